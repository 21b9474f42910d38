//! The buffer a decision works in ([`FrameBuf`]): a frame, the headroom before it and the
//! tailroom after it. A decision rewrites the frame in place — a DSR frame's MACs, an answer
//! that outgrows its request (into the tailroom), an encapsulation's outer headers (into the
//! headroom) — so that whoever holds the buffer only moves the frame's start and length
//! ([`super::Action::Encapsulated`]).
//!
//! Owns the bounds of those three parts; never reads or writes a frame's bytes itself.

use std::ops::{Deref, DerefMut};

/// Bytes before a received frame: room for any outer headers (at most 66 bytes). The data
/// plane's buffers have them (it checks), and so do the replay's and the tests'.
pub const HEADROOM: usize = 128;

/// A frame at `at` in `buf`: `buf[..at]` is headroom, `buf[at..]` the frame and the tailroom.
/// Dereferences to `buf[at..]`, the frame first (its length is the caller's to say).
#[derive(Debug)]
pub struct FrameBuf<'a> {
    buf: &'a mut [u8],
    /// At most `buf.len()`.
    at: usize,
}

impl<'a> FrameBuf<'a> {
    /// The frame starting `at` bytes into `buf` (past its end: at its end, nothing after it).
    #[inline]
    pub fn new(buf: &'a mut [u8], at: usize) -> FrameBuf<'a> {
        let at = at.min(buf.len());
        FrameBuf { buf, at }
    }

    /// A frame at the start of `buf`, without headroom: a decision that would encapsulate it
    /// drops it instead ([`super::DropReason::NoBackend`]).
    #[inline]
    pub fn at_start(buf: &'a mut [u8]) -> FrameBuf<'a> {
        FrameBuf { buf, at: 0 }
    }

    /// The buffer from `n` bytes before the frame to its end: where the frame, grown by `n`
    /// bytes at the front, lies (`None`: less headroom than that).
    #[inline]
    pub(super) fn grown_front(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.at.checked_sub(n)?;
        self.buf.get_mut(start..)
    }
}

impl Deref for FrameBuf<'_> {
    type Target = [u8];

    #[inline(always)]
    fn deref(&self) -> &[u8] {
        self.buf.get(self.at..).unwrap_or_default()
    }
}

impl DerefMut for FrameBuf<'_> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.at..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_what_follows_the_headroom() {
        let mut buf: Vec<u8> = (0..10).collect();
        let mut f = FrameBuf::new(&mut buf, 4);
        assert_eq!(&f[..], &[4, 5, 6, 7, 8, 9]);
        f[0] = 40;
        assert_eq!(f.grown_front(3).unwrap(), &[1, 2, 3, 40, 5, 6, 7, 8, 9]);
        assert!(f.grown_front(5).is_none());
        assert_eq!(buf[4], 40);
    }

    #[test]
    fn a_start_past_the_end_leaves_an_empty_frame() {
        let mut buf = [1u8; 4];
        let mut f = FrameBuf::new(&mut buf, 9);
        assert!(f.is_empty());
        assert_eq!(f.grown_front(4).unwrap().len(), 4);
        assert!(f.grown_front(5).is_none());
        let mut g = FrameBuf::at_start(&mut buf);
        assert_eq!(g.len(), 4);
        assert!(g.grown_front(1).is_none());
    }
}
