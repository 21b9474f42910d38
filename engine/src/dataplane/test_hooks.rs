//! Test-only hooks (feature `testkit`; never in a production build): SIGUSR1 stalls packet
//! core 0 — it stops looping, publishes nothing, decides nothing — until SIGUSR2, so that a
//! namespace test can see a stalled core fence its node and the node rejoin.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

static STALL: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);
static RESUME: LazyLock<Arc<AtomicBool>> = LazyLock::new(Arc::default);

/// Installs the two signal handlers (they only store to atomics).
pub fn install() -> std::io::Result<()> {
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&STALL))?;
    signal_hook::flag::register(signal_hook::consts::SIGUSR2, Arc::clone(&RESUME))?;
    Ok(())
}

/// On core 0, while a stall is asked for: wait for the resume, like a core that stopped.
#[inline]
pub(super) fn hold(core: usize) {
    if core != 0 || !STALL.load(Relaxed) {
        return;
    }
    tracing::warn!("test hook: packet core 0 stalls until SIGUSR2");
    while !RESUME.swap(false, Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
    }
    STALL.store(false, Relaxed);
    tracing::warn!("test hook: packet core 0 runs again");
}
