//! Per-core packet counters: one writer each (its core), read by the control thread, the
//! metrics endpoint and the exit report. No DPDK types.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::pipeline::DropReason;

/// One core's counters. Each field has a single writer (its core), which publishes with plain
/// relaxed stores; readers (the control thread, the exit report) read relaxed. Cache-aligned so
/// two cores never share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct CoreCounters {
    pub wire_rx: AtomicU64,
    pub host_rx: AtomicU64,
    /// Frames the host port's TX queue took.
    pub host_tx: AtomicU64,
    /// Frames the wire port's TX queue took (the host's frames and replies).
    pub wire_tx: AtomicU64,
    pub replies: AtomicU64,
    /// Frames sent to a backend (appliance mode).
    pub to_backend: AtomicU64,
    pub to_control: AtomicU64,
    /// The control thread's messages this core framed and queued for the wire port (core 0).
    pub control_tx: AtomicU64,
    /// Frames a TX queue did not take; freed and counted, never leaked.
    pub tx_unsent: AtomicU64,
    /// Later fragments held until their first fragment was seen.
    pub held: AtomicU64,
    /// Frames passed to the core that holds their flow's state (several cores only).
    pub passed: AtomicU64,
    pub dropped: [AtomicU64; DropReason::COUNT],
}

impl CoreCounters {
    pub fn snapshot(&self) -> CoreStats {
        CoreStats {
            wire_rx: self.wire_rx.load(Relaxed),
            host_rx: self.host_rx.load(Relaxed),
            host_tx: self.host_tx.load(Relaxed),
            wire_tx: self.wire_tx.load(Relaxed),
            replies: self.replies.load(Relaxed),
            to_backend: self.to_backend.load(Relaxed),
            to_control: self.to_control.load(Relaxed),
            control_tx: self.control_tx.load(Relaxed),
            tx_unsent: self.tx_unsent.load(Relaxed),
            held: self.held.load(Relaxed),
            passed: self.passed.load(Relaxed),
            dropped: std::array::from_fn(|i| self.dropped[i].load(Relaxed)),
        }
    }
}

/// A copy of one core's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CoreStats {
    pub wire_rx: u64,
    pub host_rx: u64,
    pub host_tx: u64,
    pub wire_tx: u64,
    pub replies: u64,
    pub to_backend: u64,
    pub to_control: u64,
    pub control_tx: u64,
    pub tx_unsent: u64,
    pub held: u64,
    /// Frames passed to another core, their home.
    pub passed: u64,
    /// Drops by reason, indexed by [`DropReason::index`].
    pub dropped: [u64; DropReason::COUNT],
}

impl CoreStats {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    pub fn add(&mut self, o: &CoreStats) {
        self.wire_rx += o.wire_rx;
        self.host_rx += o.host_rx;
        self.host_tx += o.host_tx;
        self.wire_tx += o.wire_tx;
        self.replies += o.replies;
        self.to_backend += o.to_backend;
        self.to_control += o.to_control;
        self.control_tx += o.control_tx;
        self.tx_unsent += o.tx_unsent;
        self.held += o.held;
        self.passed += o.passed;
        for (a, b) in self.dropped.iter_mut().zip(o.dropped) {
            *a += b;
        }
    }
}

impl std::fmt::Display for CoreStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "wire_rx={} host_tx={} host_rx={} wire_tx={} replies={} to_control={} tx_unsent={} dropped={}",
            self.wire_rx,
            self.host_tx,
            self.host_rx,
            self.wire_tx,
            self.replies,
            self.to_control,
            self.tx_unsent,
            self.dropped_total()
        )?;
        for (reason, n) in DropReason::all().iter().zip(self.dropped) {
            if n > 0 {
                write!(f, " dropped_{}={n}", reason.label())?;
            }
        }
        Ok(())
    }
}
