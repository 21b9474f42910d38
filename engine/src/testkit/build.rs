//! Synthetic frames towards the cluster address (the lab's: 198.18.0.1, 2001:2::1, MAC
//! 02:cc:00:00:00:01), with every checksum filled in, for tests and benches that need many
//! frames or frames of a given flow.

/// The cluster MAC of the tests, benches and lab.
pub const CLUSTER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 1];
/// The cluster IPv4 address.
pub const CLUSTER_IP: [u8; 4] = [198, 18, 0, 1];
/// The cluster IPv6 address, 2001:2::1.
pub const CLUSTER_IP6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// TCP flags.
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const PSH_ACK: u8 = 0x18;

/// The Internet checksum (RFC 1071) over `parts` as one buffer (each part of even length but
/// the last, as headers are).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [b] = chunks.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet header.
pub fn ethernet(src: [u8; 6], dst: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(80);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// Ethernet (from `mac` to the cluster MAC) + IPv4 from `src` to the cluster address (DF, TTL
/// 64, ident 0x1234) + the L4 header and payload `l4`, whose checksum at offset `csum_at` (if
/// any) is filled in under the pseudo-header.
pub fn ipv4(
    mac: [u8; 6],
    src: [u8; 4],
    proto: u8,
    l4: &mut [u8],
    csum_at: Option<usize>,
) -> Vec<u8> {
    let mut f = ethernet(mac, CLUSTER_MAC, 0x0800);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&CLUSTER_IP);
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    if let Some(at) = csum_at {
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src);
        pseudo[4..8].copy_from_slice(&CLUSTER_IP);
        pseudo[9] = proto;
        pseudo[10..12].copy_from_slice(&(l4.len() as u16).to_be_bytes());
        let c = checksum(&[&pseudo, l4]);
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// Ethernet + IPv6 from `src` to the cluster address (hop limit 64) + `l4`, whose checksum at
/// offset `csum_at` is filled in under the pseudo-header.
pub fn ipv6(mac: [u8; 6], src: [u8; 16], proto: u8, l4: &mut [u8], csum_at: usize) -> Vec<u8> {
    let mut f = ethernet(mac, CLUSTER_MAC, 0x86dd);
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
    ip[6] = proto;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src);
    ip[24..40].copy_from_slice(&CLUSTER_IP6);
    let mut pseudo = [0u8; 40];
    pseudo[0..16].copy_from_slice(&src);
    pseudo[16..32].copy_from_slice(&CLUSTER_IP6);
    pseudo[32..36].copy_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo[39] = proto;
    let c = checksum(&[&pseudo, l4]);
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A TCP header (to port 80, window 64240, checksum zero) and `payload`; the checksum sits at
/// offset 16.
pub fn tcp(sport: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

/// A UDP header (to port 53, checksum zero) and `payload`; the checksum sits at offset 6.
pub fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0u8; 8];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&53u16.to_be_bytes());
    u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(payload);
    u
}

/// A TCP SYN from `src:sport` (MAC 02:00:00:00:00:64) to the cluster address, port 80, with
/// valid IPv4 and TCP checksums.
pub fn syn(src: [u8; 4], sport: u16) -> Vec<u8> {
    let mut t = tcp(sport, 0x1234_5678, 0, SYN, b"");
    ipv4([0x02, 0, 0, 0, 0, 0x64], src, 6, &mut t, Some(16))
}

/// An ARP request from `mac`/`src` for the cluster address.
pub fn arp_request(mac: [u8; 6], src: [u8; 4]) -> Vec<u8> {
    let mut f = ethernet(mac, [0xff; 6], 0x0806);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&CLUSTER_IP);
    f
}

/// The two IPv4 fragments of a 24-byte UDP datagram (header + 16 bytes of data): the first 16
/// bytes (UDP header included) with "more fragments", then 8 bytes at offset 16.
pub fn udp_fragments(mac: [u8; 6], src: [u8; 4], sport: u16, ident: u16) -> [Vec<u8>; 2] {
    let mut dgram = udp(sport, b"fragmented-data!");
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src);
    pseudo[4..8].copy_from_slice(&CLUSTER_IP);
    pseudo[9] = 17;
    pseudo[10..12].copy_from_slice(&(dgram.len() as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &dgram]);
    dgram[6..8].copy_from_slice(&c.to_be_bytes());
    let fragment = |offset_units: u16, more: bool, data: &[u8]| {
        let mut f = ethernet(mac, CLUSTER_MAC, 0x0800);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&ident.to_be_bytes());
        let frag = (u16::from(more) << 13) | offset_units;
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&CLUSTER_IP);
        let c = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(data);
        f.resize(f.len().max(60), 0);
        f
    };
    [
        fragment(0, true, &dgram[..16]),
        fragment(2, false, &dgram[16..]),
    ]
}

/// An ICMPv4 echo request from `mac`/`src` to the cluster address, id 0x1234, sequence `seq`.
pub fn icmp_echo(mac: [u8; 6], src: [u8; 4], seq: u16) -> Vec<u8> {
    let mut i = vec![8, 0, 0, 0, 0x12, 0x34];
    i.extend_from_slice(&seq.to_be_bytes());
    i.extend_from_slice(b"clonecluster-ping");
    let c = checksum(&[&i]);
    i[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4(mac, src, 1, &mut i, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ipv4 as v4, tcp as t, IpProtocol};

    /// The builders agree with the engine's own views: the checksums verify.
    #[test]
    fn built_frames_carry_valid_checksums() {
        let f = syn([198, 19, 0, 7], 40000);
        let ip = v4::Packet::new_checked(&f[14..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.protocol(), IpProtocol::Tcp);
        let seg = t::Packet::new_checked(ip.payload()).unwrap();
        assert!(seg.syn());
        assert!(seg.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        // One buffer or split parts: the same sum.
        let data = [1u8, 2, 3, 4, 5, 6];
        assert_eq!(checksum(&[&data]), checksum(&[&data[..2], &data[2..]]));
        assert_eq!(checksum(&[&data]), crate::wire::checksum::checksum(&data));
    }
}
