//! The consumer: the one thread that takes records off the shards' queue and keeps the FQDN
//! cache, the aggregate counters and the flow log.
//!
//! Shards never wait for it: the queue is bounded and a full queue is counted by the shard.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use dnsfence_policy::EndpointKey;

use crate::core::{Flow, Record, Verdict};

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
    pub cache: HashMap<(EndpointKey, Box<str>), CacheEntry>,
    /// Flow records seen, by verdict.
    pub flows_forwarded: u64,
    /// Denied queries seen.
    pub flows_refused: u64,
    /// Timeouts seen.
    pub flows_timeout: u64,
    /// Malformed queries seen.
    pub flows_malformed: u64,
    /// Queries answered SERVFAIL for lack of room, a failed allow write, or an unusable answer.
    pub flows_overload: u64,
    /// Address observations seen.
    pub ip_updates: u64,
    /// Cache entries evicted because the cache was full.
    pub cache_evictions: u64,
    /// Addresses dropped from an entry beyond the per-name limit.
    pub addresses_evicted: u64,
}

impl Observations {
    /// Empty aggregates with the FQDN cache allocated once for its cap, so that no insert ever
    /// pays a whole-table reallocation and rehash (a latency cliff of tens of milliseconds at
    /// 10⁵–10⁶ entries). The cache never holds more than `cache_entries` (see
    /// [`ConsumerConfig::cache_entries`]), but evictions leave tombstones, and the standard
    /// table reallocates when tombstones use up its room while more than half of its capacity
    /// is live: room for twice the cap keeps it at its first size for good. Only the control
    /// bytes are touched up front; bucket pages become resident as entries land. The per-name
    /// address sets stay small (`max_ips_per_name`) and grow on demand.
    pub fn with_cache_capacity(cache_entries: usize) -> Observations {
        Observations {
            cache: HashMap::with_capacity(cache_entries.saturating_mul(2).saturating_add(2)),
            ..Observations::default()
        }
    }
}

/// The shards → consumer queue: bounded and lock-free, with a doorbell so that the consumer
/// may sleep long between rounds at low load without the queue overflowing in a burst.
///
/// The consumer sleeps [`IDLE_WAIT`] between rounds (a few wake-ups a second instead of one
/// every 2 ms: each costs a context switch, about 1 % of a core on an idle VM). A shard that
/// finds the queue a quarter full while the consumer sleeps wakes it ([`RecordQueue::nudge`],
/// once per loop turn, a syscall only then), so the room left never runs out at any rate the
/// consumer keeps up with.
#[derive(Debug)]
pub struct RecordQueue {
    queue: ArrayQueue<Record>,
    /// Set by the consumer before it sleeps; cleared by the consumer when it wakes or by the
    /// shard that wakes it.
    sleeping: AtomicBool,
    consumer: OnceLock<std::thread::Thread>,
    idle_wait: Duration,
}

/// How long the consumer sleeps between rounds unless a shard wakes it: the most its
/// aggregates (FQDN cache, observations for the agent, flow log) lag behind the shards.
pub const IDLE_WAIT: Duration = Duration::from_millis(20);

impl RecordQueue {
    /// A queue for `capacity` records (at least one).
    pub fn new(capacity: usize) -> RecordQueue {
        RecordQueue::with_idle_wait(capacity, IDLE_WAIT)
    }

    /// The same with the consumer's wait between rounds set (tests).
    pub fn with_idle_wait(capacity: usize, idle_wait: Duration) -> RecordQueue {
        RecordQueue {
            queue: ArrayQueue::new(capacity.max(1)),
            sleeping: AtomicBool::new(false),
            consumer: OnceLock::new(),
            idle_wait,
        }
    }

    /// Queues a record; false (the record dropped) when the queue is full.
    pub fn push(&self, record: Record) -> bool {
        self.queue.push(record).is_ok()
    }

    /// Takes the oldest record.
    pub fn pop(&self) -> Option<Record> {
        self.queue.pop()
    }

    /// Records waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.queue.capacity()
    }

    /// The fill at which a shard wakes a sleeping consumer.
    fn high_water(&self) -> usize {
        (self.queue.capacity() / 4).max(1)
    }

    /// Called by a shard after a turn's pushes: wakes the consumer when it sleeps while a
    /// quarter of the queue is used.
    pub fn nudge(&self) {
        // SeqCst here and in `sleep`: either the consumer sees this turn's records before it
        // sleeps, or this load sees it sleeping.
        if self.sleeping.load(Ordering::SeqCst)
            && self.queue.len() >= self.high_water()
            && self.sleeping.swap(false, Ordering::SeqCst)
        {
            self.wake();
        }
    }

    /// Wakes the consumer (when stopping).
    pub fn wake(&self) {
        if let Some(t) = self.consumer.get() {
            t.unpark();
        }
    }

    /// The consumer's wait between rounds: [`IDLE_WAIT`] (or as set), or until a shard or
    /// [`RecordQueue::wake`] wakes it.
    fn sleep(&self) {
        let _ = self.consumer.set(std::thread::current());
        self.sleeping.store(true, Ordering::SeqCst);
        if self.queue.len() < self.high_water() {
            std::thread::park_timeout(self.idle_wait);
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }
}

/// A hook that sees every record the consumer takes, once the whole batch it came in is
/// applied, with the aggregates as they are then (the lock on them is held: keep it short).
/// An answer's address record follows its flow record, usually in the same batch, so a
/// flow's addresses are found in the FQDN cache ([`answer_of`]).
pub type Forward = Box<dyn FnMut(&Record, &Observations) + Send>;

/// How the consumer runs.
pub struct ConsumerConfig {
    /// Most (endpoint, name) entries kept; beyond it expired entries, then arbitrary ones,
    /// are evicted (an eighth of the cache at a time).
    pub cache_entries: usize,
    /// Most addresses kept per (endpoint, name); the soonest to expire go first.
    pub max_ips_per_name: usize,
    /// Where flow records go, one JSON line each (None: not logged).
    pub flow_log: Option<Box<dyn Write + Send>>,
    /// Sees every record after its batch is applied (the standalone proxy keeps them for the
    /// agent; the agent keeps flows for `dnsfence observe`).
    pub forward: Option<Forward>,
}

/// Runs until `stop` is set and the queue is empty.
pub fn run(
    queue: Arc<RecordQueue>,
    observations: Arc<Mutex<Observations>>,
    mut config: ConsumerConfig,
    stop: Arc<AtomicBool>,
) {
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    let mut unflushed = false;
    loop {
        batch.clear();
        while batch.len() < BATCH {
            match queue.pop() {
                Some(record) => batch.push(record),
                None => break,
            }
        }
        if batch.is_empty() {
            // Idle: make what was logged visible, then wait for more.
            if unflushed && let Some(log) = config.flow_log.as_mut() {
                let _ = log.flush();
                unflushed = false;
            }
            if stop.load(Ordering::Relaxed) && queue.is_empty() {
                break;
            }
            queue.sleep();
            continue;
        }
        {
            // The lock covers the aggregates and the hook (a push per record), never the log, so
            // a metrics scrape never waits on a write.
            let mut obs = observations.lock().unwrap_or_else(|e| e.into_inner());
            for record in &batch {
                apply(
                    &mut obs,
                    record,
                    config.cache_entries,
                    config.max_ips_per_name,
                );
            }
            if let Some(forward) = config.forward.as_mut() {
                batch.iter().for_each(|record| forward(record, &obs));
            }
        }
        if let Some(log) = config.flow_log.as_mut() {
            for record in &batch {
                if let Record::Flow(flow) = record {
                    write_flow(log, flow, started);
                    unflushed = true;
                }
            }
        }
    }
    if let Some(log) = config.flow_log.as_mut() {
        let _ = log.flush();
    }
}

/// Records taken off the queue per round.
const BATCH: usize = 1024;

/// One flow record as a JSON line.
fn write_flow(log: &mut dyn Write, flow: &Flow, started: Instant) {
    let _ = writeln!(
        log,
        r#"{{"t_ms":{},"client":"{}","endpoint":{},"name":"{}","qtype":{},"verdict":"{:?}","rcode":{},"upstream_us":{}}}"#,
        flow.at.saturating_duration_since(started).as_millis(),
        flow.client,
        flow.endpoint
            .map_or_else(|| "null".to_owned(), |e| format!("\"{:016x}\"", e.0)),
        flow.name,
        flow.qtype,
        flow.verdict,
        flow.rcode.map_or(-1, i32::from),
        flow.upstream_latency.map_or(-1, |d| d.as_micros() as i64),
    );
}

/// The addresses the FQDN cache holds for what `endpoint` asked as `name` (text form, with or
/// without its trailing dot) that were still live at `at`, sorted, and the smallest
/// remaining lifetime among them in seconds (the answer's TTL raised to the floor the allow
/// entries use). Empty for names that wrote no allow entry: only `toFQDNs` names of enforced
/// endpoints are cached. Allocates the lookup key: for the consumer and the sync threads, never
/// a shard.
pub fn answer_of(
    obs: &Observations,
    endpoint: EndpointKey,
    name: &str,
    at: Instant,
) -> (Vec<IpAddr>, Option<u32>) {
    let mut text = String::with_capacity(name.len() + 1);
    text.push_str(name);
    if !text.ends_with('.') {
        text.push('.');
    }
    let Some(entry) = obs.cache.get(&(endpoint, text.into_boxed_str())) else {
        return (Vec::new(), None);
    };
    let live = entry.addresses.iter().filter(|(_, e)| **e > at);
    let ttl = live
        .clone()
        .map(|(_, e)| e.duration_since(at).as_secs().min(u64::from(u32::MAX)) as u32)
        .min();
    let mut ips: Vec<IpAddr> = live.map(|(ip, _)| *ip).collect();
    ips.sort_unstable();
    (ips, ttl)
}

/// Applies one record to the aggregates, as the consumer does (the agent merges what the
/// standalone proxy observed with it: a union, so merging one twice changes nothing).
pub fn merge(
    obs: &mut Observations,
    record: &Record,
    cache_entries: usize,
    max_ips_per_name: usize,
) {
    apply(obs, record, cache_entries, max_ips_per_name);
}

fn apply(obs: &mut Observations, record: &Record, cache_entries: usize, max_ips_per_name: usize) {
    match record {
        Record::Flow(flow) => match flow.verdict {
            Verdict::Forward => obs.flows_forwarded += 1,
            Verdict::Refuse | Verdict::RefuseUnknownSource => obs.flows_refused += 1,
            Verdict::Timeout => obs.flows_timeout += 1,
            Verdict::Malformed => obs.flows_malformed += 1,
            Verdict::Overload | Verdict::BadAnswer | Verdict::Unreachable => {
                obs.flows_overload += 1
            }
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
            // Expired addresses go; a name that keeps answering with new addresses (an
            // attacker's authoritative server can) keeps at most `max_ips_per_name`, dropping
            // the ones that expire first (Cilium: --tofqdns-endpoint-max-ip-per-hostname).
            entry.addresses.retain(|_, e| *e > update.at);
            for &ip in update.addresses.ips() {
                let e = entry.addresses.entry(ip).or_insert(expires);
                *e = (*e).max(expires);
            }
            while entry.addresses.len() > max_ips_per_name {
                let Some(first) = entry
                    .addresses
                    .iter()
                    .min_by_key(|(_, e)| **e)
                    .map(|(ip, _)| *ip)
                else {
                    break;
                };
                entry.addresses.remove(&first);
                obs.addresses_evicted += 1;
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use dnsfence_matcher::Name;
    use dnsfence_policy::EndpointKey;

    use super::*;
    use crate::core::IpUpdate;
    use crate::wire::Addresses;

    /// The doorbell: a consumer asleep for its whole wait stays asleep while the queue is
    /// under a quarter full and is woken by the shard's nudge once it is; `wake` wakes it.
    #[test]
    fn a_quarter_full_queue_wakes_the_sleeping_consumer() {
        let queue = Arc::new(RecordQueue::with_idle_wait(8, Duration::from_secs(60)));
        // One consumer thread, asleep once per message on `go`; each wait's length comes
        // back on `slept`.
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let (slept_tx, slept) = std::sync::mpsc::channel();
        let q = Arc::clone(&queue);
        let consumer = std::thread::spawn(move || {
            while go_rx.recv().is_ok() {
                let start = Instant::now();
                q.sleep();
                slept_tx.send(start.elapsed()).unwrap();
            }
        });
        let asleep = || {
            go.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !queue.sleeping.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the consumer never slept");
                std::thread::yield_now();
            }
        };
        let short = Duration::from_millis(200);
        let record = || update(Instant::now(), &["192.0.2.1".parse().unwrap()], 60);
        asleep();
        assert!(queue.push(record()));
        queue.nudge();
        assert!(
            slept.recv_timeout(short).is_err(),
            "woken under a quarter full"
        );
        assert!(queue.push(record()));
        queue.nudge();
        let first = slept
            .recv_timeout(Duration::from_secs(30))
            .expect("not woken");
        assert!(first < Duration::from_secs(30));
        // Drained and asleep again: a nudge does not wake it, `wake` (the stop) does.
        while queue.pop().is_some() {}
        asleep();
        queue.nudge();
        assert!(
            slept.recv_timeout(short).is_err(),
            "woken by a nudge with an empty queue"
        );
        queue.wake();
        slept
            .recv_timeout(Duration::from_secs(30))
            .expect("not woken by wake");
        drop(go);
        consumer.join().unwrap();
    }

    fn update(at: Instant, ips: &[std::net::IpAddr], ttl: u32) -> Record {
        let mut addresses = Addresses::default();
        for &ip in ips {
            addresses.push(ip);
        }
        Record::Addresses(IpUpdate {
            at,
            endpoint: EndpointKey(7),
            name: Name::from_text("x.attacker.test").unwrap(),
            addresses,
            ttl,
            rules: [0; 8],
            rules_total: 1,
        })
    }

    #[test]
    fn a_name_keeps_a_bounded_number_of_addresses() {
        let mut obs = Observations::default();
        let t0 = Instant::now();
        // 100 answers with 32 fresh addresses each, long TTL: capped at 64 per name.
        for i in 0..100u32 {
            let ips: Vec<_> = (0..32u32)
                .map(|j| std::net::IpAddr::from((i * 32 + j).to_be_bytes()))
                .collect();
            apply(
                &mut obs,
                &update(t0 + Duration::from_millis(u64::from(i)), &ips, 3600),
                16,
                64,
            );
        }
        assert_eq!(obs.cache.len(), 1);
        let entry = obs.cache.values().next().unwrap();
        assert_eq!(entry.addresses.len(), 64);
        assert_eq!(obs.addresses_evicted, 100 * 32 - 64);
        // Expired addresses are dropped at the next update of the name.
        let later = t0 + Duration::from_secs(7200);
        let ip = std::net::IpAddr::from([10, 0, 0, 1]);
        apply(&mut obs, &update(later, &[ip], 60), 16, 64);
        let entry = obs.cache.values().next().unwrap();
        assert_eq!(entry.addresses.keys().copied().collect::<Vec<_>>(), [ip]);
    }

    #[test]
    fn a_flows_answer_comes_from_the_cache() {
        let mut obs = Observations::default();
        let t0 = Instant::now();
        let (a, b) = (
            std::net::IpAddr::from([10, 0, 0, 2]),
            std::net::IpAddr::from([10, 0, 0, 1]),
        );
        apply(&mut obs, &update(t0, &[a, b], 300), 16, 64);
        let (ips, ttl) = answer_of(&obs, EndpointKey(7), "x.attacker.test", t0);
        assert_eq!((ips, ttl), (vec![b, a], Some(300)));
        // With or without the trailing dot; another endpoint, or a time after they expired,
        // has none.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(
            answer_of(&obs, EndpointKey(7), "x.attacker.test.", later).1,
            Some(200)
        );
        assert!(
            answer_of(&obs, EndpointKey(8), "x.attacker.test", t0)
                .0
                .is_empty()
        );
        let expired = t0 + Duration::from_secs(301);
        assert_eq!(
            answer_of(&obs, EndpointKey(7), "x.attacker.test", expired),
            (Vec::new(), None)
        );
    }

    #[test]
    fn a_cache_sized_at_start_never_rehashes() {
        const CAP: usize = 1000;
        let mut obs = Observations::with_cache_capacity(CAP);
        let capacity = obs.cache.capacity();
        assert!(capacity >= CAP);
        let mut last = capacity;
        let t0 = Instant::now();
        // Fill to the cap, then keep going through 200 caps' worth of unique names (evictions
        // all along): the table is never rehashed. (Sized for the cap alone, it reallocates
        // after about 115 caps' worth, once tombstones use up its room.)
        for i in 0..200 * CAP as u32 {
            let Record::Addresses(mut u) =
                update(t0, &[std::net::IpAddr::from(i.to_be_bytes())], 60)
            else {
                unreachable!()
            };
            u.name = Name::from_text(&format!("n{i}.flood.test")).unwrap();
            apply(&mut obs, &Record::Addresses(u), CAP, 8);
            assert!(obs.cache.len() <= CAP);
            // `capacity()` is live entries plus the room left before the next rehash: it drops
            // as evictions leave tombstones, rises by one when an insert reuses a tombstone,
            // and would jump at a rehash (in place: back to the first value; into a bigger
            // allocation: above it).
            let now = obs.cache.capacity();
            assert!(
                now <= last + 1 && now <= capacity,
                "rehash at insert {i}: capacity {last} -> {now}"
            );
            last = now;
        }
        assert!(obs.cache_evictions > 0);
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let mut obs = Observations::default();
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let Record::Addresses(mut u) = update(t0, &[std::net::IpAddr::from([10, 0, 0, 1])], 60)
            else {
                unreachable!()
            };
            u.name = Name::from_text(&format!("n{i}.attacker.test")).unwrap();
            apply(&mut obs, &Record::Addresses(u), 100, 8);
            assert!(obs.cache.len() <= 100);
        }
        assert!(obs.cache_evictions >= 900);
    }
}
