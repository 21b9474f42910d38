//! The lab's load: `wrk` from the client namespace (a WebStone-style step: a number of clients,
//! each a keep-alive connection, for a fixed time) and the reading of its summary. A run can be
//! interrupted (Ctrl-C): the child is then stopped by PID and the step is abandoned.

use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::topology::{Ns, CLUSTER_IP};

/// One load step's result.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Step {
    pub clients: u32,
    pub rps: f64,
    pub transfer_mib_s: f64,
    pub mean_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write), timeouts and non-2xx answers.
    pub errors: u64,
    pub timeouts: u64,
}

/// A `wrk` run in progress.
#[derive(Debug)]
pub struct Wrk {
    child: Child,
    clients: u32,
}

impl Wrk {
    /// Starts `wrk` in `client` with `clients` connections for `secs` seconds against `path` on
    /// the cluster address.
    pub fn start(client: &Ns, clients: u32, secs: u32, path: &str) -> Result<Wrk, String> {
        let threads = clients.clamp(1, 2).to_string();
        let child = client
            .command(&[
                "wrk",
                "-t",
                &threads,
                "-c",
                &clients.to_string(),
                "-d",
                &format!("{secs}s"),
                "--timeout",
                "3s",
                "--latency",
                &format!("http://{CLUSTER_IP}{path}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start wrk: {e}"))?;
        Ok(Wrk { child, clients })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `wrk` to finish (checking `interrupted` while it runs) and reads its summary.
    pub fn finish(mut self, interrupted: &dyn Fn() -> bool) -> Result<Step, String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if interrupted() => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("interrupted".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("wrk: {e}")),
            }
        }
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        parse_wrk(&out, self.clients)
            .ok_or_else(|| format!("cannot read wrk's output:\n{out}{err}"))
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads wrk's summary.
pub fn parse_wrk(out: &str, clients: u32) -> Option<Step> {
    let mut s = Step {
        clients,
        ..Step::default()
    };
    let mut in_distribution = false;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", "Distribution", ..] => in_distribution = true,
            ["Latency", avg, ..] if !in_distribution => s.mean_ms = duration_ms(avg)?,
            ["99%", v] if in_distribution => s.p99_ms = duration_ms(v)?,
            ["Requests/sec:", v] => s.rps = v.parse().ok()?,
            ["Transfer/sec:", v] => s.transfer_mib_s = size_mib(v)?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 1, read 2, write 0, timeout 3"
                for pair in rest.chunks(2) {
                    if let [what, n] = pair {
                        let n = n.trim_end_matches(',').parse::<u64>().ok()?;
                        s.errors += n;
                        if *what == "timeout" {
                            s.timeouts += n;
                        }
                    }
                }
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => s.errors += n.parse::<u64>().ok()?,
            _ => {}
        }
    }
    (s.rps > 0.0).then_some(s)
}

fn duration_ms(v: &str) -> Option<f64> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

fn size_mib(v: &str) -> Option<f64> {
    let (num, unit) = split_unit(v);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "B" => n / (1024.0 * 1024.0),
        "KB" => n / 1024.0,
        "MB" => n,
        "GB" => n * 1024.0,
        _ => return None,
    })
}

fn split_unit(v: &str) -> (&str, &str) {
    let i = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    v.split_at(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "Running 3s test @ http://198.18.0.1/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.50ms  500.00us  20.00ms   90.00%
    Req/Sec    10.00k     1.00k   12.00k    70.00%
  Latency Distribution
     50%    1.20ms
     75%    1.80ms
     90%    2.50ms
     99%    5.00ms
  60000 requests in 3.00s, 15.00MB read
  Socket errors: connect 1, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:  20000.00
Transfer/sec:      5.00MB
";
        let s = parse_wrk(out, 50).unwrap();
        assert_eq!(s.clients, 50);
        assert!((s.mean_ms - 1.5).abs() < 1e-9);
        assert!((s.p99_ms - 5.0).abs() < 1e-9);
        assert!((s.rps - 20000.0).abs() < 1e-9);
        assert!((s.transfer_mib_s - 5.0).abs() < 1e-9);
        assert_eq!(s.errors, 10);
        assert_eq!(s.timeouts, 3);
        assert!(parse_wrk("garbage", 1).is_none());
        assert!((duration_ms("250us").unwrap() - 0.25).abs() < 1e-9);
    }
}
