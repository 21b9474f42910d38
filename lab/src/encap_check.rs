//! The frame-by-frame check of encapsulated delivery: GUE and IP-in-IP frames captured on a
//! backend's port, as an appliance sent them, judged header by header. The appliance lab runs
//! it where this kernel cannot decapsulate them ([`super::applab_encap`]), and so does
//! `tests/appliance_netns.rs`; both call [`check_frames`], so there is one definition of a
//! well-formed frame.
//!
//! What a frame must be ([`Expect`] names the parties):
//! - Ethernet from the appliance's node MAC to the backend's MAC, EtherType IPv4;
//! - outer IPv4 from the appliance's own address to the backend's, a valid header checksum, not
//!   a fragment, no options, a TTL, DF set (its identification is 0), the inner packet's DSCP
//!   and ECN; protocol 4 (IP-in-IP) or UDP (GUE);
//! - GUE: UDP to the GUE port from an ephemeral entropy port (49152 and up), a UDP length that
//!   matches the packet, a valid (or IPv4's zero) UDP checksum, a GUE header of version 0 with
//!   no flags carrying IPv4 (`00 04 00 00`);
//! - inside: the client's packet unchanged: IPv4 from the client to the service address, a
//!   valid header checksum, TCP to the service's port with a valid checksum. A client datagram
//!   without DF too big for the tunnel arrives cut into IPv4 fragments, one per frame: each
//!   fragment's header is checked as it comes (checksum, addresses), and once the capture is
//!   read the fragments of each datagram must join, without gap or overlap, into a packet that
//!   passes the same checks.
//!
//! It owns judging bytes and saying what is wrong in words for a person (a frame's number, its
//! tunnel, the field, what it was and what it should have been). It must never panic on any
//! input, start a process, touch a network or a file, or print Rust `Debug` output into what it
//! returns: the lab puts its words into the report as they are.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use clonecluster::wire::{
    checksum, ethernet, ipv4, tcp, udp, EtherType, EthernetAddress, IpProtocol,
};

/// The GUE header of version 0, no control flag, no flags, carrying IPv4 (RFC 8086's protocol
/// number 4).
const GUE_V0_IPV4: [u8; 4] = [0, 4, 0, 0];
/// The lowest ephemeral port: GUE's source port is an entropy value in 49152..=65535.
const ENTROPY_PORTS: u16 = 0xc000;
const UDP_HEADER: usize = 8;

/// Who sent the frames to whom, and which ports the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The appliance's node MAC and own address (the outer source).
    pub node_mac: EthernetAddress,
    pub node_ip: Ipv4Addr,
    /// The backend's MAC and address (the outer destination).
    pub backend_mac: EthernetAddress,
    pub backend_ip: Ipv4Addr,
    /// The inner packet: from the client to the service address.
    pub client_ip: Ipv4Addr,
    pub service_ip: Ipv4Addr,
    /// The outer UDP destination port of GUE (the backend's FOU port, 6080 in the lab).
    pub gue_port: u16,
    /// The service port the client asked for behind GUE, and behind IP-in-IP.
    pub gue_service_port: u16,
    pub ipip_service_port: u16,
}

/// The two encapsulations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Tunnel {
    Gue,
    Ipip,
}

impl fmt::Display for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tunnel::Gue => "GUE",
            Tunnel::Ipip => "IP-in-IP",
        })
    }
}

/// What one frame was: its tunnel (None if not even that could be told) and the first thing
/// wrong with it, in words (None: well formed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameVerdict {
    pub tunnel: Option<Tunnel>,
    pub problem: Option<String>,
}

/// What [`check_frames`] found in a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncapCheck {
    /// Frames looked at.
    pub frames: usize,
    /// Frames that were GUE, and IP-in-IP (well formed or not).
    pub gue: usize,
    pub ipip: usize,
    /// Frames that carried a fragment of the client's datagram, and the datagrams they made
    /// up that joined again.
    pub fragments: usize,
    pub joined: usize,
    /// Frames with something wrong.
    pub malformed: usize,
    /// The first frame with something wrong: its number (from 1), tunnel and what was wrong.
    pub first_problem: Option<String>,
    /// Datagrams whose fragments (each well formed) did not join into the client's packet,
    /// and the first one's problem.
    pub unjoined: usize,
    pub first_unjoined: Option<String>,
}

impl EncapCheck {
    /// Every frame looked at was well formed, and every datagram in fragments joined.
    pub fn well_formed(&self) -> bool {
        self.malformed == 0 && self.unjoined == 0
    }

    /// One line for a person: counts, and the first problem if any.
    pub fn summary(&self) -> String {
        let mut counts = format!(
            "{} frame(s) checked: {} GUE, {} IP-in-IP",
            self.frames, self.gue, self.ipip
        );
        if self.fragments > 0 {
            counts += &format!(
                " ({} carrying a fragment; {} datagram(s) joined from them)",
                self.fragments, self.joined
            );
        }
        let frames = match &self.first_problem {
            None => format!("{counts}; every one well formed"),
            Some(p) => format!("{counts}; {} malformed, the first: {p}", self.malformed),
        };
        match &self.first_unjoined {
            None => frames,
            Some(p) => format!(
                "{frames}; {} datagram(s) whose fragments do not join, the first: {p}",
                self.unjoined
            ),
        }
    }
}

/// Judges every frame of a capture (in order; numbered from 1 in the words).
pub fn check_frames(frames: &[Vec<u8>], want: &Expect) -> EncapCheck {
    let mut c = EncapCheck {
        frames: frames.len(),
        ..EncapCheck::default()
    };
    let mut datagrams: BTreeMap<(Tunnel, u16), Datagram> = BTreeMap::new();
    let problem = |c: &mut EncapCheck, what: String| {
        c.malformed += 1;
        c.first_problem.get_or_insert(what);
    };
    for (i, f) in frames.iter().enumerate() {
        let mut tunnel = None;
        let verdict = judge(f, want, &mut tunnel);
        match tunnel {
            Some(Tunnel::Gue) => c.gue += 1,
            Some(Tunnel::Ipip) => c.ipip += 1,
            None => {}
        }
        match (verdict, tunnel) {
            (Ok(None), _) => {}
            (Ok(Some(piece)), Some(t)) => {
                c.fragments += 1;
                let d = datagrams.entry((t, piece.ident)).or_insert(Datagram {
                    first_frame: i + 1,
                    service_port: piece.service_port,
                    pieces: Vec::new(),
                });
                d.pieces.push(piece);
            }
            (Ok(Some(_)), None) => {
                problem(&mut c, format!("frame {}: a fragment in no tunnel", i + 1))
            }
            (Err(p), t) => {
                let what = t.map_or(String::new(), |t| format!(" ({t})"));
                problem(&mut c, format!("frame {}{what}: {p}", i + 1));
            }
        }
    }
    for ((t, ident), d) in datagrams {
        match d.join().and_then(|packet| {
            inner_packet(&packet, d.service_port, want).and_then(|piece| match piece {
                None => Ok(()),
                Some(_) => Err("the joined packet is still a fragment".to_owned()),
            })
        }) {
            Ok(()) => c.joined += 1,
            Err(p) => {
                c.unjoined += 1;
                c.first_unjoined.get_or_insert(format!(
                    "the datagram of identification {ident} ({t}, its first fragment in frame \
                     {}): {p}",
                    d.first_frame
                ));
            }
        }
    }
    c
}

/// Judges one frame (a fragment of the client's datagram is judged only as far as one
/// fragment can be: [`check_frames`] joins them).
pub fn check_frame(frame: &[u8], want: &Expect) -> FrameVerdict {
    let mut tunnel = None;
    let problem = judge(frame, want, &mut tunnel).err();
    FrameVerdict { tunnel, problem }
}

/// A fragment of the client's datagram found inside a tunnel.
#[derive(Debug, Clone)]
struct Piece {
    ident: u16,
    service_port: u16,
    /// Where its payload goes in the datagram's (bytes), and whether more follow.
    offset: usize,
    more: bool,
    /// Its IPv4 header and payload.
    header: Vec<u8>,
    payload: Vec<u8>,
}

/// The fragments of one datagram, as captured.
struct Datagram {
    first_frame: usize,
    service_port: u16,
    pieces: Vec<Piece>,
}

impl Datagram {
    /// The client's packet the fragments make up: the first one's header (its length and
    /// fragment field made whole again, the checksum recomputed), then the payloads by offset.
    fn join(&self) -> Result<Vec<u8>, String> {
        let mut pieces: Vec<&Piece> = self.pieces.iter().collect();
        pieces.sort_by_key(|p| p.offset);
        let first = pieces.first().ok_or("no fragment")?;
        if first.offset != 0 {
            return Err(format!(
                "no fragment at offset 0 (the first captured starts at byte {})",
                first.offset
            ));
        }
        let mut payload = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            if p.offset != payload.len() {
                return Err(format!(
                    "a fragment at byte {} where byte {} was due: a gap or an overlap",
                    p.offset,
                    payload.len()
                ));
            }
            if !p.more && i + 1 < pieces.len() {
                return Err(format!(
                    "the fragment at byte {} says no more follow, and more do",
                    p.offset
                ));
            }
            payload.extend_from_slice(&p.payload);
        }
        if pieces.last().is_some_and(|p| p.more) {
            return Err(format!(
                "the last fragment captured (bytes {} to {}) says more follow",
                pieces.last().map_or(0, |p| p.offset),
                payload.len()
            ));
        }
        let mut packet = first.header.clone();
        let total = u16::try_from(packet.len() + payload.len())
            .map_err(|_| "the joined packet is longer than IPv4 allows".to_owned())?;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[6..8].fill(0);
        packet[10..12].fill(0);
        let c = checksum::checksum(&packet);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
        packet.extend_from_slice(&payload);
        Ok(packet)
    }
}

/// The checks in order; the first failure's words. `tunnel` is set as soon as it is known.
/// `Ok(Some)`: the frame is well formed and carries a fragment of the client's datagram.
fn judge(
    frame: &[u8],
    want: &Expect,
    tunnel: &mut Option<Tunnel>,
) -> Result<Option<Piece>, String> {
    let eth = ethernet::Frame::new_checked(frame).map_err(|e| {
        format!(
            "not an Ethernet frame ({}, {} bytes)",
            e.as_str(),
            frame.len()
        )
    })?;
    if eth.dst() != want.backend_mac {
        return Err(format!(
            "Ethernet destination {}, not the backend's MAC {}",
            eth.dst(),
            want.backend_mac
        ));
    }
    if eth.src() != want.node_mac {
        return Err(format!(
            "Ethernet source {}, not the appliance's node MAC {}",
            eth.src(),
            want.node_mac
        ));
    }
    if eth.ethertype() != EtherType::Ipv4 {
        return Err(format!(
            "EtherType 0x{:04x}, not IPv4 (an outer IPv4 header was expected)",
            eth.ethertype().raw()
        ));
    }
    let outer = ipv4::Packet::new_checked(eth.payload())
        .map_err(|e| format!("outer IPv4 header unreadable ({})", e.as_str()))?;
    *tunnel = match outer.protocol() {
        IpProtocol::Udp => Some(Tunnel::Gue),
        p if p.raw() == 4 => Some(Tunnel::Ipip),
        p => {
            return Err(format!(
                "outer IPv4 protocol {}: neither GUE (UDP) nor IP-in-IP (4)",
                p.raw()
            ))
        }
    };
    if outer.src_addr() != want.node_ip {
        return Err(format!(
            "outer IPv4 source {}, not the appliance's own address {}",
            outer.src_addr(),
            want.node_ip
        ));
    }
    if outer.dst_addr() != want.backend_ip {
        return Err(format!(
            "outer IPv4 destination {}, not the backend's address {}",
            outer.dst_addr(),
            want.backend_ip
        ));
    }
    if !outer.verify_checksum() {
        return Err(format!(
            "outer IPv4 header checksum 0x{:04x} does not verify",
            outer.checksum()
        ));
    }
    if outer.is_fragment() {
        return Err("the outer IPv4 packet is a fragment".to_owned());
    }
    if outer.header_len() != 20 {
        return Err(format!(
            "outer IPv4 header of {} bytes: options where none belong",
            outer.header_len()
        ));
    }
    if outer.ttl() == 0 {
        return Err("outer IPv4 TTL 0: the packet cannot be forwarded".to_owned());
    }
    if !outer.dont_frag() {
        // Its identification is 0 (RFC 6864: only an atomic datagram, DF set, may repeat it).
        return Err("outer IPv4 packet without DF (its identification is not unique)".to_owned());
    }
    let (inner, service_port) = match *tunnel {
        Some(Tunnel::Gue) => (gue_payload(&outer, want)?, want.gue_service_port),
        _ => (outer.payload(), want.ipip_service_port),
    };
    // The inner packet's DSCP and ECN, copied out (RFC 6040's normal mode).
    if let Some(&tos) = inner.get(1) {
        let outer_tos = (outer.dscp() << 2) | outer.ecn();
        if outer_tos != tos {
            return Err(format!(
                "outer traffic class 0x{outer_tos:02x}, not the inner packet's 0x{tos:02x}"
            ));
        }
    }
    inner_packet(inner, service_port, want)
}

/// The GUE part of an outer packet (UDP, then the GUE header); returns the inner packet.
fn gue_payload<'a>(outer: &'a ipv4::Packet<&[u8]>, want: &Expect) -> Result<&'a [u8], String> {
    let u = udp::Packet::new_checked(outer.payload())
        .map_err(|e| format!("outer UDP header unreadable ({})", e.as_str()))?;
    if u.dst_port() != want.gue_port {
        return Err(format!(
            "outer UDP destination port {}, not the GUE port {}",
            u.dst_port(),
            want.gue_port
        ));
    }
    if u.src_port() < ENTROPY_PORTS {
        return Err(format!(
            "outer UDP source port {}, not an ephemeral entropy port (49152 and up)",
            u.src_port()
        ));
    }
    if usize::from(u.len()) != outer.payload().len() {
        return Err(format!(
            "outer UDP length {}, but the IPv4 packet carries {} bytes of UDP",
            u.len(),
            outer.payload().len()
        ));
    }
    let (src, dst) = (IpAddr::V4(outer.src_addr()), IpAddr::V4(outer.dst_addr()));
    if !u.verify_checksum(&src, &dst) {
        return Err(format!(
            "outer UDP checksum 0x{:04x} does not verify",
            u.checksum()
        ));
    }
    // The UDP length is the packet's: the GUE header and the inner packet follow the UDP
    // header to the end.
    let gue = outer.payload().get(UDP_HEADER..).unwrap_or_default();
    match gue.get(..4) {
        Some(h) if h == GUE_V0_IPV4 => Ok(&gue[4..]),
        Some(h) => Err(format!(
            "GUE header {:02x} {:02x} {:02x} {:02x}, not version 0 without flags carrying IPv4 \
             (00 04 00 00)",
            h[0], h[1], h[2], h[3]
        )),
        None => Err(format!(
            "the UDP payload ({} bytes) is too short for a GUE header",
            gue.len()
        )),
    }
}

/// The client's packet inside the tunnel: from the client to the service's port, checksums
/// valid; or a fragment of it, its header checked (`Ok(Some)`: for [`check_frames`] to join).
fn inner_packet(bytes: &[u8], service_port: u16, want: &Expect) -> Result<Option<Piece>, String> {
    let ip = ipv4::Packet::new_checked(bytes)
        .map_err(|e| format!("inner IPv4 header unreadable ({})", e.as_str()))?;
    if usize::from(ip.total_len()) != bytes.len() {
        return Err(format!(
            "inner IPv4 total length {}, but the tunnel carries {} bytes",
            ip.total_len(),
            bytes.len()
        ));
    }
    if !ip.verify_checksum() {
        return Err(format!(
            "inner IPv4 header checksum 0x{:04x} does not verify: the client's packet changed",
            ip.checksum()
        ));
    }
    if ip.src_addr() != want.client_ip || ip.dst_addr() != want.service_ip {
        return Err(format!(
            "inner IPv4 from {} to {}, not from the client {} to the service address {}",
            ip.src_addr(),
            ip.dst_addr(),
            want.client_ip,
            want.service_ip
        ));
    }
    if ip.is_fragment() {
        let header = bytes.get(..ip.header_len()).unwrap_or_default().to_vec();
        return Ok(Some(Piece {
            ident: ip.ident(),
            service_port,
            offset: usize::from(ip.frag_offset()),
            more: ip.more_frags(),
            header,
            payload: ip.payload().to_vec(),
        }));
    }
    if ip.protocol() != IpProtocol::Tcp {
        return Err(format!(
            "inner IPv4 protocol {}, not TCP (the client's requests)",
            ip.protocol().raw()
        ));
    }
    let t = tcp::Packet::new_checked(ip.payload())
        .map_err(|e| format!("inner TCP header unreadable ({})", e.as_str()))?;
    if t.dst_port() != service_port {
        return Err(format!(
            "inner TCP destination port {}, not the service's port {service_port}",
            t.dst_port()
        ));
    }
    let (src, dst) = (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()));
    if !t.verify_checksum(&src, &dst) {
        return Err(format!(
            "inner TCP checksum 0x{:04x} does not verify: the client's packet changed",
            t.checksum()
        ));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clonecluster::appliance::encap::{self, Outer};
    use clonecluster::testkit::build;

    const NODE_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 1]);
    const BACKEND_MAC: EthernetAddress = EthernetAddress([0x02, 0xbb, 0, 0, 0, 1]);

    fn expect() -> Expect {
        Expect {
            node_mac: NODE_MAC,
            node_ip: Ipv4Addr::new(198, 18, 0, 11),
            backend_mac: BACKEND_MAC,
            backend_ip: Ipv4Addr::new(198, 18, 0, 21),
            client_ip: Ipv4Addr::new(198, 18, 0, 100),
            service_ip: Ipv4Addr::from(build::CLUSTER_IP),
            gue_port: 6080,
            // The testkit's SYN goes to port 80.
            gue_service_port: 80,
            ipip_service_port: 80,
        }
    }

    /// The outer headers from the appliance to the backend of [`expect`].
    fn outer(tunnel: encap::Tunnel) -> Outer {
        let want = expect();
        Outer::new(
            tunnel,
            want.node_ip.into(),
            want.backend_ip.into(),
            NODE_MAC,
            BACKEND_MAC,
        )
        .expect("IPv4 both")
    }

    /// The client's SYN (to port 80 of the cluster address, checksums valid), encapsulated as
    /// the engine does it.
    fn encapsulated(tunnel: encap::Tunnel) -> Vec<u8> {
        let syn = build::syn([198, 18, 0, 100], 40000);
        let o = outer(tunnel);
        let mut f = vec![0u8; o.push(14)];
        f.extend_from_slice(&syn);
        let n = o
            .write(&mut f, syn.len() - 14, false, 0x1234)
            .expect("room for the outer headers");
        f.truncate(n);
        f
    }

    fn gue() -> Vec<u8> {
        encapsulated(encap::Tunnel::Gue { port: 6080 })
    }

    /// A TCP segment of 3000 bytes without DF from the client to port 80, cut for a path of
    /// 1500 bytes and each piece encapsulated, as the engine does it.
    fn in_pieces(tunnel: encap::Tunnel) -> Vec<Vec<u8>> {
        use clonecluster::appliance::fragment::Cut;
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
        let mut t = build::tcp(40000, 1, 1, 0x10, &data);
        let mut f = build::ipv4(
            [2, 0, 0, 0, 0, 0x64],
            [198, 18, 0, 100],
            6,
            &mut t,
            Some(16),
        );
        f[20] = 0; // no DF
        f[24..26].fill(0);
        let c = build::checksum(&[&f[14..34]]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        let o = outer(tunnel);
        let cut = Cut::new(&f[14..], 1500 - o.overhead()).expect("no DF");
        (0..cut.pieces())
            .map(|k| {
                let mut out = vec![0u8; 1600];
                let n = cut.write(&f[14..], k, &mut out[o.push(0)..]).unwrap();
                let n = o.write(&mut out, n, false, 0x1234).unwrap();
                out.truncate(n);
                out
            })
            .collect()
    }

    #[test]
    fn a_datagram_in_pieces_is_joined_and_checked_whole() {
        for tunnel in [encap::Tunnel::Gue { port: 6080 }, encap::Tunnel::Ipip] {
            let pieces = in_pieces(tunnel);
            assert_eq!(pieces.len(), 3);
            // In any order, among other frames.
            let mut frames = vec![gue(), pieces[2].clone(), pieces[0].clone(), ipip()];
            frames.push(pieces[1].clone());
            let c = check_frames(&frames, &expect());
            assert!(c.well_formed(), "{}", c.summary());
            assert_eq!((c.fragments, c.joined), (3, 1));
            assert!(c
                .summary()
                .contains("3 carrying a fragment; 1 datagram(s) joined"));
            // One missing: the datagram does not join, and says where.
            let c = check_frames(&[pieces[0].clone(), pieces[2].clone()], &expect());
            assert_eq!((c.malformed, c.unjoined, c.joined), (0, 1, 0));
            assert!(!c.well_formed());
            assert!(c
                .summary()
                .contains("1 datagram(s) whose fragments do not join"));
            let p = c.first_unjoined.unwrap();
            assert!(p.contains("a gap or an overlap"), "{p}");
            assert!(p.contains("first fragment in frame 1"), "{p}");
            // The last missing: more were said to follow.
            let c = check_frames(&pieces[..2], &expect());
            assert!(c.first_unjoined.unwrap().contains("says more follow"));
            // A middle piece that says it is the last: refused though the bytes join.
            let mut early_end = pieces.clone();
            let inner = 14
                + if tunnel == encap::Tunnel::Ipip {
                    20
                } else {
                    32
                };
            let h = &mut early_end[1][inner..inner + 20];
            h[6] &= !0x20;
            h[10..12].fill(0);
            let c = build::checksum(&[h]);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let c = check_frames(&early_end, &expect());
            let p = c.first_unjoined.unwrap_or_default();
            assert!(p.contains("says no more follow, and more do"), "{p}");
            // A payload byte changed on the way: the joined segment's TCP checksum tells.
            let mut changed = pieces.clone();
            let last = changed[1].len() - 1;
            changed[1][last] ^= 0xff;
            let c = check_frames(&changed, &expect());
            assert!(c.first_unjoined.unwrap().contains("inner TCP checksum"));
        }
    }

    fn ipip() -> Vec<u8> {
        encapsulated(encap::Tunnel::Ipip)
    }

    fn problem(f: &[u8]) -> String {
        check_frame(f, &expect()).problem.unwrap_or_default()
    }

    #[test]
    fn frames_the_engine_builds_are_well_formed() {
        for (f, t) in [(gue(), Tunnel::Gue), (ipip(), Tunnel::Ipip)] {
            assert_eq!(
                check_frame(&f, &expect()),
                FrameVerdict {
                    tunnel: Some(t),
                    problem: None
                }
            );
        }
    }

    #[test]
    fn a_bad_outer_checksum_is_found() {
        let mut f = gue();
        f[14 + 10] ^= 0x01;
        let p = problem(&f);
        assert!(p.starts_with("outer IPv4 header checksum"), "{p}");
    }

    /// The outer header's TTL, DF and traffic class: each wrong one named (the checksum fixed
    /// so that it is not what tells).
    #[test]
    fn the_outer_ttl_df_and_traffic_class_are_checked() {
        let with = |at: usize, value: u8| {
            let mut f = ipip();
            f[14 + at] = value;
            let mut ip = ipv4::Packet::new_checked(&mut f[14..]).unwrap();
            ip.fill_checksum();
            problem(&f)
        };
        assert!(with(8, 0).starts_with("outer IPv4 TTL 0"), "{}", with(8, 0));
        assert!(
            with(6, 0).starts_with("outer IPv4 packet without DF"),
            "{}",
            with(6, 0)
        );
        assert_eq!(
            with(1, 0xb9),
            "outer traffic class 0xb9, not the inner packet's 0x00"
        );
    }

    #[test]
    fn a_wrong_gue_port_is_found() {
        let f = encapsulated(encap::Tunnel::Gue { port: 6081 });
        assert_eq!(
            problem(&f),
            "outer UDP destination port 6081, not the GUE port 6080"
        );
    }

    #[test]
    fn a_modified_inner_packet_is_found() {
        // The inner TCP sequence number changed (the headers are 14 + 20 + 8 + 4 + 20 bytes).
        let mut f = gue();
        f[14 + 20 + 8 + 4 + 20 + 4] ^= 0xff;
        let p = problem(&f);
        assert!(p.starts_with("inner TCP checksum"), "{p}");
        // The inner source address changed, its header checksum with it: the checksum tells.
        let mut f = ipip();
        f[14 + 20 + 15] = 7;
        let p = problem(&f);
        assert!(p.starts_with("inner IPv4 header checksum"), "{p}");
    }

    #[test]
    fn wrong_parties_and_headers_are_named() {
        let mut f = ipip();
        f[0..6].copy_from_slice(&[0x02, 0xbb, 0, 0, 0, 2]);
        assert_eq!(
            problem(&f),
            "Ethernet destination 02:bb:00:00:00:02, not the backend's MAC 02:bb:00:00:00:01"
        );
        let mut other = expect();
        other.node_ip = Ipv4Addr::new(198, 18, 0, 12);
        let p = check_frame(&gue(), &other).problem.unwrap_or_default();
        assert_eq!(
            p,
            "outer IPv4 source 198.18.0.11, not the appliance's own address 198.18.0.12"
        );
        let mut f = gue();
        f[14 + 20 + 8 + 1] = 41;
        // The UDP checksum of IPv4 GUE is 0: the change shows in the GUE header.
        assert!(
            problem(&f).starts_with("GUE header 00 29 00 00"),
            "{}",
            problem(&f)
        );
        let mut other = expect();
        other.ipip_service_port = 8081;
        let p = check_frame(&ipip(), &other).problem.unwrap_or_default();
        assert_eq!(
            p,
            "inner TCP destination port 80, not the service's port 8081"
        );
        assert!(problem(&[0u8; 10]).starts_with("not an Ethernet frame"));
        assert!(problem(&build::syn([198, 18, 0, 100], 1)).starts_with("Ethernet destination"));
    }

    #[test]
    fn a_capture_is_summed_up_with_its_first_problem() {
        let mut bad = gue();
        bad[14 + 10] ^= 0x01;
        let mut odd = ipip();
        odd[14 + 9] = 47;
        let c = check_frames(&[gue(), ipip(), bad, odd, ipip()], &expect());
        assert_eq!((c.frames, c.gue, c.ipip, c.malformed), (5, 2, 2, 2));
        assert!(!c.well_formed());
        let first = c.first_problem.clone().unwrap_or_default();
        assert!(
            first.starts_with("frame 3 (GUE): outer IPv4 header checksum"),
            "{first}"
        );
        assert!(
            c.summary().starts_with(
                "5 frame(s) checked: 2 GUE, 2 IP-in-IP; 2 malformed, the first: frame 3"
            ),
            "{}",
            c.summary()
        );
        let good = check_frames(&[gue(), ipip()], &expect());
        assert_eq!(
            good.summary(),
            "2 frame(s) checked: 1 GUE, 1 IP-in-IP; every one well formed"
        );
        assert!(good.well_formed());
    }
}
