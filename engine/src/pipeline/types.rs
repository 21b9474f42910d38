//! The pipeline's vocabulary: what it returns for a frame ([`Action`], [`DropReason`]), who it
//! decides for ([`NodeIdentity`]), what the control thread tells it ([`ServiceState`]) and how
//! large its tables are ([`TableSizes`]).
//!
//! Plain values only: nothing here looks at a frame or holds per-core state.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::cluster::{Affinity, FlowTimeouts, FragmentKey, NodeId};
use crate::wire::{self, EthernetAddress, IpProtocol};

/// IP protocol TCP, as the flow tables store protocols (one byte).
pub(super) const TCP: u8 = IpProtocol::Tcp.raw();

/// Why a frame was dropped. Counted per reason; never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Unparseable, by what the parser found wrong.
    Malformed(wire::Error),
    /// Another node owns the flow (or answers the request).
    NotOwned,
    /// Unicast for a MAC that is neither the cluster's nor this node's.
    NotForUs,
    /// From the host: a frame only the engine may send (its ARP/ND answers for the cluster
    /// address, gratuitous ARP, duplicate-address probes for it).
    HostSuppressed,
    /// Frames spanning several mbuf segments (jumbo frames we did not configure for).
    Chained,
    /// A held fragment whose first fragment never came, or no room to hold it.
    FragmentExpired,
    /// A new flow in a bucket between release and acquire: no node takes it now (the orphan
    /// risk of a handoff; a TCP client retransmits its SYN). Counted by the old owner only.
    ReleaseGap,
    /// From the host: the kernel's RST to a new connection on the health-checked port (the
    /// service is not listening). Held back so that the client retransmits its SYN, which
    /// another node takes once this one drains ([`ServiceState::hold_refusals_on`]).
    ServiceRefused,
    /// To a service address, but no port rule has its protocol and port (`unmatched: drop`).
    NoRule,
    /// A port rule in mode `disabled`.
    RuleDisabled,
    /// A service frame with no backend to go to: none takes new flows, or its MAC is not
    /// resolved yet, or no node address of its IP version to encapsulate from.
    NoBackend,
    /// Several packet cores: the frame's home core had no room for it in its ring.
    CoreQueueFull,
    /// A later IP fragment of a datagram whose first fragment this node owned but dropped
    /// (appliance mode: its rule refused it, no backend took it, or it was too big for the
    /// tunnel and not cut).
    FragmentRefused,
    /// A datagram too big for its backend's tunnel and not sent: with DF (or IPv6) and not
    /// answered (a group source, over the budget of answers, a later fragment), an ICMP error,
    /// IPv4 without DF that cannot be cut (options that do not parse, a header checksum that
    /// does not verify), or the pieces of a cut one when one could not be written.
    TooBig,
    /// A datagram cut for its backend's tunnel whose pieces found not an mbuf each in the
    /// pool: none is sent (the backend could not reassemble it from some).
    NoMbuf,
}

const BASE_REASONS: usize = 14;

impl DropReason {
    /// Number of distinct counters ([`DropReason::index`] is below it).
    pub const COUNT: usize = BASE_REASONS + wire::Error::ALL.len();

    /// A dense index for counter arrays.
    #[inline]
    pub fn index(self) -> usize {
        match self {
            DropReason::NotOwned => 0,
            DropReason::NotForUs => 1,
            DropReason::HostSuppressed => 2,
            DropReason::Chained => 3,
            DropReason::FragmentExpired => 4,
            DropReason::ReleaseGap => 5,
            DropReason::ServiceRefused => 6,
            DropReason::NoRule => 7,
            DropReason::RuleDisabled => 8,
            DropReason::NoBackend => 9,
            DropReason::CoreQueueFull => 10,
            DropReason::FragmentRefused => 11,
            DropReason::TooBig => 12,
            DropReason::NoMbuf => 13,
            DropReason::Malformed(e) => BASE_REASONS + e.index(),
        }
    }

    /// Every reason, in index order.
    pub fn all() -> [DropReason; Self::COUNT] {
        let mut out = [DropReason::NotOwned; Self::COUNT];
        for r in [
            DropReason::NotOwned,
            DropReason::NotForUs,
            DropReason::HostSuppressed,
            DropReason::Chained,
            DropReason::FragmentExpired,
            DropReason::ReleaseGap,
            DropReason::ServiceRefused,
            DropReason::NoRule,
            DropReason::RuleDisabled,
            DropReason::NoBackend,
            DropReason::CoreQueueFull,
            DropReason::FragmentRefused,
            DropReason::TooBig,
            DropReason::NoMbuf,
        ]
        .into_iter()
        .chain(wire::Error::ALL.into_iter().map(DropReason::Malformed))
        {
            out[r.index()] = r;
        }
        out
    }

    /// A label for logs and metrics, e.g. `not-owned`, `malformed-truncated`.
    pub fn label(self) -> String {
        match self {
            DropReason::NotOwned => "not-owned".into(),
            DropReason::NotForUs => "not-for-us".into(),
            DropReason::HostSuppressed => "host-suppressed".into(),
            DropReason::Chained => "chained".into(),
            DropReason::FragmentExpired => "fragment-expired".into(),
            DropReason::ReleaseGap => "release-gap".into(),
            DropReason::ServiceRefused => "service-refused".into(),
            DropReason::NoRule => "no-rule".into(),
            DropReason::RuleDisabled => "rule-disabled".into(),
            DropReason::NoBackend => "no-backend".into(),
            DropReason::CoreQueueFull => "core-queue-full".into(),
            DropReason::FragmentRefused => "fragment-refused".into(),
            DropReason::TooBig => "too-big".into(),
            DropReason::NoMbuf => "no-mbuf".into(),
            DropReason::Malformed(e) => format!("malformed-{}", e.as_str()),
        }
    }
}

/// What to do with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Deliver to the host: this node is the one owner of the frame.
    Deliver,
    /// Deliver to the host: every node's host gets this frame (broadcast, multicast, neighbour
    /// discovery, frames for the node's own MAC, ARP replies to the cluster MAC).
    DeliverShared,
    /// The frame was rewritten in place into an answer of `len` bytes: send it on the wire.
    /// (See [`Action::reply`].)
    Reply {
        len: u32,
    },
    /// From the host: send on the wire (the source MAC has been rewritten).
    ToWire,
    /// A wire heartbeat: hand it to the control thread.
    ToControl,
    /// Appliance mode: send on the wire to a backend, rewritten in place (DSR).
    ToBackend,
    /// Appliance mode: send on the wire to a backend, encapsulated in place: the outer headers
    /// were written into the headroom, so the frame now starts `push` bytes before where it
    /// started and is `len` bytes long (see [`super::FrameBuf`]).
    Encapsulated {
        push: u16,
        len: u16,
    },
    /// Appliance mode: an IPv4 datagram without DF too big for its backend's tunnel, cut into
    /// `pieces` fragments: have [`Pipeline::take_pieces`] write each, encapsulated, into a
    /// frame of its own and send those on the wire; this frame is then freed.
    ToBackendInPieces {
        pieces: u16,
    },
    /// A later fragment whose first fragment has not been seen: hold it (under the key
    /// [`Pipeline::take_held`] gives) until [`Pipeline::take_released`] says what became of its
    /// datagram, or it expires. (The key stays with the pipeline so that an action is 8 bytes,
    /// returned in a register, rather than 48 returned through memory.)
    Hold,
    Drop(DropReason),
}

// An action is returned per frame: one register, not a copy through memory (a larger action
// was built on the stack and read back in wider loads than its stores: a stalled store
// forwarding per frame).
const _: () = assert!(std::mem::size_of::<Action>() <= 8);

impl Action {
    /// [`Action::Reply`] with an answer of `len` bytes (a length no frame has: dropped as
    /// malformed).
    #[inline]
    pub fn reply(len: usize) -> Action {
        match u32::try_from(len) {
            Ok(len) => Action::Reply { len },
            Err(_) => Action::Drop(DropReason::Malformed(crate::wire::Error::BadLength)),
        }
    }

    /// Whether the frame goes to the host port.
    pub fn is_delivery(self) -> bool {
        matches!(self, Action::Deliver | Action::DeliverShared)
    }
}

/// The first fragment of a datagram with held later fragments was seen: deliver them to the
/// host (`owned`), send each to the first's backend (`to_backend`), or drop them (neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub key: FragmentKey,
    pub to: ReleaseTo,
}

/// Where the held fragments of a datagram go once its first fragment is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseTo {
    /// The first went to this node's host: so do they.
    Host,
    /// The first went to a backend (appliance mode): each must be rewritten for it, by
    /// [`Pipeline::released_fragment`], and sent where the [`Action`] it returns says.
    Backend,
    /// The first was another node's, or refused: they are dropped.
    Nowhere,
}

/// What a node is, as far as the per-frame decision is concerned.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node: NodeId,
    pub node_mac: EthernetAddress,
    pub cluster_mac: EthernetAddress,
    pub cluster_ip: Ipv4Addr,
    pub cluster_ip6: Option<Ipv6Addr>,
    pub affinity: Affinity,
    /// The node's own addresses: the outer source of encapsulated frames (appliance mode).
    pub node_ip: Option<Ipv4Addr>,
    pub node_ip6: Option<Ipv6Addr>,
}

impl NodeIdentity {
    /// The identity a validated configuration describes.
    pub fn from_config(c: &crate::config::Config) -> NodeIdentity {
        NodeIdentity {
            node: c.node.id,
            node_mac: c.node.mac,
            cluster_mac: c.cluster.mac,
            cluster_ip: c.cluster.ip,
            cluster_ip6: c.cluster.ip6,
            affinity: c.cluster.affinity,
            node_ip: c.node.ip,
            node_ip6: c.node.ip6,
        }
    }
}

/// The health of the services behind the cluster address, as the control thread last
/// published it (`crate::health`, "Refused connections"). Cores pick it up between bursts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceState {
    /// This node's service fails its health check: take no new TCP connection (a SYN is
    /// dropped and retransmitted by the client, to the new owner once the drain moved the
    /// bucket); packets of known flows and other protocols are served as usual.
    pub refuse_new: bool,
    /// Bit `id - 1` per peer that announced a failing service (it takes no new TCP connection):
    /// while learning a bucket from it, a SYN of a flow we never saw is nobody's, not the old
    /// owner's, so that we take its retransmission after acquire.
    pub refusing_peers: u64,
    /// The health-checked TCP port, while another node could take the connections this node
    /// refuses: the kernel's RST to a new connection on it (nothing listens) is held back and
    /// the flow forgotten, so the client retransmits its SYN instead of failing.
    pub hold_refusals_on: Option<u16>,
}

/// How long a TCP flow is kept after its FIN or RST.
pub const CLOSING_KEPT: Duration = Duration::from_secs(2);

/// Sizes of the per-core tables.
#[derive(Debug, Clone, Copy)]
pub struct TableSizes {
    pub flows: usize,
    pub fragments: usize,
    pub fragment_waits: usize,
    pub fragment_timeout: Duration,
    pub flow_timeouts: FlowTimeouts,
}

impl TableSizes {
    /// Per-core sizes from the configuration. Flows without a TCP state (UDP and the rest) time
    /// out after `control.handoff_learn`: a new owner that learned for that long has seen every
    /// live one, so it never takes one the old owner still serves.
    pub fn from_config(c: &crate::config::Config) -> TableSizes {
        let mut sizes = TableSizes {
            flows: c.dataplane.flow_capacity as usize,
            ..TableSizes::default()
        };
        let learn = c.control.handoff_learn.0;
        // A closed connection is kept only for its last ACK or a retransmitted FIN: a handoff
        // waits for it before the new owner takes the bucket outright.
        sizes.flow_timeouts.tcp_closing = CLOSING_KEPT;
        sizes.flow_timeouts.udp = sizes.flow_timeouts.udp.min(learn);
        sizes.flow_timeouts.other = sizes.flow_timeouts.other.min(learn);
        sizes
    }
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            flows: 1 << 16,
            fragments: 4096,
            fragment_waits: 1024,
            fragment_timeout: Duration::from_secs(2),
            flow_timeouts: FlowTimeouts::default(),
        }
    }
}
