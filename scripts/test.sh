#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (the integration tests start the
# real binary on DPDK vdevs and in network namespaces they create and remove).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# This also builds the engine binary, target/debug/clonecluster, which the lab crate's namespace
# tests (cluster_netns, af_packet_netns, lab) start: Cargo builds no binary of another package
# for a test.
cargo build --workspace --all-targets --locked
# Seams: no import cycle between the engine's modules, and no lab-only crate (plots, progress
# bars, temporary files) in the engine binary's dependencies.
python3 scripts/module-cycles.py
if cargo tree -p clonecluster -e normal --prefix none | grep -E '^(plotters|indicatif|tempfile) '; then
  echo "the engine binary depends on a lab-only crate (above): keep it in lab/" >&2
  exit 1
fi
cargo test --workspace --all-targets --locked
bash scripts/lint-docker.sh
# Every parser and the whole decision under the fuzzer, briefly (malformed frames must be
# counted and dropped, never panic).
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh
bash scripts/image-test.sh   # the image (podman), the compose lab smoke test, the systemd unit
