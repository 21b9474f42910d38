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
//!   valid header checksum, TCP to the service's port with a valid checksum.
//!
//! It owns judging bytes and saying what is wrong in words for a person (a frame's number, its
//! tunnel, the field, what it was and what it should have been). It must never panic on any
//! input, start a process, touch a network or a file, or print Rust `Debug` output into what it
//! returns: the lab puts its words into the report as they are.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use clonecluster::wire::{ethernet, ipv4, tcp, udp, EtherType, EthernetAddress, IpProtocol};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// Frames with something wrong.
    pub malformed: usize,
    /// The first frame with something wrong: its number (from 1), tunnel and what was wrong.
    pub first_problem: Option<String>,
}

impl EncapCheck {
    /// Every frame looked at was well formed.
    pub fn well_formed(&self) -> bool {
        self.malformed == 0
    }

    /// One line for a person: counts, and the first problem if any.
    pub fn summary(&self) -> String {
        let counts = format!(
            "{} frame(s) checked: {} GUE, {} IP-in-IP",
            self.frames, self.gue, self.ipip
        );
        match &self.first_problem {
            None => format!("{counts}; every one well formed"),
            Some(p) => format!("{counts}; {} malformed, the first: {p}", self.malformed),
        }
    }
}

/// Judges every frame of a capture (in order; numbered from 1 in the words).
pub fn check_frames(frames: &[Vec<u8>], want: &Expect) -> EncapCheck {
    let mut c = EncapCheck {
        frames: frames.len(),
        ..EncapCheck::default()
    };
    for (i, f) in frames.iter().enumerate() {
        let v = check_frame(f, want);
        match v.tunnel {
            Some(Tunnel::Gue) => c.gue += 1,
            Some(Tunnel::Ipip) => c.ipip += 1,
            None => {}
        }
        if let Some(p) = v.problem {
            c.malformed += 1;
            if c.first_problem.is_none() {
                let what = v.tunnel.map_or(String::new(), |t| format!(" ({t})"));
                c.first_problem = Some(format!("frame {}{what}: {p}", i + 1));
            }
        }
    }
    c
}

/// Judges one frame.
pub fn check_frame(frame: &[u8], want: &Expect) -> FrameVerdict {
    let mut tunnel = None;
    let problem = judge(frame, want, &mut tunnel).err();
    FrameVerdict { tunnel, problem }
}

/// The checks in order; the first failure's words. `tunnel` is set as soon as it is known.
fn judge(frame: &[u8], want: &Expect, tunnel: &mut Option<Tunnel>) -> Result<(), String> {
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
/// valid.
fn inner_packet(bytes: &[u8], service_port: u16, want: &Expect) -> Result<(), String> {
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
    Ok(())
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

    /// The client's SYN (to port 80 of the cluster address, checksums valid), encapsulated as
    /// the engine does it.
    fn encapsulated(tunnel: encap::Tunnel) -> Vec<u8> {
        let syn = build::syn([198, 18, 0, 100], 40000);
        let want = expect();
        let o = Outer::new(
            tunnel,
            want.node_ip.into(),
            want.backend_ip.into(),
            NODE_MAC,
            BACKEND_MAC,
        )
        .expect("IPv4 both");
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
