#!/usr/bin/env bash
# Tests conf/clonecluster@.service on a machine where systemd may not be PID 1:
#  1. `systemd-analyze verify` on the unit, installed in a scratch root with the binary;
#  2. its Exec* command lines, as systemd would run them for instance `node1` (the binary and
#     /etc/clonecluster/ mapped to this build and a scratch directory), against a real engine
#     in a network namespace: af_packet wire port, tap host port, --no-huge. ExecStartPre must
#     pass; ExecStart must serve (a client in a second namespace fetches a page from the cluster
#     address); ExecStartPost, if any, must pass; ExecReload must apply a weight change; ExecStop,
#     or else KillSignal, must drain and stop the node with status 0 within TimeoutStopSec.
# Addresses: 198.18.0.0/24 (segment) and 198.19.0.1 (control) inside the namespaces only.
# Run by scripts/image-test.sh; needs root. CLONECLUSTER_BIN overrides the binary.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
unit=conf/clonecluster@.service
bin=${CLONECLUSTER_BIN:-$PWD/target/debug/clonecluster}
tag=ccunit$$
node_ns=$tag-node client_ns=$tag-cli
work=$(mktemp -d /tmp/clonecluster-unit.XXXXXX)
step="preparing"
engine=
server=

cleanup() {
  trap - ERR
  [ -n "$server" ] && kill "$server" 2>/dev/null
  [ -n "$engine" ] && kill -KILL "$engine" 2>/dev/null
  ip netns del "$node_ns" 2>/dev/null
  ip netns del "$client_ns" 2>/dev/null
  rm -rf "$work"
  return 0
}
fail() {
  trap - ERR
  echo "unit-test: stopped at $step: $*" >&2
  [ -f "$work/engine.log" ] && tail -n 5 "$work/engine.log" | sed 's/^/  engine: /' >&2
  exit 1
}
trap cleanup EXIT
# (in a command substitution, only that substitution ends: the line that used it says why)
trap 'rc=$?; [ "$BASH_SUBSHELL" = 0 ] || exit "$rc"; fail "\`$BASH_COMMAND\` failed (exit $rc)"' ERR

step="building the binary"
if [ -z "${CLONECLUSTER_BIN:-}" ]; then cargo build -q --locked -p clonecluster; fi
[ -x "$bin" ] || fail "no binary at $bin"
if ! command -v systemd-analyze >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

step="systemd-analyze verify"
root=$work/root
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"   # the targets the unit refers to
cp "$bin" "$root/usr/local/bin/clonecluster"
cp "$unit" "$root/etc/systemd/system/"
verify=$(systemd-analyze verify --root="$root" clonecluster@node1.service 2>&1) \
  || fail "$verify"
[ -z "$verify" ] || fail "$verify"   # warnings (unknown keys, bad values) fail the test too

# The unit's command lines for instance node1, one "Key<TAB>command" per line, with systemd's
# prefixes (-@:+!) dropped and the paths mapped to this test.
exec_lines() {
  sed -n 's/^\(Exec[A-Za-z]*\)=[-@:+!]*\(.*\)$/\1\t\2/p' "$unit" \
    | sed -e "s|%[iI]|node1|g" -e "s|/usr/local/bin/clonecluster|$bin|g" \
          -e "s|/etc/clonecluster/|$work/etc/|g"
}
unit_value() { sed -n "s/^$1=//p" "$unit" | tail -n 1; }
# Runs every command line of `key` in the node's namespace; each must succeed.
run_exec() {
  local key=$1 cmd
  while IFS=$'\t' read -r k cmd; do
    [ "$k" = "$key" ] || continue
    # shellcheck disable=SC2086  # systemd splits the line into words the same way here
    ip netns exec "$node_ns" $cmd >>"$work/commands.log" 2>&1 \
      || fail "$key \`$cmd\` failed: $(tail -n 2 "$work/commands.log")"
    echo "  $key ok" >&2
    ran=$((ran + 1))
  done < <(exec_lines)
}

step="making the namespaces"
ip netns add "$node_ns"
ip netns add "$client_ns"
ip link add "${tag}a" type veth peer name "${tag}b"
ip link set "${tag}a" netns "$node_ns" name eth0
ip link set "${tag}b" netns "$client_ns" name eth0
ip -n "$node_ns" link set lo up
ip -n "$node_ns" link set eth0 arp off up
ip -n "$node_ns" addr add 198.19.0.1/32 dev lo   # control.listen (no peers here)
ip netns exec "$node_ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
  net.ipv6.conf.default.disable_ipv6=1
ip netns exec "$node_ns" ethtool -K eth0 tso off gso off gro off tx off >/dev/null
ip -n "$client_ns" link set lo up
ip netns exec "$client_ns" ethtool -K eth0 tx off >/dev/null   # full checksums on the wire
ip -n "$client_ns" addr add 198.18.0.100/24 dev eth0
ip -n "$client_ns" link set eth0 up

mkdir -p "$work/etc"
head -c 32 /dev/urandom > "$work/etc/secret"
cat > "$work/etc/node1.yaml" <<EOF
cluster:
  ip: 198.18.0.1
  mac: 02:cc:00:00:00:01
  secret_file: secret
node:
  id: 1
  mac: 02:00:00:00:00:01
  weight: 100
control:
  listen: 198.19.0.1:7946
  peers: []
  socket: $work/node1.sock
  drain_deadline: 5s
dataplane:
  eal_args: [--no-huge, -m, "160", --log-level=lib.eal:warning]
  file_prefix: $tag
  wire_port: { vdev: "net_af_packet0,iface=eth0" }
  host_port: { vdev: "net_tap0,iface=cc0" }
  idle: adaptive
  pool_size: 4095
  rx_descriptors: 512
  tx_descriptors: 512
EOF
ran=0

step="ExecStartPre"
run_exec ExecStartPre

step="ExecStart"
start=$(exec_lines | sed -n 's/^ExecStart\t//p')
[ -n "$start" ] || fail "the unit has no ExecStart"
# shellcheck disable=SC2086
ip netns exec "$node_ns" $start >"$work/engine.log" 2>&1 &
engine=$!
for _ in $(seq 1 100); do
  ip -n "$node_ns" link show cc0 >/dev/null 2>&1 && break
  kill -0 "$engine" 2>/dev/null || fail "the engine exited at start"
  sleep 0.1
done
ip -n "$node_ns" link show cc0 >/dev/null 2>&1 || fail "the engine made no cc0 tap in 10 s"
echo "  ExecStart ok" >&2
ran=$((ran + 1))

step="ExecStartPost"
run_exec ExecStartPost
# What README "A real host" step 5 does once the engine runs (the unit leaves it to the host).
ip netns exec "$node_ns" ethtool -K cc0 tx off >/dev/null
ip -n "$node_ns" addr add 198.18.0.1/24 dev cc0
ip -n "$node_ns" link set cc0 up
mkdir -p "$work/www" && echo node1 > "$work/www/id"
ip netns exec "$node_ns" python3 -m http.server -b 198.18.0.1 -d "$work/www" 80 \
  >/dev/null 2>&1 &
server=$!

step="serving through the engine"
served=
for _ in $(seq 1 20); do
  if [ "$(ip netns exec "$client_ns" curl -s -m 1 http://198.18.0.1/id)" = node1 ]; then
    served=1 && break
  fi
  sleep 0.2
done
[ -n "$served" ] || fail "the client got no page from 198.18.0.1 in 20 tries"

step="ExecReload"
# A live key (node.weight) is applied; the node answers with what it applied and logs it.
sed -i 's/weight: 100/weight: 150/' "$work/etc/node1.yaml"
: > "$work/commands.log"
run_exec ExecReload
grep -q 'reload: applied node.weight' "$work/commands.log" \
  || fail "ExecReload did not apply node.weight: $(tail -n 1 "$work/commands.log")"
grep -q "reload: weight changed from=100 to=150" "$work/engine.log" \
  || fail "the engine's log does not show the weight change"
# A key that needs a restart is refused, and the command fails (systemctl reload reports it).
sed -i 's/drain_deadline: 5s/drain_deadline: 6s/' "$work/etc/node1.yaml"
refused=$(exec_lines | sed -n 's/^ExecReload\t//p' | head -n 1)
# shellcheck disable=SC2086
if ip netns exec "$node_ns" $refused >/dev/null 2>&1; then
  fail "ExecReload accepted a change of control.drain_deadline"
fi
sed -i 's/drain_deadline: 6s/drain_deadline: 5s/' "$work/etc/node1.yaml"

step="stopping"
timeout=$(unit_value TimeoutStopSec); timeout=${timeout:-90}
if exec_lines | grep -q '^ExecStop'$'\t'; then
  run_exec ExecStop
else
  signal=$(unit_value KillSignal); signal=${signal:-SIGTERM}
  kill -s "${signal#SIG}" "$engine"
  echo "  KillSignal $signal sent" >&2
fi
waited=0
while kill -0 "$engine" 2>/dev/null && [ "$waited" -lt "$((timeout * 10))" ]; do
  sleep 0.1; waited=$((waited + 1))
done
kill -0 "$engine" 2>/dev/null && fail "the engine still runs ${timeout} s (TimeoutStopSec) after the stop"
status=0; wait "$engine" || status=$?
engine=
[ "$status" = 0 ] || fail "the engine exited with status $status"
grep -q "draining" "$work/engine.log" || fail "the engine's log has no drain before it stopped"

echo "systemd unit: verify clean; $ran commands ran against an engine in a namespace" \
     "(served, ExecReload applied weight 100 -> 150 and refused a restart-only key, drained and stopped in $((waited / 10)).$((waited % 10)) s)"
