//! High availability wiring (`../shared/spec/ha.md`): the agent side and the proxy side of
//! the sync over the agent socket (`dnsfence_sync::proto`), and what both persist in
//! `--state-dir` (`dnsfence_sync::state`).
//!
//! - The agent binds the socket ([`AgentSync`]); one thread accepts, one thread serves each
//!   peer. A proxy gets the agent's policy texts in force ([`policy_message`]) at once and
//!   after every reload; the observations and flow records it sends are merged into the
//!   agent's FQDN cache and counters, and acknowledged.
//! - The proxy runs one sync thread ([`ProxySync`]): connect with backoff, Hello, then
//!   apply each snapshot (compile, persist, swap in) and acknowledge it; send what its
//!   replay buffers hold and drop what the agent acknowledges. On a lost connection the
//!   unacknowledged batches go again after the next connect.
//! - Neither side ever blocks a shard on the other: shards only push records into their
//!   queue; the consumer thread copies them into the replay buffers behind a lock held for
//!   a push; every socket read and write has a timeout.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dnsfence_engine::consumer::{self, Observations};
use dnsfence_engine::core::{IpUpdate, Record, Verdict};
use dnsfence_engine::wire::Addresses;
use dnsfence_matcher::Name;
use dnsfence_policy::EndpointKey;
use dnsfence_policy::reload::{InForce, Sources};
use dnsfence_sync::conn::{AgentListener, Backoff, connect_with_backoff};
use dnsfence_sync::proto::{
    self, Decoder, Encoder, Hello, Message, NodeFacts, Observation, PolicySnapshot, Role,
    SourceFile,
};
use dnsfence_sync::replay::ReplayBuffer;
use dnsfence_sync::state::{Kind, StateDir};

use crate::observe::FlowHistory;
use crate::serve::ServeArgs;

/// How often each process writes its FQDN cache (and the proxy its replay buffers) to the
/// state directory; both are also written at a clean exit.
pub const CACHE_PERSIST_INTERVAL: Duration = Duration::from_secs(5);
/// A side that has sent nothing for this long sends a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A peer silent for this long is gone.
const PEER_TIMEOUT: Duration = Duration::from_secs(4);
/// Reads wait at most this long (so a connection thread also gets to send and to stop).
const READ_SLICE: Duration = Duration::from_millis(50);
/// A write that makes no progress for this long ends the connection (the peer is stuck).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// One `write` call waits at most this long; then what the peer sent meanwhile is read (it
/// may itself be blocked writing to us: a multi-MiB snapshot one way and flow batches the
/// other filled both socket buffers, and each side's write waited for the other's read
/// until the timeout ended the connection, again at every reconnect; review finding).
const WRITE_SLICE: Duration = Duration::from_millis(50);
/// Bytes read ahead while writing or waiting, not decoded yet: beyond this the peer is not
/// read (it waits for us), so the read-ahead is bounded whatever the peer sends.
const READ_AHEAD: usize = 2 * proto::DEFAULT_MAX_FRAME as usize;
/// Items per observations or flows batch.
const BATCH: usize = 512;
/// Batches in flight (sent, not acknowledged) per buffer.
const IN_FLIGHT: usize = 4;

/// State file names.
const POLICY_FILE: &str = "policy";
const CACHE_FILE: &str = "fqdn-cache";
const REPLAY_FILE: &str = "replay";

/// Wall-clock milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The `Instant` of a wall-clock time in ms (clamped to now: a clock step cannot put an
/// observation in the future).
fn instant_of(ms: u64) -> Instant {
    let now = Instant::now();
    let age = Duration::from_millis(unix_ms().saturating_sub(ms));
    now.checked_sub(age).unwrap_or(now)
}

/// One framed connection with read and write timeouts.
struct Conn {
    stream: UnixStream,
    decoder: Decoder,
    encoder: Encoder,
    out: Vec<u8>,
    last_rx: Instant,
    last_tx: Instant,
}

impl Conn {
    fn new(stream: UnixStream) -> std::io::Result<Conn> {
        stream.set_read_timeout(Some(READ_SLICE))?;
        stream.set_write_timeout(Some(WRITE_SLICE))?;
        let now = Instant::now();
        Ok(Conn {
            stream,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            out: Vec::new(),
            last_rx: now,
            last_tx: now,
        })
    }

    /// Encodes into `out` with `encode`, then writes it whole.
    fn send_with(
        &mut self,
        encode: impl FnOnce(&Encoder, &mut Vec<u8>) -> Result<(), proto::EncodeError>,
    ) -> Result<()> {
        self.out.clear();
        encode(&self.encoder, &mut self.out).context("encode")?;
        self.write_out()
    }

    /// Writes `out` whole. While the peer does not take it all, what it sends is read ahead
    /// (see [`WRITE_SLICE`]); no progress for [`WRITE_TIMEOUT`] ends the connection.
    fn write_out(&mut self) -> Result<()> {
        use std::io::Write;
        let mut at = 0;
        let mut progress = Instant::now();
        while at < self.out.len() {
            match self.stream.write(&self.out[at..]) {
                Ok(0) => anyhow::bail!("write: the peer closed"),
                Ok(n) => {
                    at += n;
                    progress = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if progress.elapsed() > WRITE_TIMEOUT {
                        anyhow::bail!("write: the peer took nothing for {WRITE_TIMEOUT:?}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("write"),
            }
            if at < self.out.len() {
                // Not all taken: read what the peer has sent, whether or not this write made
                // progress (a peer whose own write progresses slowly never stops to read).
                self.read_available()?;
            }
        }
        self.last_tx = Instant::now();
        Ok(())
    }

    /// Reads, without waiting, what the peer has sent into the decoder's buffer (up to
    /// [`READ_AHEAD`] buffered), not decoding it.
    fn read_available(&mut self) -> Result<()> {
        self.stream.set_nonblocking(true).context("nonblocking")?;
        let result = loop {
            if self.decoder.buffered() >= READ_AHEAD {
                break Ok(());
            }
            match self.decoder.read_from(&mut self.stream) {
                Ok(0) => break Err(anyhow::anyhow!("closed by the peer")),
                Ok(_) => {
                    self.last_rx = Instant::now();
                    // A bad frame header ends the connection now, not after what follows
                    // it has been buffered.
                    if let Err(e) = self.decoder.check_buffered() {
                        break Err(e).context("decode");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e).context("read"),
            }
        };
        self.stream.set_nonblocking(false).context("blocking")?;
        result
    }

    /// Reads what the peer sent (at most [`READ_SLICE`] of waiting) into the decoder's
    /// buffer without decoding it: [`Conn::recv`] decodes it later, in order. Nothing is read
    /// beyond [`READ_AHEAD`] buffered (then it only waits).
    fn read_ahead(&mut self) -> Result<()> {
        if self.decoder.buffered() >= READ_AHEAD {
            std::thread::sleep(READ_SLICE);
            return Ok(());
        }
        match self.decoder.read_from(&mut self.stream) {
            Ok(0) => anyhow::bail!("closed by the peer"),
            Ok(_) => {
                self.last_rx = Instant::now();
                self.decoder.check_buffered().context("decode")?;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                if self.last_rx.elapsed() > PEER_TIMEOUT {
                    anyhow::bail!("peer silent for {PEER_TIMEOUT:?}");
                }
                Ok(())
            }
            Err(e) => Err(e).context("read"),
        }
    }

    fn send(&mut self, msg: &Message) -> Result<()> {
        self.send_with(|e, out| e.encode(msg, out))
    }

    /// The next message: decoded from what is buffered, else after one read (at most
    /// [`READ_SLICE`]); `Ok(None)` when nothing complete arrived. An error ends the
    /// connection (closed, broken, a fatal framing error, a peer silent for too long).
    fn recv(&mut self) -> Result<Option<Message>> {
        loop {
            if let Some(msg) = self.decode_buffered()? {
                return Ok(Some(msg));
            }
            match self.decoder.read_from(&mut self.stream) {
                Ok(0) => anyhow::bail!("closed by the peer"),
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.last_rx.elapsed() > PEER_TIMEOUT {
                        anyhow::bail!("peer silent for {PEER_TIMEOUT:?}");
                    }
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("read"),
            }
        }
    }

    /// The next message already buffered (none is read): `Ok(None)` when no complete one is.
    fn decode_buffered(&mut self) -> Result<Option<Message>> {
        loop {
            match self.decoder.decode() {
                Ok(Some(msg)) => {
                    self.last_rx = Instant::now();
                    return Ok(Some(msg));
                }
                Ok(None) => return Ok(None),
                Err(e) if e.is_fatal() => return Err(e).context("decode"),
                // A message type this version does not know, or a bad body: skipped.
                Err(_) => {}
            }
        }
    }

    /// Sends a heartbeat when nothing else was sent for a while.
    fn keep_alive(&mut self) -> Result<()> {
        if self.last_tx.elapsed() >= HEARTBEAT {
            self.send(&Message::Heartbeat)?;
        }
        Ok(())
    }

    /// Waits up to `within` for the peer's Hello.
    fn hello(&mut self, within: Duration) -> Result<Hello> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            match self.recv()? {
                Some(Message::Hello(h)) => return Ok(h),
                Some(other) => anyhow::bail!("expected Hello, got {:?}", other.message_type()),
                None => {}
            }
        }
        anyhow::bail!("no Hello within {within:?}")
    }
}

/// The agent's policy texts in force, as the proxy compiles them, with their identity.
pub fn policy_message(version: u64, sources: &Sources) -> PolicySnapshot {
    let mut msg = policy_texts(version, sources);
    msg.policy_id = policy_id(&msg);
    msg
}

/// [`policy_message`] without the identity.
fn policy_texts(version: u64, sources: &Sources) -> PolicySnapshot {
    let in_force = sources.in_force();
    let node = sources.node();
    let text = |cidrs: &[dnsfence_policy::cidr::Cidr]| {
        cidrs.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    PolicySnapshot {
        version,
        policy_files: in_force
            .policies
            .iter()
            .map(|(path, text)| SourceFile {
                path: path.display().to_string(),
                content: text.to_string(),
            })
            .collect(),
        endpoints: in_force.endpoints.as_ref().map_or(
            SourceFile {
                path: String::new(),
                content: String::new(),
            },
            |(path, text)| SourceFile {
                path: path.display().to_string(),
                content: text.to_string(),
            },
        ),
        node: NodeFacts {
            cluster_cidrs: text(&node.cluster),
            node_ips: text(&node.host),
            kube_apiserver: text(&node.kube_apiserver),
            open_loopback_answers: node.open_loopback,
            deny_answer_cidrs: text(&node.deny_answers),
        },
        policy_id: 0,
    }
}

/// Whether two snapshot messages carry the same policy: every text and node fact equal,
/// whatever their version numbers.
pub fn same_policy(a: &PolicySnapshot, b: &PolicySnapshot) -> bool {
    // Destructured, so that a field added to the message is not silently left out.
    let PolicySnapshot {
        version: _,
        policy_files,
        endpoints,
        node,
        policy_id: _,
    } = a;
    *policy_files == b.policy_files && *endpoints == b.endpoints && *node == b.node
}

/// The identity of the policy a snapshot message carries (`Snapshot::policy_id`): the first
/// 64 bits of a SHA-256 over every text and node fact, each length-prefixed, so that the
/// agent and a proxy given the same texts agree whatever the snapshots' version numbers (and
/// exactly when [`same_policy`] holds, short of a collision). Never 0 (the "not known"
/// value). The agent sends it with the texts ([`sent_policy_id`]): builds that know other
/// message fields would hash them otherwise.
pub fn policy_id(msg: &PolicySnapshot) -> u64 {
    use sha2::{Digest, Sha256};
    fn put(hash: &mut Sha256, bytes: &[u8]) {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    }
    fn put_list(hash: &mut Sha256, list: &[String]) {
        hash.update((list.len() as u64).to_le_bytes());
        list.iter().for_each(|s| put(hash, s.as_bytes()));
    }
    // Destructured as in `same_policy`: a field added to the message is not left out.
    let PolicySnapshot {
        version: _,
        policy_files,
        endpoints,
        node,
        policy_id: _,
    } = msg;
    let NodeFacts {
        cluster_cidrs,
        node_ips,
        kube_apiserver,
        open_loopback_answers,
        deny_answer_cidrs,
    } = node;
    let mut hash = Sha256::new();
    hash.update((policy_files.len() as u64).to_le_bytes());
    for file in policy_files.iter().chain(std::iter::once(endpoints)) {
        put(&mut hash, file.path.as_bytes());
        put(&mut hash, file.content.as_bytes());
    }
    for list in [cluster_cidrs, node_ips, kube_apiserver, deny_answer_cidrs] {
        put_list(&mut hash, list);
    }
    hash.update([u8::from(*open_loopback_answers)]);
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first).max(1)
}

/// The identity of the policy in a message from the agent: the one the agent sent (a proxy
/// of another build might hash the texts otherwise, and then wait on an identity it never
/// matches), or, from an agent before it, [`policy_id`].
pub fn sent_policy_id(msg: &PolicySnapshot) -> u64 {
    match msg.policy_id {
        0 => policy_id(msg),
        sent => sent,
    }
}

/// Compiles a snapshot message as the agent did: the sources, and the lines to log for
/// what did not load as it is.
pub fn compile(msg: &PolicySnapshot) -> Result<(Sources, dnsfence_policy::Snapshot, Vec<String>)> {
    let parse = |list: &[String]| -> Result<Vec<dnsfence_policy::cidr::Cidr>> {
        list.iter()
            .map(|s| dnsfence_policy::cidr::Cidr::parse(s).map_err(anyhow::Error::msg))
            .collect()
    };
    let node = dnsfence_policy::cidr::NodeFacts {
        cluster: parse(&msg.node.cluster_cidrs)?,
        host: parse(&msg.node.node_ips)?,
        kube_apiserver: parse(&msg.node.kube_apiserver)?,
        open_loopback: msg.node.open_loopback_answers,
        deny_answers: parse(&msg.node.deny_answer_cidrs)?,
    };
    let in_force = InForce {
        policies: msg
            .policy_files
            .iter()
            .map(|f| (PathBuf::from(&f.path), f.content.as_str().into()))
            .collect(),
        endpoints: (!msg.endpoints.path.is_empty()).then(|| {
            (
                PathBuf::from(&msg.endpoints.path),
                msg.endpoints.content.as_str().into(),
            )
        }),
    };
    let (sources, mut snapshot, rejections) = Sources::from_texts(&in_force, node);
    snapshot.set_policy_id(sent_policy_id(msg));
    let lines = rejections
        .iter()
        .map(|r| format!("{} (as the agent has it): {}", r.file.display(), r.errors))
        .collect();
    Ok((sources, snapshot, lines))
}

/// Opens `--state-dir` (None without it). An error (another process holds it, no
/// permission) stops the process: two processes sharing one state directory would
/// overwrite each other's state.
pub fn open_state(dir: Option<&Path>) -> Result<Option<StateDir>> {
    let Some(dir) = dir else { return Ok(None) };
    let state =
        StateDir::open(dir).with_context(|| format!("state directory {}", dir.display()))?;
    Ok(Some(state))
}

/// The FQDN cache persisted in `state` (empty when there is none, or when it is corrupt:
/// said in one line; the cache is an observation log, never a source of allow entries).
pub fn load_cache(who: &str, state: Option<&StateDir>, args: &ServeArgs) -> Observations {
    let mut obs = Observations::with_cache_capacity(args.fqdn_cache_entries.max(1));
    let Some(state) = state else { return obs };
    let items: Vec<Observation> = match state.load(CACHE_FILE, Kind::FQDN_CACHE) {
        Ok(None) => return obs,
        Ok(Some(loaded)) => match serde_json::from_slice(&loaded.payload) {
            Ok(items) => items,
            Err(e) => {
                eprintln!(
                    "{who}: FQDN cache in {} unreadable ({e}); starting empty",
                    state.path().display()
                );
                return obs;
            }
        },
        Err(e) => {
            eprintln!("{who}: {e}; starting with an empty FQDN cache");
            return obs;
        }
    };
    let n = items.len();
    let limits = MergeLimits::of(args);
    for item in &items {
        merge(&mut obs, item, limits);
    }
    eprintln!(
        "{who}: FQDN cache restored: {n} names from {}",
        state.path().display()
    );
    obs
}

/// Writes the FQDN cache to `state` (unexpired addresses, with their remaining TTL).
pub fn save_cache(who: &str, state: Option<&StateDir>, observations: &Mutex<Observations>) {
    let Some(state) = state else { return };
    let now = Instant::now();
    let ms = unix_ms();
    let items: Vec<Observation> = {
        let obs = observations.lock().unwrap_or_else(|e| e.into_inner());
        obs.cache
            .iter()
            .flat_map(|((endpoint, name), entry)| {
                entry
                    .addresses
                    .iter()
                    .filter(|(_, e)| **e > now)
                    .map(move |(ip, e)| Observation {
                        endpoint_key: endpoint.0,
                        name: name.trim_end_matches('.').to_owned(),
                        addresses: vec![*ip],
                        ttl_secs: e.duration_since(now).as_secs().min(u64::from(u32::MAX)) as u32,
                        observed_unix_ms: ms,
                    })
            })
            .collect()
    };
    let payload = match serde_json::to_vec(&items) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{who}: cannot encode the FQDN cache: {e}");
            return;
        }
    };
    if let Err(e) = state.save(CACHE_FILE, Kind::FQDN_CACHE, 1, &payload) {
        eprintln!("{who}: cannot persist the FQDN cache: {e}");
    }
}

/// The bounds of the FQDN cache a merge keeps.
#[derive(Debug, Clone, Copy)]
pub struct MergeLimits {
    cache_entries: usize,
    max_ips_per_name: usize,
}

impl MergeLimits {
    /// From the flags.
    pub fn of(args: &ServeArgs) -> MergeLimits {
        MergeLimits {
            cache_entries: args.fqdn_cache_entries.max(1),
            max_ips_per_name: args.max_ips_per_name.max(1),
        }
    }
}

/// Merges one observation into an FQDN cache (a union: merging one twice changes nothing).
/// An observation with a name that is not one is skipped.
fn merge(obs: &mut Observations, item: &Observation, limits: MergeLimits) -> bool {
    let Ok(name) = Name::from_text(&item.name) else {
        return false;
    };
    let mut addresses = Addresses::default();
    for &ip in &item.addresses {
        addresses.push(ip);
    }
    let update = IpUpdate {
        at: instant_of(item.observed_unix_ms),
        endpoint: EndpointKey(item.endpoint_key),
        name,
        addresses,
        ttl: item.ttl_secs,
        rules: [0; 8],
        rules_total: 0,
    };
    consumer::merge(
        obs,
        &Record::Addresses(update),
        limits.cache_entries,
        limits.max_ips_per_name,
    );
    true
}

/// The observation of an engine record (the proxy's buffer items).
fn observation_of(update: &IpUpdate) -> Observation {
    let age = update.at.elapsed().as_millis() as u64;
    Observation {
        endpoint_key: update.endpoint.0,
        name: update.name.to_string().trim_end_matches('.').to_owned(),
        addresses: update.addresses.ips().to_vec(),
        ttl_secs: update.ttl,
        observed_unix_ms: unix_ms().saturating_sub(age),
    }
}

/// Counters of the sync, either side (metrics).
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Peers (agent side) or agents (proxy side) currently connected.
    pub connected: AtomicU64,
    /// Connections made, over the process's life.
    pub connections: AtomicU64,
    /// Observations merged (agent) or acknowledged (proxy).
    pub observations: AtomicU64,
    /// Flow records merged (agent) or acknowledged (proxy).
    pub flows: AtomicU64,
    /// Policy snapshots sent (agent) or acknowledged (proxy: applied, or equal to the one in
    /// force).
    pub snapshots: AtomicU64,
    /// Policy snapshots from the agent the proxy could not put in force (they did not compile
    /// here, or named what this proxy cannot enforce): the policy in force stays.
    pub snapshots_refused: AtomicU64,
    /// Flows the agent's observe history overwrote, full (`crate::observe`).
    pub flow_history_overwritten: AtomicU64,
    /// Observe followers dropped for falling behind.
    pub observe_clients_dropped: AtomicU64,
}

/// Samples of `dnsfence_flow_history_drops_total`, by reason.
pub type FlowHistoryDrops = [([(&'static str, &'static str); 1], u64); 2];

impl SyncStats {
    /// The family `dnsfence_flow_history_drops_total{why}` for the metrics page: its name
    /// (without the prefix and `_total`), help, and samples by reason.
    pub fn flow_history_drops(&self) -> (&'static str, &'static str, FlowHistoryDrops) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let overwritten = load(&self.flow_history_overwritten);
        let slow = load(&self.observe_clients_dropped);
        let samples = [
            ([("why", "overwritten")], overwritten),
            ([("why", "slow_client")], slow),
        ];
        ("flow_history_drops", crate::observe::DROPS_HELP, samples)
    }
}

/// How long an accept loop waits for a peer before it looks at its stop flag again (a peer
/// is taken the moment it connects).
pub const ACCEPT_WAKE: Duration = Duration::from_millis(250);

/// The agent side of the sync.
pub struct AgentSync {
    listener: Arc<AgentListener>,
    latest: Arc<Mutex<Option<Arc<PolicySnapshot>>>>,
    stop: Arc<AtomicBool>,
    /// Its counters.
    pub stats: Arc<SyncStats>,
}

impl AgentSync {
    /// Binds the agent socket (its directory is created).
    pub fn bind(path: &Path, stop: Arc<AtomicBool>) -> Result<AgentSync> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = AgentListener::bind(path)?;
        listener
            .set_accept_timeout(Some(ACCEPT_WAKE))
            .context("agent socket")?;
        Ok(AgentSync {
            listener: Arc::new(listener),
            latest: Arc::new(Mutex::new(None)),
            stop,
            stats: Arc::new(SyncStats::default()),
        })
    }

    /// The snapshot every proxy gets (now, and each connecting one).
    pub fn publish(&self, snapshot: PolicySnapshot) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(snapshot));
    }

    /// Starts the accept thread: one thread per peer, merging into `observations` (and the
    /// proxy's flows into `history`).
    pub fn start(
        &self,
        observations: Arc<Mutex<Observations>>,
        history: Option<Arc<FlowHistory>>,
        limits: MergeLimits,
    ) -> Result<()> {
        let (listener, latest, stop, stats) = (
            Arc::clone(&self.listener),
            Arc::clone(&self.latest),
            Arc::clone(&self.stop),
            Arc::clone(&self.stats),
        );
        std::thread::Builder::new()
            .name("dnsf-sync-accept".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let (latest, stop, stats, observations, history) = (
                                Arc::clone(&latest),
                                Arc::clone(&stop),
                                Arc::clone(&stats),
                                Arc::clone(&observations),
                                history.clone(),
                            );
                            let _ = std::thread::Builder::new()
                                .name("dnsf-sync-peer".into())
                                .spawn(move || {
                                    stats.connected.fetch_add(1, Ordering::Relaxed);
                                    stats.connections.fetch_add(1, Ordering::Relaxed);
                                    let r = serve_peer(
                                        stream,
                                        &latest,
                                        &stop,
                                        &stats,
                                        &observations,
                                        history.as_deref(),
                                        limits,
                                    );
                                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                                    if let Err(e) = r
                                        && !stop.load(Ordering::Relaxed)
                                    {
                                        eprintln!(
                                            "dnsfence agent: sync peer (pid {}) gone: {e:#}",
                                            peer.pid
                                        );
                                    }
                                });
                        }
                        // Nobody came within ACCEPT_WAKE: look at the stop flag again.
                        Err(e) if e.is_timeout() => {}
                        // Out of descriptors, say: not in a tight loop.
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .context("agent socket thread")?;
        Ok(())
    }
}

/// What of `snapshot` a proxy that said `hello` would ignore, as a line for the log: an older
/// build does not know `deny_answer_cidrs` (its answers would open those ranges).
fn ignored_by_peer(hello: &Hello, snapshot: &PolicySnapshot) -> Option<String> {
    (!snapshot.node.deny_answer_cidrs.is_empty() && !hello.has(proto::FEATURE_DENY_ANSWERS)).then(
        || {
            format!(
                "the standalone proxy (pid {}) is an older build that ignores --deny-answer-cidr: \
                 its answers may open {} until it is upgraded",
                hello.pid,
                snapshot.node.deny_answer_cidrs.join(", ")
            )
        },
    )
}

/// One peer of the agent, until it goes or the agent stops.
fn serve_peer(
    stream: UnixStream,
    latest: &Mutex<Option<Arc<PolicySnapshot>>>,
    stop: &AtomicBool,
    stats: &SyncStats,
    observations: &Mutex<Observations>,
    history: Option<&FlowHistory>,
    limits: MergeLimits,
) -> Result<()> {
    let mut conn = Conn::new(stream)?;
    let hello = conn.hello(Duration::from_secs(2))?;
    conn.send(&Message::Hello(Hello::new(Role::Agent)))?;
    if hello.role == Role::Proxy {
        eprintln!(
            "dnsfence agent: standalone proxy (pid {}) connected",
            hello.pid
        );
    }
    let mut sent: Option<u64> = None;
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        if hello.role == Role::Proxy {
            let snapshot = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(snapshot) = snapshot
                && sent != Some(snapshot.version)
            {
                if !warned && let Some(line) = ignored_by_peer(&hello, &snapshot) {
                    eprintln!("dnsfence agent: warning: {line}");
                    warned = true;
                }
                conn.send(&Message::PolicySnapshot((*snapshot).clone()))?;
                sent = Some(snapshot.version);
                stats.snapshots.fetch_add(1, Ordering::Relaxed);
            }
        }
        match conn.recv()? {
            // Only a standalone proxy reports what it served (review finding: any peer of
            // the agent's user, whatever its role, was merged).
            Some(Message::Observations(_) | Message::Flows(_)) if hello.role != Role::Proxy => {
                anyhow::bail!(
                    "a {:?} peer (pid {}) sent observations or flows: only a proxy may",
                    hello.role,
                    hello.pid
                );
            }
            Some(Message::Observations(batch)) => {
                {
                    let mut obs = observations.lock().unwrap_or_else(|e| e.into_inner());
                    for item in &batch.items {
                        merge(&mut obs, item, limits);
                    }
                }
                stats
                    .observations
                    .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
                conn.send(&Message::ObservationsAck(proto::ObservationsAck {
                    seq: batch.seq,
                }))?;
            }
            Some(Message::Flows(batch)) => {
                // Counted with the agent's own flows (the flow view across a failover).
                {
                    let mut obs = observations.lock().unwrap_or_else(|e| e.into_inner());
                    for f in &batch.items {
                        match f.verdict.as_str() {
                            "Forward" => obs.flows_forwarded += 1,
                            "Refuse" | "RefuseUnknownSource" => obs.flows_refused += 1,
                            "Timeout" => obs.flows_timeout += 1,
                            "Malformed" => obs.flows_malformed += 1,
                            _ => obs.flows_overload += 1,
                        }
                    }
                    // Into `dnsfence observe`'s history, tagged by the process that served
                    // them (at least once: a batch re-sent after a lost ack shows twice).
                    if let Some(history) = history {
                        history.merge_proxy(&batch.items, &obs);
                    }
                }
                stats
                    .flows
                    .fetch_add(batch.items.len() as u64, Ordering::Relaxed);
                conn.send(&Message::FlowsAck(proto::FlowsAck { seq: batch.seq }))?;
            }
            Some(_) | None => {}
        }
        conn.keep_alive()?;
    }
    Ok(())
}

/// What the proxy holds for the agent: observations and flow records not acknowledged yet.
pub struct Pending {
    /// Observations (allow entries the proxy wrote), oldest first.
    pub observations: Mutex<ReplayBuffer<Observation>>,
    /// Flow records.
    pub flows: Mutex<ReplayBuffer<proto::FlowRecord>>,
    /// Observations the agent acknowledged within [`KEEP_ACKED`], oldest first (at most the
    /// buffer's capacity): an agent persists its cache only every
    /// [`CACHE_PERSIST_INTERVAL`], so one that crashed meanwhile lost them; they go again to
    /// the agent that comes next (review finding).
    acked: Mutex<Acked>,
    /// When the last connection to an agent ended: `acked` is judged by it, so that an agent
    /// that took long to come back (a crash loop's backoff) still gets what it acknowledged
    /// in its last [`KEEP_ACKED`].
    disconnected: Mutex<Option<Instant>>,
    capacity: usize,
}

/// Most addresses a flow record for the agent carries (the lowest): a name's cache entry may
/// hold up to `--max-ips-per-name` (256), and records are held by count, so the replay
/// buffer's size in bytes must not follow that flag (review finding: 65,536 such records
/// were hundreds of MB).
pub const FLOW_ADDRESSES: usize = 4;

/// Acknowledged observations kept a while (see `Pending::acked`), and what they weigh
/// (`Observation::json_bound`; held under the observation buffer's byte bound too).
#[derive(Default)]
struct Acked {
    items: VecDeque<(Instant, Observation)>,
    bytes: usize,
}

/// The most each replay buffer (observations, flow records) may weigh, in bytes of JSON
/// (`Observation::json_bound`, `FlowRecord::json_bound`): both fit the state file's bound
/// (`dnsfence_sync::state::DEFAULT_MAX_PAYLOAD`, 256 MiB) together, whatever
/// `--replay-capacity` and `--max-ips-per-name` allow (review finding: 2^18 observations
/// of 256 addresses each were gigabytes, in memory and in a save that could only fail).
pub const REPLAY_BYTES: usize = 120 << 20;

/// How long acknowledged observations are kept for an agent that restarts: its persist
/// interval, three times over.
pub const KEEP_ACKED: Duration = Duration::from_secs(3 * CACHE_PERSIST_INTERVAL.as_secs());

impl Pending {
    /// Empty buffers of `capacity` items each.
    pub fn new(capacity: usize) -> Pending {
        Pending::with_byte_bound(capacity, REPLAY_BYTES)
    }

    /// Empty buffers of `capacity` items each, weighing at most `max_bytes` each.
    pub fn with_byte_bound(capacity: usize, max_bytes: usize) -> Pending {
        Pending {
            observations: Mutex::new(ReplayBuffer::with_byte_bound(
                capacity,
                max_bytes,
                Observation::json_bound,
            )),
            flows: Mutex::new(ReplayBuffer::with_byte_bound(
                capacity,
                max_bytes,
                proto::FlowRecord::json_bound,
            )),
            acked: Mutex::new(Acked::default()),
            disconnected: Mutex::new(None),
            capacity,
        }
    }

    /// The agent acknowledged observation batches up to `seq`: they leave the buffer and are
    /// kept a while (see `acked`). Returns how many.
    fn ack_observations(&self, seq: u64) -> usize {
        let now = Instant::now();
        let mut guard = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        let acked = &mut *guard;
        let mut buffer = self.observations.lock().unwrap_or_else(|e| e.into_inner());
        let max_bytes = buffer.max_bytes();
        let outcome = buffer.ack_with(seq, |o| {
            acked.bytes += o.json_bound();
            acked.items.push_back((now, o));
        });
        drop(buffer);
        while acked.items.len() > self.capacity
            || acked.bytes > max_bytes
            || acked
                .items
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > KEEP_ACKED)
        {
            match acked.items.pop_front() {
                Some((_, o)) => acked.bytes -= o.json_bound(),
                None => break,
            }
        }
        match outcome {
            dnsfence_sync::replay::Ack::Acked { items, .. } => items,
            _ => 0,
        }
    }

    /// The connection to the agent ended (now).
    fn disconnected(&self) {
        *self.disconnected.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Another agent than the one that acknowledged them: what it acknowledged within
    /// [`KEEP_ACKED`] before the last connection ended goes again, the newest first into the
    /// room the buffer has (never pushing out what no agent has yet). Returns how many.
    fn resend_acked(&self) -> usize {
        let end = self
            .disconnected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(Instant::now);
        let mut kept: Vec<Observation> = {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            acked.bytes = 0;
            acked
                .items
                .drain(..)
                .filter(|(at, _)| end.saturating_duration_since(*at) <= KEEP_ACKED)
                .map(|(_, o)| o)
                .collect()
        };
        let mut buffer = self.observations.lock().unwrap_or_else(|e| e.into_inner());
        // The newest that fit the room, in items and in bytes.
        let mut items = buffer.capacity().saturating_sub(buffer.len());
        let mut bytes = buffer.max_bytes().saturating_sub(buffer.bytes());
        let n = kept
            .iter()
            .rev()
            .take_while(|o| {
                let weight = o.json_bound();
                let fits = items > 0 && weight <= bytes;
                if fits {
                    items -= 1;
                    bytes -= weight;
                }
                fits
            })
            .count();
        kept.drain(..kept.len() - n);
        kept.into_iter().for_each(|o| {
            buffer.push(o);
        });
        n
    }

    /// The consumer's hook: every address record becomes an observation for the agent,
    /// every flow record a flow record, with the answer's addresses as the proxy's FQDN
    /// cache holds them (the lock is held for the push only).
    pub fn forward(self: &Arc<Self>) -> consumer::Forward {
        let me = Arc::clone(self);
        Box::new(move |record, obs| match record {
            Record::Addresses(update) => {
                let item = observation_of(update);
                me.observations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(item);
            }
            Record::Flow(flow) => {
                let name = flow.name.to_string();
                let (mut addresses, ttl) = match (flow.verdict, flow.endpoint) {
                    (Verdict::Forward, Some(key)) => consumer::answer_of(obs, key, &name, flow.at),
                    _ => (Vec::new(), None),
                };
                addresses.truncate(FLOW_ADDRESSES);
                let item = proto::FlowRecord {
                    unix_ms: unix_ms().saturating_sub(flow.at.elapsed().as_millis() as u64),
                    client: flow.client,
                    endpoint_key: flow.endpoint.map(|e| e.0),
                    name,
                    qtype: flow.qtype,
                    verdict: format!("{:?}", flow.verdict),
                    rcode: flow.rcode.map_or(0, u16::from),
                    dropped: flow.rcode.is_none(),
                    addresses,
                    ttl: ttl.unwrap_or(0),
                    latency_us: flow.upstream_latency.map_or(0, |d| d.as_micros() as u64),
                    served_by: "proxy".to_owned(),
                };
                me.flows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(item);
            }
        })
    }

    /// Items held, overflowed (both buffers).
    pub fn counts(&self) -> (usize, u64) {
        let o = self.observations.lock().unwrap_or_else(|e| e.into_inner());
        let f = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        (o.len() + f.len(), o.overflowed() + f.overflowed())
    }

    /// Restores what a previous run persisted (re-sent to the agent; merging twice is
    /// harmless).
    pub fn restore(&self, who: &str, state: &StateDir) {
        #[derive(serde::Deserialize)]
        struct Saved {
            observations: Vec<Observation>,
            flows: Vec<proto::FlowRecord>,
        }
        match state.load(REPLAY_FILE, Kind::REPLAY) {
            Ok(None) => {}
            Ok(Some(loaded)) => match serde_json::from_slice::<Saved>(&loaded.payload) {
                Ok(saved) => {
                    let n = saved.observations.len() + saved.flows.len();
                    let mut o = self.observations.lock().unwrap_or_else(|e| e.into_inner());
                    saved.observations.into_iter().for_each(|i| {
                        o.push(i);
                    });
                    let mut f = self.flows.lock().unwrap_or_else(|e| e.into_inner());
                    saved.flows.into_iter().for_each(|i| {
                        f.push(i);
                    });
                    if n > 0 {
                        eprintln!(
                            "{who}: {n} records for the agent restored from the state directory"
                        );
                    }
                }
                Err(e) => eprintln!("{who}: replay file unreadable ({e}); nothing restored"),
            },
            Err(e) => eprintln!("{who}: {e}; nothing restored for the agent"),
        }
    }

    /// Persists what is held (called every few seconds and at exit).
    pub fn persist(&self, who: &str, state: &StateDir) {
        #[derive(serde::Serialize)]
        struct Saved<'a> {
            observations: Vec<&'a Observation>,
            flows: Vec<&'a proto::FlowRecord>,
        }
        // Copied out under each lock (a memcpy-like clone), encoded outside: the consumer
        // pushing into a buffer waits for the copy only (review finding: encoding a full
        // buffer under the lock stalled it for a second).
        let observations: Vec<Observation> = self
            .observations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let flows: Vec<proto::FlowRecord> = self
            .flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let payload = serde_json::to_vec(&Saved {
            observations: observations.iter().collect(),
            flows: flows.iter().collect(),
        });
        match payload {
            Ok(p) => {
                if let Err(e) = state.save(REPLAY_FILE, Kind::REPLAY, 1, &p) {
                    eprintln!("{who}: cannot persist the records for the agent: {e}");
                }
            }
            Err(e) => eprintln!("{who}: cannot encode the records for the agent: {e}"),
        }
    }
}

/// Saves a policy snapshot message (the proxy serves from it at its next start).
pub fn save_policy(state: &StateDir, msg: &PolicySnapshot) -> Result<()> {
    let payload = serde_json::to_vec(msg).context("encode policy snapshot")?;
    state
        .save(POLICY_FILE, Kind::POLICY_SNAPSHOT, msg.version, &payload)
        .context("persist policy snapshot")
}

/// The policy snapshot message persisted in `state`: `Ok(None)` when there is none, `Err`
/// (one line, the file set aside) when it is corrupt or unreadable.
pub fn load_policy(state: &StateDir) -> Result<Option<PolicySnapshot>> {
    let Some(loaded) = state.load(POLICY_FILE, Kind::POLICY_SNAPSHOT)? else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(&loaded.payload)
        .with_context(|| format!("{}: policy snapshot unreadable", state.path().display()))?;
    Ok(Some(msg))
}

/// The proxy side of the sync: one thread, until `stop`.
pub struct ProxySync {
    thread: std::thread::JoinHandle<()>,
}

impl ProxySync {
    /// Starts the sync thread: connects to `path` (with backoff), applies each snapshot with
    /// `apply` (compile, persist, swap in; an error is logged and the snapshot not
    /// acknowledged), and sends what `pending` holds.
    pub fn start(
        path: PathBuf,
        pending: Arc<Pending>,
        mut apply: impl FnMut(&PolicySnapshot) -> std::result::Result<(), ApplyError> + Send + 'static,
        stats: Arc<SyncStats>,
        stop: Arc<AtomicBool>,
    ) -> Result<ProxySync> {
        let thread_stats = stats;
        let thread = std::thread::Builder::new()
            .name("dnsf-sync".into())
            .spawn(move || {
                let stats = thread_stats;
                let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
                // Between connections that ended before they were of use (the listener of
                // another user, a peer that is not an agent): the listener answers at once, so
                // without this the proxy would reconnect in a tight loop (review finding).
                let mut failing = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
                let mut waiting_logged = false;
                // The instance of the agent of the last connection (its Hello).
                let mut last_agent = None;
                while !stop.load(Ordering::Relaxed) {
                    if !waiting_logged {
                        eprintln!(
                            "dnsfence proxy: connecting to the agent at {}",
                            path.display()
                        );
                        waiting_logged = true;
                    }
                    let Ok(stream) = connect_with_backoff(&path, &mut backoff, &stop) else {
                        break;
                    };
                    stats.connected.store(1, Ordering::Relaxed);
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let connected = Instant::now();
                    let mut applied = false;
                    let r = proxy_conn(
                        stream,
                        &pending,
                        &mut apply,
                        &stop,
                        &stats,
                        &mut applied,
                        &mut last_agent,
                    );
                    stats.connected.store(0, Ordering::Relaxed);
                    pending.disconnected();
                    if applied || connected.elapsed() >= USEFUL_CONNECTION {
                        failing.reset();
                    } else {
                        dnsfence_sync::conn::sleep_unless_stopped(failing.next_delay(), &stop);
                    }
                    // What was sent and not acknowledged goes again on the next connection.
                    pending
                        .observations
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .rewind();
                    pending
                        .flows
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .rewind();
                    if let Err(e) = r
                        && !stop.load(Ordering::Relaxed)
                    {
                        eprintln!("dnsfence proxy: agent connection lost: {e:#}; serving on");
                        waiting_logged = false;
                    }
                }
            })
            .context("sync thread")?;
        Ok(ProxySync { thread })
    }

    /// Waits for the sync thread (after `stop` was set).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Why a policy snapshot from the agent was not taken whole.
#[derive(Debug)]
pub enum ApplyError {
    /// It is not in force (it did not compile, or the allow entries could not follow it): a
    /// newer version from the agent is waited for (the same one would fail again).
    NotApplied(anyhow::Error),
    /// It is in force but not persisted: the save is tried again every [`PERSIST_RETRY`]
    /// (the same message again is cheap: it is the policy in force), acknowledged once saved.
    NotPersisted(anyhow::Error),
}

/// How often a snapshot in force but not persisted is saved again.
pub const PERSIST_RETRY: Duration = Duration::from_secs(1);

/// A connection that lasted this long was of use, even without a snapshot applied.
const USEFUL_CONNECTION: Duration = Duration::from_secs(10);

/// One connection of the proxy to the agent; `applied` is set once a snapshot is in force.
/// Runs `apply(msg)` on a helper thread while the connection stays alive: heartbeats go
/// out and what the agent sends is read ahead (review finding: a compile longer than the
/// agent's [`PEER_TIMEOUT`], a large policy on a loaded node, ended the connection, again
/// at every reconnect, so the proxy never took that policy).
///
/// Returns the apply's outcome and, beside it, the connection's error if it broke meanwhile
/// (the apply is always waited for and joined: its outcome counts whatever happened to the
/// connection, and a panic in it ends the connection, not the sync thread).
fn apply_alive(
    conn: &mut Conn,
    apply: &mut (dyn FnMut(&PolicySnapshot) -> std::result::Result<(), ApplyError> + Send),
    msg: &PolicySnapshot,
) -> Result<(std::result::Result<(), ApplyError>, Option<anyhow::Error>)> {
    std::thread::scope(|s| {
        let job = std::thread::Builder::new()
            .name("dnsf-apply".into())
            .spawn_scoped(s, || apply(msg))
            .context("start the apply thread")?;
        let mut broken = None;
        while !job.is_finished() {
            if broken.is_some() {
                std::thread::sleep(READ_SLICE);
            } else if let Err(e) = conn.keep_alive().and_then(|()| conn.read_ahead()) {
                broken = Some(e);
            }
        }
        let outcome = job
            .join()
            .map_err(|_| anyhow::anyhow!("the policy apply panicked"))?;
        Ok((outcome, broken))
    })
}

/// A snapshot in force but not persisted is saved again every [`PERSIST_RETRY`] and
/// acknowledged once saved (review finding: the agent sends each version once and never
/// looks at acknowledgements, so a failed save was never retried); one that cannot be applied
/// is said once and the next version waited for; observations and flows go on meanwhile.
fn proxy_conn(
    stream: UnixStream,
    pending: &Pending,
    apply: &mut (dyn FnMut(&PolicySnapshot) -> std::result::Result<(), ApplyError> + Send),
    stop: &AtomicBool,
    stats: &SyncStats,
    applied: &mut bool,
    last_agent: &mut Option<u64>,
) -> Result<()> {
    // The listener must be the agent's user (or root): whoever else binds the socket path
    // (a shared directory, the agent away) must not push policy into the proxy.
    match dnsfence_sync::conn::admitted_peer(&stream).context("agent socket credentials")? {
        Some(_) => {}
        None => anyhow::bail!(
            "the process listening on the agent socket is another user: refusing its policy"
        ),
    }
    let mut conn = Conn::new(stream)?;
    conn.send(&Message::Hello(Hello::new(Role::Proxy)))?;
    let hello = conn.hello(Duration::from_secs(2))?;
    anyhow::ensure!(
        hello.role == Role::Agent,
        "the peer is not an agent ({:?})",
        hello.role
    );
    eprintln!("dnsfence proxy: connected to the agent (pid {})", hello.pid);
    if last_agent.is_some_and(|last| last != hello.instance) {
        let n = pending.resend_acked();
        if n > 0 {
            eprintln!(
                "dnsfence proxy: the agent restarted: the {n} observations the last one \
                 acknowledged within {KEEP_ACKED:?} go again (it may not have persisted them)"
            );
        }
    }
    *last_agent = Some(hello.instance);
    // A snapshot in force but not saved yet, and when its save was last tried.
    let mut unsaved: Option<(PolicySnapshot, Instant)> = None;
    while !stop.load(Ordering::Relaxed) {
        // The next message, then whatever else is already buffered (read ahead during a
        // long apply): acknowledgements are taken, and of several snapshots only the newest
        // is applied (review finding: each was compiled in turn, the proxy falling further
        // behind).
        let (mut snapshot, mut first) = (None, false);
        let mut next = conn.recv()?;
        while let Some(msg) = next {
            match msg {
                Message::PolicySnapshot(msg) => (snapshot, first) = (Some(msg), true),
                Message::ObservationsAck(ack) => {
                    let items = pending.ack_observations(ack.seq);
                    stats
                        .observations
                        .fetch_add(items as u64, Ordering::Relaxed);
                }
                Message::FlowsAck(ack) => {
                    if let dnsfence_sync::replay::Ack::Acked { items, .. } = pending
                        .flows
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .ack(ack.seq)
                    {
                        stats.flows.fetch_add(items as u64, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
            next = conn.decode_buffered()?;
        }
        // Nothing new from the agent: the unsaved snapshot's save again, when due.
        let snapshot = snapshot.or_else(|| {
            unsaved
                .take_if(|(_, tried)| tried.elapsed() >= PERSIST_RETRY)
                .map(|(msg, _)| msg)
        });
        if let Some(msg) = snapshot {
            let (outcome, broken) = apply_alive(&mut conn, &mut *apply, &msg)?;
            match outcome {
                Ok(()) => {
                    unsaved = None;
                    *applied = true;
                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    if broken.is_none() {
                        conn.send(&Message::SnapshotAck(proto::SnapshotAck {
                            version: msg.version,
                        }))?;
                    }
                }
                Err(ApplyError::NotPersisted(e)) => {
                    *applied = true;
                    if first {
                        eprintln!(
                            "dnsfence proxy: policy snapshot {} in force but not persisted: \
                             {e:#}; saved again every {PERSIST_RETRY:?}",
                            msg.version
                        );
                    }
                    unsaved = Some((msg, Instant::now()));
                }
                Err(ApplyError::NotApplied(e)) => {
                    unsaved = None;
                    stats.snapshots_refused.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "dnsfence proxy: policy snapshot {} not applied: {e:#}; the policy \
                         in force stays until the agent sends another",
                        msg.version
                    );
                }
            }
            if let Some(e) = broken {
                return Err(e);
            }
        }

        // Send what is held, a few batches ahead of the acknowledgements. The buffer's lock
        // is held while encoding one batch (a few hundred µs), never while writing.
        loop {
            let mut obs = pending
                .observations
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if obs.outstanding_batches() >= IN_FLIGHT {
                break;
            }
            let Some(batch) = obs.next_batch(BATCH) else {
                break;
            };
            let (seq, items) = (batch.seq, batch.items);
            conn.out.clear();
            conn.encoder
                .encode_observations(seq, items, &mut conn.out)
                .context("encode")?;
            drop(obs);
            conn.write_out()?;
        }
        loop {
            let mut flows = pending.flows.lock().unwrap_or_else(|e| e.into_inner());
            if flows.outstanding_batches() >= IN_FLIGHT {
                break;
            }
            let Some(batch) = flows.next_batch(BATCH) else {
                break;
            };
            let (seq, items) = (batch.seq, batch.items);
            conn.out.clear();
            conn.encoder
                .encode_flows(seq, items, &mut conn.out)
                .context("encode")?;
            drop(flows);
            conn.write_out()?;
        }
        conn.keep_alive()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy snapshot message of about `mib` MiB.
    fn big_snapshot(version: u64, mib: usize) -> Message {
        Message::PolicySnapshot(PolicySnapshot {
            version,
            policy_files: vec![SourceFile {
                path: "p.yaml".into(),
                content: "x".repeat(mib << 20),
            }],
            endpoints: SourceFile {
                path: String::new(),
                content: String::new(),
            },
            node: NodeFacts::default(),
            policy_id: 0,
        })
    }

    /// The agent and the proxy give the same policy the same identity (the agent from its
    /// sources, the proxy from the message it was sent, under another version number), and
    /// any other text or node fact another one.
    #[test]
    fn a_policy_has_one_identity_in_the_agent_and_the_proxy() {
        let msg = PolicySnapshot {
            version: 7,
            policy_files: vec![SourceFile {
                path: "p.yaml".into(),
                content:
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
                          spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchPattern: \
                          '*.example.com'}]\n"
                        .into(),
            }],
            endpoints: SourceFile {
                path: String::new(),
                content: String::new(),
            },
            node: NodeFacts::default(),
            policy_id: 0,
        };
        let (sources, snapshot, _) = compile(&msg).unwrap();
        let id = policy_id(&msg);
        assert_ne!(id, 0);
        assert_eq!(snapshot.policy_id(), id, "the proxy's compile carries it");
        assert_eq!(policy_id(&policy_message(1, &sources)), id, "the agent's");
        assert_eq!(
            policy_message(1, &sources).policy_id,
            id,
            "sent with the texts"
        );
        // The identity the agent sent is the one the proxy takes (another build may hash
        // the texts otherwise); an agent before it sends 0, and the proxy computes it.
        let mut sent = msg.clone();
        sent.policy_id = 42;
        assert_eq!(compile(&sent).unwrap().1.policy_id(), 42);
        assert_eq!(sent_policy_id(&sent), 42);
        assert_eq!(sent_policy_id(&msg), id);
        assert!(
            same_policy(&sent, &msg),
            "the same texts are the same policy"
        );
        let changed = |f: &dyn Fn(&mut PolicySnapshot)| {
            let mut other = msg.clone();
            f(&mut other);
            policy_id(&other)
        };
        assert_eq!(changed(&|m| m.version = 99), id);
        assert_ne!(changed(&|m| m.policy_files[0].content.push(' ')), id);
        assert_ne!(changed(&|m| m.policy_files[0].path = "q.yaml".into()), id);
        assert_ne!(changed(&|m| m.endpoints.path = "e.yaml".into()), id);
        assert_ne!(changed(&|m| m.node.open_loopback_answers = true), id);
        assert_ne!(
            changed(&|m| m.node.cluster_cidrs = vec!["10.0.0.0/8".into()]),
            id
        );
        // A value moved from one list to the next is another policy too.
        assert_ne!(
            changed(&|m| m.node.node_ips = vec!["10.0.0.0/8".into()]),
            changed(&|m| m.node.cluster_cidrs = vec!["10.0.0.0/8".into()])
        );
    }

    /// The proxy compiles the agent's `--deny-answer-cidr` ranges from the snapshot message:
    /// its answers open nothing there either; a range that does not parse fails the compile
    /// (the last good snapshot stays in force).
    #[test]
    fn the_proxy_takes_the_agents_deny_answer_ranges() {
        let msg = |deny: &[&str]| PolicySnapshot {
            version: 1,
            policy_files: vec![SourceFile {
                path: "p.yaml".into(),
                content:
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n\
                          spec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchPattern: \
                          '*.example.com'}]\n"
                        .into(),
            }],
            endpoints: SourceFile {
                path: String::new(),
                content: String::new(),
            },
            node: NodeFacts {
                deny_answer_cidrs: deny.iter().map(|s| (*s).to_owned()).collect(),
                ..NodeFacts::default()
            },
            policy_id: 0,
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let (_, snapshot, _) = compile(&msg(&["203.0.113.0/24", "2001:db8::/32"])).unwrap();
        assert!(snapshot.in_cluster(ip("203.0.113.9")));
        assert!(snapshot.in_cluster(ip("2001:db8::1")));
        assert!(!snapshot.in_cluster(ip("198.51.100.1")));
        let (_, snapshot, _) = compile(&msg(&[])).unwrap();
        assert!(!snapshot.in_cluster(ip("203.0.113.9")));
        assert!(compile(&msg(&["203.0.113.0/33"])).is_err());
        // The agent's message carries them as it was given them.
        let with = msg(&["203.0.113.0/24", "2001:db8::/32"]);
        let (sources, _, _) = compile(&with).unwrap();
        assert_eq!(policy_message(2, &sources).node, with.node);
        // An older proxy (no features in its Hello) is said to ignore them, a current one not.
        let mut hello = Hello::new(Role::Proxy);
        let with = msg(&["203.0.113.0/24"]);
        assert_eq!(ignored_by_peer(&hello, &with), None);
        assert_eq!(ignored_by_peer(&hello, &msg(&[])), None);
        hello.features.clear();
        let line = ignored_by_peer(&hello, &with).expect("an older proxy ignores them");
        assert!(line.contains("203.0.113.0/24"), "{line}");
        assert_eq!(ignored_by_peer(&hello, &msg(&[])), None);
    }

    /// Review finding: a multi-MiB frame each way at once filled both socket buffers, and
    /// each side's write waited for the other's read until the write timeout ended the
    /// connection. A side whose write waits reads ahead what the peer sends.
    #[test]
    fn both_sides_writing_large_frames_at_once_do_not_block_each_other() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let side = |stream: UnixStream, version: u64| {
            std::thread::spawn(move || -> Result<u64> {
                let mut conn = Conn::new(stream)?;
                conn.send(&big_snapshot(version, 8))?;
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    if let Some(Message::PolicySnapshot(m)) = conn.recv()? {
                        return Ok(m.version);
                    }
                }
                anyhow::bail!("nothing received")
            })
        };
        let (ta, tb) = (side(a, 1), side(b, 2));
        assert_eq!(ta.join().expect("side a").expect("side a"), 2);
        assert_eq!(tb.join().expect("side b").expect("side b"), 1);
    }

    /// Review finding: a connection error while the apply ran returned at once, and a panic
    /// of the apply then took the sync thread down with it (the scope re-panics an unjoined
    /// panic). The apply is always joined: its panic is an error, the connection's error is
    /// returned beside its outcome.
    #[test]
    fn an_apply_that_panics_after_the_connection_broke_is_an_error() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        drop(b);
        let mut conn = Conn::new(a).expect("conn");
        let msg = match big_snapshot(4, 0) {
            Message::PolicySnapshot(m) => m,
            _ => unreachable!(),
        };
        let mut panics = |_: &PolicySnapshot| -> std::result::Result<(), ApplyError> {
            std::thread::sleep(Duration::from_millis(200));
            panic!("apply failed");
        };
        let r = apply_alive(&mut conn, &mut panics, &msg);
        assert!(r.is_err_and(|e| e.to_string().contains("panicked")));
        // And an apply that succeeds is reported with the connection's error beside it.
        let mut fine = |_: &PolicySnapshot| -> std::result::Result<(), ApplyError> {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        };
        let (outcome, broken) = apply_alive(&mut conn, &mut fine, &msg).expect("joined");
        assert!(outcome.is_ok());
        assert!(broken.is_some(), "the peer is gone");
    }

    /// Review finding: the proxy compiled a snapshot on its connection thread, silent the
    /// while; one longer than the agent's peer timeout ended the connection. Heartbeats go
    /// out while it runs.
    #[test]
    fn a_long_apply_keeps_the_connection_alive() {
        let (a, b) = UnixStream::pair().expect("socket pair");
        let applier = std::thread::spawn(move || {
            let mut conn = Conn::new(a).expect("conn");
            let msg = match big_snapshot(3, 0) {
                Message::PolicySnapshot(m) => m,
                _ => unreachable!(),
            };
            let mut slow = |_: &PolicySnapshot| {
                std::thread::sleep(HEARTBEAT + Duration::from_millis(800));
                Ok(())
            };
            apply_alive(&mut conn, &mut slow, &msg).expect("connection alive")
        });
        let mut peer = Conn::new(b).expect("conn");
        let start = Instant::now();
        let mut heartbeat = false;
        while start.elapsed() < HEARTBEAT + Duration::from_millis(700) && !heartbeat {
            heartbeat = matches!(peer.recv().expect("recv"), Some(Message::Heartbeat));
        }
        assert!(heartbeat, "no heartbeat while the apply ran");
        assert!(applier.join().expect("applier").0.is_ok());
    }

    fn observation(i: u8) -> Observation {
        Observation {
            endpoint_key: 1,
            name: format!("n{i}.test"),
            addresses: vec![std::net::IpAddr::from([192, 0, 2, i])],
            ttl_secs: 60,
            observed_unix_ms: 1,
        }
    }

    /// What the agent acknowledged goes again only into the room the buffer has, the newest
    /// first, never pushing out what no agent has yet.
    #[test]
    fn acknowledged_observations_go_again_only_into_free_room() {
        let pending = Pending::new(4);
        let seq = {
            let mut b = pending.observations.lock().unwrap();
            for i in 0..3 {
                b.push(observation(i));
            }
            b.next_batch(10).unwrap().seq
        };
        assert_eq!(pending.ack_observations(seq), 3);
        {
            let mut b = pending.observations.lock().unwrap();
            b.push(observation(10));
            b.push(observation(11));
        }
        pending.disconnected();
        assert_eq!(pending.resend_acked(), 2);
        let b = pending.observations.lock().unwrap();
        assert_eq!(b.overflowed(), 0);
        let names: Vec<&str> = b.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["n10.test", "n11.test", "n1.test", "n2.test"]);
        drop(b);
        // Sent again once: nothing is kept for a third agent.
        assert_eq!(pending.resend_acked(), 0);
    }

    /// An observation of `n` IPv6 addresses.
    fn heavy(i: u16, n: u16) -> Observation {
        Observation {
            endpoint_key: 1,
            name: format!("heavy{i}.test"),
            addresses: (0..n)
                .map(|a| std::net::IpAddr::from([0xffff, 0xffff, 0xffff, 0xffff, 0xffff, i, a, 1]))
                .collect(),
            ttl_secs: 60,
            observed_unix_ms: 1,
        }
    }

    /// Review finding: the replay buffers were bounded by count only, so observations of
    /// hundreds of addresses (`--max-ips-per-name`) made them gigabytes, and their save, over
    /// the state file's bound, could only fail (nothing persisted at all). Now each buffer
    /// holds what fits its byte bound, the oldest dropped and counted, and what it holds
    /// always persists; acknowledged observations kept for a restarting agent are bounded
    /// the same way, and go again only into the room the buffer has in bytes.
    #[test]
    fn the_replay_buffers_hold_what_fits_the_state_file() {
        let bound = 64 << 10;
        let pending = Pending::with_byte_bound(1000, bound);
        {
            let mut b = pending.observations.lock().unwrap();
            for i in 0..100 {
                b.push(heavy(i, 256));
            }
            assert!(b.bytes() <= bound);
            assert!(b.len() < 100 && b.len() >= 4, "{}", b.len());
            assert_eq!(b.overflowed() as usize + b.len(), 100);
        }
        {
            let mut f = pending.flows.lock().unwrap();
            for i in 0..1000 {
                f.push(proto::FlowRecord {
                    unix_ms: 1,
                    client: "[::1]:5353".parse().unwrap(),
                    endpoint_key: Some(1),
                    name: format!("{i}.").repeat(50),
                    qtype: 1,
                    verdict: "Forward".into(),
                    rcode: 0,
                    dropped: false,
                    addresses: Vec::new(),
                    ttl: 60,
                    latency_us: 1,
                    served_by: "proxy".into(),
                });
            }
            assert!(f.bytes() <= bound && f.overflowed() > 0);
        }
        // What it holds persists, within both bounds.
        let dir =
            std::env::temp_dir().join(format!("dnsfence-replay-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let state = StateDir::open(&dir).unwrap();
        pending.persist("test", &state);
        let saved = state
            .load(REPLAY_FILE, Kind::REPLAY)
            .unwrap()
            .expect("persisted");
        assert!(saved.payload.len() <= 2 * bound, "{}", saved.payload.len());
        let restored = Pending::with_byte_bound(1000, bound);
        restored.restore("test", &state);
        assert_eq!(
            restored.observations.lock().unwrap().len(),
            pending.observations.lock().unwrap().len()
        );
        drop(state);
        let _ = std::fs::remove_dir_all(&dir);

        // Acknowledged: kept within the bound, and sent again into the room in bytes only.
        let seq = pending
            .observations
            .lock()
            .unwrap()
            .next_batch(1000)
            .unwrap()
            .seq;
        let held = pending.ack_observations(seq);
        assert!(held >= 4);
        {
            let acked = pending.acked.lock().unwrap();
            assert!(acked.bytes <= bound && acked.items.len() == held);
            assert_eq!(
                acked.bytes,
                acked
                    .items
                    .iter()
                    .map(|(_, o)| o.json_bound())
                    .sum::<usize>()
            );
        }
        {
            // Half the byte room taken by what no agent has yet.
            let mut b = pending.observations.lock().unwrap();
            for i in 200..200 + held as u16 / 2 {
                b.push(heavy(i, 256));
            }
        }
        pending.disconnected();
        let again = pending.resend_acked();
        let b = pending.observations.lock().unwrap();
        assert_eq!(
            b.overflowed() as usize,
            100 - held,
            "nothing unsent pushed out"
        );
        assert!(again > 0 && again < held, "{again} of {held}");
        assert!(b.bytes() <= bound);
        drop(b);
        // Acknowledgements of several buffers' worth keep one buffer's worth.
        for round in 0..3u16 {
            let seq = {
                let mut b = pending.observations.lock().unwrap();
                for i in 0..100 {
                    b.push(heavy(1000 + round * 100 + i, 256));
                }
                b.next_batch(1000).unwrap().seq
            };
            assert!(pending.ack_observations(seq) > 0);
        }
        let acked = pending.acked.lock().unwrap();
        assert!(acked.bytes <= bound, "{}", acked.bytes);
        assert_eq!(
            acked.bytes,
            acked
                .items
                .iter()
                .map(|(_, o)| o.json_bound())
                .sum::<usize>()
        );
    }
}
