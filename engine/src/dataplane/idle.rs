//! How a packet core waits when its queues are empty, by `dataplane.idle`: busy polling,
//! adaptive sleeps, or RX interrupts (with a fallback to adaptive sleeps where a port has
//! none). It must never delay a frame that is already in a queue.

use std::time::Duration;

use dpdk_sys as sys;

use super::link::CoreLink;
use super::strerror;
use super::worker::Shared;
use crate::config::IdleMode;

/// Polls without traffic before a core starts to back off.
const SPIN_POLLS: u32 = 64;
const FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Longest epoll wait when every port can wake us: only bounds how late `stop` is seen.
const INTERRUPT_WAIT_MS: i32 = 100;

/// A wait of at most `longest`, and at most a quarter of the control thread's `tick` (but a
/// millisecond, epoll's least, if `longest` allows it: with a tick under 4 ms, more than a
/// quarter): the wire heartbeats it queues go out from core 0 when it wakes, and peers find a
/// node dead after a few ticks of silence (an idle node, waiting 100 ms at a time, fell silent
/// on the wire).
fn within_tick(longest: Duration, tick: Duration) -> Duration {
    longest
        .min(tick / 4)
        .max(Duration::from_millis(1).min(longest))
}

/// What a core does after a poll, by idle mode.
pub(super) struct Idle {
    mode: IdleMode,
    empty_polls: u32,
    sleep: Duration,
    max_sleep: Duration,
    /// Interrupt mode: (port, queue) pairs registered with this thread's epoll.
    intr: [(u16, u16, bool); 2],
    armed: bool,
    wait_ms: i32,
}

impl Idle {
    pub(super) fn new(shared: &Shared, queue: u16) -> Idle {
        let mut mode = shared.idle;
        let mut intr = [(shared.wire, queue, false), (shared.host, queue, false)];
        if mode == IdleMode::Interrupt {
            for (entry, capable) in intr.iter_mut().zip([shared.wire_intr, shared.host_intr]) {
                if !capable {
                    continue;
                }
                // SAFETY: the port was started with RX interrupts configured and `queue` is
                // one of its queues; the epoll instance is this thread's own.
                let ret = unsafe {
                    sys::rte_eth_dev_rx_intr_ctl_q(
                        entry.0,
                        entry.1,
                        sys::RTE_EPOLL_PER_THREAD,
                        sys::RTE_INTR_EVENT_ADD as i32,
                        std::ptr::null_mut(),
                    )
                };
                entry.2 = ret == 0;
                if ret != 0 {
                    tracing::info!(port = entry.0, queue, "no RX interrupt: {}", strerror(ret));
                }
            }
            if !intr.iter().any(|e| e.2) {
                tracing::info!(
                    queue,
                    "no port has RX interrupts: falling back to adaptive idle"
                );
                mode = IdleMode::Adaptive;
            }
        }
        // When a port cannot wake us, the wait is bounded like an adaptive sleep; so it is
        // with several cores, whose rings between them raise no interrupt.
        let all_capable = intr.iter().all(|e| e.2) && shared.cores.len() == 1;
        let max_sleep = within_tick(shared.max_sleep, shared.control_interval);
        let longest = if all_capable {
            Duration::from_millis(INTERRUPT_WAIT_MS as u64)
        } else {
            max_sleep
        };
        let wait_ms = within_tick(longest, shared.control_interval)
            .as_millis()
            .clamp(1, i32::MAX as u128) as i32;
        Idle {
            mode,
            empty_polls: 0,
            sleep: FIRST_SLEEP,
            max_sleep: max_sleep.max(FIRST_SLEEP),
            intr,
            armed: false,
            wait_ms,
        }
    }

    /// After a poll that received `received` frames: maybe sleep. Returns whether it slept;
    /// while it sleeps, `mark` (the core's link, when it follows the control thread's
    /// snapshots) says so, and the core must then adopt the current snapshot before it decides
    /// anything (see [`CoreLink::decides_under`]).
    #[inline(always)]
    pub(super) fn after_poll(&mut self, received: usize, mark: Option<(&CoreLink, u64)>) -> bool {
        if received > 0 {
            if self.empty_polls != 0 {
                self.empty_polls = 0;
                self.sleep = FIRST_SLEEP;
                self.disarm();
            }
            return false;
        }
        match self.mode {
            IdleMode::Busy => false,
            IdleMode::Adaptive => {
                self.empty_polls += 1;
                if self.empty_polls <= SPIN_POLLS {
                    return false;
                }
                let sleep = self.sleep;
                asleep(mark, || std::thread::sleep(sleep));
                self.sleep = (self.sleep * 2).min(self.max_sleep);
                true
            }
            IdleMode::Interrupt => {
                self.empty_polls += 1;
                if self.empty_polls <= SPIN_POLLS {
                    return false;
                }
                if !self.armed {
                    // Arm, then poll once more before sleeping: a frame that arrived before the
                    // arm raised no interrupt.
                    self.arm();
                    return false;
                }
                asleep(mark, || self.wait());
                true
            }
        }
    }

    /// Interrupt mode: waits for an RX interrupt (or `wait_ms`).
    fn wait(&mut self) {
        let mut events = [sys::rte_epoll_event::default(); 2];
        // SAFETY: `events` has room for 2 events; the epoll instance is this thread's.
        unsafe {
            sys::rte_epoll_wait(
                sys::RTE_EPOLL_PER_THREAD,
                events.as_mut_ptr(),
                events.len() as i32,
                self.wait_ms,
            );
        }
        self.disarm();
    }

    fn arm(&mut self) {
        for &(port, queue, capable) in &self.intr {
            if capable {
                // SAFETY: the queue was registered for interrupts in `new`.
                unsafe { sys::rte_eth_dev_rx_intr_enable(port, queue) };
            }
        }
        self.armed = true;
    }

    fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        for &(port, queue, capable) in &self.intr {
            if capable {
                // SAFETY: the queue was registered for interrupts in `new`.
                unsafe { sys::rte_eth_dev_rx_intr_disable(port, queue) };
            }
        }
        self.armed = false;
    }
}

/// Runs `sleep` with the core marked as following the snapshot on wake-up, then marks it awake
/// under the same version (the core then reads the current version before deciding).
#[inline]
fn asleep(mark: Option<(&CoreLink, u64)>, sleep: impl FnOnce()) {
    if let Some((link, version)) = mark {
        link.sleep_after(version);
        sleep();
        link.decide_under(version);
    } else {
        sleep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_never_outlasts_a_quarter_of_the_control_tick() {
        let ms = Duration::from_millis;
        assert_eq!(within_tick(ms(100), ms(100)), ms(25));
        assert_eq!(within_tick(ms(100), ms(1000)), ms(100));
        assert_eq!(
            within_tick(Duration::from_micros(500), ms(100)),
            Duration::from_micros(500)
        );
        assert_eq!(
            within_tick(ms(20), ms(2)),
            ms(1),
            "at least a millisecond of epoll"
        );
    }
}
