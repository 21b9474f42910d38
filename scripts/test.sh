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
cargo test --workspace --all-targets --locked
bash scripts/lint-docker.sh
# Every parser and the whole decision under the fuzzer, briefly (malformed frames must be
# counted and dropped, never panic).
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh
