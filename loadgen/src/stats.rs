//! Run statistics: counters, latency histograms (microseconds), the per-second timeline, and
//! the final [`Report`] (JSON and human forms).
//!
//! The timeline attributes every query to the second in which it was *sent*: row N says how
//! many queries were sent during second N, how many of those were answered or timed out, and
//! the p99 latency of their answers. `answered_rx` is the one exception: answers *received*
//! during second N, i.e. the throughput seen at that time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::scenario::Event;
use crate::wire;

/// How many slow answers a report lists at most (`--slow-us`); the rest are only counted.
pub const SLOW_KEPT: usize = 10_000;

/// Accumulates one second of the timeline.
struct Second {
    sent: u64,
    answered: u64,
    timeouts: u64,
    answered_rx: u64,
    latency: Histogram<u64>,
}

/// Accumulates a run's statistics; the hot path only increments and records.
pub struct Collector {
    highest_us: u64,
    /// Queries sent.
    pub sent: u64,
    /// Matching answers.
    pub answered: u64,
    /// Queries not answered within the timeout.
    pub timeouts: u64,
    /// Answers whose ID matched a pending query but whose question did not.
    pub mismatched: u64,
    /// Answers for no pending query (unknown ID, duplicate, or later than the timeout).
    pub unexpected: u64,
    /// Datagrams too short or not a response.
    pub malformed: u64,
    /// Matching answers with the TC bit.
    pub truncated: u64,
    /// Datagrams the kernel refused to send (still counted as sent and pending).
    pub send_errors: u64,
    /// The latest a query was sent after its scheduled time, in microseconds.
    pub max_send_lag_us: u64,
    rcodes: [u64; 16],
    latency: Histogram<u64>,
    seconds: Vec<Second>,
    slow_us: u64,
    slow: Vec<SlowAnswer>,
    slow_left_out: u64,
}

fn histogram(highest_us: u64, sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, highest_us.max(2), sigfig)
        .or_else(|_| Histogram::new(sigfig))
        .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()))
}

impl Collector {
    /// For a run of `seconds` timeline rows whose latencies stay below `highest_us`.
    pub fn new(seconds: usize, highest_us: u64) -> Self {
        Self {
            highest_us,
            sent: 0,
            answered: 0,
            timeouts: 0,
            mismatched: 0,
            unexpected: 0,
            malformed: 0,
            truncated: 0,
            send_errors: 0,
            max_send_lag_us: 0,
            rcodes: [0; 16],
            latency: histogram(highest_us, 3),
            seconds: (0..seconds.max(1))
                .map(|_| Second {
                    sent: 0,
                    answered: 0,
                    timeouts: 0,
                    answered_rx: 0,
                    latency: histogram(highest_us, 2),
                })
                .collect(),
            slow_us: 0,
            slow: Vec::new(),
            slow_left_out: 0,
        }
    }

    fn second(&mut self, ns: u64) -> &mut Second {
        let i = ((ns / 1_000_000_000) as usize).min(self.seconds.len() - 1);
        &mut self.seconds[i]
    }

    /// A query sent at `sent_ns` (from the start of the run).
    pub fn on_sent(&mut self, sent_ns: u64) {
        self.sent += 1;
        self.second(sent_ns).sent += 1;
    }

    /// An answer received at `now_ns` to a query sent at `sent_ns`.
    pub fn on_answer(&mut self, sent_ns: u64, now_ns: u64, rcode: u8, truncated: bool) {
        let us = (now_ns.saturating_sub(sent_ns) / 1000).clamp(1, self.highest_us);
        self.answered += 1;
        self.rcodes[usize::from(rcode & 0xF)] += 1;
        if truncated {
            self.truncated += 1;
        }
        let _ = self.latency.record(us);
        let s = self.second(sent_ns);
        s.answered += 1;
        let _ = s.latency.record(us);
        self.second(now_ns).answered_rx += 1;
    }

    /// List answers at least `us` microseconds late one by one (0, the default: none). The list's
    /// room is taken now, so the receive loop does not allocate.
    pub fn list_slow(&mut self, us: u64) {
        self.slow_us = us;
        if us > 0 {
            self.slow.reserve_exact(SLOW_KEPT);
        }
    }

    /// An answer received at `now_ns` on socket `socket` to a query sent at `sent_ns`: listed
    /// when at least `slow_us` late, so a latency spike can be placed in time to the
    /// millisecond and on a socket (which process of a SO_REUSEPORT group served it).
    pub fn on_slow(&mut self, sent_ns: u64, now_ns: u64, socket: usize) {
        let us = now_ns.saturating_sub(sent_ns) / 1000;
        if self.slow_us == 0 || us < self.slow_us {
            return;
        }
        if self.slow.len() < SLOW_KEPT {
            self.slow.push(SlowAnswer {
                sent_ms: sent_ns as f64 / 1e6,
                us,
                socket,
            });
        } else {
            self.slow_left_out += 1;
        }
    }

    /// A query sent at `sent_ns` that was not answered in time.
    pub fn on_timeout(&mut self, sent_ns: u64) {
        self.timeouts += 1;
        self.second(sent_ns).timeouts += 1;
    }

    /// The progress of second `index` so far.
    pub fn progress(&self, index: usize) -> Option<Progress> {
        let s = self.seconds.get(index)?;
        Some(Progress {
            second: index,
            sent: s.sent,
            answered_rx: s.answered_rx,
            timeouts_total: self.timeouts,
            p99_us: s.latency.value_at_quantile(0.99),
        })
    }

    /// The final report.
    pub fn report(&self, info: RunInfo, events: Vec<Event>) -> Report {
        let mut rcodes = BTreeMap::new();
        for r in [
            wire::RCODE_NOERROR,
            wire::RCODE_SERVFAIL,
            wire::RCODE_NXDOMAIN,
            wire::RCODE_REFUSED,
        ] {
            rcodes.insert(wire::rcode_name(r), 0);
        }
        for (r, &n) in self.rcodes.iter().enumerate() {
            if n > 0 {
                rcodes.insert(wire::rcode_name(r as u8), n);
            }
        }
        let q = |h: &Histogram<u64>, p: f64| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(p)
            }
        };
        let l = &self.latency;
        let latency_us = Latency {
            min: if l.is_empty() { 0 } else { l.min() },
            mean: if l.is_empty() { 0.0 } else { l.mean() },
            p50: q(l, 0.50),
            p90: q(l, 0.90),
            p99: q(l, 0.99),
            p999: q(l, 0.999),
            max: if l.is_empty() { 0 } else { l.max() },
        };
        let send_s = info.send_s.max(1e-9);
        let timeline = self
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| TimelineRow {
                t_s: i as u64,
                sent: s.sent,
                answered: s.answered,
                timeouts: s.timeouts,
                p99_us: q(&s.latency, 0.99),
                p50_us: q(&s.latency, 0.50),
                max_us: if s.latency.is_empty() {
                    0
                } else {
                    s.latency.max()
                },
                answered_rx: s.answered_rx,
            })
            .collect();
        Report {
            server: info.server,
            rate: info.rate,
            duration_s: info.duration_s,
            send_s: info.send_s,
            elapsed_s: info.elapsed_s,
            sockets: info.sockets,
            timeout_ms: info.timeout_ms,
            sent: self.sent,
            answered: self.answered,
            timeouts: self.timeouts,
            mismatched: self.mismatched,
            unexpected: self.unexpected,
            malformed: self.malformed,
            truncated: self.truncated,
            send_errors: self.send_errors,
            qps: self.answered as f64 / send_s,
            sent_qps: self.sent as f64 / send_s,
            rcodes,
            latency_us,
            max_send_lag_us: self.max_send_lag_us,
            cpu_s: info.cpu_s,
            cpu_us_per_query: if self.sent == 0 {
                0.0
            } else {
                info.cpu_s * 1e6 / self.sent as f64
            },
            timeline,
            events,
            slow_us: self.slow_us,
            slow: self.slow.clone(),
            slow_left_out: self.slow_left_out,
        }
    }
}

/// One answer at least `--slow-us` late.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SlowAnswer {
    /// When its query was sent, in milliseconds from the start of the run.
    pub sent_ms: f64,
    /// Its latency (µs).
    pub us: u64,
    /// The load generator's socket (source port index) it was sent from.
    pub socket: usize,
}

/// One second's progress, for the live line on stderr.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Second index from the start.
    pub second: usize,
    /// Queries sent during it.
    pub sent: u64,
    /// Answers received during it.
    pub answered_rx: u64,
    /// Timeouts so far (all seconds).
    pub timeouts_total: u64,
    /// p99 latency of the answers so far to queries sent during it.
    pub p99_us: u64,
}

/// Facts about the run that the collector does not see.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The server address.
    pub server: String,
    /// Target rate (queries per second).
    pub rate: f64,
    /// Requested duration.
    pub duration_s: f64,
    /// How long the sending phase actually lasted.
    pub send_s: f64,
    /// Wall time including the wait for stragglers.
    pub elapsed_s: f64,
    /// UDP sockets used.
    pub sockets: usize,
    /// Timeout per query.
    pub timeout_ms: u64,
    /// CPU seconds (user + system) used by the load generator.
    pub cpu_s: f64,
}

/// Latency percentiles of answered queries, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
}

/// One row of the timeline (see the module doc for the attribution rule).
#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    /// Second index from the start.
    pub t_s: u64,
    /// Queries sent during this second.
    pub sent: u64,
    /// Of those, answered.
    pub answered: u64,
    /// Of those, timed out.
    pub timeouts: u64,
    /// p99 latency of those answered (0 when none).
    pub p99_us: u64,
    /// Median latency of those answered (0 when none).
    pub p50_us: u64,
    /// Largest latency of those answered (0 when none).
    pub max_us: u64,
    /// Answers received during this second (whenever their query was sent).
    pub answered_rx: u64,
}

/// The result of a run: printed as one JSON object with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The server address.
    pub server: String,
    /// Target rate.
    pub rate: f64,
    /// Requested duration.
    pub duration_s: f64,
    /// Actual sending time.
    pub send_s: f64,
    /// Wall time including the wait for stragglers.
    pub elapsed_s: f64,
    /// UDP sockets (source ports).
    pub sockets: usize,
    /// Timeout per query.
    pub timeout_ms: u64,
    /// Queries sent.
    pub sent: u64,
    /// Queries answered (ID, socket and question matched).
    pub answered: u64,
    /// Queries lost (no matching answer within the timeout).
    pub timeouts: u64,
    /// Answers with a pending ID whose question did not match (not counted as answers).
    pub mismatched: u64,
    /// Answers to no pending query: unknown ID, duplicate, or late.
    pub unexpected: u64,
    /// Datagrams that are not DNS responses.
    pub malformed: u64,
    /// Answers with the TC bit.
    pub truncated: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Answered queries per second of sending.
    pub qps: f64,
    /// Sent queries per second of sending.
    pub sent_qps: f64,
    /// Answers by rcode name.
    pub rcodes: BTreeMap<String, u64>,
    /// Latency percentiles (µs).
    pub latency_us: Latency,
    /// The latest a query left after its scheduled time (µs): pacing accuracy.
    pub max_send_lag_us: u64,
    /// CPU seconds of the load generator.
    pub cpu_s: f64,
    /// The load generator's CPU µs per query sent.
    pub cpu_us_per_query: f64,
    /// Per-second rows.
    pub timeline: Vec<TimelineRow>,
    /// Scenario commands run.
    pub events: Vec<Event>,
    /// The `--slow-us` threshold (0: none listed).
    pub slow_us: u64,
    /// Answers at least `slow_us` late, in the order received (the first `SLOW_KEPT`).
    pub slow: Vec<SlowAnswer>,
    /// Slow answers beyond `SLOW_KEPT`, counted only.
    pub slow_left_out: u64,
}

impl Report {
    /// The human-readable summary and timeline.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let pct = |n: u64| {
            if self.sent == 0 {
                0.0
            } else {
                n as f64 * 100.0 / self.sent as f64
            }
        };
        let _ = writeln!(
            s,
            "server {}  rate {} qps  duration {:.1} s  sockets {}  timeout {} ms",
            self.server, self.rate, self.duration_s, self.sockets, self.timeout_ms
        );
        let _ = writeln!(
            s,
            "sent {}  answered {} ({:.2}%)  timeouts {} ({:.2}%)  qps {:.0}",
            self.sent,
            self.answered,
            pct(self.answered),
            self.timeouts,
            pct(self.timeouts),
            self.qps
        );
        let rcodes: Vec<String> = self
            .rcodes
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(s, "rcodes: {}", rcodes.join("  "));
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency us: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.0})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let _ = writeln!(
            s,
            "mismatched {}  unexpected {}  malformed {}  truncated {}  send errors {}",
            self.mismatched, self.unexpected, self.malformed, self.truncated, self.send_errors
        );
        if self.slow_us > 0 {
            let _ = writeln!(
                s,
                "slow answers listed (>= {} us): {}{} (in the JSON report)",
                self.slow_us,
                self.slow.len(),
                if self.slow_left_out > 0 {
                    format!(", {} more counted only", self.slow_left_out)
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            s,
            "loadgen cpu {:.2} us/query  max send lag {} us",
            self.cpu_us_per_query, self.max_send_lag_us
        );
        let _ = writeln!(
            s,
            "\n  t_s       sent   answered   timeouts    p50_us    p99_us  answered_rx"
        );
        for row in &self.timeline {
            let _ = write!(
                s,
                "{:5} {:10} {:10} {:10} {:9} {:9} {:12}",
                row.t_s,
                row.sent,
                row.answered,
                row.timeouts,
                row.p50_us,
                row.p99_us,
                row.answered_rx
            );
            for e in self.events.iter().filter(|e| e.t_s as u64 == row.t_s) {
                let exit = e
                    .exit
                    .map_or_else(|| "running".to_string(), |c| c.to_string());
                let _ = write!(s, "  <- {:.2}s `{}` (exit {exit})", e.t_s, e.command);
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_to_send_second() {
        let mut c = Collector::new(3, 2_000_000);
        c.on_sent(100);
        c.on_sent(1_500_000_000);
        c.on_sent(2_999_999_999);
        c.on_sent(9_000_000_000); // clamped into the last row
        c.on_answer(100, 1_000_000_100, 0, false);
        c.on_answer(1_500_000_000, 1_750_000_000, 5, true);
        c.on_timeout(2_999_999_999);
        let r = c.report(
            RunInfo {
                server: "x".into(),
                rate: 1.0,
                duration_s: 3.0,
                send_s: 2.0,
                elapsed_s: 3.0,
                sockets: 1,
                timeout_ms: 2000,
                cpu_s: 0.001,
            },
            vec![],
        );
        assert_eq!((r.sent, r.answered, r.timeouts, r.truncated), (4, 2, 1, 1));
        assert_eq!(r.rcodes["NOERROR"], 1);
        assert_eq!(r.rcodes["REFUSED"], 1);
        assert_eq!(r.rcodes["NXDOMAIN"], 0);
        assert_eq!(r.timeline[0].sent, 1);
        assert_eq!(r.timeline[0].answered, 1);
        assert_eq!(r.timeline[0].answered_rx, 0);
        assert_eq!(r.timeline[1].answered_rx, 2);
        assert!((990_000..=1_010_000).contains(&r.timeline[0].p99_us));
        assert!(
            (247_000..=253_000).contains(&r.timeline[1].p99_us),
            "{}",
            r.timeline[1].p99_us
        );
        assert_eq!(r.timeline[2].sent, 2);
        assert_eq!(r.timeline[2].timeouts, 1);
        assert_eq!(r.timeline[2].p99_us, 0);
        assert_eq!(r.qps, 1.0);
        assert!(r.human().contains("answered 2"));
    }

    #[test]
    fn lists_slow_answers() {
        let mut c = Collector::new(2, 2_000_000);
        c.on_slow(0, 5_000_000, 0); // no threshold: nothing listed
        c.list_slow(1_000);
        c.on_slow(1_000_000, 1_999_000, 3); // 999 µs: under
        c.on_slow(1_500_000, 2_500_000, 1); // 1000 µs: listed
        c.on_slow(1_200_000_000, 1_207_000_000, 2);
        for _ in 0..SLOW_KEPT {
            c.on_slow(0, 3_000_000, 0);
        }
        let r = c.report(
            RunInfo {
                server: "x".into(),
                rate: 1.0,
                duration_s: 2.0,
                send_s: 2.0,
                elapsed_s: 2.0,
                sockets: 4,
                timeout_ms: 2000,
                cpu_s: 0.0,
            },
            vec![],
        );
        assert_eq!(r.slow.len(), SLOW_KEPT);
        assert_eq!(r.slow_left_out, 2);
        assert_eq!((r.slow[0].us, r.slow[0].socket), (1_000, 1));
        assert!((r.slow[0].sent_ms - 1.5).abs() < 1e-9);
        assert_eq!((r.slow[1].us, r.slow[1].socket), (7_000, 2));
        assert!((r.slow[1].sent_ms - 1200.0).abs() < 1e-9);
        assert!(
            r.human()
                .contains("slow answers listed (>= 1000 us): 10000, 2 more")
        );
    }
}
