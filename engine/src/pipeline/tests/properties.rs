//! Properties over generated frames and clusters: exactly one owner, the burst shortcut
//! decides like the full path, no frame panics.

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Exactly one node delivers each TCP/UDP/ICMP frame to the cluster address, and an ICMP
    /// error goes to the node that owns the flow it quotes.
    #[test]
    fn exactly_one_node_delivers(
        members in members(),
        frames in proptest::collection::vec((any::<[u8; 4]>(), any::<u16>(), kind()), 1..16),
    ) {
        let mut nodes = cluster(&members);
        let mut buf = vec![0u8; 2048];
        for (src, sport, kind) in &frames {
            let src = Ipv4Addr::from(*src);
            let frame = ipv4_frame(src, *sport, kind);
            let mut owners = Vec::new();
            for p in nodes.iter_mut() {
                buf[..frame.len()].copy_from_slice(&frame);
                let action = p.from_wire(&mut FrameBuf::at_start(&mut buf), frame.len(), 0);
                prop_assert!(matches!(action, Action::Deliver | Action::Drop(DropReason::NotOwned)), "{action:?}");
                if action == Action::Deliver {
                    owners.push(p.identity().node);
                }
            }
            prop_assert_eq!(owners.len(), 1);
            if let Kind::ErrorQuoting(tcp) = kind {
                // Same owner as the quoted flow's own packets.
                let flow = ipv4_frame(src, *sport, &if *tcp { Kind::Tcp(0x10) } else { Kind::Udp });
                let p = nodes.iter_mut().find(|p| p.identity().node == owners[0]).unwrap();
                buf[..flow.len()].copy_from_slice(&flow);
                prop_assert_eq!(p.from_wire(&mut FrameBuf::at_start(&mut buf), flow.len(), 0), Action::Deliver);
            }
        }
    }

    /// `prepare` + `decide` (the burst path, with its TCP/UDP shortcut) take exactly the
    /// decisions of the full path, frame after frame, in every role of a handoff, for
    /// well-formed frames, broken ones and the lab capture.
    #[test]
    fn the_shortcut_decides_like_the_full_path(
        members in members(),
        frames in proptest::collection::vec(
            (any::<[u8; 4]>(), 0u16..8, kind(), any::<Option<(usize, u8)>>(), 0u64..4),
            1..48,
        ),
    ) {
        let table = OwnershipTable::build(1, &members).unwrap();
        let me = members[0].id;
        let other = members.last().unwrap().id;
        // A third of the buckets move: to `me` from their owner, or from `me` to `other`.
        let target = |b: Bucket| match table.owner(b) {
            o if !b.index().is_multiple_of(3) => o,
            o if o == me => other,
            _ => me,
        };
        for phase in [Phase::Learn, Phase::Release, Phase::Acquire, Phase::Done] {
            let snapshot = Arc::new(Snapshot::build(
                PlanId { epoch: 2, proposer: me },
                phase,
                |b| table.owner(b),
                Some(&target),
                table.digest(),
            ));
            let mut fast = Pipeline::new(identity(me.get()), SECRET, Arc::clone(&snapshot), small());
            let mut full = Pipeline::new(identity(me.get()), SECRET, snapshot, small());
            let mut all: Vec<Vec<u8>> = frames
                .iter()
                .map(|(src, sport, kind, flip, _)| {
                    let mut f = ipv4_frame(Ipv4Addr::from(*src), 40_000 + sport, kind);
                    if let Some((at, byte)) = flip {
                        let at = at % f.len();
                        f[at] = *byte;
                    }
                    f
                })
                .collect();
            all.extend(capture());
            // A burst prepares exactly what frame-by-frame preparation does.
            let views: Vec<Option<&[u8]>> = all.iter().map(|f| Some(&f[..])).collect();
            let mut burst = vec![Prepared::default(); views.len()];
            let others = fast.prepare_burst(&views, &mut burst);
            // A shorter burst into the same, longer `out` (its tail stale from the burst
            // above): the same bits for its frames, none beyond them. An odd length below
            // 64, so that a group is cut short and its stale rest would show in the mask.
            let k = (views.len() / 2).clamp(1, 61) | 1;
            let short = fast.prepare_burst(&views[..k], &mut burst.clone());
            prop_assert_eq!(short, others & ((1u64 << k) - 1));
            for (n, (frame, b)) in all.iter().zip(&burst).enumerate() {
                prop_assert_eq!(*b, fast.prepare(frame), "frame {}", n);
                // The mask holds exactly the frames `decide` drops untouched as another
                // node's.
                let role = match b {
                    Prepared::Flow { bucket, .. } => Some(fast.snapshot().role(*bucket, me)),
                    _ => None,
                };
                if n < 64 {
                    prop_assert_eq!(others >> n & 1 == 1, role == Some(Role::NotOwner), "frame {}", n);
                }
                if role == Some(Role::NotOwner) {
                    let mut copy = vec![0u8; 2048];
                    copy[..frame.len()].copy_from_slice(frame);
                    let mut probe = Pipeline::new(identity(me.get()), SECRET, Arc::clone(fast.snapshot()), small());
                    prop_assert_eq!(probe.decide(&mut FrameBuf::at_start(&mut copy), frame.len(), b, 0), Action::Drop(DropReason::NotOwned));
                    prop_assert_eq!(probe.flows().len() + probe.learned().len(), 0);
                }
            }
            let mut chained = [Prepared::default()];
            fast.prepare_burst(&[None], &mut chained);
            prop_assert_eq!(chained[0], Prepared::Drop(DropReason::Chained));
            let mut now = 0;
            for (n, frame) in all.iter().enumerate() {
                now += frames.get(n).map_or(1, |f| f.4) * 1_000_000_000;
                let mut a = vec![0u8; 2048];
                a[..frame.len()].copy_from_slice(frame);
                let mut b = a.clone();
                let prepared = fast.prepare(&a[..frame.len()]);
                let x = fast.decide(&mut FrameBuf::at_start(&mut a), frame.len(), &prepared, now);
                let y = full.decide_full(&mut FrameBuf::at_start(&mut b), frame.len(), now);
                prop_assert_eq!(x, y, "frame {} in {:?}", n, phase);
                prop_assert!(a == b, "frame {} rewritten differently", n);
                prop_assert_eq!(fast.take_released(), full.take_released());
            }
            prop_assert_eq!(fast.flows().len(), full.flows().len());
            prop_assert_eq!(fast.learned().len(), full.learned().len());
        }
    }

    /// No frame, however broken, panics either direction.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), cluster_dst in any::<bool>()) {
        let mut p = alone();
        let mut buf = bytes.clone();
        if cluster_dst && buf.len() >= 6 {
            buf[..6].copy_from_slice(&CLUSTER_MAC.0);
        }
        let len = buf.len();
        buf.resize(2048, 0);
        let _ = p.from_wire(&mut FrameBuf::at_start(&mut buf), len, 0);
        let mut host = bytes;
        let _ = p.from_host(&mut host, 0);
    }
}
