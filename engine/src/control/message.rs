//! The wire format of control messages: a fixed, versioned binary encoding, authenticated.
//!
//! The same bytes travel on the side UDP channel (one datagram per message) and inside wire
//! broadcast frames with EtherType [`crate::wire::CONTROL_ETHERTYPE`] (the message is the
//! frame's payload). Every integer is **big-endian** (network order). No serde: the layout below
//! is the contract, pinned by a test vector, and changes only with a [`VERSION`] bump.
//!
//! # Versions
//!
//! A node decodes its own version and the one before ([`PREVIOUS_VERSION`]) and refuses any
//! other as [`Refusal::UnknownVersion`], so a cluster upgrades one node at a time. It encodes
//! in the version [`super::Membership`] chooses: the newest every live peer understands.
//!
//! - **1**: the format of every release before versions were negotiated.
//! - **2**: the heartbeat's flags gain bit 1, `refusing` (the sender's service fails its health
//!   check), and bit 2, `fenced` (its wire port has no link: it owns nothing). Encoded as
//!   version 1, a heartbeat leaves both clear: a version-1 node cannot act on them (and the
//!   first releases of version 1 refuse bit 1 as malformed). Decoding version 1 accepts bit 1,
//!   which later version-1 releases set.
//! - **3**: the heartbeat's flags gain bit 3, `wire_deaf` (the sender's data path is up but it
//!   hears no peer on the wire), and its body grows by two bitmaps (bit `id - 1` per node):
//!   `wire_heard`, the peers whose wire heartbeats the sender hears, and `serving`, the nodes
//!   it lets own buckets (live and not fenced). (Every version read now carries them.)
//! - **4**: a new kind, 5: an operator's backend drain relayed by the node it was given to
//!   ([`BackendDrain`]). A version-3 node could not read it: a version-4 node relayed one only
//!   while every live peer spoke version 4. Everything else is the same in versions 3 and 4.
//!   (Since version 5 a node no longer reads version 3, so every peer reads a relayed drain.)
//! - **5**: a new kind, 6: a notice to a node whose messages are refused as stale, with the
//!   incarnation the sender holds for it ([`StaleNotice`]), so that a node restarted with a
//!   smaller incarnation than its last run's (its clock stepped back) raises its own above it
//!   instead of staying locked out. Sent only while every live peer speaks version 5; a
//!   version-4 message of kind 6 is malformed.
//!
//! ```text
//! offset len  field
//!      0   2  magic "CC" (0x43 0x43)
//!      2   1  version (4 or 5)
//!      3   1  kind: 1 heartbeat, 2 plan, 3 request, 4 backends, 5 backend drain,
//!             6 stale notice (version 5)
//!      4   1  path the sender put it on: 1 UDP, 2 wire (authenticated: no cross-path replay)
//!      5   1  sender node id (1..=64)
//!      6   8  sender incarnation (a rejoin uses a larger one, e.g. its start time)
//!     14   8  seq: strictly increasing per sender incarnation, over both paths
//!     22   8  config digest of the sender
//!     30   …  body (see `Heartbeat`, `Plan`, `Request`, `Backends`, `BackendDrain` and
//!             `StaleNotice`)
//!  len-16 16  tag: HMAC-SHA256(key, bytes[0..len-16]), first 16 bytes
//! ```
//!
//! The key is [`ControlKey::from_secret`]: `derive_key(secret, b"clonecluster control v1")`,
//! 128 bits, independent of the bucket-hash key.
//!
//! [`decode`] checks, in this order: length and magic ([`Refusal::Malformed`]), version
//! ([`Refusal::UnknownVersion`]), the tag in constant time ([`Refusal::BadMac`]), then the body
//! ([`Refusal::Malformed`]), the path ([`Refusal::WrongPath`]) and the config digest
//! ([`Refusal::WrongDigest`]). So nothing of an unauthenticated body is ever parsed. Replay
//! and staleness need per-peer state and are checked by [`super::Membership`].

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::backends::{BackendDrain, Backends};
use crate::cluster::{derive_key, Member, NodeId, Weight};

/// The newest format version this code speaks.
pub const VERSION: u8 = 5;
/// The oldest format version this code still decodes and can speak: the version before.
pub const PREVIOUS_VERSION: u8 = VERSION - 1;
/// HMAC label of the control-message key.
pub const CONTROL_KEY_LABEL: &[u8] = b"clonecluster control v1";

const MAGIC: [u8; 2] = *b"CC";
const HEADER_LEN: usize = 30;
const TAG_LEN: usize = 16;
/// A heartbeat's body (the same since version 3).
const HEARTBEAT_BODY: usize = 63;
const PLAN_FIXED: usize = 28;
const MEMBER_LEN: usize = 5;
/// The longest message: a plan listing 64 + 64 members. Fits a 1500-byte frame.
pub const MAX_LEN: usize = HEADER_LEN + PLAN_FIXED + 128 * MEMBER_LEN + TAG_LEN;

const KIND_HEARTBEAT: u8 = 1;
const KIND_PLAN: u8 = 2;
const KIND_REQUEST: u8 = 3;
/// Appliance mode's backend reports and table.
const KIND_BACKENDS: u8 = 4;
/// Appliance mode's relayed backend drains.
const KIND_BACKEND_DRAIN: u8 = 5;
/// The first version that carries [`Body::BackendDrain`].
pub const BACKEND_DRAIN_VERSION: u8 = 4;
/// Notices of stale incarnations.
const KIND_STALE_NOTICE: u8 = 6;
/// The first version that carries [`Body::StaleNotice`].
pub const STALE_NOTICE_VERSION: u8 = 5;

/// `releasing_left` value meaning "no flow report yet".
pub const LEFT_UNKNOWN: u32 = u32::MAX;

/// Which path a message travels: the side UDP channel or the wire port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    Udp,
    Wire,
}

impl Path {
    /// Both paths, in counter order.
    pub const ALL: [Path; 2] = [Path::Udp, Path::Wire];

    /// 0 for UDP, 1 for the wire: an index into per-path arrays.
    pub const fn index(self) -> usize {
        match self {
            Path::Udp => 0,
            Path::Wire => 1,
        }
    }

    fn code(self) -> u8 {
        self.index() as u8 + 1
    }

    /// Its name in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Path::Udp => "udp",
            Path::Wire => "wire",
        }
    }
}

/// Why a received message was refused. A refused message is never acted on; the caller (and
/// [`super::Membership::refused`]) counts them per reason and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Refusal {
    #[error("malformed control message")]
    Malformed,
    #[error("unknown control message version")]
    UnknownVersion,
    #[error("bad MAC: forged, corrupted or another cluster secret")]
    BadMac,
    #[error("message claims another path than it arrived on")]
    WrongPath,
    #[error("sender has another configuration digest")]
    WrongDigest,
    #[error("sequence number not newer than the last accepted one (replay or reordering)")]
    Replayed,
    #[error("message from an older incarnation of the sender")]
    Stale,
    #[error("message carries our own node id")]
    FromSelf,
    #[error("plan whose table digests do not match what we compute")]
    TableMismatch,
}

impl Refusal {
    /// Every reason, in counter order.
    pub const ALL: [Refusal; 9] = [
        Refusal::Malformed,
        Refusal::UnknownVersion,
        Refusal::BadMac,
        Refusal::WrongPath,
        Refusal::WrongDigest,
        Refusal::Replayed,
        Refusal::Stale,
        Refusal::FromSelf,
        Refusal::TableMismatch,
    ];

    /// Position in [`Refusal::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Its name in metrics (the `reason` label).
    pub const fn name(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::UnknownVersion => "unknown-version",
            Refusal::BadMac => "bad-mac",
            Refusal::WrongPath => "wrong-path",
            Refusal::WrongDigest => "wrong-digest",
            Refusal::Replayed => "replayed",
            Refusal::Stale => "stale",
            Refusal::FromSelf => "from-self",
            Refusal::TableMismatch => "table-mismatch",
        }
    }
}

/// The 128-bit key that authenticates control messages.
#[derive(Clone)]
pub struct ControlKey([u8; 16]);

impl ControlKey {
    /// `derive_key(secret, CONTROL_KEY_LABEL)`.
    pub fn from_secret(cluster_secret: &[u8]) -> ControlKey {
        ControlKey(derive_key(cluster_secret, CONTROL_KEY_LABEL))
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"))
    }
}

impl fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Derived from the cluster secret: never printed.
        f.write_str("ControlKey(<secret>)")
    }
}

/// Handoff phase of a plan (DESIGN.md, "Changing owners without losing connections").
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Phase {
    /// The new owner records flow keys as the old owner's; the old owner still owns outright.
    Learn = 1,
    /// The old owner takes no new flow; nobody does (a SYN in this gap is retransmitted).
    Release = 2,
    /// The new owner takes new flows not learned as the old owner's; the old one serves its own.
    Acquire = 3,
    /// The plan's target table is in force: every bucket owned outright.
    Done = 4,
}

impl Phase {
    /// The phase in words, for people.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Learn => "learn",
            Phase::Release => "release",
            Phase::Acquire => "acquire",
            Phase::Done => "done",
        }
    }

    fn from_code(c: u8) -> Option<Phase> {
        Some(match c {
            1 => Phase::Learn,
            2 => Phase::Release,
            3 => Phase::Acquire,
            4 => Phase::Done,
            _ => return None,
        })
    }

    /// The phase after this one (`Done` stays `Done`).
    pub fn next(self) -> Phase {
        match self {
            Phase::Learn => Phase::Release,
            Phase::Release => Phase::Acquire,
            Phase::Acquire | Phase::Done => Phase::Done,
        }
    }
}

/// A plan's identity: its epoch and the node that created it. Newer = larger epoch, or the same
/// epoch from a smaller proposer id (so two sides of a healed partition agree on one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanId {
    pub epoch: u64,
    pub proposer: NodeId,
}

impl PlanId {
    /// Whether `self` supersedes `other`.
    pub fn newer_than(self, other: PlanId) -> bool {
        self.epoch > other.epoch || (self.epoch == other.epoch && self.proposer < other.proposer)
    }
}

/// A node's reported load (for the by-load policy and for operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Load {
    /// Flows in this node's flow tables.
    pub active_flows: u32,
    /// Busy fraction of the packet cores, 0..=1000.
    pub busy_permille: u16,
}

/// Sent by every node every interval on both paths.
///
/// Body layout (63 bytes): node MAC 6, weight u32, active flows u32, busy ‰ u16, flags u8
/// (bit 0 draining, bit 1 refusing, bit 2 fenced, bit 3 wire_deaf), view u64, plan epoch u64
/// (0 = no plan), plan proposer u8 (0 = none), phase u8 (0 = none), table digest u64,
/// releasing_left u32, wire_heard u64 and serving u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub node_mac: [u8; 6],
    /// The configured (or operator-set) weight.
    pub weight: Weight,
    pub load: Load,
    pub draining: bool,
    /// The sender's service fails its health check: it takes no new TCP connection, so a
    /// node learning a bucket from it must not count a new SYN as the sender's.
    pub refusing: bool,
    /// The sender's data path cannot serve (or just came back): it owns nothing, and peers
    /// take its buckets (see `Membership`'s fencing).
    pub fenced: bool,
    /// The sender's wire link and packet cores are up, peers are live, and it hears none of
    /// them on the wire.
    pub wire_deaf: bool,
    /// Bit `id - 1` per peer whose wire heartbeats the sender hears.
    pub wire_heard: u64,
    /// Bit `id - 1` per node the sender lets own buckets: live and not fenced, itself included
    /// unless fenced.
    pub serving: u64,
    /// Bit `id - 1` set for each node the sender considers live (itself included).
    pub view: u64,
    /// The plan the sender follows and the phase it has reached and published.
    pub plan: Option<(PlanId, Phase)>,
    /// Digest of the sender's target table (its effective table once the plan is done).
    pub table_digest: u64,
    /// Buckets the sender releases in the current plan, or released in an earlier one and
    /// still serves connections in, that hold live flows, as last reported by its data path;
    /// [`LEFT_UNKNOWN`] before the first report of the current plan.
    pub releasing_left: u32,
}

/// An ownership plan: sent every interval by the coordinator (the lowest live member).
///
/// Body layout: epoch u64, proposer u8, phase u8, from-table digest u64, to-table digest u64,
/// from count u8, to count u8, then (id u8, weight u32) per from member and per to member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: PlanId,
    pub phase: Phase,
    /// Members (sorted by id) of the table buckets move from.
    pub from: Vec<Member>,
    /// Members (sorted by id) of the table buckets move to.
    pub to: Vec<Member>,
    /// `OwnershipTable::build(.., from).digest()`: receivers check it.
    pub from_digest: u64,
    /// `OwnershipTable::build(.., to).digest()`.
    pub to_digest: u64,
}

/// A message's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Heartbeat(Heartbeat),
    Plan(Plan),
    /// An operator's request, relayed by the node it was given to, for node `target`.
    Request(Request),
    /// Appliance mode: the sender's backend report and, from the coordinator, the agreed
    /// backend table (see [`super::backends`]).
    Backends(Backends),
    /// Appliance mode: an operator's backend drain or undrain, relayed by the node it was
    /// given to ([`BACKEND_DRAIN_VERSION`] and later).
    BackendDrain(BackendDrain),
    /// Node `node`'s messages are refused as stale: the sender holds a larger incarnation for
    /// it ([`STALE_NOTICE_VERSION`] and later).
    StaleNotice(StaleNotice),
}

/// What a node tells a peer whose messages it refuses as older than the incarnation it holds
/// for it (SWIM's refutation: the peer raises its own incarnation above `known`). Body layout:
/// node u8, known incarnation u64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleNotice {
    pub node: NodeId,
    pub known: u64,
}

/// An operator's request for another node (`clonecluster drain --node N`). Body layout: target
/// u8, action u8 (1 drain, 2 undrain).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub target: NodeId,
    pub drain: bool,
}

/// One control message: who sent it, when in its life, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The format version it is (to be) encoded in: [`PREVIOUS_VERSION`] or [`VERSION`].
    pub version: u8,
    pub node: NodeId,
    pub incarnation: u64,
    pub seq: u64,
    pub path: Path,
    pub config_digest: u64,
    pub body: Body,
}

impl Message {
    /// The authenticated encoding (see the module doc).
    pub fn encode(&self, key: &ControlKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(MAX_LEN);
        b.extend_from_slice(&MAGIC);
        // A caller bug, not input: only the two versions this code knows can be written.
        debug_assert!((PREVIOUS_VERSION..=VERSION).contains(&self.version));
        let version = self.version.clamp(PREVIOUS_VERSION, VERSION);
        b.push(version);
        b.push(match self.body {
            Body::Heartbeat(_) => KIND_HEARTBEAT,
            Body::Plan(_) => KIND_PLAN,
            Body::Request(_) => KIND_REQUEST,
            Body::Backends(_) => KIND_BACKENDS,
            Body::BackendDrain(_) => KIND_BACKEND_DRAIN,
            Body::StaleNotice(_) => KIND_STALE_NOTICE,
        });
        b.push(self.path.code());
        b.push(self.node.get());
        b.extend_from_slice(&self.incarnation.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.config_digest.to_be_bytes());
        match &self.body {
            Body::Heartbeat(h) => {
                b.extend_from_slice(&h.node_mac);
                b.extend_from_slice(&h.weight.get().to_be_bytes());
                b.extend_from_slice(&h.load.active_flows.to_be_bytes());
                b.extend_from_slice(&h.load.busy_permille.to_be_bytes());
                b.push(
                    u8::from(h.draining)
                        | (u8::from(h.refusing) << 1)
                        | (u8::from(h.fenced) << 2)
                        | (u8::from(h.wire_deaf) << 3),
                );
                b.extend_from_slice(&h.view.to_be_bytes());
                let (epoch, proposer, phase) = match h.plan {
                    Some((id, phase)) => (id.epoch, id.proposer.get(), phase as u8),
                    None => (0, 0, 0),
                };
                b.extend_from_slice(&epoch.to_be_bytes());
                b.push(proposer);
                b.push(phase);
                b.extend_from_slice(&h.table_digest.to_be_bytes());
                b.extend_from_slice(&h.releasing_left.to_be_bytes());
                b.extend_from_slice(&h.wire_heard.to_be_bytes());
                b.extend_from_slice(&h.serving.to_be_bytes());
            }
            Body::Backends(x) => x.encode(&mut b),
            Body::BackendDrain(x) => {
                // A caller bug, not input: only versions that carry it can be written.
                debug_assert!(version >= BACKEND_DRAIN_VERSION);
                x.encode(&mut b);
            }
            Body::StaleNotice(x) => {
                // A caller bug, not input: a version-4 node could not read it.
                debug_assert!(version >= STALE_NOTICE_VERSION);
                b.push(x.node.get());
                b.extend_from_slice(&x.known.to_be_bytes());
            }
            Body::Request(r) => {
                b.push(r.target.get());
                b.push(if r.drain { 1 } else { 2 });
            }
            Body::Plan(p) => {
                b.extend_from_slice(&p.id.epoch.to_be_bytes());
                b.push(p.id.proposer.get());
                b.push(p.phase as u8);
                b.extend_from_slice(&p.from_digest.to_be_bytes());
                b.extend_from_slice(&p.to_digest.to_be_bytes());
                // At most 64 distinct node ids exist; longer lists are a caller bug.
                debug_assert!(p.from.len() <= 64 && p.to.len() <= 64);
                b.push(p.from.len().min(64) as u8);
                b.push(p.to.len().min(64) as u8);
                for m in p.from.iter().take(64).chain(p.to.iter().take(64)) {
                    b.push(m.id.get());
                    b.extend_from_slice(&m.weight.get().to_be_bytes());
                }
            }
        }
        let mut mac = key.mac();
        mac.update(&b);
        let tag = mac.finalize().into_bytes();
        b.extend_from_slice(&tag[..TAG_LEN]);
        b
    }
}

/// A bounds-checked big-endian reader; every read past the end is `Malformed`.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Refusal> {
        let end = self.at.checked_add(N).ok_or(Refusal::Malformed)?;
        let s = self.bytes.get(self.at..end).ok_or(Refusal::Malformed)?;
        self.at = end;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Refusal> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Refusal> {
        Ok(u16::from_be_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, Refusal> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, Refusal> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn node(&mut self) -> Result<NodeId, Refusal> {
        NodeId::new(self.u8()?).ok_or(Refusal::Malformed)
    }
    fn weight(&mut self) -> Result<Weight, Refusal> {
        Weight::new(self.u32()?).ok_or(Refusal::Malformed)
    }
}

/// Decodes and authenticates `bytes` that arrived on `path`, for a cluster whose configuration
/// digest is `config_digest`. Never panics, whatever the input.
pub fn decode(
    bytes: &[u8],
    key: &ControlKey,
    path: Path,
    config_digest: u64,
) -> Result<Message, Refusal> {
    if bytes.len() < HEADER_LEN + TAG_LEN || bytes.len() > MAX_LEN || bytes[0..2] != MAGIC {
        return Err(Refusal::Malformed);
    }
    let version = bytes[2];
    if !(PREVIOUS_VERSION..=VERSION).contains(&version) {
        return Err(Refusal::UnknownVersion);
    }
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    let mut mac = key.mac();
    mac.update(signed);
    mac.verify_truncated_left(tag)
        .map_err(|_| Refusal::BadMac)?;

    let mut r = Reader {
        bytes: signed,
        at: 3,
    };
    let kind = r.u8()?;
    let sent_path = match r.u8()? {
        1 => Path::Udp,
        2 => Path::Wire,
        _ => return Err(Refusal::Malformed),
    };
    let node = r.node()?;
    let incarnation = r.u64()?;
    let seq = r.u64()?;
    let digest = r.u64()?;
    let body = match kind {
        KIND_HEARTBEAT => {
            if signed.len() != HEADER_LEN + HEARTBEAT_BODY {
                return Err(Refusal::Malformed);
            }
            Body::Heartbeat(heartbeat(&mut r)?)
        }
        KIND_PLAN => Body::Plan(plan(&mut r)?),
        KIND_REQUEST => {
            let target = r.node()?;
            let drain = match r.u8()? {
                1 => true,
                2 => false,
                _ => return Err(Refusal::Malformed),
            };
            Body::Request(Request { target, drain })
        }
        KIND_BACKENDS => {
            let (x, n) = Backends::decode(&signed[r.at..]).ok_or(Refusal::Malformed)?;
            r.at += n;
            Body::Backends(x)
        }
        KIND_BACKEND_DRAIN if version >= BACKEND_DRAIN_VERSION => {
            let (x, n) = BackendDrain::decode(&signed[r.at..]).ok_or(Refusal::Malformed)?;
            r.at += n;
            Body::BackendDrain(x)
        }
        KIND_STALE_NOTICE if version >= STALE_NOTICE_VERSION => Body::StaleNotice(StaleNotice {
            node: r.node()?,
            known: r.u64()?,
        }),
        _ => return Err(Refusal::Malformed),
    };
    if r.at != signed.len() {
        return Err(Refusal::Malformed);
    }
    if sent_path != path {
        return Err(Refusal::WrongPath);
    }
    if digest != config_digest {
        return Err(Refusal::WrongDigest);
    }
    Ok(Message {
        version,
        node,
        incarnation,
        seq,
        path,
        config_digest: digest,
        body,
    })
}

/// A heartbeat's body (its length already checked).
fn heartbeat(r: &mut Reader<'_>) -> Result<Heartbeat, Refusal> {
    let node_mac = r.take::<6>()?;
    let weight = r.weight()?;
    let active_flows = r.u32()?;
    let busy_permille = r.u16()?;
    let flags = r.u8()?;
    if flags > 15 || busy_permille > 1000 {
        return Err(Refusal::Malformed);
    }
    let view = r.u64()?;
    let epoch = r.u64()?;
    let proposer = r.u8()?;
    let phase = r.u8()?;
    let plan = match (epoch, proposer, phase) {
        (0, 0, 0) => None,
        (0, _, _) => return Err(Refusal::Malformed),
        (epoch, p, ph) => {
            let proposer = NodeId::new(p).ok_or(Refusal::Malformed)?;
            let phase = Phase::from_code(ph).ok_or(Refusal::Malformed)?;
            Some((PlanId { epoch, proposer }, phase))
        }
    };
    let table_digest = r.u64()?;
    let releasing_left = r.u32()?;
    let (wire_heard, serving) = (r.u64()?, r.u64()?);
    Ok(Heartbeat {
        node_mac,
        weight,
        load: Load {
            active_flows,
            busy_permille,
        },
        draining: flags & 1 == 1,
        refusing: flags & 2 == 2,
        fenced: flags & 4 == 4,
        wire_deaf: flags & 8 == 8,
        wire_heard,
        serving,
        view,
        plan,
        table_digest,
        releasing_left,
    })
}

/// A plan's body.
fn plan(r: &mut Reader<'_>) -> Result<Plan, Refusal> {
    let epoch = r.u64()?;
    let proposer = r.node()?;
    let phase = Phase::from_code(r.u8()?).ok_or(Refusal::Malformed)?;
    let from_digest = r.u64()?;
    let to_digest = r.u64()?;
    let n_from = usize::from(r.u8()?);
    let n_to = usize::from(r.u8()?);
    if epoch == 0 || n_from > 64 || n_to == 0 || n_to > 64 {
        return Err(Refusal::Malformed);
    }
    let mut members = |n: usize| -> Result<Vec<Member>, Refusal> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.node()?;
            let weight = r.weight()?;
            // Sorted and distinct: one encoding per plan.
            if v.last().is_some_and(|m: &Member| m.id >= id) {
                return Err(Refusal::Malformed);
            }
            v.push(Member { id, weight });
        }
        Ok(v)
    };
    let from = members(n_from)?;
    let to = members(n_to)?;
    Ok(Plan {
        id: PlanId { epoch, proposer },
        phase,
        from,
        to,
        from_digest,
        to_digest,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> ControlKey {
        ControlKey::from_secret(b"clonecluster test secret")
    }

    fn n(id: u8) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn heartbeat(path: Path) -> Message {
        Message {
            version: VERSION,
            node: n(3),
            incarnation: 1_700_000_000_000_000_000,
            seq: 42,
            path,
            config_digest: 0xfeed_beef,
            body: Body::Heartbeat(Heartbeat {
                node_mac: [2, 0xcc, 0, 0, 0, 3],
                weight: Weight::new(100).unwrap(),
                load: Load {
                    active_flows: 1234,
                    busy_permille: 456,
                },
                draining: true,
                refusing: true,
                fenced: true,
                wire_deaf: true,
                wire_heard: 0b101,
                serving: 0b110,
                view: 0b111,
                plan: Some((
                    PlanId {
                        epoch: 9,
                        proposer: n(1),
                    },
                    Phase::Acquire,
                )),
                table_digest: 0x0123_4567_89ab_cdef,
                releasing_left: 7,
            }),
        }
    }

    fn plan() -> Message {
        let to: Vec<Member> = (1..=64)
            .map(|i| Member::new(i, u32::from(i)).unwrap())
            .collect();
        Message {
            version: VERSION,
            node: n(1),
            incarnation: 5,
            seq: 6,
            path: Path::Wire,
            config_digest: 0xfeed_beef,
            body: Body::Plan(Plan {
                id: PlanId {
                    epoch: 10,
                    proposer: n(1),
                },
                phase: Phase::Learn,
                from: to[..63].to_vec(),
                to,
                from_digest: 1,
                to_digest: 2,
            }),
        }
    }

    /// An operator's drain of the backends at places 2 and 700, relayed.
    fn backend_drain() -> Message {
        Message {
            version: VERSION,
            node: n(2),
            incarnation: 5,
            seq: 8,
            path: Path::Udp,
            config_digest: 0xfeed_beef,
            body: Body::BackendDrain(BackendDrain {
                digest: 0x0102_0304_0506_0708,
                drain: true,
                places: [2, 700].into(),
            }),
        }
    }

    /// Node 3 tells node 7 it holds incarnation 0x0102030405060708 for it.
    fn stale_notice() -> Message {
        let mut m = heartbeat(Path::Udp);
        m.body = Body::StaleNotice(StaleNotice {
            node: n(7),
            known: 0x0102_0304_0506_0708,
        });
        m
    }

    fn dec(b: &[u8], path: Path) -> Result<Message, Refusal> {
        decode(b, &key(), path, 0xfeed_beef)
    }

    /// `signed` (a message without its tag) with a correct tag: a body the sender chose.
    fn signed(mut signed: Vec<u8>) -> Vec<u8> {
        let mut mac = key().mac();
        mac.update(&signed);
        let tag = mac.finalize().into_bytes();
        signed.extend_from_slice(&tag[..TAG_LEN]);
        signed
    }

    #[test]
    fn round_trips() {
        for m in [heartbeat(Path::Udp), heartbeat(Path::Wire), plan()] {
            let b = m.encode(&key());
            assert!(b.len() <= MAX_LEN);
            assert_eq!(dec(&b, m.path), Ok(m));
        }
        let mut m = heartbeat(Path::Udp);
        if let Body::Heartbeat(h) = &mut m.body {
            h.plan = None;
            h.draining = false;
            h.refusing = false;
            h.fenced = false;
            h.wire_deaf = false;
            h.wire_heard = 0;
            h.serving = u64::MAX;
        }
        assert_eq!(dec(&m.encode(&key()), Path::Udp), Ok(m));
        assert!(plan().encode(&key()).len() <= 1500 - 14);
        for drain in [true, false] {
            let mut m = heartbeat(Path::Wire);
            m.body = Body::Request(Request {
                target: n(5),
                drain,
            });
            let b = m.encode(&key());
            assert_eq!(dec(&b, Path::Wire), Ok(m));
            // An unknown action is malformed, even correctly signed.
            let mut forged = b[..b.len() - TAG_LEN].to_vec();
            *forged.last_mut().unwrap() = 9;
            let mut mac = key().mac();
            mac.update(&forged);
            let tag = mac.finalize().into_bytes();
            forged.extend_from_slice(&tag[..TAG_LEN]);
            assert_eq!(dec(&forged, Path::Wire), Err(Refusal::Malformed));
        }
        for drain in [true, false] {
            let mut m = backend_drain();
            if let Body::BackendDrain(d) = &mut m.body {
                d.drain = drain;
                d.places = (1..=64).collect();
            }
            let b = m.encode(&key());
            assert!(b.len() <= MAX_LEN);
            assert_eq!(dec(&b, Path::Udp), Ok(m));
        }
        let m = stale_notice();
        assert_eq!(dec(&m.encode(&key()), Path::Udp), Ok(m));
    }

    /// PINNED: the layout is the wire contract; change it only with a VERSION bump.
    #[test]
    fn pinned_stale_notice_layout() {
        let b = stale_notice().encode(&key());
        assert_eq!(b.len(), HEADER_LEN + 9 + TAG_LEN);
        assert_eq!(&b[..6], &[b'C', b'C', 5, 6, 1, 3]);
        assert_eq!(b[30], 7, "the node refused");
        assert_eq!(&b[31..39], &0x0102_0304_0506_0708u64.to_be_bytes(), "known");
        // A node id of 0 is malformed, even correctly signed.
        let mut zero = b[..b.len() - TAG_LEN].to_vec();
        zero[30] = 0;
        assert_eq!(dec(&signed(zero), Path::Udp), Err(Refusal::Malformed));
    }

    /// PINNED: the layout is the wire contract; change it only with a VERSION bump.
    #[test]
    fn pinned_backend_drain_layout() {
        let b = backend_drain().encode(&key());
        assert_eq!(b.len(), HEADER_LEN + 8 + 1 + 1 + 2 * 2 + TAG_LEN);
        assert_eq!(&b[..6], &[b'C', b'C', 5, 5, 1, 2]);
        assert_eq!(
            &b[30..38],
            &0x0102_0304_0506_0708u64.to_be_bytes(),
            "digest"
        );
        assert_eq!(b[38], 1, "drain");
        assert_eq!(b[39], 2, "count");
        assert_eq!(&b[40..44], &[0, 2, 0x02, 0xbc], "places 2 and 700");
        let mut m = backend_drain();
        if let Body::BackendDrain(d) = &mut m.body {
            d.drain = false;
        }
        assert_eq!(m.encode(&key())[38], 2, "undrain");
    }

    /// PINNED: the layout is the wire contract; change it only with a VERSION bump.
    #[test]
    fn pinned_heartbeat_layout() {
        // The same since version 3; this release writes 4 and 5.
        for version in [4u8, 5] {
            let mut m = heartbeat(Path::Udp);
            m.version = version;
            let b = m.encode(&key());
            assert_eq!(b.len(), HEADER_LEN + 63 + TAG_LEN);
            assert_eq!(&b[..6], &[b'C', b'C', version, 1, 1, 3]);
            assert_eq!(&b[14..22], &42u64.to_be_bytes());
            assert_eq!(&b[30..36], &[2, 0xcc, 0, 0, 0, 3]);
            assert_eq!(&b[36..40], &100u32.to_be_bytes());
            // Flags: draining, refusing, fenced, wire_deaf.
            assert_eq!(b[46], 0b1111, "version {version}");
            assert_eq!(&b[73..77], &7u32.to_be_bytes(), "releasing_left");
            assert_eq!(&b[77..85], &0b101u64.to_be_bytes(), "wire_heard");
            assert_eq!(&b[85..93], &0b110u64.to_be_bytes(), "serving");
        }
    }

    #[test]
    fn the_previous_version_is_spoken_and_understood() {
        // Heartbeats, plans, requests, backends and backend drains are the same in versions 4
        // and 5.
        let mut m = heartbeat(Path::Wire);
        m.version = PREVIOUS_VERSION;
        assert_eq!(PREVIOUS_VERSION, 4);
        let b = m.encode(&key());
        assert_eq!(dec(&b, Path::Wire), Ok(m.clone()));
        let mut p = plan();
        p.version = PREVIOUS_VERSION;
        assert_eq!(dec(&p.encode(&key()), Path::Wire), Ok(p));
        let mut r = heartbeat(Path::Wire);
        r.version = PREVIOUS_VERSION;
        r.body = Body::Request(Request {
            target: n(5),
            drain: true,
        });
        assert_eq!(dec(&r.encode(&key()), Path::Wire), Ok(r));
        let mut d = backend_drain();
        d.version = PREVIOUS_VERSION;
        assert_eq!(dec(&d.encode(&key()), Path::Udp), Ok(d));
        // A stale notice claiming version 4 is malformed, even correctly signed: a version-4
        // node cannot read it.
        let mut v4 = stale_notice().encode(&key());
        v4.truncate(v4.len() - TAG_LEN);
        v4[2] = 4;
        assert_eq!(dec(&signed(v4), Path::Udp), Err(Refusal::Malformed));
        // Version 3 is two releases back: refused.
        let mut b = b;
        b[2] = 3;
        assert_eq!(dec(&b, Path::Wire), Err(Refusal::UnknownVersion));
    }

    #[test]
    fn refusals() {
        let b = heartbeat(Path::Udp).encode(&key());
        assert_eq!(dec(&b, Path::Wire), Err(Refusal::WrongPath));
        assert_eq!(decode(&b, &key(), Path::Udp, 1), Err(Refusal::WrongDigest));
        assert_eq!(
            decode(
                &b,
                &ControlKey::from_secret(b"other"),
                Path::Udp,
                0xfeed_beef
            ),
            Err(Refusal::BadMac)
        );
        for version in [0, VERSION + 1, 0xff] {
            let mut v = b.clone();
            v[2] = version;
            assert_eq!(dec(&v, Path::Udp), Err(Refusal::UnknownVersion));
        }
        let mut v = b.clone();
        v[0] = b'X';
        assert_eq!(dec(&v, Path::Udp), Err(Refusal::Malformed));
        assert_eq!(dec(&[], Path::Udp), Err(Refusal::Malformed));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in [
            heartbeat(Path::Udp),
            plan(),
            backend_drain(),
            stale_notice(),
        ] {
            let b = m.encode(&key());
            for len in 0..b.len() {
                assert!(dec(&b[..len], m.path).is_err(), "length {len}");
            }
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        for m in [
            heartbeat(Path::Udp),
            plan(),
            backend_drain(),
            stale_notice(),
        ] {
            let b = m.encode(&key());
            for bit in 0..b.len() * 8 {
                let mut v = b.clone();
                v[bit / 8] ^= 1 << (bit % 8);
                let got = dec(&v, m.path);
                // Magic and version are checked before the tag; everything else is the tag.
                // A flipped version bit that names the other known version fails the tag.
                let want = match bit / 8 {
                    0 | 1 => Refusal::Malformed,
                    2 if !(PREVIOUS_VERSION..=VERSION).contains(&v[2]) => Refusal::UnknownVersion,
                    _ => Refusal::BadMac,
                };
                assert_eq!(got, Err(want), "bit {bit}");
            }
        }
    }

    #[test]
    fn validly_signed_nonsense_is_malformed() {
        // A correct tag over a body with bad fields: parsed only after authentication, and
        // still refused.
        let mut m = plan();
        if let Body::Plan(p) = &mut m.body {
            p.to.swap(0, 1); // unsorted
        }
        assert_eq!(dec(&m.encode(&key()), Path::Wire), Err(Refusal::Malformed));
        // A backend drain with an unknown action, no place, more than 64, places out of
        // order or repeated, or bytes left over.
        let mut good = backend_drain().encode(&key());
        good.truncate(good.len() - TAG_LEN);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            dec(&signed(b), Path::Udp)
        };
        assert!(bad(&|_| {}).is_ok());
        assert_eq!(bad(&|b| b[38] = 3), Err(Refusal::Malformed), "action");
        assert_eq!(
            bad(&|b| {
                b[39] = 0;
                b.truncate(40);
            }),
            Err(Refusal::Malformed),
            "no place"
        );
        assert_eq!(
            bad(&|b| {
                b[39] = 65;
                b.truncate(40);
                b.extend((1..=65u16).flat_map(u16::to_be_bytes));
            }),
            Err(Refusal::Malformed),
            "65 places"
        );
        assert_eq!(
            bad(&|b| b[40..44].copy_from_slice(&[0x02, 0xbc, 0, 2])),
            Err(Refusal::Malformed),
            "out of order"
        );
        assert_eq!(
            bad(&|b| b[42..44].copy_from_slice(&[0, 2])),
            Err(Refusal::Malformed),
            "repeated"
        );
        assert_eq!(bad(&|b| b.push(0)), Err(Refusal::Malformed), "left over");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..800)) {
            let _ = dec(&bytes, Path::Udp);
        }

        #[test]
        fn signed_arbitrary_bodies_never_panic(
            kind in 0u8..7,
            body in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            // Valid header and tag around random bodies: exercises the body parser.
            let mut b = heartbeat(Path::Udp).encode(&key());
            b.truncate(HEADER_LEN);
            b[3] = kind;
            b.extend_from_slice(&body);
            let mut mac = key().mac();
            mac.update(&b);
            let tag = mac.finalize().into_bytes();
            b.extend_from_slice(&tag[..TAG_LEN]);
            let _ = dec(&b, Path::Udp);
        }
    }
}
