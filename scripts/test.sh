#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (the integration tests start the
# real binary on DPDK vdevs and in network namespaces they create and remove).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --all-targets --locked
bash scripts/lint-docker.sh
# Every parser and the whole decision under the fuzzer, briefly (malformed frames must be
# counted and dropped, never panic).
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash scripts/fuzz.sh
bash scripts/image-test.sh   # the image (podman), the compose lab smoke test, the systemd unit
