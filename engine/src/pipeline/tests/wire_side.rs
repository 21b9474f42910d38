//! Frames from the wire that the pipeline decides without ownership: other MACs, runts,
//! heartbeats, drop reasons, and IP fragments in any order.

use super::*;

#[test]
fn frames_for_other_macs_and_runts() {
    let mut p = alone();
    let mut buf = [0u8; 64];
    buf[..6].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    assert_eq!(
        p.from_wire(&mut FrameBuf::at_start(&mut buf), 64, 0),
        Action::Drop(DropReason::NotForUs)
    );
    buf[..6].copy_from_slice(&NODE_MAC.0);
    assert_eq!(
        p.from_wire(&mut FrameBuf::at_start(&mut buf), 64, 0),
        Action::DeliverShared
    );
    for len in 0..14 {
        assert!(matches!(
            p.from_wire(&mut FrameBuf::at_start(&mut buf), len, 0),
            Action::Drop(DropReason::Malformed(_))
        ));
        assert!(matches!(
            p.from_host(&mut buf[..len], 0),
            Action::Drop(DropReason::Malformed(_))
        ));
    }
    // A length beyond the buffer is refused, not a panic.
    assert!(matches!(
        p.from_wire(&mut FrameBuf::at_start(&mut buf), 65, 0),
        Action::Drop(DropReason::Malformed(_))
    ));
    // A heartbeat frame goes to the control thread.
    buf[..6].copy_from_slice(&[0xff; 6]);
    buf[12..14].copy_from_slice(&HEARTBEAT_ETHERTYPE.to_be_bytes());
    assert_eq!(
        p.from_wire(&mut FrameBuf::at_start(&mut buf), 64, 0),
        Action::ToControl
    );
}

#[test]
fn drop_reason_indices_are_dense() {
    let all = DropReason::all();
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r.index(), i, "{r:?}");
    }
}

#[test]
fn fragments_follow_their_first_even_when_it_comes_last() {
    // From the capture: an IPv4 ping of 3000 bytes in three fragments.
    let frames = capture();
    let frags: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| {
            f[..6] == CLUSTER_MAC.0 && f[12..14] == [8, 0] && (f[20] & 0x3f != 0 || f[21] != 0)
        })
        .take(3)
        .collect();
    assert_eq!(frags.len(), 3, "the capture holds a fragmented ping");
    let members: Vec<Member> = (1..=3).map(|i| Member::new(i, 100).unwrap()).collect();
    let mut nodes = cluster(&members);
    let mut buf = vec![0u8; 2048];
    let mut delivered = vec![0; 3];
    // Last fragments first: held, then released by the first fragment.
    for order in [[1usize, 2, 0], [0, 1, 2]] {
        let mut holds: Vec<FragmentHold<usize>> = (0..3)
            .map(|_| FragmentHold::new(8, Duration::from_secs(2)))
            .collect();
        delivered = vec![0; 3];
        for &i in &order {
            for (n, p) in nodes.iter_mut().enumerate() {
                buf[..frags[i].len()].copy_from_slice(frags[i]);
                match p.from_wire(&mut FrameBuf::at_start(&mut buf), frags[i].len(), 10) {
                    Action::Deliver => delivered[i] += 1,
                    Action::Hold => holds[n].put(p.take_held().unwrap(), 10, i).unwrap(),
                    _ => {}
                }
                if let Some(r) = p.take_released() {
                    holds[n].release(&r.key, |held| {
                        if r.to == ReleaseTo::Host {
                            delivered[held] += 1;
                        }
                    });
                }
            }
        }
        assert_eq!(delivered, vec![1, 1, 1], "order {order:?}");
        // Each node then knows the datagram: the second round needs no hold.
        nodes = cluster(&members);
    }
    assert_eq!(delivered, vec![1, 1, 1]);
}
