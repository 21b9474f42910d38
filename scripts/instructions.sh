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
# frame than on a CPU with AVX-512). Frames: the frames each received from the wire port
# (testpmd's accumulated RX-packets, the engine's wire_rx), which both print when they stop.
# On failure the logs stay in the directory the script names.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/setup.sh
if ! command -v valgrind >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq valgrind >/dev/null
fi

scenario=${1:-flows=1000,delivery=dsr}
mode=${2:-5tswap}
secs=${CC_INSN_SECS:-10}
dir=$(mktemp -d /tmp/cc-insn.XXXXXX)
# The engine under valgrind, while it runs (stopped by PID if the script ends early).
engine_pid=
cleanup() {
  local status=$?
  if [ -n "$engine_pid" ]; then kill -TERM "$engine_pid" 2>/dev/null || true; fi
  if [ "$status" = 0 ]; then
    rm -rf "$dir"
  else
    echo "instructions: failed; logs in $dir" >&2
  fi
}
trap cleanup EXIT
fail() {
  echo "instructions: $1" >&2
  [ -f "${2:-}" ] && tail -20 "$2" >&2
  exit 1
}

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

# testpmd for $1 seconds: writes "instructions frames" to $dir/testpmd-$1.count.
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
  local frames instructions
  frames=$(grep -A2 'Accumulated forward statistics' "$out.log" | sed -n 's/.*RX-packets: *\([0-9]*\).*/\1/p' | head -1 || true)
  instructions=$(total "$out.cg" || true)
  [ -n "$frames" ] && [ -n "$instructions" ] || fail "testpmd printed no frame count or callgrind no total" "$out.log"
  echo "$instructions $frames" >"$out.count"
}

# The engine for $1 seconds of forwarding: writes "instructions frames" to
# $dir/engine-$1.count.
engine_run() {
  local out="$dir/engine-$1"
  (cd "$dir" && exec valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
    "$root/target/release/clonecluster" run --config "$config" \
    >"$out.log" 2>&1) &
  engine_pid=$!
  # Forwarding starts when the data plane logs its cores (start-up under valgrind: seconds).
  local started=
  for _ in $(seq 1 600); do
    if grep -q 'running on cores' "$out.log" 2>/dev/null; then started=1; break; fi
    kill -0 "$engine_pid" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$started" ] || fail "the engine did not start forwarding" "$out.log"
  sleep "$1"
  kill -TERM "$engine_pid"
  wait "$engine_pid" || true
  engine_pid=
  local frames instructions
  frames=$(sed -n 's/^total: wire_rx=\([0-9]*\) .*/\1/p' "$out.log")
  instructions=$(total "$out.cg" || true)
  [ -n "$frames" ] && [ -n "$instructions" ] || fail "the engine printed no frame count or callgrind no total" "$out.log"
  echo "$instructions $frames" >"$out.count"
}

# Instructions per frame from two runs' "instructions frames" (the longer one second).
per_frame() {
  local a b c d
  read -r a b <"$1"
  read -r c d <"$2"
  [ "$d" -gt "$b" ] || fail "the longer run counted no more frames ($b, then $d)"
  python3 -c "import sys; a,b,c,d=map(int,sys.argv[1:]); print(round((c-a)/(d-b),1))" "$a" "$b" "$c" "$d"
}
frames() { echo $(($(cut -d' ' -f2 "$2") - $(cut -d' ' -f2 "$1"))); }

echo "instructions: testpmd $mode, ${secs} s and $((3 * secs)) s under callgrind" >&2
testpmd_run "$secs"
testpmd_run $((3 * secs))
echo "instructions: the engine, ${secs} s and $((3 * secs)) s under callgrind" >&2
engine_run "$secs"
engine_run $((3 * secs))
tp=$(per_frame "$dir/testpmd-$secs.count" "$dir/testpmd-$((3 * secs)).count")
en=$(per_frame "$dir/engine-$secs.count" "$dir/engine-$((3 * secs)).count")
echo "scenario $scenario: instructions per frame (callgrind, difference of two runs):"
echo "  testpmd $mode: $tp  ($(frames "$dir/testpmd-$secs.count" "$dir/testpmd-$((3 * secs)).count") frames)"
echo "  clonecluster:  $en  ($(frames "$dir/engine-$secs.count" "$dir/engine-$((3 * secs)).count") frames)"
python3 -c "import sys; t,e=map(float,sys.argv[1:]); print(f'  engine / testpmd in frames per instruction: {t/e:.3f} (the bench: in frames per CPU second)')" "$tp" "$en"
