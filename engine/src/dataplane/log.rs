//! DPDK's own log messages (EAL, PMDs, telemetry) as `tracing` events, so that
//! [`crate::logging`] formats them like every other line (with the node and the epoch) instead
//! of DPDK writing bare text on stderr. This owns the FFI of that route (glibc's `fopencookie`,
//! `rte_openlog_stream`); it must never format lines itself, nor be called once the EAL runs.

/// Opens DPDK's log stream on a `fopencookie` stream whose writes become `tracing` events
/// (target `dpdk`, level from DPDK's). Call it before the EAL starts; without it DPDK writes to
/// stderr itself.
pub(crate) fn route_logs() -> anyhow::Result<()> {
    use std::os::raw::{c_char, c_int, c_void};

    /// glibc's `cookie_io_functions_t`: the callbacks of a `fopencookie` stream.
    #[repr(C)]
    struct CookieIo {
        read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, usize) -> isize>,
        write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, usize) -> isize>,
        seek: Option<unsafe extern "C" fn(*mut c_void, *mut i64, c_int) -> c_int>,
        close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
    }
    unsafe extern "C" {
        fn fopencookie(
            cookie: *mut c_void,
            mode: *const c_char,
            funcs: CookieIo,
        ) -> *mut dpdk_sys::FILE;
    }

    /// DPDK writes a message in one or more pieces and flushes: complete lines become events.
    unsafe extern "C" fn write(_cookie: *mut c_void, buf: *const c_char, size: usize) -> isize {
        static PENDING: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
        // SAFETY: stdio hands us `size` readable bytes at `buf` for the length of this call.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) };
        // SAFETY: plain reads of DPDK's per-thread "current message" fields, set by rte_vlog on
        // this thread before it wrote the message.
        let level = unsafe { dpdk_sys::rte_log_cur_msg_loglevel() };
        let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        pending.push_str(&String::from_utf8_lossy(bytes));
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            // RTE_LOG_EMERG = 1 .. RTE_LOG_DEBUG = 8.
            match level {
                1..=4 => tracing::error!(target: "dpdk", "{line}"),
                5 => tracing::warn!(target: "dpdk", "{line}"),
                6 | 7 => tracing::info!(target: "dpdk", "{line}"),
                _ => tracing::debug!(target: "dpdk", "{line}"),
            }
        }
        size as isize
    }

    let funcs = CookieIo {
        read: None,
        write: Some(write),
        seek: None,
        close: None,
    };
    // SAFETY: the mode is a NUL-terminated string; the callbacks match glibc's signatures and
    // the stream keeps no pointer to the cookie (null) or to `funcs` (passed by value).
    let stream = unsafe { fopencookie(std::ptr::null_mut(), c"w".as_ptr(), funcs) };
    if stream.is_null() {
        anyhow::bail!("cannot open a log stream for DPDK (fopencookie failed)");
    }
    // SAFETY: `stream` is a valid FILE that lives for the rest of the process (never closed);
    // DPDK only writes to it and flushes after each message.
    let ret = unsafe { dpdk_sys::rte_openlog_stream(stream) };
    if ret != 0 {
        anyhow::bail!("rte_openlog_stream failed: {ret}");
    }
    Ok(())
}
