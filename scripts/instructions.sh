#!/usr/bin/env bash
# Instructions per frame of the engine and of dpdk-testpmd on the same input, counted by
# valgrind's callgrind: a figure the noise of a shared VM cannot move, to set beside the
# pipeline bench's cycles (which it explains: on the Intel VM the two ratios agree within a few
# percent). Not part of the test suite; the performance section of README.md quotes it.
#
#   bash scripts/instructions.sh [scenario] [testpmd mode]
#
# `scenario` is one of the pipeline bench's (default `flows=1000,delivery=dsr`; see
# benches/pipeline.rs); the mode defaults to 5tswap. The bench writes the scenario's capture
# and the engine's configuration; then each program runs twice under callgrind, for
# CC_INSN_SECS and 3 x CC_INSN_SECS seconds of forwarding (default 10), and the difference of
# the two runs' instructions over the difference of their frames leaves out start-up and exit.
# Under valgrind the CPU has no AVX-512: the engine hashes with AVX2 (~10 more instructions per
# frame than on a CPU with AVX-512). Frames: testpmd's forwarded-frame total, the engine's
# received wire frames; both print them when they stop.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/setup.sh
if ! command -v valgrind >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi

scenario=${1:-flows=1000,delivery=dsr}
mode=${2:-5tswap}
secs=${CC_INSN_SECS:-10}
dir=$(mktemp -d /tmp/cc-insn.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

echo "instructions: writing the files of '$scenario' (one short engine run of the bench)" >&2
CC_BENCH_DIR="$dir" CC_BENCH_TESTPMD=none CC_BENCH_SECS=1 CC_BENCH_ROUNDS=1 \
  CC_BENCH_SCENARIOS="$scenario" cargo bench -p clonecluster --bench pipeline --locked \
  >"$dir/bench.log" 2>&1 || { cat "$dir/bench.log" >&2; exit 1; }

config="$dir/bench.yaml"
# The files and sizes the engine's configuration names, for testpmd to take the same.
vdev=$(sed -n 's/^ *wire_port: { vdev: "\(.*\)" }$/\1/p' "$config")
pool=$(sed -n 's/^ *pool_size: \([0-9]*\)$/\1/p' "$config")
mbuf=$(sed -n 's/^ *mbuf_size: \([0-9]*\)$/\1/p' "$config")
case "$vdev" in
  net_pcap*) ;;
  *) echo "instructions: only net_pcap inputs (this scenario's wire port: $vdev)" >&2; exit 1 ;;
esac
topology=()
grep -q '^services:' "$config" && topology=(--port-topology=loop)

# Total instructions in a callgrind output file.
total() { sed -n 's/^totals: \([0-9]*\)$/\1/p' "$1" | head -1; }

# testpmd for $1 seconds: prints "instructions frames".
testpmd_run() {
  local out="$dir/testpmd-$1"
  # testpmd without -i forwards until its standard input closes.
  (sleep "$1"; sleep 8) | valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
    dpdk-testpmd --no-huge -m 512 --no-pci --log-level=lib.eal:warning \
    --file-prefix="cc-insn-testpmd-$$" --vdev="$vdev" --vdev=net_null1,no-rx=1 \
    --lcores=0@0,1@1 --main-lcore 0 -- --total-num-mbufs=$((pool + 1)) --mbuf-size="$mbuf" \
    --forward-mode="$mode" "${topology[@]}" --nb-cores=1 --auto-start --stats-period=0 \
    >"$out.log" 2>&1
  # The accumulated statistics come last: their RX total.
  local frames
  frames=$(grep -A2 'Accumulated forward statistics' "$out.log" | sed -n 's/.*RX-packets: *\([0-9]*\).*/\1/p' | head -1)
  echo "$(total "$out.cg") $frames"
}

# The engine for $1 seconds of forwarding: prints "instructions frames".
engine_run() {
  local out="$dir/engine-$1"
  (cd "$dir" && exec valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
    "$root/target/release/clonecluster" run --config "$config" \
    >"$out.log" 2>&1) &
  local pid=$!
  pids+=("$pid")
  # Forwarding starts when the data plane logs its cores.
  for _ in $(seq 1 600); do
    grep -q 'running on cores' "$out.log" 2>/dev/null && break
    sleep 0.2
  done
  sleep "$1"
  kill -TERM "$pid"
  wait "$pid" || true
  local frames
  frames=$(sed -n 's/^total: wire_rx=\([0-9]*\) .*/\1/p' "$out.log")
  echo "$(total "$out.cg") $frames"
}

per_frame() { python3 -c "import sys; a,b,c,d=map(int,sys.argv[1:]); print(round((c-a)/(d-b),1))" "$@"; }

echo "instructions: testpmd $mode, ${secs} s and $((3 * secs)) s under callgrind" >&2
read -r t1 tf1 < <(testpmd_run "$secs")
read -r t2 tf2 < <(testpmd_run $((3 * secs)))
echo "instructions: the engine, ${secs} s and $((3 * secs)) s under callgrind" >&2
read -r e1 ef1 < <(engine_run "$secs")
read -r e2 ef2 < <(engine_run $((3 * secs)))
tp=$(per_frame "$t1" "$tf1" "$t2" "$tf2")
en=$(per_frame "$e1" "$ef1" "$e2" "$ef2")
echo "scenario $scenario: instructions per frame (callgrind, difference of two runs):"
echo "  testpmd $mode: $tp  ($((tf2 - tf1)) frames)"
echo "  clonecluster:  $en  ($((ef2 - ef1)) frames)"
python3 -c "import sys; t,e=map(float,sys.argv[1:]); print(f'  engine / testpmd in frames per instruction: {t/e:.3f} (the bench: in frames per CPU second)')" "$tp" "$en"
