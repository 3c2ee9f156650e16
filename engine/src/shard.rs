//! Shards: one thread per core, each a thin I/O shell around a [`Core`].
//!
//! The loop of a shard: wait for packets (or the next timeout), feed every received packet to
//! the core, expire timeouts, commit the batch's allow entries, send everything the core has
//! ready in one flush, hand records to the consumer queue, repeat. A policy reload is noticed
//! by comparing one atomic generation per loop.
//!
//! Stopping is a drain: the shard takes its listen sockets out of the kernel's choice for
//! new packets (its [`Steering`] in eBPF mode; without it, [`ShardIo::retire_listen_udp`]),
//! keeps polling, and exits once nothing has come from a client for [`DRAIN_QUIET`] and
//! every query in flight is answered (bounded by the upstream timeout): what the kernel had
//! already queued on its sockets is answered, not dropped with them.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::consumer::RecordQueue;
use std::net::SocketAddr;

use dnsfence_policy::{Proto, Snapshot};

use crate::allow::AllowSink;
use crate::core::{Client, Core, CoreConfig, Destination, Origin, Stats};
use crate::io::{
    self, Backend, BackendChoice, Event, Io, IoConfig, IoError, IoStats, ListenFds, ShardIo,
};

/// A stopping shard exits once no client message has arrived for this long (and nothing is
/// in flight): its sockets' queues are then empty, since no new packet is steered to them.
pub const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Takes a shard's listen sockets into and out of the set the kernel steers new packets of
/// the shared listen port to (eBPF mode: the `SK_REUSEPORT` program of the datapath, over the
/// sockets of every process serving the port). Called on the shard's own thread.
pub trait Steering: Send {
    /// The shard polls its sockets: they may take new packets.
    fn join(&mut self, sockets: ListenFds<'_>);
    /// The shard stops: its sockets take no new packets (while another process's can); it
    /// goes on reading what they hold.
    fn leave(&mut self, sockets: ListenFds<'_>);
}

/// The current policy snapshot, shared by the control plane and every shard.
///
/// Shards read one atomic per loop; the lock is taken only when the generation changed.
#[derive(Debug)]
pub struct PolicyHandle {
    generation: AtomicU64,
    current: Mutex<Arc<Snapshot>>,
}

impl PolicyHandle {
    /// A handle holding `snapshot`.
    pub fn new(snapshot: Arc<Snapshot>) -> PolicyHandle {
        PolicyHandle {
            generation: AtomicU64::new(1),
            current: Mutex::new(snapshot),
        }
    }

    /// Swaps in a new snapshot; shards pick it up before their next batch.
    pub fn store(&self, snapshot: Arc<Snapshot>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        Arc::clone(&self.current.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Bumped by every [`PolicyHandle::store`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Where a shard learns who sent a redirected query and which server it addressed: the
/// datapath's origin map in eBPF mode. Asked once per client query.
pub trait OriginSource: Send {
    /// The origin of a query from `client` over `proto`, if the datapath recorded one.
    fn origin(&mut self, client: SocketAddr, proto: Proto) -> Option<Origin>;
}

/// The origin of each TCP client connection, looked up at its first query and kept for the
/// connection's life. The datapath records it once, at the SYN, in an LRU map that other
/// workloads' traffic to the proxy can flush; a long-lived connection must not lose its
/// endpoint (its later queries would be judged as an unknown source's) when that happens.
/// One entry per connection slot, sized at start: no allocation per query.
struct ConnOrigins {
    slots: Vec<Option<(io::ConnId, Origin)>>,
}

impl ConnOrigins {
    fn new(max_conns: usize) -> ConnOrigins {
        ConnOrigins {
            slots: vec![None; max_conns.min(1 << 16)],
        }
    }

    /// The origin of connection `conn` from `peer`: the one seen at its first query that
    /// had one, else what the datapath says now.
    fn get(
        &mut self,
        source: &mut dyn OriginSource,
        conn: io::ConnId,
        peer: SocketAddr,
    ) -> Option<Origin> {
        let slot = self.slots.get_mut(io::conn_slot(conn));
        if let Some(Some((id, origin))) = slot.as_deref()
            && *id == conn
        {
            return Some(*origin);
        }
        let origin = source.origin(peer, Proto::Tcp)?;
        if let Some(slot) = slot {
            *slot = Some((conn, origin));
        }
        Some(origin)
    }
}

/// What a running shard publishes for metrics (refreshed about every 100 ms).
#[derive(Debug, Default)]
pub struct ShardStatus {
    /// The core's counters.
    pub stats: Mutex<Stats>,
    /// The I/O layer's counters.
    pub io: Mutex<IoStats>,
    /// The I/O backend in use.
    pub backend: Mutex<Option<Backend>>,
    /// The CPU the shard is pinned to, if any.
    pub cpu: Mutex<Option<usize>>,
    /// Loop iterations (batches).
    pub batches: AtomicU64,
    /// The policy generation the shard judges new queries by.
    pub generation: AtomicU64,
}

/// Everything a shard needs to start.
pub struct ShardConfig {
    /// Index of the shard (for thread names).
    pub index: usize,
    /// Per-query behaviour.
    pub core: CoreConfig,
    /// Sockets and batching.
    pub io: IoConfig,
    /// io_uring, mmsg or automatic.
    pub backend: BackendChoice,
    /// Pin the thread to this CPU.
    pub cpu: Option<usize>,
    /// Where the shard writes allow entries.
    pub allow: Box<dyn AllowSink + Send>,
    /// Who sent redirected queries (eBPF mode); None: endpoints by source address only.
    pub origin: Option<Box<dyn OriginSource>>,
    /// Policy.
    pub policy: Arc<PolicyHandle>,
    /// Records for the consumer.
    pub records: Arc<RecordQueue>,
    /// Set to stop; the shard drains its sockets and its in-flight queries (bounded by the
    /// upstream timeout), then exits.
    pub stop: Arc<AtomicBool>,
    /// Steering of the shared listen port (eBPF mode); None: plain `SO_REUSEPORT`.
    pub steering: Option<Box<dyn Steering>>,
    /// Published counters.
    pub status: Arc<ShardStatus>,
}

/// Why a shard could not start.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Its sockets or ring could not be set up.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Its thread could not be started.
    #[error("cannot start shard thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Starts the shard's thread and returns once its sockets are open (so errors such as a
/// taken port surface here, before anything runs). Ready before serving: the thread pins
/// itself and builds its core (tables sized at start: tens of milliseconds of allocation
/// and page faults) *before* it binds the listen sockets, which puts them in the
/// SO_REUSEPORT group, and it polls them right after: a process joining the group takes no
/// queries it is not ready to answer (before, they waited in its queue meanwhile: a
/// 200-400 ms p99 spike in the second a process started).
pub fn spawn(config: ShardConfig) -> Result<JoinHandle<()>, ShardError> {
    let (opened, result) = std::sync::mpsc::sync_channel(1);
    // Linux keeps 15 bytes of a thread name: `dnsf-shard-NNN` fits.
    let name = format!("dnsf-shard-{}", config.index);
    let handle = std::thread::Builder::new()
        .name(name)
        .spawn(move || run(config, opened))
        .map_err(ShardError::Spawn)?;
    match result.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(ShardError::Io(e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(ShardError::Spawn(std::io::Error::other(
                "shard thread ended at start",
            )))
        }
    }
}

fn run(mut config: ShardConfig, opened: std::sync::mpsc::SyncSender<Result<(), IoError>>) {
    if let Some(cpu) = config.cpu {
        let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
        *config.status.cpu.lock().unwrap_or_else(|e| e.into_inner()) = pinned.then_some(cpu);
    }
    let mut generation = config.policy.generation();
    // Built at idle priority (see `startup`): the processes already serving keep the CPU.
    let (core_config, snapshot) = (config.core.clone(), config.policy.load());
    let mut core = crate::startup::at_idle_priority(move || Core::new(core_config, snapshot));
    config
        .status
        .generation
        .store(generation, Ordering::Release);
    let mut origins = config.origin.take();
    let mut conn_origins = ConnOrigins::new(if origins.is_some() {
        config.io.max_tcp_conns
    } else {
        0
    });
    let mut io = match io::open(&config.io, config.backend) {
        Ok(io) => io,
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    *config
        .status
        .backend
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(io.backend());
    let _ = opened.send(Ok(()));
    let mut published = Instant::now();
    let mut stopping: Option<Instant> = None;
    let mut drops = Drops::default();
    let mut steering = config.steering.take();
    let mut joined = false;
    let mut last_client = Instant::now();
    loop {
        let now = Instant::now();
        if config.stop.load(Ordering::Relaxed) && stopping.is_none() {
            stopping = Some(now);
            last_client = now;
            match steering.as_mut() {
                Some(s) => s.leave(io.listen_fds()),
                None => io.retire_listen_udp(),
            }
        }
        if let Some(since) = stopping
            && ((core.in_flight() == 0 && now.duration_since(last_client) >= DRAIN_QUIET)
                || now.duration_since(since) > config.core.upstream_timeout)
        {
            break;
        }
        refresh(&mut core, &config, &mut generation);
        core.note_allow_epoch(config.allow.epoch());
        // Sleep until a packet, the next timeout, or 100 ms (to notice stop and publish).
        let wait = core
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        let mut from_client = false;
        let polled = io.poll(Some(wait), &mut |event| {
            let now = Instant::now();
            match event {
                Event::ClientDatagram { peer, data } => {
                    from_client = true;
                    // A snapshot stored while the shard waited applies to what woke it.
                    refresh(&mut core, &config, &mut generation);
                    let origin = origins.as_mut().and_then(|o| o.origin(peer, Proto::Udp));
                    core.handle_client(now, Client::Udp(peer), origin, data);
                    // One clock read (vDSO, ~23 ns here) for the processing histogram.
                    core.processing_took(now.elapsed());
                }
                Event::UpstreamDatagram { socket, from, data } => {
                    // Read again per answer (one atomic load): the other writer's removal
                    // while this shard waited must not let an answer pass on its memory of
                    // what is written (review finding).
                    core.note_allow_epoch(config.allow.epoch());
                    core.handle_upstream(now, socket, from, data)
                }
                Event::TcpClientMessage { conn, peer, data } => {
                    // Not counted against the drain's quiet: a client that keeps a
                    // connection busy would hold the drain to its deadline (review finding);
                    // its queries in flight are answered, then the connection closes with
                    // the process, and the client reconnects to a serving one.
                    refresh(&mut core, &config, &mut generation);
                    let origin = origins
                        .as_mut()
                        .and_then(|o| conn_origins.get(o.as_mut(), conn, peer));
                    core.handle_client(now, Client::Tcp { conn, peer }, origin, data);
                    core.processing_took(now.elapsed());
                }
                Event::UpstreamUnreachable { socket } => core.handle_upstream_error(now, socket),
                Event::TcpUpstreamMessage { server, data } => {
                    core.note_allow_epoch(config.allow.epoch());
                    core.handle_upstream_tcp(now, server, data)
                }
                Event::TcpUpstreamClosed { server } => core.handle_upstream_tcp_closed(now, server),
                Event::TcpClientClosed { .. } => {}
            }
        });
        if polled.is_err() {
            // Transient errors (ENOBUFS, EINTR) are counted by the I/O layer; keep serving.
            std::thread::yield_now();
        }
        let now = Instant::now();
        if from_client {
            last_client = now;
        }
        if !joined && stopping.is_none() {
            // Polling: new packets may come here now (a process takes traffic only once its
            // shards serve, not when its sockets join the SO_REUSEPORT group).
            joined = true;
            if let Some(s) = steering.as_mut() {
                s.join(io.listen_fds());
            }
        }
        core.handle_timeout(now);
        if core.allows_pending() {
            // Timed here (the core reads no clock): the answers held for this write wait
            // that long.
            let start = Instant::now();
            core.commit_allows(now, config.allow.as_mut());
            core.write_took(start.elapsed());
        } else {
            core.commit_allows(now, config.allow.as_mut());
        }
        replace_sockets(&mut core, &mut io);
        send(&mut core, &mut io);
        drops.account(&mut core, &io);
        hand_records(&mut core, &config.records);
        config.status.batches.fetch_add(1, Ordering::Relaxed);
        if now.duration_since(published) >= Duration::from_millis(100) {
            published = now;
            publish(&config.status, &core, &io);
        }
    }
    // Past the drain deadline, what is still in flight gets SERVFAIL rather than silence.
    let beyond = Instant::now() + Duration::from_secs(2 * 86_400);
    while core.in_flight() > 0 {
        core.handle_timeout(beyond);
        send(&mut core, &mut io);
    }
    drops.account(&mut core, &io);
    // Their flow records too (the consumer drains the queue before it stops).
    hand_records(&mut core, &config.records);
    publish(&config.status, &core, &io);
}

/// Moves the core's records to the consumer's queue (a full queue: counted as dropped) and,
/// when there were some, nudges the consumer.
fn hand_records(core: &mut Core, records: &RecordQueue) {
    let mut queued = false;
    while let Some(record) = core.poll_record() {
        queued = true;
        if !records.push(record) {
            core.record_dropped();
        }
    }
    if queued {
        records.nudge();
    }
}

/// Replaces the upstream sockets the core retired (quota spent, or a burst of unknown IDs):
/// before the transmits are drained, so that re-sent queries go out from the new sockets.
fn replace_sockets(core: &mut Core, io: &mut Io) {
    while let Some(socket) = core.poll_replace() {
        let ok = io.replace_upstream_udp(socket).is_ok();
        core.upstream_replaced(socket, ok);
    }
}

/// The I/O layer's drop counters as last handed to the core.
#[derive(Default)]
struct Drops {
    client: u64,
    upstream: u64,
}

impl Drops {
    /// Hands the sends the I/O layer dropped since the last call to the core's stats.
    fn account(&mut self, core: &mut Core, io: &Io) {
        let s = io.stats();
        let (client, upstream) = (s.client_sends_dropped, s.upstream_sends_dropped);
        if (client, upstream) != (self.client, self.upstream) {
            core.sends_dropped(client - self.client, upstream - self.upstream);
            (self.client, self.upstream) = (client, upstream);
        }
    }
}

/// Takes the newest policy snapshot when there is one (an atomic load otherwise).
fn refresh(core: &mut Core, config: &ShardConfig, generation: &mut u64) {
    let g = config.policy.generation();
    if g != *generation {
        *generation = g;
        core.set_snapshot(config.policy.load());
        config.status.generation.store(g, Ordering::Release);
    }
}

/// Hands everything the core has ready to the sockets, in one flush.
fn send(core: &mut Core, io: &mut Io) {
    while let Some(t) = core.poll_transmit() {
        match t.to {
            Destination::Client(Client::Udp(peer)) => io.send_client_udp(peer, t.data),
            Destination::Client(Client::Tcp { conn, .. }) => io.send_client_tcp(conn, t.data),
            Destination::UpstreamUdp { socket } => io.send_upstream_udp(socket, t.data),
            Destination::UpstreamTcp { server } => io.send_upstream_tcp(server, t.data),
        }
    }
    let _ = io.flush();
}

/// Copies the core's and the I/O layer's counters where the metrics thread reads them.
fn publish(status: &ShardStatus, core: &Core, io: &Io) {
    *status.stats.lock().unwrap_or_else(|e| e.into_inner()) = *core.stats();
    *status.io.lock().unwrap_or_else(|e| e.into_inner()) = io.stats().clone();
}
