//! Port setup: queues, promiscuous mode, RX interrupts, link state.

use std::ffi::CString;

use dpdk_sys as sys;

use super::{strerror, Mempool, StartError};
use crate::config::{IdleMode, PortSpec};
use crate::wire::EthernetAddress;

/// Which side of the node a port is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// The shared segment.
    Wire,
    /// Into the node's own kernel.
    Host,
}

impl PortRole {
    pub fn key(self) -> &'static str {
        match self {
            PortRole::Wire => "dataplane.wire_port",
            PortRole::Host => "dataplane.host_port",
        }
    }
}

/// A started ethdev port with one RX and one TX queue per packet core. Stopped and closed on
/// drop.
#[derive(Debug)]
pub struct Port {
    pub id: u16,
    pub role: PortRole,
    pub name: String,
    pub queues: u16,
    /// Whether RX interrupts were configured (the PMD may still refuse them per queue).
    pub rx_interrupts: bool,
    /// Where its link state is read.
    pub link_watch: LinkWatch,
}

/// How a port's link state is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkWatch {
    /// The PMD's own link state (a NIC), by port id.
    Pmd(u16),
    /// `net_af_packet` reports its link up whatever its kernel interface does: that
    /// interface's `operstate` in sysfs instead (the namespace's own, under `ip netns exec`).
    Kernel(std::path::PathBuf),
}

impl LinkWatch {
    /// How `spec`'s link is read once it is port `id`.
    pub fn for_port(spec: &PortSpec, id: u16) -> LinkWatch {
        match spec {
            PortSpec::Vdev(v) if v.starts_with("net_af_packet") => v
                .split(',')
                .find_map(|kv| kv.strip_prefix("iface="))
                .map_or(LinkWatch::Pmd(id), |iface| {
                    LinkWatch::Kernel(format!("/sys/class/net/{iface}/operstate").into())
                }),
            _ => LinkWatch::Pmd(id),
        }
    }

    /// Whether the link is up now, without waiting. An interface whose state the kernel does
    /// not know (`unknown`, as for some virtual devices) counts as up; one that is gone, down.
    pub fn up(&self) -> bool {
        match self {
            LinkWatch::Pmd(id) => link_state(*id).0,
            LinkWatch::Kernel(path) => {
                std::fs::read_to_string(path).is_ok_and(|s| matches!(s.trim(), "up" | "unknown"))
            }
        }
    }
}

fn check(ret: i32, role: PortRole, what: &str, fix: &str) -> Result<(), StartError> {
    if ret < 0 {
        Err(StartError::new(
            role.key(),
            format!("{what}: {}", strerror(ret)),
            fix,
        ))
    } else {
        Ok(())
    }
}

impl Port {
    /// Finds the port created for `spec` and starts it with `queues` queue pairs.
    pub fn start(
        role: PortRole,
        spec: &PortSpec,
        queues: u16,
        descriptors: (u16, u16),
        idle: IdleMode,
        pool: &Mempool,
    ) -> Result<Port, StartError> {
        let name = spec.device_name().to_owned();
        let c = CString::new(name.as_str()).expect("checked when the vdev was created");
        let mut id = 0u16;
        // SAFETY: `c` is a valid C string; `id` is a valid out-pointer.
        let ret = unsafe { sys::rte_eth_dev_get_port_by_name(c.as_ptr(), &mut id) };
        check(
            ret,
            role,
            &format!("no DPDK port named `{name}`"),
            "for a PCI NIC, bind it to vfio-pci with dpdk-devbind.py; for a vdev, check its name",
        )?;

        let mut info = sys::rte_eth_dev_info::default();
        // SAFETY: `id` is a valid port; `info` is a valid out-pointer.
        let ret = unsafe { sys::rte_eth_dev_info_get(id, &mut info) };
        check(ret, role, "cannot read device info", "check the driver")?;
        if queues > info.max_rx_queues || queues > info.max_tx_queues {
            return Err(StartError::new(
                "dataplane.cores",
                format!(
                    "{} has {} RX / {} TX queues but {queues} packet cores need one each",
                    name, info.max_rx_queues, info.max_tx_queues
                ),
                "list fewer cores, or give the vdev more queues (e.g. qpairs=N for \
                 net_af_packet, queues=N for net_tap)",
            ));
        }

        let mut conf = sys::rte_eth_conf::default();
        if queues > 1 && info.flow_type_rss_offloads != 0 {
            conf.rxmode.mq_mode = sys::rte_eth_rx_mq_mode_RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_hf = info.flow_type_rss_offloads
                & u64::from(sys::RTE_ETH_RSS_IP | sys::RTE_ETH_RSS_TCP | sys::RTE_ETH_RSS_UDP);
        }
        let want_intr = idle == IdleMode::Interrupt;
        if want_intr {
            conf.intr_conf.set_rxq(1);
        }
        // SAFETY: valid port id and configuration struct.
        let mut ret = unsafe { sys::rte_eth_dev_configure(id, queues, queues, &conf) };
        let mut rx_interrupts = want_intr;
        if ret < 0 && want_intr {
            // This PMD has no RX interrupts: fall back to timed sleeps for it.
            conf.intr_conf.set_rxq(0);
            rx_interrupts = false;
            // SAFETY: as above.
            ret = unsafe { sys::rte_eth_dev_configure(id, queues, queues, &conf) };
        }
        check(
            ret,
            role,
            &format!("cannot configure {name}"),
            "check the driver and queue count",
        )?;

        let (mut nrx, mut ntx) = descriptors;
        // SAFETY: valid port id and out-pointers.
        let ret = unsafe { sys::rte_eth_dev_adjust_nb_rx_tx_desc(id, &mut nrx, &mut ntx) };
        check(
            ret,
            role,
            "cannot size the rings",
            "lower dataplane.rx_descriptors / tx_descriptors",
        )?;
        // SAFETY: valid port id.
        let socket = unsafe { sys::rte_eth_dev_socket_id(id) };
        let socket = if socket < 0 { 0 } else { socket as u32 };
        for q in 0..queues {
            // SAFETY: port configured with `queues` queues; `q` is in range; the pool
            // outlives the port (drop order in `run`); null conf means driver defaults.
            let ret = unsafe {
                sys::rte_eth_rx_queue_setup(id, q, nrx, socket, std::ptr::null(), pool.as_ptr())
            };
            check(
                ret,
                role,
                &format!("cannot set up RX queue {q}"),
                "raise dataplane.pool_size or lower dataplane.rx_descriptors",
            )?;
            // SAFETY: as above.
            let ret = unsafe { sys::rte_eth_tx_queue_setup(id, q, ntx, socket, std::ptr::null()) };
            check(
                ret,
                role,
                &format!("cannot set up TX queue {q}"),
                "lower dataplane.tx_descriptors",
            )?;
        }
        // SAFETY: the port is configured with all its queues set up.
        let ret = unsafe { sys::rte_eth_dev_start(id) };
        check(
            ret,
            role,
            &format!("cannot start {name}"),
            "check the interface exists and is not in use",
        )?;
        // Every node sees frames for the cluster MAC, not its own: the wire port must be
        // promiscuous. Virtual ports without the notion (-ENOTSUP) are already.
        // SAFETY: valid started port.
        let ret = unsafe { sys::rte_eth_promiscuous_enable(id) };
        if ret < 0 && ret != -95 {
            tracing::warn!(port = %name, "cannot enable promiscuous mode: {}", strerror(ret));
        }
        Ok(Port {
            id,
            role,
            name,
            queues,
            rx_interrupts,
            link_watch: LinkWatch::for_port(spec, id),
        })
    }

    /// Sets the port's own MAC (on net_tap: the kernel interface's MAC).
    pub fn set_mac(&self, mac: EthernetAddress) -> anyhow::Result<()> {
        let mut addr = sys::rte_ether_addr { addr_bytes: mac.0 };
        // SAFETY: valid port id and address struct.
        let ret = unsafe { sys::rte_eth_dev_default_mac_addr_set(self.id, &mut addr) };
        if ret < 0 {
            Err(anyhow::anyhow!(strerror(ret)))
        } else {
            Ok(())
        }
    }

    /// Link state (up, speed in Mb/s), without waiting.
    pub fn link(&self) -> (bool, u32) {
        link_state(self.id)
    }
}

fn link_state(id: u16) -> (bool, u32) {
    let mut link = sys::rte_eth_link::default();
    // SAFETY: a started port's id and a valid out-pointer; the call only fills `link`.
    unsafe { sys::rte_eth_link_get_nowait(id, &mut link) };
    // The status bit is a bitfield in the generated struct.
    (link.link_status() != 0, link.link_speed)
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the packet loops that used this port have returned (they are joined before
        // ports drop), so no thread calls into its queues any more.
        unsafe {
            sys::rte_eth_dev_stop(self.id);
        }
        // SAFETY: as above; closing releases the queues and their mbufs back to the pool.
        unsafe {
            sys::rte_eth_dev_close(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af_packet_links_are_read_from_the_kernel_interface() {
        let spec = PortSpec::Vdev("net_af_packet0,iface=eth0,qpairs=2".into());
        assert_eq!(
            LinkWatch::for_port(&spec, 3),
            LinkWatch::Kernel("/sys/class/net/eth0/operstate".into())
        );
        for other in [
            PortSpec::Vdev("net_tap0,iface=cc0".into()),
            PortSpec::Pci("0000:01:00.0".into()),
        ] {
            assert_eq!(LinkWatch::for_port(&other, 3), LinkWatch::Pmd(3));
        }
        // An interface that does not exist has no link.
        assert!(!LinkWatch::Kernel("/sys/class/net/no-such-interface/operstate".into()).up());
    }
}
