#!/usr/bin/env bash
# The main job on a machine with no NIC: the lab. A learning bridge, a client and engine nodes
# in network namespaces, nginx behind each engine; wrk ramps against 1 node, 2 nodes `hash`,
# 2 nodes `by-load` and, on the same topology, the kernel-only clone cluster (nftables) of 1
# and 2 nodes, and 1 node with testpmd io in the engine's place (the ports' ceiling); then the
# failover (kill -9), wire-cut (wire port down), join and drain scenarios under load. The report and plots
# land in lab-out/. Then appliance mode: 3 backends behind one backend alone, the kernel
# director (nftables), HAProxy and 1 and 2 engine appliances, the same ramp in shorter steps,
# and an appliance killed, its wire cut, an appliance joining, a backend killed, a backend
# drained and the director killed under load; its report lands in lab-out/appliance/. A short
# run: about 6 minutes on 2 cores, the build included.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The engine and the lab are built side by side: the lab runs target/release/clonecluster.
cargo build --release --locked -p clonecluster -p clonecluster-lab
target/release/clonecluster-lab lab --nodes 2 --clients 10,50,100,200,300 --duration 2 \
  --scenario ramp,failover,wire-cut,join,drain --baseline kernel,testpmd --out lab-out
target/release/clonecluster-lab lab --mode appliance --nodes 2 --backends 3 \
  --clients 10,50,100,200 --duration 2 \
  --scenario ramp,appliance-kill,appliance-wire-cut,appliance-join,backend-kill,backend-drain,director-kill \
  --out lab-out/appliance
