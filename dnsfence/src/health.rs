//! Liveness and readiness of a serving process (`GET /healthz`, `GET /readyz`, served by
//! `metrics.rs`). The control loop beats, the shards' loop counters move; both are read when a
//! probe asks, from atomics the hot path already keeps: nothing here runs per query.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A control loop that has not beaten for this long is taken as hung (a reload compiles on
/// it, and a large policy can take a few seconds).
pub const CONTROL_STALL: Duration = Duration::from_secs(10);
/// A shard whose loop has not turned for this long is taken as hung (it turns at least every
/// 100 ms when idle).
pub const SHARD_STALL: Duration = Duration::from_secs(10);

/// Which process this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `dnsfence agent`.
    Agent,
    /// `dnsfence proxy` (the standalone HA proxy).
    Proxy,
}

impl Role {
    /// The name used in metrics and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Proxy => "proxy",
        }
    }
}

/// `Health::dead_shard` when the consumer thread ended.
const CONSUMER_DIED: u64 = u64::MAX;

/// What the process says about itself, written by its control loop and its sync.
#[derive(Debug)]
pub struct Health {
    role: Role,
    born: Instant,
    /// Milliseconds from `born` to the control loop's last beat.
    beat_ms: AtomicU64,
    /// 1 + the index of a shard thread that ended (0: none; [`CONSUMER_DIED`]: the
    /// consumer thread).
    dead_shard: AtomicU64,
    /// A policy is in force (the agent's files; the proxy's persisted one or the agent's).
    policy_in_force: AtomicBool,
    /// The version of the policy in force as the sync numbers it (the agent's counter of the
    /// snapshots it publishes; for the proxy, that of the agent's snapshot it serves): 0 none.
    policy_version: AtomicU64,
    /// Set by SIGTERM/SIGINT: the process drains and takes no new traffic.
    stop: std::sync::Arc<AtomicBool>,
    /// Per shard: its loop counter when last seen to move, and when.
    progress: Mutex<Vec<(u64, Instant)>>,
}

/// What a probe reads from the running process (the shards' published status, the sync).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Per shard: loop iterations so far.
    pub batches: Vec<u64>,
    /// The policy generation in force.
    pub generation: u64,
    /// Sync peers connected now (agent: proxies; proxy: the agent).
    pub sync_connected: u64,
}

/// A probe's answer: healthy or not, and why, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 200 when true, 503 otherwise.
    pub ok: bool,
    /// The body.
    pub text: String,
}

impl Answer {
    fn new(ok: bool, text: String) -> Answer {
        Answer { ok, text }
    }
}

impl Health {
    /// A process that has not served yet; `stop` is its SIGTERM flag.
    pub fn new(role: Role, stop: std::sync::Arc<AtomicBool>) -> Health {
        Health {
            role,
            born: Instant::now(),
            beat_ms: AtomicU64::new(0),
            dead_shard: AtomicU64::new(0),
            policy_in_force: AtomicBool::new(false),
            policy_version: AtomicU64::new(0),
            stop,
            progress: Mutex::new(Vec::new()),
        }
    }

    /// Which process this is.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The control loop is alive (called on each of its turns).
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    fn beat_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.born).as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    /// Shard `index`'s thread ended.
    pub fn shard_died(&self, index: usize) {
        self.dead_shard.store(index as u64 + 1, Ordering::Relaxed);
    }

    /// The consumer thread ended (the FQDN cache, the flow history and the proxy's records
    /// for the agent stopped with it).
    pub fn consumer_died(&self) {
        self.dead_shard.store(CONSUMER_DIED, Ordering::Relaxed);
    }

    /// A policy is in force now, numbered `version` by the sync (0: not numbered).
    pub fn policy_loaded(&self, version: u64) {
        self.policy_version.store(version, Ordering::Relaxed);
        self.policy_in_force.store(true, Ordering::Relaxed);
    }

    /// The version of the policy in force (0: none, or not numbered).
    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::Relaxed)
    }

    /// Whether a policy is in force.
    pub fn policy_in_force(&self) -> bool {
        self.policy_in_force.load(Ordering::Relaxed)
    }

    /// Liveness: the control loop beats, and every shard thread runs and turns.
    pub fn liveness(&self, seen: &Observed, now: Instant) -> Answer {
        match self.problems(seen, now) {
            None => Answer::new(
                true,
                format!(
                    "ok: {} control loop alive, {} shards alive\n",
                    self.role.name(),
                    seen.batches.len()
                ),
            ),
            Some(why) => Answer::new(false, format!("unhealthy: {why}\n")),
        }
    }

    /// Readiness: alive, not stopping, every shard polling its sockets, a policy in force.
    /// The proxy also says whether it is synced with an agent (ready either way: serving
    /// alone from its persisted policy is what it is for).
    pub fn readiness(&self, seen: &Observed, now: Instant) -> Answer {
        let not_ready = |why: String| Answer::new(false, format!("not ready: {why}\n"));
        if let Some(why) = self.problems(seen, now) {
            return not_ready(why);
        }
        if self.stop.load(Ordering::Relaxed) {
            return not_ready("stopping: draining in-flight queries".to_owned());
        }
        if let Some(i) = seen.batches.iter().position(|&b| b == 0) {
            return not_ready(format!("shard {i} is not polling its sockets yet"));
        }
        if !self.policy_in_force() {
            return not_ready(
                "no policy in force (every query is refused): waiting for the agent's".to_owned(),
            );
        }
        let version = match self.policy_version() {
            0 => String::new(),
            v => format!(", version {v}"),
        };
        let sync = match (self.role, seen.sync_connected) {
            (Role::Agent, n) => format!("; {n} proxies connected"),
            (Role::Proxy, 0) => "; not synced: no agent connected (serving the last policy it \
                                 received)"
                .to_owned(),
            (Role::Proxy, _) => "; synced with the agent".to_owned(),
        };
        Answer::new(
            true,
            format!(
                "ready: {} shards serving, policy generation {}{version} in force{sync}\n",
                seen.batches.len(),
                seen.generation
            ),
        )
    }

    /// What makes the process unhealthy, if anything.
    fn problems(&self, seen: &Observed, now: Instant) -> Option<String> {
        match self.dead_shard.load(Ordering::Relaxed) {
            0 => {}
            CONSUMER_DIED => return Some("the consumer thread stopped".to_owned()),
            n => return Some(format!("shard {} stopped", n - 1)),
        }
        let beat = self.born + Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let silent = now.saturating_duration_since(beat);
        if silent > CONTROL_STALL {
            return Some(format!(
                "the control loop has not run for {} s",
                silent.as_secs()
            ));
        }
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if progress.len() != seen.batches.len() {
            *progress = seen.batches.iter().map(|&b| (b, now)).collect();
        }
        let mut stalled = None;
        for (i, (&batches, (last, since))) in
            seen.batches.iter().zip(progress.iter_mut()).enumerate()
        {
            if batches != *last {
                (*last, *since) = (batches, now);
            } else if stalled.is_none() && now.saturating_duration_since(*since) > SHARD_STALL {
                stalled = Some(format!(
                    "shard {i} has not turned its loop for {} s",
                    now.saturating_duration_since(*since).as_secs()
                ));
            }
        }
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn seen(batches: &[u64], sync_connected: u64) -> Observed {
        Observed {
            batches: batches.to_vec(),
            generation: 3,
            sync_connected,
        }
    }

    #[test]
    fn a_serving_agent_is_alive_and_ready() {
        let h = Health::new(Role::Agent, Arc::default());
        h.policy_loaded(2);
        let now = Instant::now();
        h.beat_at(now);
        let live = h.liveness(&seen(&[5, 7], 1), now);
        assert!(live.ok, "{live:?}");
        let ready = h.readiness(&seen(&[5, 7], 1), now);
        assert!(ready.ok, "{ready:?}");
        assert_eq!(
            ready.text,
            "ready: 2 shards serving, policy generation 3, version 2 in force; 1 proxies connected\n"
        );
    }

    #[test]
    fn a_shard_that_stops_turning_is_unhealthy() {
        let h = Health::new(Role::Agent, Arc::default());
        h.policy_loaded(1);
        let t0 = Instant::now();
        h.beat_at(t0);
        assert!(h.liveness(&seen(&[5, 7], 0), t0).ok);
        // Shard 0 keeps turning, shard 1 does not.
        let later = t0 + SHARD_STALL + Duration::from_secs(1);
        h.beat_at(later);
        let live = h.liveness(&seen(&[50, 7], 0), later);
        assert!(!live.ok, "{live:?}");
        assert!(live.text.contains("shard 1 has not turned"), "{live:?}");
        assert!(!h.readiness(&seen(&[50, 7], 0), later).ok);
        // Turning again: alive again.
        assert!(h.liveness(&seen(&[60, 8], 0), later).ok);
    }

    #[test]
    fn a_silent_control_loop_or_a_dead_shard_is_unhealthy() {
        let h = Health::new(Role::Agent, Arc::default());
        h.policy_loaded(1);
        let t0 = Instant::now();
        h.beat_at(t0);
        let late = t0 + CONTROL_STALL + Duration::from_secs(1);
        let live = h.liveness(&seen(&[1], 0), late);
        assert!(!live.ok && live.text.contains("control loop"), "{live:?}");
        h.beat_at(late);
        assert!(h.liveness(&seen(&[2], 0), late).ok);
        h.shard_died(0);
        let live = h.liveness(&seen(&[3], 0), late);
        assert_eq!(
            live,
            Answer::new(false, "unhealthy: shard 0 stopped\n".into())
        );
        // A dead consumer too (review finding: it was not reported).
        let h = Health::new(Role::Proxy, Arc::default());
        h.policy_loaded(1);
        h.beat_at(late);
        assert!(h.liveness(&seen(&[4], 0), late).ok);
        h.consumer_died();
        assert_eq!(
            h.liveness(&seen(&[5], 0), late),
            Answer::new(false, "unhealthy: the consumer thread stopped\n".into())
        );
        assert!(!h.readiness(&seen(&[6], 0), late).ok);
    }

    #[test]
    fn not_ready_without_policy_before_polling_or_while_stopping() {
        let stop = Arc::new(AtomicBool::new(false));
        let h = Health::new(Role::Proxy, Arc::clone(&stop));
        let now = Instant::now();
        h.beat_at(now);
        let ready = h.readiness(&seen(&[4], 0), now);
        assert!(
            !ready.ok && ready.text.contains("no policy in force"),
            "{ready:?}"
        );
        // Alive all the same: it serves (and refuses) every query.
        assert!(h.liveness(&seen(&[5], 0), now).ok);
        h.policy_loaded(7);
        let ready = h.readiness(&seen(&[6], 0), now);
        assert!(ready.ok && ready.text.contains("not synced"), "{ready:?}");
        let ready = h.readiness(&seen(&[7], 1), now);
        assert!(
            ready.ok && ready.text.contains("synced with the agent"),
            "{ready:?}"
        );
        let ready = h.readiness(&seen(&[0, 8], 1), now);
        assert!(
            !ready.ok && ready.text.contains("shard 0 is not polling"),
            "{ready:?}"
        );
        stop.store(true, Ordering::Relaxed);
        let ready = h.readiness(&seen(&[9], 1), now);
        assert!(!ready.ok && ready.text.contains("stopping"), "{ready:?}");
    }
}
