#!/usr/bin/env bash
# The main job on a machine with no NIC: the engine on DPDK virtual ports. Until the lab exists
# it runs one node on net_pcap vdevs over a committed capture of real traffic and shows what came
# out of each port.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --locked -p clonecluster
bin=target/release/clonecluster

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -c 32 /dev/urandom > "$work/secret"
fixture=$(pwd)/tests/fixtures/lab-mix.pcap
cat > "$work/node.yaml" <<YAML
cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
dataplane:
  eal_args: [--no-huge, -m, "256", --log-level=lib.eal:warning]
  file_prefix: clonecluster-demo-$$
  wire_port: { vdev: "net_pcap0,rx_pcap=$fixture,tx_pcap=$work/to-wire.pcap" }
  host_port: { vdev: "net_pcap1,rx_pcap=$fixture,tx_pcap=$work/to-host.pcap" }
  idle: adaptive
  pool_size: 4095
YAML
echo "== configuration ($bin check)"
$bin check --config "$work/node.yaml"
echo
echo "== running the engine for 2 s on net_pcap vdevs fed with $fixture"
$bin run --config "$work/node.yaml" & pid=$!
sleep 2
kill -TERM "$pid"
wait "$pid"
echo
echo "== frames delivered to the host port (first 10)"
tcpdump -r "$work/to-host.pcap" -e -n 2>/dev/null | head -10
echo
echo "== frames sent on the wire port (first 10): source MAC is now the node MAC 02:00:00:00:00:01"
tcpdump -r "$work/to-wire.pcap" -e -n 2>/dev/null | head -10
