//! The control plane's protocol: membership, failure detection and lossless bucket handoff,
//! as a sans-IO state machine (DESIGN.md, "Control plane" and "Changing owners without losing
//! connections").
//!
//! The control thread owns the UDP socket, the wire-frame path through the data path and the
//! timers; it feeds [`Membership`] with received bytes ([`Membership::handle_message`]), ticks
//! ([`Membership::handle_tick`]), operator actions ([`Membership::drain`], …) and the data
//! path's flow counts ([`Membership::report_flows`]), always with `now` in nanoseconds, and
//! carries out the returned [`Output`]s: send bytes, publish an immutable [`Snapshot`] to the
//! packet cores, log an [`Event`]. Packet cores only ever read a [`Snapshot`] and ask
//! [`Snapshot::role`] per frame.
//!
//! This module must never do I/O, read a clock, sleep, spawn threads or touch DPDK: that is what
//! makes it testable on a simulated network in virtual time (`sim`, tests only).
//!
//! - [`message`]: the authenticated, versioned wire format of control messages.
//! - [`snapshot`]: [`Snapshot`] and [`Role`], what the data path consumes.
//! - [`membership`]: the [`Membership`] state machine and its [`Config`].
//! - [`node`]: [`Node`], the membership plus the node's own rules (health, SIGTERM, operator
//!   requests): what the control thread drives.
//! - [`operator`]: the operator's typed requests and replies on the control socket, shared by
//!   the node, the CLI, the lab and the tests.
//! - [`service_status`]: what `status`, `owner-of` and `check` say about appliance mode's
//!   services and backends.
//! - [`timeline`]: the last steps a node took, stamped, as `status` reports them.
//! - [`backends`]: appliance mode's agreed backend table and the backend drains every node
//!   holds, driven by the membership.

pub mod backends;
pub mod membership;
pub mod message;
pub mod node;
pub mod operator;
pub mod service_status;
pub mod snapshot;
pub mod timeline;

#[cfg(test)]
mod sim;

pub use membership::{
    Config, Event, FenceReasons, Membership, Output, PeerInfo, Policy, HASH_WEIGHT, PROBE_EVERY,
};
pub use message::{
    decode, ControlKey, Heartbeat, Load, Message, Path, Phase, Plan, PlanId, Refusal,
    CONTROL_KEY_LABEL, LEFT_UNKNOWN, MAX_LEN, PREVIOUS_VERSION, VERSION,
};
pub use node::{Node, ServiceGuard, Settings, Verdict};
pub use snapshot::{Role, Snapshot};
pub use timeline::{Step, Steps, Timeline, What};
