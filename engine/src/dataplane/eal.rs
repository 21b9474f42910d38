//! EAL start and the packet mempool.

use std::ffi::{c_char, CString};
use std::ptr::NonNull;

use dpdk_sys as sys;

use super::{rte_errno, strerror, StartError};
use crate::config::{DataplaneConfig, PortSpec};

/// A started EAL. There is one per process; `rte_eal_cleanup` runs on drop.
#[derive(Debug)]
pub struct Eal {
    _private: (),
}

impl Eal {
    /// Builds the EAL arguments from the config (cores, file prefix, PCI allow list) and starts
    /// the EAL, then creates the configured vdevs one by one so that a bad one is named.
    pub fn start(dp: &DataplaneConfig, node_id: u8) -> Result<Eal, StartError> {
        let args = eal_args(dp, node_id);
        tracing::debug!(args = %args.join(" "), "starting the EAL");
        // The EAL keeps pointers into argv for the life of the process: leak the strings.
        let owned: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                StartError::new(
                    "dataplane.eal_args",
                    "an argument contains a NUL byte",
                    "remove it",
                )
            })?;
        let argv: &mut [*mut c_char] = Box::leak(
            owned
                .into_iter()
                .map(CString::into_raw)
                .collect::<Vec<_>>()
                .into_boxed_slice(),
        );
        // SAFETY: argv holds argc valid NUL-terminated strings that live for the rest of the
        // process; rte_eal_init may permute them, which is why they are leaked and mutable.
        let ret = unsafe { sys::rte_eal_init(argv.len() as i32, argv.as_mut_ptr()) };
        if ret < 0 {
            let errno = rte_errno();
            let fix = match errno {
                13 => "run as root",
                16 | 114 => {
                    "another DPDK process uses the same --file-prefix: set dataplane.file_prefix \
                     to a name of its own"
                }
                12 => "raise `-m` in dataplane.eal_args or reserve hugepages",
                _ => {
                    "read the EAL messages above; if it could not lock its config, another DPDK \
                     process runs with the same file prefix: set dataplane.file_prefix to a name \
                     of its own; else check dataplane.eal_args and dataplane.cores"
                }
            };
            return Err(StartError::new(
                "dataplane.eal_args",
                if errno == 0 {
                    "the DPDK EAL did not start".to_owned()
                } else {
                    format!("the DPDK EAL did not start: {}", strerror(errno))
                },
                fix,
            ));
        }
        let eal = Eal { _private: () };
        for (key, spec) in [
            ("dataplane.wire_port", &dp.wire_port),
            ("dataplane.host_port", &dp.host_port),
        ] {
            if let PortSpec::Vdev(devargs) = spec {
                probe_vdev(key, devargs)?;
            }
        }
        Ok(eal)
    }
}

impl Drop for Eal {
    fn drop(&mut self) {
        // SAFETY: every port and pool handle borrows from the Eal's lifetime in `run`, so none
        // is used after this point.
        unsafe { sys::rte_eal_cleanup() };
    }
}

/// The argument vector for `rte_eal_init`.
pub(crate) fn eal_args(dp: &DataplaneConfig, node_id: u8) -> Vec<String> {
    let cores = dp
        .cores
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        "clonecluster".to_owned(),
        "-l".to_owned(),
        cores,
        "--main-lcore".to_owned(),
        dp.cores[0].to_string(),
        "--file-prefix".to_owned(),
        dp.file_prefix(node_id),
    ];
    let pci: Vec<&str> = [&dp.wire_port, &dp.host_port]
        .into_iter()
        .filter_map(|p| match p {
            PortSpec::Pci(addr) => Some(addr.as_str()),
            PortSpec::Vdev(_) => None,
        })
        .collect();
    if pci.is_empty() {
        args.push("--no-pci".to_owned());
    }
    for addr in pci {
        args.push("-a".to_owned());
        args.push(addr.to_owned());
    }
    args.extend(dp.eal_args.iter().cloned());
    args
}

fn probe_vdev(key: &'static str, devargs: &str) -> Result<(), StartError> {
    let c = CString::new(devargs)
        .map_err(|_| StartError::new(key, "the vdev string contains a NUL byte", "remove it"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call; the EAL has
    // been initialised by the caller.
    let ret = unsafe { sys::rte_dev_probe(c.as_ptr()) };
    if ret < 0 {
        return Err(StartError::new(
            key,
            format!(
                "DPDK could not create the vdev `{devargs}`: {}",
                strerror(ret)
            ),
            "check the driver name (net_af_packet, net_tap, net_pcap, net_ring, net_null) and its \
             arguments; for net_af_packet the interface must exist in this network namespace",
        ));
    }
    Ok(())
}

/// The packet mempool, sized from `dataplane.pool_size`.
#[derive(Debug)]
pub struct Mempool {
    raw: NonNull<sys::rte_mempool>,
}

// SAFETY: a DPDK mempool is designed to be shared between lcores; its get/put paths are
// thread-safe (per-lcore caches plus a lock-free ring).
unsafe impl Send for Mempool {}
// SAFETY: as above, every operation through `&Mempool` is thread-safe.
unsafe impl Sync for Mempool {}

/// Per-lcore object cache of the pool.
const POOL_CACHE: u32 = 256;

impl Mempool {
    /// A pool of `size` mbufs of `mbuf_size` buffer bytes each (headroom included).
    pub fn create(_eal: &Eal, size: u32, mbuf_size: u16) -> Result<Mempool, StartError> {
        let name = CString::new("cc_pkt_pool").expect("no NUL");
        // SAFETY: the EAL is started (proven by `_eal`), `name` is a valid C string, and the
        // sizes are plain integers that DPDK checks itself.
        let raw = unsafe {
            sys::rte_pktmbuf_pool_create(
                name.as_ptr(),
                size,
                POOL_CACHE.min(size / 8),
                0,
                mbuf_size,
                sys::rte_socket_id() as i32,
            )
        };
        NonNull::new(raw).map(|raw| Mempool { raw }).ok_or_else(|| {
            let errno = rte_errno();
            let mib = (u64::from(size) * (u64::from(mbuf_size) + 128 + 64)).div_ceil(1 << 20);
            StartError::new(
                "dataplane.pool_size",
                format!(
                    "cannot create a pool of {size} mbufs (~{mib} MiB): {}",
                    strerror(errno)
                ),
                "lower dataplane.pool_size, or give the EAL more memory (`-m` in \
                 dataplane.eal_args, or hugepages)",
            )
        })
    }

    /// A non-owning handle to a pool created by [`Mempool::create`] (never freed by drop).
    ///
    /// # Safety
    /// `raw` must be a live mempool that outlives the handle.
    pub(crate) unsafe fn borrow(raw: *mut sys::rte_mempool) -> std::mem::ManuallyDrop<Mempool> {
        std::mem::ManuallyDrop::new(Mempool {
            raw: NonNull::new(raw).expect("a live pool"),
        })
    }

    pub fn as_ptr(&self) -> *mut sys::rte_mempool {
        self.raw.as_ptr()
    }

    /// Mbufs currently out of the pool (in rings, bursts or flight).
    pub fn in_use(&self) -> u32 {
        // SAFETY: the pool pointer is valid for the life of `self`; the count is a racy read
        // by design.
        unsafe { sys::rte_mempool_in_use_count(self.raw.as_ptr()) }
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // SAFETY: the ports using this pool have been stopped and closed before (drop order in
        // `run`), so no mbuf of it is referenced by a driver any more.
        unsafe { sys::rte_mempool_free(self.raw.as_ptr()) };
    }
}
