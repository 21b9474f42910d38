//! IP fragments (DESIGN.md, "Data path": the first fragment decides, the node that owns it
//! takes the later ones), and the hold for later fragments that arrive before their first.
//!
//! The [`crate::cluster::FragmentTracker`] remembers which datagrams this node owns; a later
//! fragment of a datagram it has not seen yet becomes [`Action::Hold`], and the caller keeps it
//! in a [`FragmentHold`] until [`Pipeline::take_released`] says what became of its datagram, or
//! it expires. In appliance mode the first fragment of a service's flow is decided by its rule
//! (`appliance`), and its later fragments, held or not, go to the same backend the same way, or
//! are dropped if it was refused. The hold is generic over what it keeps (mbufs in the data
//! plane, frames in `replay`): it never looks inside, and never allocates after construction.

use std::time::Duration;

use crate::cluster::{FirstFragment, FragmentKey, FragmentVerdict};
use crate::wire::{Fragment, Parsed};

use super::{Action, DropReason, FrameBuf, Pipeline, ReleaseTo, Released};

impl Pipeline {
    /// An IP fragment to the cluster MAC (`frag` of the datagram `p` belongs to; the frame in
    /// `buf[..len]`, rewritten in place if it goes to a backend).
    #[inline]
    pub(super) fn fragment_from_wire(
        &mut self,
        buf: &mut FrameBuf<'_>,
        len: usize,
        p: &Parsed,
        frag: Fragment,
        now: u64,
    ) -> Action {
        let key = FragmentKey::new(p.src_ip, p.dst_ip, u8::from(p.protocol), frag.ident);
        if frag.offset != 0 {
            return match self.fragments.later_fragment(&key, now) {
                FragmentVerdict::Owned => Action::Deliver,
                FragmentVerdict::NotOwned => Action::Drop(DropReason::NotOwned),
                FragmentVerdict::Forwarded { backend, entropy } => {
                    self.later_fragment_to_backend(buf, len, p, backend, entropy)
                }
                FragmentVerdict::Refused => Action::Drop(DropReason::FragmentRefused),
                FragmentVerdict::Unknown => {
                    self.held = Some(key);
                    Action::Hold
                }
            };
        }
        let service = if self.services.active() {
            self.service_first_fragment(buf, len, p, now)
        } else {
            None
        };
        let (action, first) = service.unwrap_or_else(|| {
            let owned = self.mine(self.bucket_of(p));
            let action = if owned {
                Action::Deliver
            } else {
                Action::Drop(DropReason::NotOwned)
            };
            (action, FirstFragment::owned(owned))
        });
        if self.fragments.first_fragment(&key, first, now) > 0 {
            let to = match first {
                FirstFragment::Owned => ReleaseTo::Host,
                FirstFragment::Forwarded { .. } => ReleaseTo::Backend,
                _ => ReleaseTo::Nowhere,
            };
            self.released = Some(Released { key, to });
        }
        action
    }

    /// A later fragment [`Pipeline::take_released`] released (its first fragment has just been
    /// decided), in `buf[..len]`: what to do with it, as for a frame from the wire — to the
    /// host, to the first's backend (rewritten or encapsulated in place), or dropped. Never
    /// [`Action::Hold`] again.
    pub fn released_fragment(&mut self, buf: &mut FrameBuf<'_>, len: usize, now: u64) -> Action {
        match self.decide_full(buf, len, now) {
            Action::Hold => {
                self.held = None;
                Action::Drop(DropReason::FragmentExpired)
            }
            action => action,
        }
    }

    /// After [`Action::Hold`]: the key of the datagram the fragment waits for (`None`: taken
    /// already).
    #[inline]
    pub fn take_held(&mut self) -> Option<FragmentKey> {
        self.held.take()
    }
}

/// Held later fragments waiting for their first, of any item type (mbufs in the data plane,
/// frame numbers in `replay`). Fixed capacity; nothing allocates after construction.
#[derive(Debug)]
pub struct FragmentHold<T> {
    slots: Vec<Option<(FragmentKey, u64, T)>>,
    timeout: u64,
}

impl<T> FragmentHold<T> {
    pub fn new(capacity: usize, timeout: Duration) -> FragmentHold<T> {
        FragmentHold {
            slots: (0..capacity).map(|_| None).collect(),
            timeout: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Holds `item`; hands it back when every slot is taken.
    pub fn put(&mut self, key: FragmentKey, now: u64, item: T) -> Result<(), T> {
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some((key, now, item));
                Ok(())
            }
            None => Err(item),
        }
    }

    /// Takes one held item of `key`, if any is held.
    pub fn take(&mut self, key: &FragmentKey) -> Option<T> {
        let slot = self
            .slots
            .iter_mut()
            .find(|s| matches!(s, Some((k, _, _)) if k == key))?;
        slot.take().map(|(_, _, item)| item)
    }

    /// Takes every held item of `key`, calling `f` on each.
    pub fn release(&mut self, key: &FragmentKey, mut f: impl FnMut(T)) {
        for slot in &mut self.slots {
            if matches!(slot, Some((k, _, _)) if k == key) {
                if let Some((_, _, item)) = slot.take() {
                    f(item);
                }
            }
        }
    }

    /// Takes every item held for longer than the timeout, calling `f` on each.
    pub fn expire(&mut self, now: u64, mut f: impl FnMut(T)) {
        for slot in &mut self.slots {
            if matches!(slot, Some((_, at, _)) if now.saturating_sub(*at) > self.timeout) {
                if let Some((_, _, item)) = slot.take() {
                    f(item);
                }
            }
        }
    }

    /// Takes everything (at shutdown).
    pub fn drain(&mut self, mut f: impl FnMut(T)) {
        for slot in &mut self.slots {
            if let Some((_, _, item)) = slot.take() {
                f(item);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
