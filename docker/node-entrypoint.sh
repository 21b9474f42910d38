#!/usr/bin/env bash
# A lab node in a container: keep the kernel silent on the shared segment (eth0), start the
# engine, give the tap the cluster address, serve nginx on it. SIGTERM drains the engine first.
set -euo pipefail
config=${1:-/etc/clonecluster/node.yaml}
cluster_ip=${CLUSTER_IP:-198.18.0.1}

# The wire port is eth0 (the lab configs say iface=eth0), but neither Docker nor podman promises
# which network becomes eth0: the segment is the one with an address in the cluster's /24; if
# that is another interface, the two swap names.
wire=$(ip -o -4 addr show | awk -v net="${cluster_ip%.*}." 'index($4, net) == 1 {print $2; exit}')
if [ -n "$wire" ] && [ "$wire" != eth0 ]; then
  ip link set eth0 down && ip link set "$wire" down
  ip link set eth0 name ccswap0 && ip link set "$wire" name eth0 && ip link set ccswap0 name "$wire"
  ip link set eth0 up && ip link set "$wire" up
fi
ip link set eth0 arp off
# compose.yaml sets these (`sysctls:`; /proc/sys is read-only inside a container); a
# privileged container may set them itself. Refuse to start with IPv6 on: the kernel would
# answer neighbour discovery on the shared segment.
sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
if [ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || echo 1)" != 1 ]; then
  echo "node-entrypoint: IPv6 is on; start the container with" \
       "--sysctl net.ipv6.conf.all.disable_ipv6=1 (compose.yaml does)" >&2
  exit 1
fi
ethtool -K eth0 tso off gso off gro off tx off >/dev/null
ip addr flush dev eth0   # the segment address Docker assigned must not answer for itself

clonecluster check --config "$config" >/dev/null
clonecluster run --config "$config" &
engine=$!
trap 'kill -TERM $engine; wait $engine' TERM INT
for _ in $(seq 1 100); do ip link show cc0 >/dev/null 2>&1 && break; sleep 0.1; done
ethtool -K cc0 tx off >/dev/null
ip addr add "$cluster_ip/24" dev cc0
ip link set cc0 up
mkdir -p /var/www/html && echo "${HOSTNAME}" > /var/www/html/id
nginx   # Debian's nginx.conf: a master and a worker per core, as a daemon
wait $engine
