#!/usr/bin/env python3
"""Hostile traffic for the flood tests: raw frames out of one interface of a test namespace.

Run only inside a namespace the test made (it sends on the interface it is given, nothing else):

  flood.py random  IFACE SECONDS DST_MAC SEED
      random frames to DST_MAC: 30 % EtherType 0x88b5 (control) with random payloads, the rest
      random IPv4, IPv6 and ARP, from random unicast source MACs.
  flood.py control IFACE SECONDS MEMBER_MACS SEED
      forged control frames (a plausible header: magic, version, kind, path; the rest random,
      so the tag never matches), half of them from the members' MACs (comma-separated), the
      other half from random MACs; plus genuine control frames captured on IFACE for up to 2 s
      first, replayed over and over (authentic, but stale: replays).
  flood.py udp     IFACE DST_IP PORT SECONDS SEED
      forged control datagrams (a plausible header on the UDP path, the rest random) to
      DST_IP:PORT, mixed with genuine ones captured on IFACE for up to 2 s first (replays).
  flood.py syn     IFACE COUNT DST_MAC DST_IP SEED
      COUNT TCP SYNs to DST_IP:80, each from a distinct spoofed source (address in
      198.18.128.0/17, 32768 of them, each with its own ports), checksums correct, as fast as
      the socket takes them.

Prints one JSON line: what was sent, by kind.
"""

import json
import random
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
CONTROL = 0x88B5


def mac(text):
    return bytes(int(x, 16) for x in text.split(":"))


def random_mac(rng):
    b = bytearray(rng.randbytes(6))
    b[0] = (b[0] & 0xFE) | 0x02  # unicast, locally administered
    return bytes(b)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def sender(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    return s


def send_for(sock, seconds, frames):
    """Sends `frames` round-robin for `seconds`; returns counts by kind."""
    counts = {}
    end = time.monotonic() + seconds
    i = 0
    while True:
        if i % 256 == 0 and time.monotonic() >= end:
            break
        kind, frame = frames[i % len(frames)]
        try:
            sock.send(frame)
        except OSError:
            # A full socket buffer: the kernel dropped it before the wire; not sent.
            i += 1
            continue
        counts[kind] = counts.get(kind, 0) + 1
        i += 1
    return counts


def random_frames(rng, dst):
    frames = []
    for _ in range(4096):
        r = rng.random()
        if r < 0.3:
            kind, etype = "control", CONTROL
        elif r < 0.6:
            kind, etype = "ipv4", 0x0800
        elif r < 0.85:
            kind, etype = "ipv6", 0x86DD
        else:
            kind, etype = "arp", 0x0806
        payload = rng.randbytes(rng.randint(0, 200))
        frame = dst + random_mac(rng) + struct.pack("!H", etype) + payload
        frames.append((kind, frame.ljust(60, b"\0")))
    return frames


def capture(iface, ethertype, seconds, pick):
    """Up to 20 frames of `ethertype` seen on `iface` within `seconds`, as `pick(frame)` gives
    them (None: not wanted)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
    s.bind((iface, 0))
    s.settimeout(0.2)
    got = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(got) < 20:
        try:
            frame = s.recv(2048)
        except socket.timeout:
            continue
        if len(frame) > 14 and frame[12:14] == struct.pack("!H", ethertype):
            wanted = pick(frame)
            if wanted is not None:
                got.append(wanted)
    s.close()
    return got


def capture_control(iface, seconds):
    return capture(iface, CONTROL, seconds, lambda frame: frame)


def control_frames(rng, members, genuine):
    frames = []
    for n in range(4096):
        if genuine and n % 4 == 0:
            frames.append(("replayed", genuine[n % len(genuine)]))
            continue
        src = members[n % len(members)] if members and n % 2 == 0 else random_mac(rng)
        kind = "forged-member" if members and n % 2 == 0 else "forged-stranger"
        # Magic "CC", version 4 or 5 (the ones a node decodes: the tag is checked), kind 1..6,
        # path 2 (wire), a plausible node id; the rest (incarnation, seq, digest, body, tag)
        # random, as long as a heartbeat, a request, a backend drain of two places, a stale
        # notice, or any.
        message = b"CC" + bytes([rng.choice([4, 5]), rng.randint(1, 6), 2, rng.randint(1, 3)])
        message += rng.randbytes(
            rng.choice(
                [63 + 24 + 16, 2 + 24 + 16, 14 + 24 + 16, 9 + 24 + 16, rng.randint(0, 300)]
            )
        )
        payload = struct.pack("!H", len(message)) + message
        frame = b"\xff" * 6 + src + struct.pack("!H", CONTROL) + payload
        frames.append((kind, frame.ljust(60, b"\0")))
    return frames


def capture_udp(iface, port, seconds):
    """Payloads of UDP datagrams to `port` seen on `iface`."""
    def payload(frame):
        ihl = (frame[14] & 0x0F) * 4
        udp = frame[14 + ihl:]
        if frame[23] == 17 and len(udp) >= 8 and struct.unpack("!H", udp[2:4])[0] == port:
            return udp[8:]
        return None

    return capture(iface, 0x0800, seconds, payload)


def udp_flood(iface, dst_ip, port, seconds, rng):
    genuine = capture_udp(iface, port, 2.0)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    counts = {"genuine-captured": len(genuine)}
    end = time.monotonic() + seconds
    n = 0
    while True:
        if n % 256 == 0 and time.monotonic() >= end:
            break
        if genuine and n % 4 == 0:
            kind, data = "replayed", genuine[n % len(genuine)]
        else:
            kind = "forged"
            data = b"CC" + bytes([rng.choice([4, 5]), rng.randint(1, 6), 1, rng.randint(1, 3)])
            data += rng.randbytes(rng.choice([63 + 24 + 16, rng.randint(0, 300)]))
        try:
            out.sendto(data, (dst_ip, port))
            counts[kind] = counts.get(kind, 0) + 1
        except OSError:
            pass
        n += 1
    return counts


def syn_flood(sock, count, dst, dst_ip, rng):
    dst_ip = socket.inet_aton(dst_ip)
    # One attacker host spoofing many addresses: one source MAC (the switch learns one).
    attacker = random_mac(rng)
    sent = 0
    for n in range(count):
        # 32768 addresses in 198.18.128.0/17, each with its own ports: n distinct flows.
        host = n % 32768
        src_ip = bytes([198, 18, 128 + host // 256, host % 256])
        sport = 1024 + n // 32768
        seq = rng.getrandbits(32)
        tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), n & 0xFFFF, 0x4000, 64, 6, 0,
                         src_ip, dst_ip)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        frame = dst + attacker + struct.pack("!H", 0x0800) + ip + tcp
        try:
            sock.send(frame.ljust(60, b"\0"))
            sent += 1
        except OSError:
            pass
    return {"syn": sent}


def main(argv):
    what, iface = argv[1], argv[2]
    sock = sender(iface)
    start = time.monotonic()
    if what == "random":
        seconds, dst, seed = float(argv[3]), mac(argv[4]), int(argv[5])
        counts = send_for(sock, seconds, random_frames(random.Random(seed), dst))
    elif what == "control":
        seconds, seed = float(argv[3]), int(argv[5])
        members = [mac(m) for m in argv[4].split(",") if m]
        genuine = capture_control(iface, 2.0)
        counts = send_for(sock, seconds, control_frames(random.Random(seed), members, genuine))
        counts["genuine-captured"] = len(genuine)
    elif what == "udp":
        dst_ip, port, seconds, seed = argv[3], int(argv[4]), float(argv[5]), int(argv[6])
        counts = udp_flood(iface, dst_ip, port, seconds, random.Random(seed))
    elif what == "syn":
        count, dst, dst_ip, seed = int(argv[3]), mac(argv[4]), argv[5], int(argv[6])
        counts = syn_flood(sock, count, dst, dst_ip, random.Random(seed))
    else:
        sys.exit("flood.py: random, control, udp or syn (see the docstring)")
    counts["seconds"] = round(time.monotonic() - start, 2)
    print(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv)
