//! The operator's protocol: typed requests and replies exchanged over a node's control socket,
//! one line each way (a request word, then one JSON object with `ok`).
//!
//! It owns the types both ends share — the node that answers ([`super::Node`] builds
//! every reply), the CLI, the lab and the tests that ask — so that renaming a field of `status`
//! is a compile error on every side, not a silent mismatch. It also owns the client: [`call`]
//! sends one request and decodes the reply into its type.
//!
//! It must never decide anything: what a request does to the node is the control plane's
//! business; here are only the words, their parsing and their JSON form.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use super::service_status::{BackendStatus, OwnerBackend, OwnerService, ServiceStatus};
use super::{Phase, Step};
use crate::cluster::{Affinity, NodeId};

/// One request to a node, as the operator writes it on the socket (`drain 2`, `status`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The node's view of the cluster: [`Status`].
    Status,
    /// Drain (`drain: true`) or undrain a node: this one, or `node` through this one. A drain's
    /// `deadline` ends the connections the node still serves in the buckets it handed over
    /// (None: the node's `control.drain_deadline`; a relayed drain always uses the target's).
    Drain {
        node: Option<NodeId>,
        drain: bool,
        deadline: Option<DrainDeadline>,
    },
    /// Re-read the node's YAML and apply what can change live: [`ReloadReply`].
    Reload,
    /// Appliance mode: take a backend out of new flows (`drain: true`; its flows continue) or
    /// back in, cluster-wide (through the agreed backend table): [`BackendReply`].
    DrainBackend { name: String, drain: bool },
    /// Which node owns a flow, and why: [`OwnerReply`].
    OwnerOf {
        src: SocketAddr,
        dst: SocketAddr,
        proto: Proto,
    },
}

/// A drain's own deadline (`drain --deadline 30s`, `drain --deadline none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainDeadline {
    /// Cut the connections still served this long after the drain began.
    After(Duration),
    /// Wait for the last connection.
    Wait,
}

impl std::str::FromStr for DrainDeadline {
    type Err = String;

    fn from_str(s: &str) -> Result<DrainDeadline, String> {
        if s == "none" {
            return Ok(DrainDeadline::Wait);
        }
        humantime::parse_duration(s)
            .map(DrainDeadline::After)
            .map_err(|e| {
                format!("deadline `{s}`: {e}; write a duration like 30s or 2m, or none to wait")
            })
    }
}

impl fmt::Display for DrainDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // One word (the request line is split on spaces): whole seconds, else ms.
            DrainDeadline::After(d) if d.subsec_nanos() == 0 => write!(f, "{}s", d.as_secs()),
            DrainDeadline::After(d) => write!(f, "{}ms", d.as_millis()),
            DrainDeadline::Wait => f.write_str("none"),
        }
    }
}

/// A transport protocol `owner-of` can be asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Proto {
    type Err = String;

    fn from_str(s: &str) -> Result<Proto, String> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("protocol `{other}`: tcp or udp")),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Request {
    /// Parses one request line; the error is the reply's text.
    pub fn parse(line: &str) -> Result<Request, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Request::Status),
            ["reload"] => Ok(Request::Reload),
            [verb @ ("drain" | "undrain"), rest @ ..] => {
                let (rest, deadline) = match rest {
                    [rest @ .., "--deadline", d] if *verb == "drain" => (rest, Some(d.parse()?)),
                    _ => (rest, None),
                };
                let node = match rest {
                    [] => None,
                    [n] => Some(
                        n.parse::<u8>()
                            .ok()
                            .and_then(NodeId::new)
                            .ok_or("a node id is 1..=64")?,
                    ),
                    _ if *verb == "drain" => {
                        return Err("usage: drain [NODE] [--deadline DURATION|none]".to_owned())
                    }
                    _ => return Err(format!("usage: {verb} [NODE]")),
                };
                Ok(Request::Drain {
                    node,
                    drain: *verb == "drain",
                    deadline,
                })
            }
            ["owner-of", rest @ ..] => {
                let usage = "usage: owner-of SRC_IP:PORT DST_IP:PORT [tcp|udp]";
                let (src, dst, proto) = match rest {
                    [src, dst] => (*src, *dst, "tcp"),
                    [src, dst, proto] => (*src, *dst, *proto),
                    _ => return Err(usage.to_owned()),
                };
                let (Ok(src), Ok(dst)) = (src.parse(), dst.parse()) else {
                    return Err("addresses are IP:PORT ([IPv6]:PORT)".to_owned());
                };
                Ok(Request::OwnerOf {
                    src,
                    dst,
                    proto: proto.parse()?,
                })
            }
            [verb @ ("drain-backend" | "undrain-backend"), name] => Ok(Request::DrainBackend {
                name: (*name).to_owned(),
                drain: *verb == "drain-backend",
            }),
            [verb @ ("drain-backend" | "undrain-backend"), ..] => {
                Err(format!("usage: {verb} BACKEND (its name, or SERVICE/NAME)"))
            }
            [] => Err("empty request".to_owned()),
            _ => Err(format!("unknown command `{}`", line.trim())),
        }
    }
}

impl fmt::Display for Request {
    /// The request's line on the socket (what [`Request::parse`] reads back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Status => f.write_str("status"),
            Request::Reload => f.write_str("reload"),
            Request::Drain {
                node,
                drain,
                deadline,
            } => {
                f.write_str(if *drain { "drain" } else { "undrain" })?;
                if let Some(n) = node {
                    write!(f, " {}", n.get())?;
                }
                match deadline {
                    Some(d) => write!(f, " --deadline {d}"),
                    None => Ok(()),
                }
            }
            Request::OwnerOf { src, dst, proto } => write!(f, "owner-of {src} {dst} {proto}"),
            Request::DrainBackend { name, drain } => {
                let verb = if *drain {
                    "drain-backend"
                } else {
                    "undrain-backend"
                };
                write!(f, "{verb} {name}")
            }
        }
    }
}

/// A node's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Status(Box<Status>),
    Drain(DrainReply),
    Reload(ReloadReply),
    OwnerOf(OwnerReply),
    DrainBackend(BackendReply),
    /// The node refused the request and changed nothing.
    Refused(Refused),
}

/// The state of a node as `status` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Serving its share.
    Up,
    /// Its service fails: it refuses new connections.
    Failing,
    /// Handing its buckets over; it still serves the connections it had.
    Draining,
    /// Out of the table and done handing over.
    Drained,
    /// Alive, waiting for a plan that gives it buckets.
    Joining,
    /// It cannot serve (its data path is down): it owns nothing.
    Fenced,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Failing => "failing",
            NodeState::Draining => "draining",
            NodeState::Drained => "drained",
            NodeState::Joining => "joining",
            NodeState::Fenced => "fenced",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One node in [`Status`], as the answering node knows it (itself: first hand; a peer: from
/// its last heartbeat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: u8,
    pub state: NodeState,
    /// None where the answering node has not heard it.
    pub weight: Option<u32>,
    pub accepting_buckets: u32,
    /// Buckets it owns once the current plan is done.
    pub final_buckets: u32,
    pub active_flows: Option<u32>,
    pub busy_permille: Option<u16>,
    /// Buckets it handed over that still hold connections it serves (DESIGN.md, "Long-lived
    /// flows"), this plan's and earlier plans'; None where not heard.
    #[serde(default)]
    pub held_buckets: Option<u32>,
    /// Those connections (flows), for the answering node itself only (a peer's heartbeat
    /// carries the buckets, not the flows).
    #[serde(default)]
    pub held_flows: Option<u64>,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The answering node.
    pub node: u8,
    pub epoch: u64,
    pub phase: Phase,
    /// Buckets changing owner in the current plan.
    pub moving: u32,
    pub draining: bool,
    pub drained: bool,
    /// Its drain reached its deadline and cut the connections it still served.
    #[serde(default)]
    pub drain_cut: bool,
    /// Buckets whose earlier owner still serves connections in them, as this node sees them.
    #[serde(default)]
    pub owed_buckets: u32,
    pub refusing: bool,
    #[serde(default)]
    pub fenced: bool,
    /// Why it is fenced, by label (`link-down`, `core-stalled`, `hears-no-peer-on-wire`,
    /// `unheard-on-wire`, `settling`, `superseded`); empty when it is not.
    #[serde(default)]
    pub fence_reasons: Vec<String>,
    #[serde(default)]
    pub protocol_version: u8,
    /// The health checker's verdict (None: no health check configured).
    pub healthy: Option<bool>,
    /// The members of the current table.
    pub members: Vec<NodeStatus>,
    /// Live nodes the table leaves out (joining, drained, failing, fenced).
    pub outside: Vec<NodeStatus>,
    /// The last ownership steps this node took.
    #[serde(default)]
    pub timeline: Vec<Step>,
    /// Appliance mode: the port rules in force and their backends (empty: server mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceStatus>,
    /// The agreed backend table's epoch the services were built from (0: the configuration's).
    #[serde(default)]
    pub services_epoch: u64,
    /// Peers whose configured services differ from this node's: their backend verdicts are
    /// not counted, and they may send a flow to another backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_differ: Vec<u8>,
}

impl Status {
    /// Every node the answering one knows alive: the table's members, then the others.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeStatus> {
        self.members.iter().chain(&self.outside)
    }

    /// The node `id`, if the answering node knows it alive.
    pub fn node(&self, id: u8) -> Option<&NodeStatus> {
        self.nodes().find(|n| n.node == id)
    }

    /// The ids of the current table's members.
    pub fn member_ids(&self) -> Vec<u8> {
        self.members.iter().map(|m| m.node).collect()
    }
}

/// The reply to `drain` and `undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReply {
    pub node: u8,
    pub draining: bool,
    /// The request was for another node and was relayed to it.
    #[serde(default)]
    pub relayed: bool,
}

/// The reply to `reload` when it applied: the keys that changed (all of them live keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    pub changed: Vec<String>,
    pub applied: Vec<String>,
}

/// The reply to `owner-of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerReply {
    /// The flow as asked, `SRC -> DST proto`.
    pub flow: String,
    pub affinity: Affinity,
    pub bucket: u32,
    pub epoch: u64,
    pub phase: Phase,
    /// The node that takes a new flow of this bucket now (None: nobody, the release gap).
    pub new_flows_owner: Option<u8>,
    pub owner_when_settled: Option<u8>,
    /// The answering node's role for the bucket, in words.
    pub role_of_this_node: String,
    /// A flow to a service address (appliance mode): its rule and the backend a new flow gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<OwnerService>,
}

/// A refused request: why, and for `reload` the keys that differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<String>>,
}

impl Refused {
    pub fn new(error: impl Into<String>) -> Refused {
        Refused {
            error: error.into(),
            changed: None,
        }
    }
}

impl Reply {
    /// The reply's line on the socket: its JSON object with `ok` added.
    pub fn to_line(&self) -> String {
        let (ok, body) = match self {
            Reply::Status(s) => (true, serde_json::to_value(s)),
            Reply::Drain(d) => (true, serde_json::to_value(d)),
            Reply::Reload(r) => (true, serde_json::to_value(r)),
            Reply::OwnerOf(o) => (true, serde_json::to_value(o)),
            Reply::DrainBackend(b) => (true, serde_json::to_value(b)),
            Reply::Refused(r) => (false, serde_json::to_value(r)),
        };
        let mut body = body.unwrap_or_default();
        if let Some(map) = body.as_object_mut() {
            map.insert("ok".to_owned(), ok.into());
        }
        body.to_string()
    }

    /// Reads the line a node answered to `request`.
    pub fn decode(request: &Request, line: &str) -> Result<Reply, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("a reply that is not JSON: {e}"))?;
        let bad = |e: serde_json::Error| format!("a reply this version cannot read: {e}");
        if value.get("ok") == Some(&serde_json::Value::Bool(false)) {
            return serde_json::from_value(value)
                .map(Reply::Refused)
                .map_err(bad);
        }
        Ok(match request {
            Request::Status => Reply::Status(serde_json::from_value(value).map_err(bad)?),
            Request::Drain { .. } => Reply::Drain(serde_json::from_value(value).map_err(bad)?),
            Request::Reload => Reply::Reload(serde_json::from_value(value).map_err(bad)?),
            Request::OwnerOf { .. } => Reply::OwnerOf(serde_json::from_value(value).map_err(bad)?),
            Request::DrainBackend { .. } => {
                Reply::DrainBackend(serde_json::from_value(value).map_err(bad)?)
            }
        })
    }
}

/// The reply to `drain-backend` / `undrain-backend`: the backends it applies to (a name may
/// be in several services), what the answering node now holds for them, and where else it
/// holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendReply {
    /// `service/backend` of each backend matched.
    pub backends: Vec<String>,
    pub drained: bool,
    /// The live peers with the same services it was relayed to, which hold it too (None: not
    /// relayed, held by this node only).
    #[serde(default)]
    pub relayed_to: Option<Vec<u8>>,
    /// Not relayed: these live peers run an older version, which cannot carry it (said only
    /// by a node of a release before control format version 5; read so that its reply still
    /// reads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub older_peers: Vec<u8>,
    /// Live peers that run other services: they ignore it (their places may name other
    /// servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services_differ: Vec<u8>,
    /// This node's backend checks have not settled: its report, and so its drains, count once
    /// they have.
    #[serde(default)]
    pub unsettled: bool,
}

impl fmt::Display for BackendReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = |ids: &[u8]| {
            let list = super::node::ids_text(ids);
            if ids.len() == 1 {
                format!("node {list}")
            } else {
                format!("nodes {list}")
            }
        };
        write!(
            f,
            "{}: {}",
            self.backends.join(", "),
            if self.drained {
                "drained: no new flows, its flows continue"
            } else {
                "takes new flows again"
            }
        )?;
        match &self.relayed_to {
            Some(peers) if peers.is_empty() => {
                f.write_str("; on this node alone: no live peer runs its services")?
            }
            Some(peers) => write!(f, "; relayed to {}, which apply it too", nodes(peers))?,
            None if self.older_peers.is_empty() => {
                f.write_str("; on this node only: the cluster speaks an older protocol version")?
            }
            None => write!(
                f,
                "; on this node only while an older version runs on {}: {}",
                nodes(&self.older_peers),
                if self.drained {
                    "it ends if this node stops"
                } else {
                    "a node that holds the drain keeps it"
                }
            )?,
        }
        if !self.services_differ.is_empty() {
            write!(
                f,
                "; ignored by {} (other services)",
                nodes(&self.services_differ)
            )?;
        }
        if self.unsettled {
            f.write_str(
                "; this node's backend checks have not settled: it counts here once they have",
            )?;
        }
        f.write_str(" (the cluster applies it with its next backend table)")
    }
}

/// A request that got no usable answer: the node is unreachable, silent or refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer (the text says why and what to check).
    Unreachable(String),
    /// The node answered and refused; nothing changed.
    Refused(Refused),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Unreachable(why) => f.write_str(why),
            CallError::Refused(r) => write!(f, "the node refused: {}", r.error),
        }
    }
}

impl std::error::Error for CallError {}

/// Sends `request` to the node listening on `socket` and returns its reply line as sent.
pub fn call_raw(socket: &Path, request: &Request) -> Result<String, CallError> {
    let unreachable = |what: String| CallError::Unreachable(what);
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        unreachable(format!(
            "cannot reach the node at {}: {e} (is it running, and is control.socket this path?)",
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| unreachable(e.to_string()))?;
    writeln!(stream, "{request}").map_err(|e| unreachable(e.to_string()))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| unreachable(format!("no reply from {}: {e}", socket.display())))?;
    Ok(reply.trim().to_owned())
}

/// Sends `request` to the node listening on `socket` and decodes its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, CallError> {
    let line = call_raw(socket, request)?;
    match Reply::decode(request, &line).map_err(CallError::Unreachable)? {
        Reply::Refused(r) => Err(CallError::Refused(r)),
        reply => Ok(reply),
    }
}

/// `status` of the node listening on `socket`.
pub fn status(socket: &Path) -> Result<Status, CallError> {
    match call(socket, &Request::Status)? {
        Reply::Status(s) => Ok(*s),
        _ => Err(CallError::Unreachable(
            "a reply to another request".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_back_what_they_write() {
        let n2 = NodeId::new(2);
        for r in [
            Request::Status,
            Request::Reload,
            Request::Drain {
                node: None,
                drain: true,
                deadline: None,
            },
            Request::Drain {
                node: n2,
                drain: false,
                deadline: None,
            },
            Request::Drain {
                node: n2,
                drain: true,
                deadline: Some(DrainDeadline::After(Duration::from_secs(90))),
            },
            Request::Drain {
                node: None,
                drain: true,
                deadline: Some(DrainDeadline::Wait),
            },
            Request::OwnerOf {
                src: "198.18.0.5:4000".parse().unwrap(),
                dst: "[2001:2::1]:80".parse().unwrap(),
                proto: Proto::Udp,
            },
        ] {
            assert_eq!(Request::parse(&r.to_string()), Ok(r.clone()), "{r}");
        }
        assert_eq!(
            Request::parse("owner-of 198.18.0.5:4000 198.18.0.1:80"),
            Ok(Request::OwnerOf {
                src: "198.18.0.5:4000".parse().unwrap(),
                dst: "198.18.0.1:80".parse().unwrap(),
                proto: Proto::Tcp
            })
        );
    }

    #[test]
    fn bad_requests_say_why() {
        assert_eq!(
            Request::parse("drain 0"),
            Err("a node id is 1..=64".to_owned())
        );
        assert_eq!(
            Request::parse("drain 70"),
            Err("a node id is 1..=64".to_owned())
        );
        assert!(Request::parse("drain --deadline soon")
            .unwrap_err()
            .contains("or none to wait"));
        assert!(Request::parse("undrain --deadline 5s").is_err());
        assert_eq!(
            Request::parse("frobnicate"),
            Err("unknown command `frobnicate`".to_owned())
        );
        assert!(Request::parse("owner-of 1.2.3.4 5.6.7.8:80")
            .unwrap_err()
            .contains("IP:PORT"));
        assert!(Request::parse("owner-of 198.18.0.5:1 198.18.0.1:80 sctp")
            .unwrap_err()
            .contains("tcp or udp"));
    }

    #[test]
    fn replies_decode_into_their_types() {
        let status = Status {
            node: 1,
            epoch: 4,
            phase: Phase::Done,
            moving: 0,
            draining: false,
            drained: false,
            drain_cut: false,
            owed_buckets: 0,
            refusing: false,
            fenced: true,
            fence_reasons: vec!["hears-no-peer-on-wire".to_owned()],
            protocol_version: 3,
            healthy: Some(true),
            members: vec![NodeStatus {
                node: 1,
                state: NodeState::Up,
                weight: Some(100),
                accepting_buckets: 65536,
                final_buckets: 65536,
                active_flows: Some(3),
                busy_permille: None,
                held_buckets: None,
                held_flows: None,
            }],
            outside: vec![],
            timeline: vec![],
            services: vec![],
            services_epoch: 0,
            services_differ: Vec::new(),
        };
        let line = Reply::Status(Box::new(status.clone())).to_line();
        assert!(line.contains("\"ok\":true"), "{line}");
        assert!(line.contains("\"phase\":\"Done\""), "{line}");
        assert_eq!(
            Reply::decode(&Request::Status, &line),
            Ok(Reply::Status(Box::new(status)))
        );
        let refused = Reply::Refused(Refused::new("a node id is 1..=64")).to_line();
        assert_eq!(refused, r#"{"error":"a node id is 1..=64","ok":false}"#);
        assert_eq!(
            Reply::decode(&Request::Reload, &refused),
            Ok(Reply::Refused(Refused::new("a node id is 1..=64")))
        );
        assert!(Reply::decode(&Request::Status, "{\"ok\":true}")
            .unwrap_err()
            .contains("cannot read"));
    }

    /// The reply to `drain-backend` says where the drain holds, in words, and reads back; an
    /// older node's reply (without those fields) still reads.
    #[test]
    fn a_backend_reply_says_where_the_drain_holds() {
        let reply = |relayed_to: Option<Vec<u8>>, older_peers: Vec<u8>| BackendReply {
            backends: vec!["web/b2".to_owned()],
            drained: true,
            relayed_to,
            older_peers,
            services_differ: Vec::new(),
            unsettled: false,
        };
        let said = |r: &BackendReply| r.to_string();
        let relayed = reply(Some(vec![1, 3]), Vec::new());
        assert_eq!(
            said(&relayed),
            "web/b2: drained: no new flows, its flows continue; relayed to nodes 1, 3, which \
             apply it too (the cluster applies it with its next backend table)"
        );
        assert!(said(&reply(Some(Vec::new()), Vec::new())).contains("on this node alone"));
        let local = reply(None, vec![3]);
        assert!(
            said(&local).contains(
                "on this node only while an older version runs on node 3: it \
                 ends if this node stops"
            ),
            "{local}"
        );
        let undrain = BackendReply {
            drained: false,
            services_differ: vec![4, 5],
            unsettled: true,
            ..local
        };
        let text = said(&undrain);
        for part in [
            "takes new flows again",
            "a node that holds the drain keeps it",
            "ignored by nodes 4, 5 (other services)",
            "have not settled: it counts here once they have",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains('[') && !text.contains('{'), "{text}");
        let request = Request::DrainBackend {
            name: "b2".to_owned(),
            drain: false,
        };
        let line = Reply::DrainBackend(undrain.clone()).to_line();
        assert_eq!(
            Reply::decode(&request, &line),
            Ok(Reply::DrainBackend(undrain))
        );
        let older = r#"{"backends":["web/b2"],"drained":true,"ok":true}"#;
        assert_eq!(
            Reply::decode(&request, older),
            Ok(Reply::DrainBackend(reply(None, Vec::new())))
        );
    }

    #[test]
    fn a_recorded_status_of_an_older_node_still_reads() {
        // Lines recorded by the lab before `fenced` and `protocol_version` existed.
        let polls = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/drain-status-polls.jsonl"
        ))
        .unwrap();
        for line in polls.lines().filter(|l| l.contains("\"ok\":true")) {
            let Ok(Reply::Status(s)) = Reply::decode(&Request::Status, line) else {
                panic!("unreadable: {line}");
            };
            assert!(s.node(1).is_some());
        }
    }
}
