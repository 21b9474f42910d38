//! Zero-copy packet views and builders: the bytes on the wire, read and written in place.
//!
//! Every node of the cluster sees every frame, so this is the code that looks at every packet.
//! Each protocol has a view `Packet<T: AsRef<[u8]>>` (`Frame` for Ethernet) over a byte buffer
//! (an mbuf's data in production, a `static` array or a pcap record in tests):
//!
//! - `new_unchecked` wraps without looking; `new_checked` validates lengths (and versions) once,
//!   after which no getter can panic;
//! - setters exist only where `T: AsMut<[u8]>`, so a MAC rewrite is one call on the mbuf's bytes;
//! - a `Repr` (where useful) is the parsed value, with `parse`, `emit` and `buffer_len`, so that
//!   replies (ARP, neighbour advertisements) can be built.
//!
//! [`parse_l2_l4`] is the one-pass classifier for the hot path: Ethernet (one 802.1Q tag), IPv4
//! or IPv6 (extension headers, fragments), then ports, TCP flags or ICMP type and quoted flow.
//!
//! What this module must never do: panic on any input, allocate, know about DPDK or mbufs, or
//! make ownership decisions (that is `cluster`'s job). Values it does not know decode to
//! `Unknown(raw)`; packets that are too short or contradict themselves give an [`Error`], whose
//! [`Error::as_str`] is the label the data path counts drops under.
#![forbid(unsafe_code)]

use core::fmt;

#[macro_use]
mod macros {
    /// Declares a C-like enum over a raw integer type with an extra `Unknown(raw)` variant, and
    /// the lossless conversions both ways. Values are literals so they can be used as patterns.
    macro_rules! enum_with_unknown {
        (
            $(#[$enum_meta:meta])*
            pub enum $name:ident($ty:ty) {
                $(
                    $(#[$variant_meta:meta])*
                    $variant:ident = $value:literal
                ),+ $(,)?
            }
        ) => {
            $(#[$enum_meta])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
            pub enum $name {
                $(
                    $(#[$variant_meta])*
                    $variant,
                )+
                /// A value this module has no name for; kept so it can be counted and re-emitted.
                Unknown($ty),
            }

            impl ::core::convert::From<$ty> for $name {
                fn from(value: $ty) -> Self {
                    match value {
                        $( $value => $name::$variant, )+
                        other => $name::Unknown(other),
                    }
                }
            }

            impl $name {
                /// The raw value (what `From` gives, usable in `const` items).
                #[inline]
                pub const fn raw(self) -> $ty {
                    match self {
                        $( $name::$variant => $value, )+
                        $name::Unknown(other) => other,
                    }
                }
            }

            impl ::core::convert::From<$name> for $ty {
                #[inline]
                fn from(value: $name) -> Self {
                    value.raw()
                }
            }
        };
    }
}

pub mod arp;
pub mod checksum;
mod classify;
pub mod ethernet;
pub mod icmpv4;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

#[cfg(test)]
mod fuzz;

pub use classify::{parse_ip_flow, parse_l2_l4, Fragment, IcmpInfo, IpFlow, Parsed, QuotedFlow};
pub use ethernet::{EtherType, EthernetAddress, CONTROL_ETHERTYPE};
pub use tcp::TcpFlags;

/// Why a packet could not be read. Small and `Copy`, so the data path can count drops per
/// reason (see [`Error::as_str`]) without allocating. No variant implies that anything changed:
/// views never modify the buffer while checking it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Error {
    /// The buffer ends before a header does, or before the length a header claims.
    Truncated,
    /// A length field contradicts itself (IPv4 IHL < 5, total length < header length, TCP data
    /// offset < 5, UDP length < 8, an NDP option of length 0, ...).
    BadLength,
    /// The IP version nibble does not match the EtherType.
    BadVersion,
    /// The packet is well-formed enough to read but structurally wrong (an extension-header
    /// chain longer than we walk, a field combination the protocol forbids).
    Malformed,
    /// Valid on the wire but not something we speak (ARP for non-Ethernet/IPv4, ...).
    Unsupported,
    /// A checksum did not verify (only returned where a caller asked for verification).
    BadChecksum,
}

impl Error {
    /// A short, stable label for counters and logs, e.g. `"truncated"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Error::Truncated => "truncated",
            Error::BadLength => "bad_length",
            Error::BadVersion => "bad_version",
            Error::Malformed => "malformed",
            Error::Unsupported => "unsupported",
            Error::BadChecksum => "bad_checksum",
        }
    }

    /// Every variant, in a fixed order, so per-reason counters can be laid out as an array.
    pub const ALL: [Error; 6] = [
        Error::Truncated,
        Error::BadLength,
        Error::BadVersion,
        Error::Malformed,
        Error::Unsupported,
        Error::BadChecksum,
    ];

    /// Position of this variant in [`Error::ALL`].
    pub fn index(&self) -> usize {
        match self {
            Error::Truncated => 0,
            Error::BadLength => 1,
            Error::BadVersion => 2,
            Error::Malformed => 3,
            Error::Unsupported => 4,
            Error::BadChecksum => 5,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated packet",
            Error::BadLength => "inconsistent length field",
            Error::BadVersion => "wrong IP version",
            Error::Malformed => "malformed packet",
            Error::Unsupported => "unsupported packet type",
            Error::BadChecksum => "bad checksum",
        })
    }
}

impl std::error::Error for Error {}

/// Result of the wire module.
pub type Result<T> = core::result::Result<T, Error>;

enum_with_unknown! {
    /// IP protocol number (IPv4 `protocol`, IPv6 `next header`).
    pub enum IpProtocol(u8) {
        /// IPv6 hop-by-hop options header.
        HopByHop = 0,
        /// ICMP for IPv4.
        Icmp = 1,
        /// IGMP.
        Igmp = 2,
        /// TCP.
        Tcp = 6,
        /// UDP.
        Udp = 17,
        /// IPv6 routing header.
        Ipv6Route = 43,
        /// IPv6 fragment header.
        Ipv6Frag = 44,
        /// GRE.
        Gre = 47,
        /// IPsec ESP.
        Esp = 50,
        /// IPsec authentication header.
        Ah = 51,
        /// ICMP for IPv6.
        Icmpv6 = 58,
        /// IPv6 "no next header".
        Ipv6NoNxt = 59,
        /// IPv6 destination options header.
        Ipv6Opts = 60,
        /// SCTP.
        Sctp = 132,
    }
}

impl fmt::Display for IpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpProtocol::Unknown(n) => write!(f, "proto-{n}"),
            IpProtocol::Tcp => f.write_str("tcp"),
            IpProtocol::Udp => f.write_str("udp"),
            IpProtocol::Icmp => f.write_str("icmp"),
            IpProtocol::Icmpv6 => f.write_str("icmpv6"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Big-endian field access on slices whose length the caller has already checked.
pub(crate) mod be {
    #[inline]
    pub(crate) fn u16_at(data: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([data[at], data[at + 1]])
    }
    #[inline]
    pub(crate) fn u32_at(data: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
    }
    #[inline]
    pub(crate) fn put_u16(data: &mut [u8], at: usize, value: u16) {
        data[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }
    #[inline]
    pub(crate) fn put_u32(data: &mut [u8], at: usize, value: u32) {
        data[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_values_round_trip() {
        assert_eq!(IpProtocol::from(6), IpProtocol::Tcp);
        assert_eq!(IpProtocol::from(253), IpProtocol::Unknown(253));
        assert_eq!(u8::from(IpProtocol::Unknown(253)), 253);
        assert_eq!(u8::from(IpProtocol::Icmpv6), 58);
    }

    #[test]
    fn error_labels_are_distinct_and_indexed() {
        for (i, e) in Error::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
            assert!(!e.as_str().is_empty());
            assert!(!e.to_string().is_empty());
        }
        let mut labels: Vec<_> = Error::ALL.iter().map(Error::as_str).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Error::ALL.len());
    }
}
