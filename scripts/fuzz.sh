#!/usr/bin/env bash
# Runs every fuzz target for a short, bounded time (FUZZ_SECONDS each, default 20), seeded with
# the frames of the committed lab capture. Needs cargo-fuzz; the machine has only a stable
# toolchain, hence RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-20}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz@0.13.1 >/dev/null
fi
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
# Seed corpus: every frame of the lab capture, one file each (python3 is on Debian's base).
python3 - "$corpus" tests/fixtures/lab-mix.pcap <<'PY'
import struct, sys, os
out, path = sys.argv[1], sys.argv[2]
data = open(path, 'rb').read()
off, n = 24, 0
while off + 16 <= len(data):
    incl = struct.unpack('<I', data[off + 8:off + 12])[0]
    frame = data[off + 16:off + 16 + incl]
    for t in ('wire_parsers', 'parse_l2_l4', 'decision'):
        os.makedirs(os.path.join(out, t), exist_ok=True)
        prefix = b'\x80' if t == 'decision' else (b'\x00' if t == 'wire_parsers' else b'')
        open(os.path.join(out, t, '%05d' % n), 'wb').write(prefix + frame)
    # The decision target's appliance node (mode bit 6) gets every frame too.
    open(os.path.join(out, 'decision', 'a%05d' % n), 'wb').write(b'\xc0' + frame)
    off += 16 + incl
    n += 1
# And a UDP datagram without DF, with an option, too big for the fuzz services' GUE tunnel
# (198.18.0.2 port 53, mtu 1280): the decision cuts it into pieces.
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
udp = struct.pack('!HHHH', 40000, 53, 8 + 1400, 0) + bytes(range(256)) * 5 + bytes(120)
ip = struct.pack('!BBHHHBBH4s4s', 0x46, 0, 24 + len(udp), 7, 0, 64, 17, 0,
                 bytes([198, 18, 7, 1]), bytes([198, 18, 0, 2])) + bytes([130, 3, 0, 0])
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
frame = bytes.fromhex('02cc00000001' '020000000064' '0800') + ip + udp
# (The mode byte mod 3 makes the pipeline node 1, 2 or 3 of the fuzz cluster, and one of them
# owns the flow: a seed for each.)
for mode in (0xc0, 0xc1, 0xc2):
    open(os.path.join(out, 'decision', 'cut%02x' % mode), 'wb').write(bytes([mode]) + frame)
PY
for target in wire_parsers parse_l2_l4 decision; do
  echo "fuzz: $target for ${seconds}s" >&2
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "$corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -3
done
