//! Cutting an IPv4 datagram that allows fragmentation (no DF) into pieces that fit an
//! encapsulated path (RFC 791 §3.2, "Fragmentation"), each piece then encapsulated on its own
//! (inner fragmentation, RFC 4459 §3.2: the backend gets ordinary fragments after
//! decapsulation, and the outer packets stay atomic, DF set, one flow's GUE port).
//!
//! Every piece keeps the datagram's identification, protocol and addresses; its fragment
//! offset and "more fragments" continue the datagram's own (a fragment may be cut again); the
//! first keeps the header's options, later ones only those marked to be copied. A datagram with
//! DF, or whose options do not parse, is never cut here. Plain functions over byte slices:
//! nothing here allocates, reads a clock or panics on a packet.

use crate::wire::checksum;

const IPV4: usize = 20;
/// "Don't fragment", "more fragments" and the offset's bits in the flags-and-offset word.
const DF: u16 = 0x4000;
const MF: u16 = 0x2000;
const OFFSET: u16 = 0x1fff;
/// The largest IPv4 header (IHL 15).
const MAX_HEADER: usize = 60;

/// How one IPv4 packet is cut so that every piece fits `room` bytes ([`Cut::new`]), and the
/// header later pieces carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The packet's header length, and its payload's.
    header: usize,
    payload: usize,
    /// Payload bytes in the first piece and in each later one (multiples of 8 but the last's).
    first: usize,
    each: usize,
    pieces: usize,
    /// The header of the later pieces: the fixed 20 bytes with the copied options behind them,
    /// padded to a multiple of 4 (lengths, offset and checksum written per piece).
    later: [u8; MAX_HEADER],
    later_len: usize,
    /// The packet's flags-and-offset word (DF clear).
    word: u16,
}

impl Cut {
    /// The cut of `packet`, an IPv4 packet exactly as long as its total length says, into
    /// pieces of at most `room` bytes each. `None`: it may not or cannot be cut (DF set, not
    /// IPv4, lengths that disagree, a header checksum that does not verify (the pieces' new
    /// checksums would hide a header damaged on the way), options that do not parse, a room
    /// that holds no 8 bytes of payload behind the header, offsets past the largest).
    pub fn new(packet: &[u8], room: usize) -> Option<Cut> {
        let first_byte = *packet.first()?;
        let header = usize::from(first_byte & 0x0f) * 4;
        if first_byte >> 4 != 4 || header < IPV4 || packet.len() < header {
            return None;
        }
        let word = u16::from_be_bytes([packet[6], packet[7]]);
        if usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len()
            || word & DF != 0
            || checksum::checksum(&packet[..header]) != 0
        {
            return None;
        }
        let mut later = [0u8; MAX_HEADER];
        later[..IPV4].copy_from_slice(&packet[..IPV4]);
        let copied = copied_options(&packet[IPV4..header], &mut later[IPV4..])?;
        let later_len = IPV4 + copied.next_multiple_of(4);
        later[0] = 0x40 | (later_len / 4) as u8;
        let per_piece = |h: usize| room.checked_sub(h).map(|n| n & !7).filter(|&n| n >= 8);
        let (first, each) = (per_piece(header)?, per_piece(later_len)?);
        let payload = packet.len() - header;
        let pieces = if payload <= first {
            1
        } else {
            1 + (payload - first).div_ceil(each)
        };
        let cut = Cut {
            header,
            payload,
            first,
            each,
            pieces,
            later,
            later_len,
            word,
        };
        // The last piece's offset must fit the field, or the datagram is refused whole (not
        // some of its pieces sent).
        let last_offset = usize::from(word & OFFSET) + cut.span(pieces - 1).0 / 8;
        (last_offset <= usize::from(OFFSET)).then_some(cut)
    }

    /// How many pieces.
    pub fn pieces(&self) -> usize {
        self.pieces
    }

    /// Piece `k`'s payload: where it starts in the packet's payload, and its length (0 past
    /// the last piece).
    fn span(&self, k: usize) -> (usize, usize) {
        let start = match k {
            0 => 0,
            _ => (k - 1).saturating_mul(self.each).saturating_add(self.first),
        };
        let size = if k == 0 { self.first } else { self.each };
        (start, size.min(self.payload.saturating_sub(start)))
    }

    /// Bytes of piece `k` (header included; `None` past the last piece).
    pub fn len(&self, k: usize) -> Option<usize> {
        let header = if k == 0 { self.header } else { self.later_len };
        (k < self.pieces).then(|| header + self.span(k).1)
    }

    /// Writes piece `k` (< [`Cut::pieces`]) of `packet`, the packet this cut was made for,
    /// into the start of `out`: its header, then its part of the payload. Returns its length
    /// (`None`: `out` is too short, or no such piece).
    pub fn write(&self, packet: &[u8], k: usize, out: &mut [u8]) -> Option<usize> {
        if k >= self.pieces {
            return None;
        }
        let (start, size) = self.span(k);
        let header = if k == 0 {
            packet.get(..self.header)?
        } else {
            &self.later[..self.later_len]
        };
        let h = header.len();
        let out = out.get_mut(..h + size)?;
        out[..h].copy_from_slice(header);
        let from = self.header + start;
        out[h..].copy_from_slice(packet.get(from..from + size)?);
        let word = self.word;
        // The offset continues the packet's own (in 8-byte units: every piece starts at a
        // multiple of 8); the last piece keeps the packet's "more fragments", the others set it.
        // Checked by `new` for the last piece: this one's fits.
        let offset = (word & OFFSET) + u16::try_from(start / 8).ok()?;
        let more = if k + 1 < self.pieces { MF } else { word & MF };
        out[2..4].copy_from_slice(&u16::try_from(h + size).ok()?.to_be_bytes());
        out[6..8].copy_from_slice(&(more | offset).to_be_bytes());
        out[10..12].fill(0);
        let c = checksum::checksum(&out[..h]);
        out[10..12].copy_from_slice(&c.to_be_bytes());
        Some(h + size)
    }
}

/// Copies the options of `options` that every fragment must carry (the copy flag, RFC 791)
/// into `to`, returns their length (`None`: the options do not parse).
fn copied_options(options: &[u8], to: &mut [u8]) -> Option<usize> {
    let (mut at, mut n) = (0, 0);
    while let Some(&kind) = options.get(at) {
        let len = match kind {
            0 => break, // end of the list
            1 => 1,     // no operation
            _ => usize::from(*options.get(at + 1)?),
        };
        if len < 1 || (kind > 1 && len < 2) || at + len > options.len() {
            return None;
        }
        if kind & 0x80 != 0 {
            to.get_mut(n..n + len)?
                .copy_from_slice(&options[at..at + len]);
            n += len;
        }
        at += len;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::checksum;

    /// An IPv4 packet of `payload` bytes (byte i of the payload is i as u8) with `options`,
    /// flags-and-offset `word`.
    fn packet(payload: usize, options: &[u8], word: u16) -> Vec<u8> {
        let header = IPV4 + options.len();
        let mut p = vec![0u8; header + payload];
        p[0] = 0x40 | (header / 4) as u8;
        p[2..4].copy_from_slice(&((header + payload) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&word.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 7, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 100]);
        p[IPV4..header].copy_from_slice(options);
        for (i, b) in p[header..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let c = checksum(&p[..header]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    }

    /// Every piece of `p` cut for `room`, each checked as a fragment, and the payload they
    /// carry put together again (by offset) with the last piece's "more fragments".
    fn cut_and_join(p: &[u8], room: usize) -> (Vec<Vec<u8>>, Vec<u8>, bool) {
        let cut = Cut::new(p, room).expect("cuttable");
        let mut pieces = Vec::new();
        let first_offset = usize::from(u16::from_be_bytes([p[6], p[7]]) & OFFSET) * 8;
        let mut joined = vec![0u8; p.len() - usize::from(p[0] & 0xf) * 4];
        let mut more = false;
        for k in 0..cut.pieces() {
            let mut out = vec![0u8; 2000];
            let n = cut.write(p, k, &mut out).unwrap();
            assert_eq!(Some(n), cut.len(k));
            assert!(n <= room, "piece {k} of {n} bytes in a room of {room}");
            out.truncate(n);
            let h = usize::from(out[0] & 0xf) * 4;
            assert_eq!(usize::from(u16::from_be_bytes([out[2], out[3]])), n);
            assert_eq!(checksum(&out[..h]), 0, "piece {k}'s header checksum");
            assert_eq!(&out[4..6], &p[4..6], "identification kept");
            assert_eq!(&out[8..10], &p[8..10], "TTL and protocol kept");
            assert_eq!(&out[12..20], &p[12..20], "addresses kept");
            let word = u16::from_be_bytes([out[6], out[7]]);
            assert_eq!(word & DF, 0);
            let at = usize::from(word & OFFSET) * 8 - first_offset;
            if k + 1 < cut.pieces() {
                assert_ne!(word & MF, 0, "piece {k} says more follow");
                assert_eq!((n - h) % 8, 0, "piece {k}'s payload a multiple of 8");
            } else {
                more = word & MF != 0;
            }
            joined[at..at + n - h].copy_from_slice(&out[h..]);
            pieces.push(out);
        }
        (pieces, joined, more)
    }

    #[test]
    fn a_datagram_is_cut_into_pieces_that_fit_and_join_again() {
        for (payload, room) in [
            (1480, 1448),
            (1480, 1468),
            (8000, 1448),
            (1449, 1448),
            (9, 28),
        ] {
            let p = packet(payload, &[], 0);
            let (pieces, joined, more) = cut_and_join(&p, room);
            assert_eq!(joined, &p[20..], "payload {payload}, room {room}");
            assert!(!more);
            assert!(pieces.len() >= 2);
            assert_eq!(pieces.len(), payload.div_ceil((room - 20) & !7));
        }
        // One that fits is one piece, unchanged.
        let p = packet(100, &[], 0);
        let (pieces, _, _) = cut_and_join(&p, 1448);
        assert_eq!(pieces, vec![p]);
    }

    #[test]
    fn a_fragment_is_cut_again_continuing_its_offset_and_its_more_fragments() {
        for more in [0, MF] {
            let p = packet(2000, &[], more | 185); // at byte 1480 of its datagram
            let (pieces, joined, last_more) = cut_and_join(&p, 1000);
            assert_eq!(joined, &p[20..]);
            assert_eq!(last_more, more != 0);
            assert_eq!(
                u16::from_be_bytes([pieces[0][6], pieces[0][7]]) & OFFSET,
                185
            );
        }
    }

    #[test]
    fn the_first_piece_keeps_every_option_later_ones_the_copied_ones() {
        // Record route (7, not copied), a no-op, a security option (130, copied), the end.
        let options = [7, 7, 4, 0, 0, 0, 0, 1, 130, 3, 9, 0];
        let p = packet(3000, &options, 0);
        let (pieces, joined, _) = cut_and_join(&p, 1400);
        assert_eq!(joined, &p[32..]);
        assert_eq!(&pieces[0][20..32], &options);
        for later in &pieces[1..] {
            assert_eq!(
                usize::from(later[0] & 0xf) * 4,
                24,
                "copied options padded to 4"
            );
            assert_eq!(&later[20..24], &[130, 3, 9, 0]);
        }
    }

    #[test]
    fn what_may_not_or_cannot_be_cut_is_refused() {
        assert_eq!(Cut::new(&packet(3000, &[], DF), 1400), None, "DF");
        let mut short = packet(3000, &[], 0);
        short.truncate(2000);
        assert_eq!(Cut::new(&short, 1400), None, "lengths disagree");
        assert_eq!(
            Cut::new(&packet(3000, &[7, 9, 4, 0], 0), 1400),
            None,
            "option too long"
        );
        assert_eq!(
            Cut::new(&packet(3000, &[130, 1, 0, 0], 0), 1400),
            None,
            "option length 1"
        );
        assert_eq!(
            Cut::new(&packet(3000, &[], 0), 27),
            None,
            "no 8 bytes of room"
        );
        let mut v6 = packet(3000, &[], 0);
        v6[0] = 0x65;
        assert_eq!(Cut::new(&v6, 1400), None, "not IPv4");
        assert_eq!(Cut::new(&[], 1400), None);
        // A piece past the last, or an output too short: nothing written.
        let p = packet(3000, &[], 0);
        let cut = Cut::new(&p, 1400).unwrap();
        assert_eq!(cut.write(&p, cut.pieces(), &mut [0u8; 2000]), None);
        assert_eq!(cut.write(&p, 0, &mut [0u8; 100]), None);
    }

    #[test]
    fn an_offset_past_the_largest_or_a_damaged_header_is_refused_whole() {
        // A fragment near the end of the largest datagram: its last piece's offset would not
        // fit, so none is cut (not the first pieces sent and the rest lost).
        assert_eq!(Cut::new(&packet(2000, &[], OFFSET - 10), 1000), None);
        let fits = packet(2000, &[], OFFSET - 2000 / 8);
        let cut = Cut::new(&fits, 1000).unwrap();
        assert_eq!(cut_and_join(&fits, 1000).1, &fits[20..]);
        assert_eq!(cut.len(cut.pieces()), None);
        // A header changed on the way (its checksum does not verify): not cut, lest the
        // pieces' new checksums hide it.
        let mut damaged = packet(2000, &[], 0);
        damaged[8] = 1;
        assert_eq!(Cut::new(&damaged, 1000), None);
    }
}
