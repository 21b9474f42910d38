//! What a packet core does with each frame: pure Rust over byte slices, no DPDK types.
//!
//! The data plane hands every frame from the wire port to [`Pipeline::from_wire`] and every
//! frame from the host port to [`Pipeline::from_host`], and carries out the returned
//! [`Action`]. Keeping the logic here means it is unit-tested, replayed over pcaps and
//! benchmarked without DPDK.

use crate::config::MacAddr;

/// Why a frame was dropped. Counted per reason; never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than an Ethernet header, or otherwise unparseable.
    Malformed = 0,
    /// Another node owns the flow.
    NotOwned = 1,
    /// From the host: a frame only the engine may send (its ARP replies for the cluster IP).
    HostSuppressed = 2,
    /// Frames spanning several mbuf segments (jumbo frames we did not configure for).
    Chained = 3,
}

impl DropReason {
    pub const COUNT: usize = 4;
    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Malformed,
        DropReason::NotOwned,
        DropReason::HostSuppressed,
        DropReason::Chained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::NotOwned => "not-owned",
            DropReason::HostSuppressed => "host-suppressed",
            DropReason::Chained => "chained",
        }
    }
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deliver to the node's kernel through the host port.
    ToHost,
    /// Send on the wire (from the host: after the source MAC rewrite).
    ToWire,
    /// The frame was rewritten in place into an answer of `len` bytes: send it on the wire.
    Reply {
        len: usize,
    },
    /// A control-plane frame (wire heartbeat): hand it to the control thread.
    ToControl,
    Drop(DropReason),
}

/// Per-core packet logic and its state.
#[derive(Debug, Clone)]
pub struct Pipeline {
    node_mac: MacAddr,
    cluster_mac: MacAddr,
}

const ETHERNET_HEADER: usize = 14;
const SRC_MAC: std::ops::Range<usize> = 6..12;

impl Pipeline {
    pub fn new(node_mac: MacAddr, cluster_mac: MacAddr) -> Pipeline {
        Pipeline {
            node_mac,
            cluster_mac,
        }
    }

    pub fn cluster_mac(&self) -> MacAddr {
        self.cluster_mac
    }

    /// A frame from the shared segment. `frame` is the received frame; until flow ownership is
    /// decided here, every well-formed frame goes to the host.
    #[inline]
    pub fn from_wire(&mut self, frame: &mut [u8]) -> Action {
        if frame.len() < ETHERNET_HEADER {
            return Action::Drop(DropReason::Malformed);
        }
        Action::ToHost
    }

    /// A frame from the node's kernel, on its way to the wire. Its Ethernet source becomes the
    /// node MAC, always: if the switch ever saw the cluster MAC as a source it would learn it
    /// on this node's port and the other nodes would stop hearing the cluster.
    #[inline]
    pub fn from_host(&mut self, frame: &mut [u8]) -> Action {
        if frame.len() < ETHERNET_HEADER {
            return Action::Drop(DropReason::Malformed);
        }
        frame[SRC_MAC].copy_from_slice(&self.node_mac.0);
        Action::ToWire
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const CLUSTER: MacAddr = MacAddr([2, 0xcc, 0, 0, 0, 1]);

    #[test]
    fn host_frames_get_the_node_mac_and_nothing_else_changes() {
        let mut p = Pipeline::new(NODE, CLUSTER);
        let mut frame: Vec<u8> = (0..60u8).collect();
        frame[6..12].copy_from_slice(&CLUSTER.0);
        let before = frame.clone();
        assert_eq!(p.from_host(&mut frame), Action::ToWire);
        assert_eq!(&frame[6..12], &NODE.0);
        assert_eq!(&frame[..6], &before[..6]);
        assert_eq!(&frame[12..], &before[12..]);
    }

    #[test]
    fn runts_are_dropped_as_malformed() {
        let mut p = Pipeline::new(NODE, CLUSTER);
        for len in 0..ETHERNET_HEADER {
            let mut f = vec![0u8; len];
            assert_eq!(p.from_wire(&mut f), Action::Drop(DropReason::Malformed));
            assert_eq!(p.from_host(&mut f), Action::Drop(DropReason::Malformed));
        }
    }
}
