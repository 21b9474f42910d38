//! Structured logs: every line names the node and the epoch in force when it was written.
//!
//! A node is one process, so its id and current epoch live in two process-wide atomics: the
//! `run` command sets the node id once, and the control thread stores the epoch every time it
//! may have changed (after each message, tick or operator request, before it logs what
//! happened). The event formatter reads both for every line, whichever thread logs it (control,
//! health checker, metrics, packet cores), so the epoch on a line is current, never the one a
//! span captured when a thread started. Lines are text for people, or one JSON object each
//! (`run --json`, or `CLONECLUSTER_LOG_FORMAT=json`):
//!
//! ```text
//! {"time":"…Z","level":"INFO","target":"clonecluster::runtime","thread":"control",
//!  "node":2,"epoch":5,"message":"handoff phase","plan_epoch":5,"phase":"Release"}
//! ```
//!
//! DPDK's own messages are routed here too ([`route_dpdk_logs`]; its FFI lives in
//! [`crate::dataplane`]). What gets one line each: a membership change (peer up, rejoined,
//! dead; take-over), a handoff step (plan adopted, every phase change, drained) and a health
//! transition (failing, healthy again; draining and undraining for it; a stalled checker). This
//! module must never block or allocate on the packet path: cores log only at start and stop.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

static NODE: AtomicU8 = AtomicU8::new(0);
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// This process runs node `id` (0: not a node, e.g. an operator command).
pub fn set_node(id: u8) {
    NODE.store(id, Relaxed);
}

/// The epoch of the ownership plan this node follows now.
pub(crate) fn set_epoch(epoch: u64) {
    EPOCH.store(epoch, Relaxed);
}

/// The node id and epoch every line carries.
pub(crate) fn context() -> (u8, u64) {
    (NODE.load(Relaxed), EPOCH.load(Relaxed))
}

/// Installs the global subscriber: `CLONECLUSTER_LOG` filters (default `info`), stderr, JSON
/// lines when `json`.
pub fn init(json: bool) {
    let ansi = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLONECLUSTER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .event_format(LineFormat { json })
        .init();
}

/// The event formatter (see the module doc).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineFormat {
    pub json: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let meta = event.metadata();
        let (node, epoch) = context();
        let mut fields = Fields::default();
        event.record(&mut fields);
        if self.json {
            let mut line = serde_json::Map::new();
            line.insert("time".into(), time.into());
            line.insert("level".into(), meta.level().as_str().into());
            line.insert("target".into(), meta.target().into());
            if let Some(name) = std::thread::current().name() {
                line.insert("thread".into(), name.into());
            }
            line.insert("node".into(), node.into());
            line.insert("epoch".into(), epoch.into());
            line.insert("message".into(), fields.message.into());
            for (k, v) in fields.rest {
                // The context is authoritative for these two; events that repeat them agree.
                if k != "node" && k != "epoch" {
                    line.entry(k).or_insert(v);
                }
            }
            writeln!(writer, "{}", serde_json::Value::Object(line))
        } else {
            write!(
                writer,
                "{time} {:>5} node={node} epoch={epoch} {}: {}",
                meta.level().as_str(),
                meta.target(),
                fields.message
            )?;
            for (k, v) in fields.rest {
                if k == "node" || k == "epoch" {
                    continue;
                }
                match v {
                    serde_json::Value::String(s) => write!(writer, " {k}={s}")?,
                    other => write!(writer, " {k}={other}")?,
                }
            }
            writeln!(writer)
        }
    }
}

/// An event's fields as JSON values, `message` apart.
#[derive(Debug, Default)]
struct Fields {
    message: String,
    rest: Vec<(String, serde_json::Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.rest.push((field.name().to_owned(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// Sends DPDK's own log messages (EAL, PMDs, telemetry) through this module, so that they too
/// are lines with the node and the epoch (target `dpdk`, level from DPDK's), not bare text on
/// stderr. Call it before the EAL starts; without it DPDK writes to stderr itself.
pub fn route_dpdk_logs() -> anyhow::Result<()> {
    crate::dataplane::route_logs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_json_line_carries_node_and_epoch() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = std::sync::Arc::clone(&buf);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(std::sync::Arc::clone(&sink)))
            .with_ansi(false)
            .event_format(LineFormat { json: true })
            .finish();
        set_node(7);
        tracing::subscriber::with_default(subscriber, || {
            set_epoch(3);
            tracing::info!(peer = 2, phase = ?Some(1), "peer up");
            set_epoch(4);
            tracing::warn!(
                node = 7u8,
                epoch = 4u64,
                ok = true,
                "with its own node and epoch"
            );
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["node"], 7);
        assert_eq!(lines[0]["epoch"], 3);
        assert_eq!(lines[0]["message"], "peer up");
        assert_eq!(lines[0]["peer"], 2);
        assert_eq!(lines[0]["phase"], "Some(1)");
        assert_eq!(lines[1]["epoch"], 4);
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["ok"], true);
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
