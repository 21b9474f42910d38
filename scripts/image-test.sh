#!/usr/bin/env bash
# Builds the real docker/Dockerfile with podman and runs the compose lab's smoke test, as root on
# a Debian 12 machine with no Docker daemon and no Docker Hub:
#  - podman (runc, the ulimits this machine allows) and debootstrap are installed when missing;
#    debian:12-slim is made from Debian's mirror with debootstrap (the rootfs tarball is cached
#    in /var/cache/clonecluster-image) when podman has no such image;
#  - crates are vendored into the build context (.vendor/, removed afterwards): a builder behind
#    an intercepting proxy cannot reach crates.io;
#  - the lab of docker/compose.yaml (its networks, addresses, MACs, capabilities, sysctls and
#    volumes, read from the file) runs with plain podman (podman-compose 1.0.3 ignores static
#    addresses): two engine nodes with nginx and a client on one segment. Requests reach both
#    nodes through the cluster address; stopping node 2 (SIGTERM: it drains first) loses none;
#    killing it (SIGKILL) loses only the connections node 2 was serving.
# Also runs scripts/unit-test.sh (the systemd unit) first. Everything it makes is named
# cc-imagetest-* (containers, networks) or localhost/clonecluster-imagetest (images) and removed
# on exit; IMAGE_TEST_KEEP=1 keeps the images (a rebuild then comes from the layer cache).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
prefix=cc-imagetest
image=localhost/clonecluster-imagetest
cache=${IMAGE_TEST_CACHE:-/var/cache/clonecluster-image}
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
  2>/dev/null | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
step="starting"
made_base=
t0=$(date +%s)

cleanup() {
  trap - ERR
  local c n
  for c in client node1 node2; do podman rm -f -t 0 "$prefix-$c" >/dev/null 2>&1; done
  # A removed network may leave its bridge behind (seen here: `podman2` holding the control
  # subnet, so that the next run could not create its network): remove it by name.
  local br
  for n in segment control; do
    br=$(podman network inspect --format '{{.NetworkInterface}}' "$prefix-$n" 2>/dev/null || true)
    podman network rm -f "$prefix-$n" >/dev/null 2>&1
    if [ -n "$br" ]; then ip link del "$br" >/dev/null 2>&1 || true; fi
  done
  if [ -z "${IMAGE_TEST_KEEP:-}" ]; then
    podman rmi -f "$image:lab" "$image:node" >/dev/null 2>&1
    # The build stage's untagged layers (and those of a failed build): the images this run
    # made that no tag names, newest first (removing one removes its untagged parents).
    local id
    for id in $(podman images -a -q --no-trunc 2>/dev/null); do
      grep -qx "$id" "$images_before" 2>/dev/null && continue
      [ "$(podman image inspect --format '{{len .RepoTags}}' "$id" 2>/dev/null)" = 0 ] \
        && podman rmi "$id" >/dev/null 2>&1
    done
    [ -n "$made_base" ] && podman rmi -f docker.io/library/debian:12-slim >/dev/null 2>&1
  fi
  rm -rf .vendor "${work:-}" "${images_before:-}" "${rootfs:-}"
  return 0
}
fail() {
  trap - ERR
  # The containers' logs, for a failure after the lab started.
  local c logs=lab-out/image-test
  if podman container exists "$prefix-node1" 2>/dev/null; then
    mkdir -p "$logs"
    for c in node1 node2; do podman logs "$prefix-$c" >"$logs/$c.log" 2>&1 || true; done
    set -- "$@" "(node logs in $logs/)"
  fi
  echo "image-test: stopped at $step: $*" >&2
  exit 1
}
trap cleanup EXIT
# (in a command substitution, only that substitution ends: the line that used it says why)
trap 'rc=$?; [ "$BASH_SUBSHELL" = 0 ] || exit "$rc"; fail "\`$BASH_COMMAND\` failed (exit $rc)"' ERR
elapsed() { echo "$(( $(date +%s) - $1 ))"; }

step="the systemd unit test"
bash scripts/unit-test.sh || fail "scripts/unit-test.sh failed (its line above says why)"

step="preparing podman"
need=()
for p in podman runc debootstrap python3-yaml; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Podman's default ulimits exceed what these machines allow ("setrlimit RLIMIT_NOFILE:
# Operation not permitted"), and crun refuses their hybrid cgroup layout: runc instead.
conf=/etc/containers/containers.conf.d/50-clonecluster.conf
if [ ! -f "$conf" ]; then
  mkdir -p "$(dirname "$conf")"
  printf '%s\n' '[containers]' 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
    '[engine]' 'runtime = "runc"' > "$conf"
fi
podman info >/dev/null 2>&1 || fail "podman does not work here: $(podman info 2>&1 | tail -n 1)"

images_before=$(mktemp /tmp/clonecluster-images.XXXXXX)
podman images -a -q --no-trunc > "$images_before"

step="making debian:12-slim"
t=$(date +%s)
if ! podman image exists docker.io/library/debian:12-slim; then
  tarball=$cache/debian-12-minbase.tar.gz
  if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX") && root=$rootfs
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
      || fail "debootstrap from $mirror failed: $(tail -n 1 "$cache/debootstrap.log")"
    # As Debian's own slim image: security and updates suites, no package lists or caches, no
    # documentation, manual pages or translations (now or from packages installed later).
    rm -f "$root/etc/apt/sources.list"
    printf '%s\n' 'Types: deb' "URIs: $mirror" 'Suites: bookworm bookworm-updates' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' '' \
      'Types: deb' "URIs: ${mirror%/debian}/debian-security" 'Suites: bookworm-security' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
      > "$root/etc/apt/sources.list.d/debian.sources"
    rm -rf "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
      "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/log/apt/*
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
      > "$root/etc/dpkg/dpkg.cfg.d/slim"
    find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
      "$root"/usr/share/lintian/*
    tar -C "$root" --numeric-owner -czf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
    rootfs=
  fi
  podman import -q --change 'CMD ["bash"]' "$tarball" docker.io/library/debian:12-slim >/dev/null
  made_base=1
fi
base_s=$(elapsed "$t")

step="vendoring the crates"
rm -rf .vendor
cargo vendor -q --locked --versioned-dirs .vendor >/dev/null

step="building the image"
t=$(date +%s)
work=$(mktemp -d /tmp/clonecluster-imagetest.XXXXXX)
# The dev profile by default: the smoke test needs a working binary, not a fast one, and the
# release build (LTO, one codegen unit) takes several minutes more on two cores.
profile=${IMAGE_TEST_PROFILE:-dev}
podman build -f docker/Dockerfile --build-arg PROFILE="$profile" --target lab -t "$image:lab" . \
  >"$work/build.log" 2>&1 \
  || fail "podman build --target lab failed: $(grep -v '^$' "$work/build.log" | tail -n 3 | tr '\n' ' ')"
podman build -f docker/Dockerfile --build-arg PROFILE="$profile" -t "$image:node" . \
  >>"$work/build.log" 2>&1 \
  || fail "podman build (node) failed: $(grep -v '^$' "$work/build.log" | tail -n 3 | tr '\n' ' ')"
build_s=$(elapsed "$t")
rm -rf .vendor
size() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }
podman run --rm --entrypoint clonecluster "$image:node" --version >/dev/null \
  || fail "the node image's binary does not start"
node_size=$(size "$image:node") lab_size=$(size "$image:lab")

step="starting the compose lab"
# docker/compose.yaml, as podman commands: networks (internal, with their subnets and gateways)
# and services (addresses, MACs, capabilities, devices, sysctls, volumes, environment).
/usr/bin/python3 - "$prefix" "$image:lab" docker/compose.yaml >"$work/lab.sh" <<'EOF'
import json, os, shlex, sys, yaml
prefix, image, path = sys.argv[1:4]
c = yaml.safe_load(open(path))
for name, net in c["networks"].items():
    ipam = net["ipam"]["config"][0]
    args = ["podman", "network", "create", "--disable-dns", "--subnet", ipam["subnet"],
            "--gateway", ipam["gateway"]]
    if net.get("internal"):
        args.append("--internal")
    print(shlex.join(args + [f"{prefix}-{name}"]) + " >/dev/null")
for name, s in c["services"].items():
    args = ["podman", "run", "-d", "--name", f"{prefix}-{name}", "--hostname", name]
    for n, a in s["networks"].items():
        opts = [f"ip={a['ipv4_address']}"] + ([f"mac={a['mac_address']}"] if "mac_address" in a else [])
        args += ["--network", f"{prefix}-{n}:" + ",".join(opts)]
    for k, v in s.get("environment", {}).items():
        args += ["-e", f"{k}={v}"]
    for k, v in s.get("sysctls", {}).items():
        args += ["--sysctl", f"{k}={v}"]
    args += [x for d in s.get("devices", []) for x in ("--device", d)]
    args += [x for cap in s.get("cap_add", []) for x in ("--cap-add", cap)]
    for v in s.get("volumes", []):
        src, rest = v.split(":", 1)
        args += ["-v", os.path.abspath(os.path.join(os.path.dirname(path), src)) + ":" + rest]
    if "stop_grace_period" in s:
        args += ["--stop-timeout", s["stop_grace_period"].rstrip("s")]
    if "entrypoint" in s:
        args += ["--entrypoint", json.dumps([a.replace("$$", "$") for a in s["entrypoint"]])]
    args.append(image)
    print(shlex.join(args) + " >/dev/null")
EOF
bash -e "$work/lab.sh" 2>"$work/lab.err" || fail "$(tail -n 1 "$work/lab.err")"

status_json() { podman exec "$prefix-node1" clonecluster status --json --config /etc/clonecluster/node.yaml; }
# Waits until node 1 sees both nodes up, each accepting buckets, and no plan under way.
both_up() {
  local i
  for i in $(seq 1 150); do
    if status_json 2>/dev/null | python3 2>/dev/null -c '
import json, sys
s = json.load(sys.stdin)
up = [m for m in s["members"] if m["state"] == "up" and m["accepting_buckets"] > 0]
sys.exit(0 if len(up) == 2 and s["phase"] == "Done" and s["moving"] == 0 else 1)'; then
      return 0
    fi
    sleep 0.2
  done
  fail "node 1 does not see both nodes up with buckets in 30 s; last log lines:" \
    "node 1: $(podman logs --tail 1 "$prefix-node1" 2>&1 | cut -c1-200 || true)" \
    "node 2: $(podman logs --tail 1 "$prefix-node2" 2>&1 | cut -c1-200 || true)"
}
# Client side: `loops` request loops, each a new connection per request, until /tmp/stop
# exists; every answer (the node's name) or "lost" is one line in /tmp/req.N.
start_requests() {
  podman exec "$prefix-client" bash -c 'rm -f /tmp/stop /tmp/req.*
    for n in 1 2; do
      (while [ ! -e /tmp/stop ]; do
         curl -s -m 5 http://198.18.0.1/id || echo "lost (curl exit $?) at $(date +%T.%N)"
       done > /tmp/req.$n) &
    done'
}
stop_requests() {
  podman exec "$prefix-client" bash -c 'touch /tmp/stop; while pgrep -x curl >/dev/null; do sleep 0.1; done
    sleep 0.2; cat /tmp/req.*' > "$work/$1"
}
count() { grep -c "^$1\( \|$\)" "$work/$2" || true; }
# How the lost requests of a phase failed (curl's exit status: 7 refused, 28 timed out, 52 or
# 56 reset, ...) and when.
how_lost() { grep '^lost' "$work/$1" | sort | uniq -c | sed 's/^ *//' | tr '\n' ';' || true; }

step="waiting for both nodes"
t=$(date +%s)
both_up
up_s=$(elapsed "$t")

step="sharing requests"
podman exec "$prefix-client" bash -c \
  'for i in $(seq 1 200); do curl -s -m 5 http://198.18.0.1/id || echo lost; done' > "$work/share"
share1=$(count node1 share) share2=$(count node2 share) share_lost=$(count lost share)
[ "$share_lost" = 0 ] || fail "$share_lost of 200 requests lost with both nodes up"
[ "$share1" -gt 0 ] && [ "$share2" -gt 0 ] \
  || fail "requests did not reach both nodes (node1 $share1, node2 $share2)"

step="stopping node 2 (SIGTERM)"
start_requests
sleep 2
stop_from=$(date +%T.%N)
podman stop -t 30 "$prefix-node2" >/dev/null
stop_to=$(date +%T.%N)
sleep 2
stop_requests stop
stop_total=$(wc -l < "$work/stop") stop_lost=$(count lost stop)
stop2=$(count node2 stop)
[ "$stop_lost" = 0 ] || fail "$stop_lost of $stop_total requests lost while node 2 drained: $(how_lost stop)" \
  "(podman stop ran from $stop_from to $stop_to)"

step="restarting node 2"
podman start "$prefix-node2" >/dev/null
both_up
# Slow downloads (nginx sends at 100 kB/s, so the connections live through the kill); the
# file's size names the node that serves it.
for n in 1 2; do
  podman exec "$prefix-node$n" sh -c "head -c 40000$((n - 1)) /dev/zero > /var/www/html/big
    echo 'limit_rate 100k;' > /etc/nginx/conf.d/slow.conf && nginx -s reload 2>/dev/null"
done

step="killing node 2 (SIGKILL)"
podman exec "$prefix-client" bash -c 'rm -f /tmp/dl.*; for n in 1 2 3 4 5 6 7 8; do
    (curl -s -m 30 -o /dev/null -w "%{http_code} %header{content-length} %{size_download}" \
       http://198.18.0.1/big; echo " $?") > /tmp/dl.$n 2>&1 &
  done'
start_requests
sleep 1.5
podman kill -s KILL "$prefix-node2" >/dev/null
sleep 3
stop_requests kill
podman exec "$prefix-client" bash -c 'while pgrep -x curl >/dev/null; do sleep 0.2; done; cat /tmp/dl.*' \
  > "$work/downloads"
kill_total=$(wc -l < "$work/kill") kill_lost=$(count lost kill)
# "code content-length size exit" per download.
dl1=$(awk '$2 == 400000' "$work/downloads" | wc -l)
dl1_ok=$(awk '$2 == 400000 && $3 == 400000 && $4 == 0' "$work/downloads" | wc -l)
dl2=$(awk '$2 == 400001' "$work/downloads" | wc -l)
dl2_cut=$(awk '$2 == 400001 && $4 != 0' "$work/downloads" | wc -l)
[ "$dl1_ok" = "$dl1" ] || fail "$((dl1 - dl1_ok)) of node 1's $dl1 downloads broke when node 2 was killed"
[ "$((dl1 + dl2))" = 8 ] || fail "downloads without an answer: $(tr '\n' ';' < "$work/downloads")"
# Only requests in flight on node 2 at the kill may be lost: at most one per request loop.
[ "$kill_lost" -le 2 ] \
  || fail "$kill_lost of $kill_total requests lost when node 2 was killed (more than were in flight): $(how_lost kill)"

step="cleaning up"
trap - ERR
cleanup
echo "image ($profile profile): node $node_size, lab $lab_size; built in ${build_s} s" \
     "(base image ${base_s} s)"
echo "compose lab: both nodes up ${up_s} s after start; 200 requests: node1 $share1, node2 $share2, lost 0"
echo "  node 2 stopped (SIGTERM, drain first): $stop_total requests, node 2 served $stop2, lost $stop_lost"
echo "  node 2 killed (SIGKILL): $kill_total requests, lost $kill_lost; slow downloads: node 1" \
     "$dl1_ok of $dl1 complete, node 2 $dl2_cut of $dl2 cut"
echo "image test: $(elapsed "$t0") s in all"
