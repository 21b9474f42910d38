//! The appliance lab's baselines, one dispatcher in front of the same backends (the design a
//! clone cluster of appliances avoids), and what this kernel can do for the lab:
//! - the kernel director: an nftables `netdev` ingress rule on the dispatcher's `eth0` that
//!   hashes each TCP flow to the service (`jhash` of client address and port) onto a backend,
//!   writes that backend's MAC as destination and the director's MAC as source, and `fwd`s the
//!   frame out of the same port: DSR, no connection tracking (IPVS would be the usual tool; it
//!   is not in every kernel, [`KernelFeatures`] says);
//! - HAProxy in TCP mode: the user-space proxy people deploy; replies come back through it;
//! - [`KernelFeatures`]: whether the kernel has IPVS and can decapsulate IP-in-IP and FOU/GUE,
//!   found from its config and by trying in a namespace of its own; never an error.
//!
//! This module writes configurations and starts processes in the namespaces it is given; it
//! never touches the root namespace.

use std::path::Path;
use std::process::{Child, Stdio};

use serde::Serialize;

use super::topology::{
    backend_ip, backend_mac, LoneNs, Ns, CLUSTER_IP, DISPATCHER_IP, DISPATCHER_MAC,
};

/// The kernel director's nftables table for `backends` (indexes), loaded on the dispatcher.
pub fn director_rules(backends: &[u8]) -> String {
    let map: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(slot, &b)| format!("{slot} : {}", backend_mac(b)))
        .collect();
    format!(
        "table netdev director {{
  chain in {{
    type filter hook ingress device eth0 priority 0;
    ip daddr {CLUSTER_IP} tcp dport 80 ether saddr set {DISPATCHER_MAC} ether daddr set jhash ip saddr . tcp sport mod {count} seed 0x5eed map {{ {map} }} fwd to eth0
  }}
}}
",
        count = backends.len(),
        map = map.join(", ")
    )
}

/// Loads `rules` into `ns` with `nft -f -`.
pub fn load_nft(ns: &Ns, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut nft = ns
        .command(&["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = nft.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{}: nft refused the rules: {}\n{rules}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// HAProxy's configuration: TCP mode on the cluster address's port 80, connections spread
/// round-robin over `backends` at their own addresses, from the dispatcher's own address.
pub fn haproxy_config(backends: &[u8]) -> String {
    let servers: String = backends
        .iter()
        .map(|&b| format!("    server b{b} {}:80\n", backend_ip(b)))
        .collect();
    format!(
        "global
    maxconn 8000
    nbthread 2
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend web
    bind {CLUSTER_IP}:80
    default_backend backends
backend backends
    balance roundrobin
    source {DISPATCHER_IP}
{servers}"
    )
}

/// Starts HAProxy in the foreground in `ns` with [`haproxy_config`] written into `dir`; its
/// messages go to `log`.
pub fn start_haproxy(ns: &Ns, dir: &Path, backends: &[u8], log: &Path) -> Result<Child, String> {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(backends))
        .map_err(|e| format!("{}: {e}", cfg.display()))?;
    let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    ns.command(&["haproxy", "-db", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start haproxy (apt package `haproxy`): {e}"))
}

/// One kernel capability the lab reports: present or not (None: could not tell), and how that
/// was found.
#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub present: Option<bool>,
    pub how: String,
}

impl Feature {
    pub fn words(&self) -> &'static str {
        match self.present {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        }
    }
}

/// What this kernel offers the appliance lab.
#[derive(Debug, Clone, Serialize)]
pub struct KernelFeatures {
    /// `CONFIG_IP_VS`: the kernel's own load balancer (a director baseline would use it).
    pub ipvs: Feature,
    /// `CONFIG_NET_IPIP`: a backend can decapsulate `delivery: ipip`.
    pub ipip: Feature,
    /// `CONFIG_NET_FOU`: a backend can decapsulate `delivery: gue`.
    pub fou: Feature,
}

impl KernelFeatures {
    /// A backend here can decapsulate both IP-in-IP and GUE (`ipip` and `gue` delivery could
    /// run end to end); false when either is missing or could not be told.
    pub fn decapsulates(&self) -> bool {
        self.ipip.present == Some(true) && self.fou.present == Some(true)
    }
}

/// The kernel's build config (`/proc/config.gz`, else `/boot/config-RELEASE`), if readable.
fn kernel_config() -> Option<(String, String)> {
    if let Ok(out) = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .stderr(Stdio::null())
        .output()
    {
        if out.status.success() && !out.stdout.is_empty() {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            return Some(("/proc/config.gz".to_owned(), text));
        }
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let path = format!("/boot/config-{}", release.trim());
    std::fs::read_to_string(&path).ok().map(|t| (path, t))
}

/// `CONFIG_<key>` in `config`: Some(true) for `y`/`m`, Some(false) for "is not set" or absent.
pub fn config_says(config: &str, key: &str) -> bool {
    let set = format!("CONFIG_{key}=");
    config
        .lines()
        .any(|l| l.starts_with(&set) && matches!(&l[set.len()..], "y" | "m"))
}

/// Finds out what the kernel offers; tries the tunnels in a namespace of its own, named from
/// `prefix` (removed afterwards).
pub fn kernel_features(prefix: &str) -> KernelFeatures {
    let config = kernel_config();
    let from_config = |key: &str| match &config {
        Some((path, text)) => Feature {
            present: Some(config_says(text, key)),
            how: format!("CONFIG_{key} in {path}"),
        },
        None => Feature {
            present: None,
            how: "no kernel config readable".to_owned(),
        },
    };
    let ipvs = if Path::new("/proc/net/ip_vs").exists() {
        Feature {
            present: Some(true),
            how: "/proc/net/ip_vs exists".to_owned(),
        }
    } else {
        from_config("IP_VS")
    };
    let tried = |what: &str, args: &[&str]| -> Feature {
        let ns = match LoneNs::create(&format!("{prefix}-kf")) {
            Ok(ns) => ns,
            Err(e) => {
                return Feature {
                    present: None,
                    how: format!("could not try `{what}`: {e}"),
                }
            }
        };
        match ns.run(args) {
            Ok(_) => Feature {
                present: Some(true),
                how: format!("`{what}` works in a namespace"),
            },
            Err(e) => Feature {
                present: Some(false),
                how: format!("`{what}` fails in a namespace: {}", last_words(&e)),
            },
        }
    };
    let ipip = tried(
        "ip link add ... type ipip",
        &[
            "ip",
            "link",
            "add",
            "cctun0",
            "type",
            "ipip",
            "local",
            "198.18.0.21",
            "remote",
            "198.18.0.11",
        ],
    );
    let fou = tried(
        "ip fou add port 6080 gue",
        &["ip", "fou", "add", "port", "6080", "gue"],
    );
    KernelFeatures { ipvs, ipip, fou }
}

/// What the command said (after `failed: `), on one line, for a report's table.
fn last_words(e: &str) -> String {
    let tail = e.rsplit("failed: ").next().unwrap_or(e);
    tail.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn director_rules_map_every_backend() {
        let r = director_rules(&[1, 2, 3]);
        assert!(r.contains("mod 3"), "{r}");
        assert!(
            r.contains("0 : 02:bb:00:00:00:01, 1 : 02:bb:00:00:00:02, 2 : 02:bb:00:00:00:03"),
            "{r}"
        );
        assert!(r.contains("fwd to eth0"), "{r}");
        assert!(
            r.contains(&format!("ether saddr set {DISPATCHER_MAC}")),
            "{r}"
        );
    }

    #[test]
    fn haproxy_lists_backends_at_their_own_addresses() {
        let c = haproxy_config(&[1, 2]);
        assert!(c.contains("server b1 198.18.0.21:80\n"), "{c}");
        assert!(c.contains("server b2 198.18.0.22:80\n"), "{c}");
        assert!(
            c.contains("mode tcp") && c.contains("bind 198.18.0.1:80"),
            "{c}"
        );
    }

    #[test]
    fn kernel_config_lines_are_read() {
        let c = "# CONFIG_IP_VS is not set\nCONFIG_NET_IPIP=m\nCONFIG_NET_FOU=y\nCONFIG_X=n\n";
        assert!(!config_says(c, "IP_VS"));
        assert!(config_says(c, "NET_IPIP"));
        assert!(config_says(c, "NET_FOU"));
        assert!(!config_says(c, "X"));
        assert!(!config_says(c, "ABSENT"));
    }
}
