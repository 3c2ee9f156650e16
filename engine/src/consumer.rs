//! The consumer: the one thread that takes records off the shards' queue and keeps the FQDN
//! cache, the aggregate counters and the flow log.
//!
//! Shards never wait for it: the queue is bounded and a full queue is counted by the shard.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use dnsfence_policy::EndpointId;

use crate::core::{Record, Verdict};

/// One FQDN cache entry: addresses an endpoint learned for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// Address → expiry.
    pub addresses: HashMap<IpAddr, Instant>,
    /// When the name was last resolved.
    pub last_seen: Instant,
}

/// Aggregates the consumer keeps.
#[derive(Debug, Default)]
pub struct Observations {
    /// (endpoint, name in text form with its trailing dot) → addresses.
    pub cache: HashMap<(EndpointId, Box<str>), CacheEntry>,
    /// Flow records seen, by verdict.
    pub flows_forwarded: u64,
    /// Denied queries seen.
    pub flows_refused: u64,
    /// Timeouts seen.
    pub flows_timeout: u64,
    /// Malformed queries seen.
    pub flows_malformed: u64,
    /// Queries answered SERVFAIL for lack of room or a failed allow write.
    pub flows_overload: u64,
    /// Address observations seen.
    pub ip_updates: u64,
    /// Cache entries evicted because the cache was full.
    pub cache_evictions: u64,
}

/// How the consumer runs.
pub struct ConsumerConfig {
    /// Most (endpoint, name) entries kept; the oldest is evicted beyond.
    pub cache_entries: usize,
    /// Where flow records go, one JSON line each (None: not logged).
    pub flow_log: Option<Box<dyn Write + Send>>,
}

/// Runs until `stop` is set and the queue is empty.
pub fn run(
    queue: Arc<ArrayQueue<Record>>,
    observations: Arc<Mutex<Observations>>,
    mut config: ConsumerConfig,
    stop: Arc<AtomicBool>,
) {
    let started = Instant::now();
    loop {
        let mut batch = 0;
        {
            let mut obs = observations.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(record) = queue.pop() {
                apply(&mut obs, &record, config.cache_entries);
                if let (Record::Flow(flow), Some(log)) = (&record, config.flow_log.as_mut()) {
                    let _ = writeln!(
                        log,
                        r#"{{"t_ms":{},"client":"{}","endpoint":{},"name":"{}","qtype":{},"verdict":"{:?}","rcode":{},"upstream_us":{}}}"#,
                        flow.at.saturating_duration_since(started).as_millis(),
                        flow.client,
                        flow.endpoint.map_or(-1, |e| i64::from(e.0)),
                        flow.name,
                        flow.qtype,
                        flow.verdict,
                        flow.rcode.map_or(-1, i32::from),
                        flow.upstream_latency.map_or(-1, |d| d.as_micros() as i64),
                    );
                }
                batch += 1;
                if batch == 4096 {
                    break;
                }
            }
        }
        if batch == 0 {
            if stop.load(Ordering::Relaxed) && queue.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if let Some(log) = config.flow_log.as_mut() {
        let _ = log.flush();
    }
}

fn apply(obs: &mut Observations, record: &Record, cache_entries: usize) {
    match record {
        Record::Flow(flow) => match flow.verdict {
            Verdict::Forward => obs.flows_forwarded += 1,
            Verdict::Refuse | Verdict::RefuseUnknownSource => obs.flows_refused += 1,
            Verdict::Timeout => obs.flows_timeout += 1,
            Verdict::Malformed => obs.flows_malformed += 1,
            Verdict::Overload => obs.flows_overload += 1,
        },
        Record::Addresses(update) => {
            obs.ip_updates += 1;
            let key = (update.endpoint, Box::<str>::from(update.name.to_string()));
            if !obs.cache.contains_key(&key) && obs.cache.len() >= cache_entries {
                make_room(obs, update.at, cache_entries);
            }
            let entry = obs.cache.entry(key).or_insert_with(|| CacheEntry {
                addresses: HashMap::new(),
                last_seen: update.at,
            });
            entry.last_seen = update.at;
            let expires = update.at + Duration::from_secs(u64::from(update.ttl));
            for &ip in update.addresses.ips() {
                let e = entry.addresses.entry(ip).or_insert(expires);
                *e = (*e).max(expires);
            }
        }
    }
}

/// Frees at least an eighth of the cache: expired entries first, then arbitrary ones. Amortised
/// O(1) per insertion, so a flood of unique names costs bounded memory and bounded time.
fn make_room(obs: &mut Observations, now: Instant, cache_entries: usize) {
    let before = obs.cache.len();
    obs.cache
        .retain(|_, e| e.addresses.values().any(|&expires| expires > now));
    let target = cache_entries - cache_entries / 8;
    if obs.cache.len() > target {
        let excess = obs.cache.len() - target;
        let victims: Vec<_> = obs.cache.keys().take(excess).cloned().collect();
        for k in victims {
            obs.cache.remove(&k);
        }
    }
    obs.cache_evictions += (before - obs.cache.len()) as u64;
}
