//! Burst preparation, the first half of the decision for a frame from the wire: the MAC checks,
//! the parse, and for unicast TCP/UDP the flow key's keyed hash (eight at a time for a burst),
//! the bucket, the flow fingerprint and a prefetch of the flow-table lines the decision will
//! read.
//!
//! Nothing here changes the pipeline's state: a burst is prepared whole before its first frame
//! is decided, so that the prefetched lines have time to arrive.

use crate::cluster::{Bucket, FlowHash, FlowKey, FlowRest, KeyWords, Role, TcpFlags};
use crate::wire::{self, ethernet, parse_ip_flow, parse_l2_l4, EtherType, IpProtocol, Parsed};

use super::{DropReason, Pipeline};

/// The bucket of a keyed flow-key hash: its low 16 bits (see `cluster::flow_key`).
#[inline(always)]
pub(super) fn bucket_from(key_hash: u64) -> Bucket {
    // Truncation is the definition: hash mod 65536.
    Bucket(key_hash as u16)
}

/// What [`Pipeline::prepare`] keeps of a flow frame besides its key and the rest of its
/// 5-tuple (which [`Pipeline::parts`] writes where the hash will read them).
#[derive(Debug, Clone, Copy, Default)]
struct FlowMeta {
    proto: u8,
    flags: TcpFlags,
    /// Read at fixed offsets ([`parse_ip_flow`]).
    plain: bool,
}

/// A frame after [`Pipeline::prepare`]: what [`Pipeline::decide`] needs. 16 bytes of plain
/// data (a burst of them stays in two cache lines' worth of stores per 8 frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prepared {
    /// Decided already: dropped.
    Drop(DropReason),
    /// Decided already: for every host (the node's own MAC).
    Shared,
    /// Unicast TCP/UDP to the cluster MAC, not a fragment: the common case, decided by the
    /// flow's bucket and flow-table entry alone.
    Flow {
        bucket: Bucket,
        hash: FlowHash,
        proto: u8,
        flags: TcpFlags,
        /// The frame is the common one [`parse_ip_flow`] reads at fixed offsets (untagged,
        /// IPv4 without options or IPv6 with TCP/UDP right after its header, lengths checked):
        /// the decision reads it again at those offsets without checking it again.
        plain: bool,
    },
    /// Anything else (ARP, ICMP, fragments, group addresses, heartbeats): `decide` parses the
    /// frame again and takes the full path.
    Other,
}

impl Default for Prepared {
    fn default() -> Self {
        Prepared::Drop(DropReason::NotForUs)
    }
}

impl Pipeline {
    /// The bucket a frame's flow falls in.
    #[inline]
    pub fn bucket_of(&self, p: &Parsed) -> Bucket {
        bucket_from(self.key_hash(p))
    }

    /// The keyed hash of a frame's flow key: its low 16 bits are the bucket.
    #[inline]
    pub(super) fn key_hash(&self, p: &Parsed) -> u64 {
        let proto = u8::from(p.protocol);
        let key = match (p.protocol, p.src_port, &p.icmp) {
            (IpProtocol::Tcp | IpProtocol::Udp, Some(port), _) => {
                FlowKey::new(self.id.affinity, p.src_ip, port, proto)
            }
            (_, _, Some(icmp)) if icmp.is_error => match icmp.quoted {
                // The quoted packet is one the cluster sent: its destination is the client.
                Some(q) => match (q.protocol, q.dst_port) {
                    (IpProtocol::Tcp | IpProtocol::Udp, Some(port)) => {
                        FlowKey::new(self.id.affinity, q.dst_ip, port, u8::from(q.protocol))
                    }
                    _ => FlowKey::source(q.dst_ip),
                },
                None => FlowKey::source(p.src_ip),
            },
            _ => FlowKey::source(p.src_ip),
        };
        self.hasher.hash(&key)
    }

    /// The first half of [`Pipeline::from_wire`], which changes nothing: the MAC checks, the
    /// parse, and for unicast TCP/UDP the bucket and flow fingerprint, whose flow-table line it
    /// prefetches.
    #[inline]
    pub fn prepare(&self, frame: &[u8]) -> Prepared {
        let (mut key, mut rest) = ([0u64; 3], FlowRest::default());
        match self.parts(frame, &mut key, &mut rest) {
            Err(prepared) => prepared,
            Ok(meta) => {
                let key_hash = self.hasher.hash_words(&key);
                let (bucket, hash) = (bucket_from(key_hash), FlowHash::from_parts(key_hash, &rest));
                let mut prepared = Prepared::default();
                self.finish(bucket, hash, meta, &mut prepared);
                prepared
            }
        }
    }

    /// [`Pipeline::prepare`] of a whole burst (`None`: a frame spanning several segments),
    /// into `out[..frames.len()]`: frames are parsed eight at a time, their flow keys hashed
    /// side by side ([`crate::cluster::BucketHasher::hash8`]), and each group's table lines
    /// prefetched as soon as its hashes are known (a few instructions apart, in the loop that
    /// writes the group's prepared frames), so that the first groups' lines have the time of
    /// the later groups' parsing and hashing to arrive before the first [`Pipeline::decide`].
    ///
    /// Eight prefetches close together rather than one after each hash: at millions of flows
    /// a prefetch may also miss the TLB, and only prefetches close together overlap their
    /// page walks. (One tight loop after all the burst's hashes, as before 2026-11-29, left
    /// the first frames' lines the least time: 100 thousand flows 182 → 172 cycles per frame
    /// with the lines asked for group by group.)
    ///
    /// Returns the burst's frames of buckets that are simply another node's, bit `i` for
    /// `out[i]` (`i` < 64): [`Pipeline::decide`] would drop them ([`DropReason::NotOwned`])
    /// without touching anything, so a caller may drop them in bulk instead. In a 2-node
    /// cluster that is a coin toss per frame; decided one by one, it costs a mispredicted jump
    /// every other frame. The mask and the prefetches are computed without a jump on it. While
    /// a `single` port rule is configured the mask is empty (its node takes its frames whatever
    /// their buckets): every frame is decided, and other nodes' frames cost a table lookup.
    #[inline]
    pub fn prepare_burst(&self, frames: &[Option<&[u8]>], out: &mut [Prepared]) -> u64 {
        const LANES: usize = 8;
        let n = frames.len().min(out.len());
        let mut others = 0u64;
        for g in (0..n).step_by(LANES) {
            let lanes = (n - g).min(LANES);
            // Lane j's flow key and rest of its 5-tuple, if bit j of `flows` is set.
            let mut keys = [[0u64; 3]; LANES];
            let mut rests = [FlowRest::default(); LANES];
            let mut metas = [FlowMeta::default(); LANES];
            let mut flows = 0u32;
            for j in 0..lanes {
                out[g + j] = match frames[g + j] {
                    None => Prepared::Drop(DropReason::Chained),
                    Some(frame) => match self.parts(frame, &mut keys[j], &mut rests[j]) {
                        Err(prepared) => prepared,
                        Ok(meta) => {
                            metas[j] = meta;
                            flows |= 1 << j;
                            continue;
                        }
                    },
                };
            }
            if flows == 0 {
                // Nothing to hash (drops, ARP, ...): skip the SipHashes.
                continue;
            }
            let hashes = self.hasher.hash8(&keys);
            let fingerprints = FlowHash::from_parts8(&hashes, &rests, &self.hasher);
            while flows != 0 {
                let j = flows.trailing_zeros() as usize % LANES;
                flows &= flows - 1;
                let (bucket, hash) = (bucket_from(hashes[j]), fingerprints[j]);
                let not_owner = self.finish(bucket, hash, metas[j], &mut out[g + j]);
                if g + j < 64 {
                    others |= u64::from(not_owner) << (g + j);
                }
            }
        }
        others
    }

    /// The hash-independent part of [`Pipeline::prepare`]: `Err` with the prepared frame if
    /// it is decided already (or takes the full path), else `Ok` for a TCP/UDP frame, whose
    /// flow key and rest of the 5-tuple are written into `key` and `rest`.
    #[inline(always)]
    fn parts(
        &self,
        frame: &[u8],
        key: &mut KeyWords,
        rest: &mut FlowRest,
    ) -> Result<FlowMeta, Prepared> {
        if frame.len() < ethernet::HEADER_LEN {
            return Err(Prepared::Drop(DropReason::Malformed(
                wire::Error::Truncated,
            )));
        }
        let dst = ethernet::Frame::new_unchecked(frame).dst();
        if dst == self.id.node_mac {
            return Err(Prepared::Shared);
        }
        if dst != self.id.cluster_mac {
            // Broadcast and multicast take the full path; other unicast is not ours.
            return Err(if dst.is_multicast() {
                Prepared::Other
            } else {
                Prepared::Drop(DropReason::NotForUs)
            });
        }
        // Most frames: untagged TCP/UDP over IPv4 without options or IPv6 without extension
        // headers, read at fixed offsets.
        if let Some(f) = parse_ip_flow(frame) {
            *key = *FlowKey::new(self.id.affinity, f.src, f.src_port, f.protocol).words();
            *rest = FlowRest::new(f.dst, f.src_port, f.dst_port, f.protocol);
            return Ok(FlowMeta {
                proto: f.protocol,
                flags: TcpFlags(f.tcp_flags),
                plain: true,
            });
        }
        let parsed = parse_l2_l4(frame);
        let p = match &parsed {
            Ok(p) => p,
            Err(e) => return Err(Prepared::Drop(DropReason::Malformed(*e))),
        };
        match (p.ethertype, p.fragment, p.src_port, p.dst_port) {
            (EtherType::Ipv4 | EtherType::Ipv6, None, Some(sp), Some(dp)) => {
                let proto = u8::from(p.protocol);
                // What `key_hash` hashes for TCP/UDP.
                *key = *FlowKey::new(self.id.affinity, p.src_ip, sp, proto).words();
                *rest = FlowRest::new(p.dst_ip, sp, dp, proto);
                Ok(FlowMeta {
                    proto,
                    flags: TcpFlags(p.tcp_flags.0 as u8),
                    plain: false,
                })
            }
            _ => Err(Prepared::Other),
        }
    }

    /// The rest of [`Pipeline::prepare`] for a flow frame, once its bucket and fingerprint are
    /// known: writes the prepared frame into `out`, prefetches its table lines and returns
    /// whether its bucket is simply another node's ([`Pipeline::prefetch`]).
    #[inline(always)]
    fn finish(&self, bucket: Bucket, hash: FlowHash, meta: FlowMeta, out: &mut Prepared) -> bool {
        *out = Prepared::Flow {
            bucket,
            hash,
            proto: meta.proto,
            flags: meta.flags,
            plain: meta.plain,
        };
        self.prefetch(bucket, hash)
    }

    /// Prefetches the table lines `flow_packet` will read for this node's role; for a bucket
    /// that is simply another node's (most frames in a large cluster) there are none, and it
    /// returns `true`.
    #[inline(always)]
    fn prefetch(&self, bucket: Bucket, hash: FlowHash) -> bool {
        let role = self.snapshot.role(bucket, self.id.node);
        match role {
            Role::Learning { .. } => self.learned.prefetch(hash),
            Role::Acquiring { .. } => {
                self.flows.prefetch(hash);
                self.learned.prefetch(hash);
            }
            // Owner or not is a coin toss per frame in a 2-node cluster: no jump on it. A bucket
            // that is another node's may still hold flows this node served before it moved
            // (they stay this node's until they end): its frames take the full decision.
            Role::Owner | Role::NotOwner | Role::Releasing { .. } => {
                // Only another node's bucket needs its count; an owner's frames read bucket
                // 0's, a line that stays cached, rather than a random line of the 256 KiB of
                // counts (at millions of flows a miss the prefetch below would wait for). A
                // `single` rule's frames are not the bucket owner's but its first serving
                // node's: while there is one, no frame is simply another node's.
                let not_owner = role == Role::NotOwner && !self.services.has_single();
                let at = std::hint::select_unpredictable(not_owner, bucket, Bucket(0));
                let mine = !not_owner | (self.flows.count_in_bucket(at) != 0);
                self.flows.prefetch_if(hash, mine);
                return !mine;
            }
        }
        false
    }
}
