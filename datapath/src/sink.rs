//! The allow-map sink: the engine's [`Ledger`] mirrored into the pinned `df_allow` map.
//!
//! Shards share one [`BpfAllow`]; its lock is taken once per batch that has new entries
//! (never per query). Each group of a batch is planned by the ledger, written to the map
//! entry by entry, and committed; if the kernel refuses one update, the group's earlier
//! updates are undone, so a group is in the map whole or not at all.
//!
//! **Two writers.** The agent and the standalone proxy write the same pinned map, each with
//! its own ledger, which does not see the other's writes. So an entry's expiry in the map only
//! grows whoever writes it (a write takes the later of the map's expiry and its own), and the
//! expiry sweep removes an entry only if the map's expiry has passed too (else the other
//! process extended it: the ledger takes the map's expiry back and keeps the entry).
//! Revocation is each process's own: both get every policy snapshot (the proxy from the
//! agent) and each removes the entries its ledger knows the new one does not justify; what
//! the agent wrote while it knew, a restarted proxy learns from the map at start.
//!
//! **An entry both ledgers hold.** One address answered for two names, one per process (or a
//! snapshot one process has and the other not yet): the first process's revocation removes
//! the entry from the map while the second's ledger, whose name still justifies it, holds it,
//! and would release its next answers for it with nothing behind them (review finding). So a
//! writer that removes entries on revocation bumps the **writers' epoch**, a counter in the
//! first bytes of the writers' lock file, mapped shared by both (read with no syscall), and
//! writes the keys it takes out into a ring beside it. The other writer, on seeing the epoch
//! change, (1) has its shards forget what they remember as written (`AllowSink::epoch`),
//! (2) plans every entry an answer needs as a rewrite until (3) its periodic repair has
//! checked the removed keys (the whole ledger when the ring does not hold them all) against
//! its ledger and the map, and put back those its policy still justifies. A removal by
//! expiry bumps nothing: the sweep removes only what the map's own expiry says has passed,
//! which no ledger outlives.
//!
//! **A proxy behind the agent's policy.** The agent's policy is the newest there is (the
//! proxy gets its policy from the agent, or serves the one it persisted from it). So the
//! agent publishes the identity of each policy it puts in force (`Snapshot::policy_id`) in
//! the shared region before it removes anything under it, and a proxy whose own policy is
//! another defers its repair until it has the agent's (review finding: a proxy on an older
//! snapshot, or cut off from the agent, put back every entry the agent's newer policy
//! revoked, within 50 ms, for as long as it lagged). Meanwhile what it held and the agent
//! removed stays out (fail closed) until the repair, under the agent's policy, puts back
//! what that policy justifies, except what the proxy's own answers write again (verify
//! mode) under its older policy: the lag of a proxy's policy behind the agent's, which the
//! sync bounds, not the repair. The identity is published before the agent's revocation
//! adopts the map's entries, after one hold of the writers' lock, and the proxy takes a
//! new identity as its own only once its ledger judges by that policy; a repair checks it
//! again under both locks before it puts anything back (and without the writers' lock,
//! after a stuck holder, it puts nothing back). Known limit: an agent of a build before
//! this, started after a newer one, leaves the newer one's identity in place, and the
//! proxy's repairs wait (said in its log, `dnsfence_allow_behind_agent`) until a newer
//! agent returns or the node restarts.
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, IterableMap, Map, MapData};
use dnsfence_engine::allow::{
    AllowBatch, AllowKey, AllowSink, Change, Ledger, LedgerConfig, LedgerStats, REVOKE_SLICE,
};
use dnsfence_policy::Snapshot;

use crate::loader::DatapathError;
use crate::maps::{AllowMapKey, NameValue, names};
use crate::sys;

/// Converts between `Instant` and the programs' clock (CLOCK_BOOTTIME ns).
#[derive(Debug, Clone, Copy)]
struct Clock {
    instant: Instant,
    boot_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            boot_ns: sys::boottime_ns(),
        }
    }

    fn to_boot_ns(self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(ahead) => self.boot_ns.saturating_add(ahead.as_nanos() as u64),
            None => self
                .boot_ns
                .saturating_sub(self.instant.duration_since(at).as_nanos() as u64),
        }
    }

    fn to_instant(self, boot_ns: u64) -> Instant {
        if boot_ns >= self.boot_ns {
            self.instant + Duration::from_nanos(boot_ns - self.boot_ns)
        } else {
            self.instant
                .checked_sub(Duration::from_nanos(self.boot_ns - boot_ns))
                .unwrap_or(self.instant)
        }
    }
}

struct Inner {
    ledger: Ledger,
    map: HashMap<MapData, AllowMapKey, u64>,
    /// The name that justified each entry (its first), kept beside the map so that a
    /// restarted agent judges restored entries by name.
    names: HashMap<MapData, AllowMapKey, NameValue>,
    changes: Vec<Change>,
    /// Taken (flock) around every map write and removal: the other writer holds it too.
    writers: std::fs::File,
    /// The map's value of each change's key before the write (for undo).
    previous: Vec<Option<u64>>,
    removed: Vec<AllowKey>,
    /// The writers' epoch this ledger has taken in: when the shared one differs, the other
    /// writer removed entries since, and the ledger verifies (see the module documentation).
    seen_epoch: u64,
    /// Where this process's repair last read the removal ring.
    ring_mark: RingMark,
    /// Scratch of `revoke`: the removed keys the map still held.
    present: Vec<AllowKey>,
}

/// Takes in the writers' epoch read under the lock: when the other writer removed entries
/// since this ledger last looked (`seen`), every entry an answer needs is written again (put
/// back if missing) until the repair has checked them all.
fn observe_epoch(seen: &mut u64, ledger: &mut Ledger, epoch: u64) {
    if epoch > *seen {
        *seen = epoch;
        ledger.set_verify(true);
    }
}

/// Words of the shared region (the writers' lock file, see `sys::SharedRegion`): the
/// writers' epoch; how many keys the removal ring has ever been given; how many bumps gave
/// theirs (a bump without them, from a build without the ring or a writer that could not
/// take the lock, leaves it behind the epoch: the other writer then checks its whole ledger).
const EPOCH: usize = 0;
const RING_HEAD: usize = 1;
const KEYED: usize = 2;
/// The identity of the policy the agent put in force last (`Snapshot::policy_id`; 0: none
/// published, as by a build before it), stored before the agent removes anything under it.
const AGENT_POLICY: usize = 3;

/// The shared words as a repair last read them: the ring holds every key removed since iff
/// every bump since gave its keys and fewer keys than the ring's slots were written.
#[derive(Debug, Clone, Copy)]
struct RingMark {
    epoch: u64,
    keyed: u64,
    head: u64,
}

impl RingMark {
    fn now(shared: &sys::SharedRegion) -> RingMark {
        RingMark {
            epoch: shared.word(EPOCH).load(Ordering::Acquire),
            keyed: shared.word(KEYED).load(Ordering::Acquire),
            head: shared.word(RING_HEAD).load(Ordering::Acquire),
        }
    }

    /// Whether the ring holds every key removed between `self` and `now`.
    fn covers(self, now: RingMark) -> bool {
        let bumps = now.epoch.checked_sub(self.epoch);
        let keyed = now.keyed.checked_sub(self.keyed);
        let written = now.head.checked_sub(self.head);
        bumps.is_some() && bumps == keyed && written.is_some_and(|n| n <= sys::RING_SLOTS as u64)
    }
}

/// An allow key in a ring slot: endpoint, address (IPv4 mapped), ports, family.
fn slot_of(k: &AllowKey) -> [u8; sys::SLOT_LEN] {
    let mut b = [0u8; sys::SLOT_LEN];
    b[0..8].copy_from_slice(&k.endpoint.0.to_le_bytes());
    let (v6, family) = match k.ip {
        std::net::IpAddr::V4(a) => (a.to_ipv6_mapped(), 4),
        std::net::IpAddr::V6(a) => (a, 6),
    };
    b[8..24].copy_from_slice(&v6.octets());
    b[24..26].copy_from_slice(&k.ports.lo.to_le_bytes());
    b[26..28].copy_from_slice(&k.ports.hi.to_le_bytes());
    b[28] = k.ports.protos;
    b[29] = family;
    b
}

/// The key of a ring slot (None for a slot that holds none).
fn key_of(b: &[u8; sys::SLOT_LEN]) -> Option<AllowKey> {
    let word =
        |r: std::ops::Range<usize>| b[r].iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x));
    let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).ok()?);
    let ip = match b[29] {
        4 => std::net::IpAddr::V4(v6.to_ipv4_mapped()?),
        6 => std::net::IpAddr::V6(v6),
        _ => return None,
    };
    Some(AllowKey {
        endpoint: dnsfence_policy::EndpointKey(word(0..8)),
        ip,
        ports: dnsfence_engine::allow::PortSpec {
            lo: word(24..26) as u16,
            hi: word(26..28) as u16,
            protos: b[28],
        },
    })
}

/// The writers' lock held (released on drop). A lock that cannot be taken (an error of
/// flock) is not waited for: the write goes on, as it did before the lock existed.
struct WritersLock<'a>(Option<&'a std::fs::File>);

/// How long a writer waits for the other to release the writers' lock before writing without
/// it: far longer than any hold of a working writer (a slice of 4,096 removals, a sweep), so
/// that only one stopped, frozen or dying while holding it is written past (a write made
/// without the lock then races nothing: the stuck holder sweeps and revokes nothing meanwhile).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
/// After a wait ran out, the next takes try once without waiting for this long: a stuck
/// holder costs one wait, not one per batch.
const LOCK_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// Until when (CLOCK_BOOTTIME ns, `sys::boottime_ns`) takes do not wait: set when a wait ran
/// out.
static LOCK_BACKOFF_UNTIL: AtomicU64 = AtomicU64::new(0);

impl<'a> WritersLock<'a> {
    /// Takes the lock, waiting at most [`LOCK_PATIENCE`] (review finding: a blocking flock
    /// held by a stopped, frozen or dying other writer stalled every shard needing a write,
    /// behind the ledger's mutex, for as long as it lasted), not at all during a back-off.
    fn take(file: &'a std::fs::File) -> WritersLock<'a> {
        let patience = if sys::boottime_ns() < LOCK_BACKOFF_UNTIL.load(Ordering::Relaxed) {
            std::time::Duration::ZERO
        } else {
            LOCK_PATIENCE
        };
        let deadline = std::time::Instant::now() + patience;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    LOCK_BACKOFF_UNTIL.store(0, Ordering::Relaxed);
                    return WritersLock(Some(file));
                }
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    LOCK_BACKOFF_UNTIL.store(
                        sys::boottime_ns() + LOCK_BACKOFF.as_nanos() as u64,
                        Ordering::Relaxed,
                    );
                    return WritersLock(None);
                }
                Err(_) => return WritersLock(None),
            }
        }
    }

    /// Whether the lock is held (the removal ring is written and read only then).
    fn held(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for WritersLock<'_> {
    fn drop(&mut self) {
        if let Some(file) = self.0 {
            let _ = file.unlock();
        }
    }
}

/// Second handles on the two maps, to read them whole without holding the writers' lock.
struct Scan {
    map: HashMap<MapData, AllowMapKey, u64>,
    names: HashMap<MapData, AllowMapKey, NameValue>,
}

/// The allow sink of eBPF mode. Cloning shares it.
#[derive(Clone)]
pub struct BpfAllow {
    inner: Arc<Mutex<Inner>>,
    scan: Arc<Mutex<Scan>>,
    /// The writers' epoch, shared with the other writer through the lock file.
    shared: Arc<sys::SharedRegion>,
    /// The writers' epoch the last repair checked the ledger for (or that this process's
    /// own removal made).
    repaired: Arc<AtomicU64>,
    /// Repairs that read the removal ring, and that scanned the whole ledger.
    ring_scans: Arc<AtomicU64>,
    full_scans: Arc<AtomicU64>,
    /// Whether this is the agent's sink: it publishes its policy's identity (`AGENT_POLICY`)
    /// and never defers a repair; the standalone proxy's follows.
    publishes: bool,
    /// The identity of this process's newest policy (`Snapshot::policy_id`; 0: not known).
    policy: Arc<AtomicU64>,
    /// Repairs put off because the agent's policy was not this process's.
    deferred: Arc<AtomicU64>,
}

impl std::fmt::Debug for BpfAllow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfAllow").finish_non_exhaustive()
    }
}

impl BpfAllow {
    /// A sink over the allow maps pinned under `pin_dir` by an agent (the standalone
    /// proxy's: it loads no program and takes no pin lock); what the map holds is taken
    /// into the ledger, whose capacity is never above the map's.
    pub fn open_pinned(
        pin_dir: &Path,
        mut config: LedgerConfig,
    ) -> Result<BpfAllow, DatapathError> {
        let open = |name| crate::loader::open_pinned_map(pin_dir, name);
        let allow = open(names::ALLOW)?;
        if let Ok(info) = allow.info() {
            config.capacity = config.capacity.min(info.max_entries() as usize);
        }
        let map_err = |map: &'static str| {
            move |e: aya::maps::MapError| DatapathError::Map {
                map,
                reason: e.to_string(),
            }
        };
        let allow = HashMap::try_from(Map::HashMap(allow)).map_err(map_err(names::ALLOW))?;
        let allow_names = HashMap::try_from(Map::HashMap(open(names::ALLOW_NAMES)?))
            .map_err(map_err(names::ALLOW_NAMES))?;
        BpfAllow::new(allow, allow_names, config, pin_dir)
    }

    /// A sink over the pinned allow map; what the map holds is taken into the ledger.
    pub fn new(
        map: HashMap<MapData, AllowMapKey, u64>,
        names_map: HashMap<MapData, AllowMapKey, NameValue>,
        config: LedgerConfig,
        pin_dir: &Path,
    ) -> Result<BpfAllow, DatapathError> {
        let lock_path = crate::loader::allow_lock_path(pin_dir);
        if let Some(dir) = lock_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| DatapathError::Map {
                map: names::ALLOW,
                reason: format!("creating {}: {e}", dir.display()),
            })?;
        }
        // The lock file's first 64 KiB hold the writers' epoch and removal ring, mapped by
        // both processes:
        // only they may write it (a truncation by anyone else would raise SIGBUS in both),
        // and a symlink there is not followed.
        let writers = {
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            let refuse = |reason: String| DatapathError::Map {
                map: names::ALLOW,
                reason: format!("{}: {reason}", lock_path.display()),
            };
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&lock_path)
                .map_err(|e| refuse(format!("opening: {e}")))?;
            let meta = file.metadata().map_err(|e| refuse(format!("stat: {e}")))?;
            let euid = rustix::process::geteuid().as_raw();
            // One of ours that others may write (an older build's, made under a looser
            // umask): made private, not refused.
            if meta.file_type().is_file() && meta.uid() == euid && meta.mode() & 0o022 != 0 {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| refuse(format!("chmod 0600: {e}")))?;
            }
            let meta = file.metadata().map_err(|e| refuse(format!("stat: {e}")))?;
            if !meta.file_type().is_file()
                || (meta.uid() != euid && meta.uid() != 0)
                || meta.mode() & 0o022 != 0
            {
                return Err(refuse(format!(
                    "not a regular file of this user or root writable by them only \
                     (owner {}, mode {:o}): refusing it",
                    meta.uid(),
                    meta.mode() & 0o7777
                )));
            }
            file
        };
        let map_err = |map: &'static str| {
            move |e: std::io::Error| DatapathError::Map {
                map,
                reason: e.to_string(),
            }
        };
        let reopen = |data: &MapData, map: &'static str| -> Result<MapData, DatapathError> {
            use std::os::fd::AsFd;
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(map_err(map))?;
            MapData::from_fd(fd).map_err(|e| DatapathError::Map {
                map,
                reason: e.to_string(),
            })
        };
        let scan = Scan {
            map: HashMap::try_from(Map::HashMap(reopen(map.map(), names::ALLOW)?)).map_err(
                |e| DatapathError::Map {
                    map: names::ALLOW,
                    reason: e.to_string(),
                },
            )?,
            names: HashMap::try_from(Map::HashMap(reopen(names_map.map(), names::ALLOW_NAMES)?))
                .map_err(|e| DatapathError::Map {
                    map: names::ALLOW_NAMES,
                    reason: e.to_string(),
                })?,
        };
        let shared = sys::SharedRegion::map(&writers).map_err(|e| DatapathError::Map {
            map: names::ALLOW,
            reason: format!("mapping {}: {e}", lock_path.display()),
        })?;
        let seen_epoch = shared.word(EPOCH).load(Ordering::Acquire);
        let ring_mark = RingMark::now(&shared);
        let mut ledger = Ledger::new(config);
        // Start-up work (a few map syscalls per entry: milliseconds for thousands), at idle
        // priority like the ledger's own: a process starting beside one that serves must
        // not hold a CPU its shards wait for (seen: 3 ms runs of a starting agent's main
        // thread delaying the proxy's shards).
        dnsfence_engine::startup::at_idle_priority(|| -> Result<(), DatapathError> {
            let clock = Clock::now();
            for item in map.iter() {
                let (k, expires) = item.map_err(|e| DatapathError::Map {
                    map: names::ALLOW,
                    reason: e.to_string(),
                })?;
                let name = names_map
                    .get(&k, 0)
                    .ok()
                    .and_then(|n| dnsfence_matcher::Name::from_wire(n.bytes()).ok());
                ledger.restore(AllowKey::from(&k), clock.to_instant(expires), name.as_ref());
            }
            Ok(())
        })?;
        Ok(BpfAllow {
            shared: Arc::new(shared),
            repaired: Arc::new(AtomicU64::new(seen_epoch)),
            ring_scans: Arc::new(AtomicU64::new(0)),
            full_scans: Arc::new(AtomicU64::new(0)),
            publishes: false,
            policy: Arc::new(AtomicU64::new(0)),
            deferred: Arc::new(AtomicU64::new(0)),
            scan: Arc::new(Mutex::new(scan)),
            inner: Arc::new(Mutex::new(Inner {
                ledger,
                map,
                names: names_map,
                changes: Vec::new(),
                writers,
                previous: Vec::new(),
                removed: Vec::new(),
                seen_epoch,
                ring_mark,
                present: Vec::new(),
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Repairs so far that read the removal ring, and that scanned the whole ledger.
    pub fn repair_scans(&self) -> (u64, u64) {
        (
            self.ring_scans.load(Ordering::Relaxed),
            self.full_scans.load(Ordering::Relaxed),
        )
    }

    /// Makes this the agent's sink (`Datapath::allow_sink`): each snapshot it revokes under
    /// publishes its policy identity to the other writer, and its repairs never wait.
    pub(crate) fn publishing(mut self) -> BpfAllow {
        self.publishes = true;
        self
    }

    /// Sets this process's policy identity without revoking anything: the standalone proxy
    /// serving the snapshot it persisted (its repairs go on while the agent's policy is that
    /// one, and wait while it is another).
    pub fn follow_policy(&self, id: u64) {
        self.policy.store(id, Ordering::Release);
    }

    /// Repairs put off so far because the agent's policy was not this process's.
    pub fn repairs_deferred(&self) -> u64 {
        self.deferred.load(Ordering::Relaxed)
    }

    /// Whether the agent published a policy other than this process's: then what it removed
    /// may be what this process's older policy would put back, and its repairs wait (see
    /// the module documentation). Never for the agent's own sink.
    pub fn behind_agent(&self) -> bool {
        if self.publishes {
            return false;
        }
        let agents = self.shared.word(AGENT_POLICY).load(Ordering::Acquire);
        agents != 0 && agents != self.policy.load(Ordering::Acquire)
    }

    /// The ledger's counters.
    pub fn stats(&self) -> LedgerStats {
        let mut stats = self.lock().ledger.stats();
        stats.repairs_deferred = self.repairs_deferred();
        stats.behind_agent = self.behind_agent();
        stats
    }

    /// Takes into the ledger the map's entries it does not know: those the other writer (the
    /// agent or the standalone proxy) wrote since this ledger was seeded, so that revocation
    /// and the expiry sweep cover them too (review finding: an agent's reload left the
    /// proxy's entries for a revoked name in the map until they expired). The map is read
    /// through second handles, without the writers' lock; the ledger's lock is held for the
    /// merge only (a hash lookup per entry). Returns how many were taken in.
    pub fn adopt(&self) -> usize {
        let entries: Vec<(AllowMapKey, u64, Option<NameValue>)> = {
            let scan = self.scan.lock().unwrap_or_else(|e| e.into_inner());
            scan.map
                .iter()
                .filter_map(Result::ok)
                .map(|(k, expires)| {
                    let name = scan.names.get(&k, 0).ok();
                    (k, expires, name)
                })
                .collect()
        };
        let clock = Clock::now();
        let mut guard = self.lock();
        let before = guard.ledger.stats().entries;
        for (k, expires, name) in &entries {
            let name = name.and_then(|n| dnsfence_matcher::Name::from_wire(n.bytes()).ok());
            guard
                .ledger
                .restore(AllowKey::from(k), clock.to_instant(*expires), name.as_ref());
        }
        guard.ledger.stats().entries - before
    }

    /// Takes a new policy snapshot: entries it does not justify leave the map now, whichever
    /// writer wrote them. Writes are judged by the new snapshot at once; the entries held
    /// are judged [`REVOKE_SLICE`] at a time, the ledger's lock (which every shard's write
    /// needs) released between slices (review finding: the whole table was judged under it,
    /// a quarter of a second for a full table, every answer needing a write waiting).
    pub fn revoke(&self, snapshot: Arc<Snapshot>) -> usize {
        let id = snapshot.policy_id();
        if id != 0 && self.publishes {
            // Before anything is removed under it: a proxy that sees the removals (the
            // epoch's bump, after this) sees the identity too. Then one hold of the writers'
            // lock: a proxy's repair slice that checked the older identity under it (and may
            // be putting back what that policy justifies) ends before the adopt below reads
            // the map, so its entries are judged by this policy too (review finding).
            self.shared.word(AGENT_POLICY).store(id, Ordering::Release);
            drop(WritersLock::take(&self.lock().writers));
        }
        self.adopt();
        let keys = {
            let mut guard = self.lock();
            let keys = guard.ledger.take_snapshot(snapshot);
            if id != 0 {
                // Under the ledger's lock, once the ledger judges by this policy: a repair
                // that sees this identity (it checks under the same lock before putting
                // anything back) judges by it too (review finding: stored before, a repair
                // between the two put back what the older snapshot justified).
                self.policy.store(id, Ordering::Release);
            }
            keys
        };
        let mut revoked = 0;
        for slice in keys.chunks(REVOKE_SLICE) {
            let mut guard = self.lock();
            let inner = &mut *guard;
            inner.removed.clear();
            inner.ledger.revoke_keys(slice, &mut inner.removed);
            if inner.removed.is_empty() {
                continue;
            }
            revoked += inner.removed.len();
            let writers = WritersLock::take(&inner.writers);
            // Only what the map still holds is taken out here and moves the epoch (the other
            // writer, given the same policy, removed most of these already).
            inner.present.clear();
            for k in &inner.removed {
                if inner.map.get(&AllowMapKey::from(k), 0).is_ok() {
                    inner.present.push(*k);
                }
            }
            if !inner.present.is_empty() {
                // The keys into the removal ring and the bump first, then the removals, all
                // in one hold of the writers' lock (review findings: a bump after the last
                // slice left the other writer trusting its memory for the whole revocation;
                // a process dying between removals and bump left removals nobody checks;
                // now it can only leave keys the other writer finds still present).
                let keyed = writers.held();
                if keyed {
                    let head = self.shared.word(RING_HEAD);
                    for k in &inner.present {
                        let at = head.load(Ordering::Acquire);
                        self.shared.write_slot(at, &slot_of(k));
                        head.store(at + 1, Ordering::Release);
                    }
                }
                self.bump_epoch(&mut inner.seen_epoch, &mut inner.ring_mark, keyed);
                for k in &inner.present {
                    let _ = inner.map.remove(&AllowMapKey::from(k));
                }
            }
            for k in &inner.removed {
                let _ = inner.names.remove(&AllowMapKey::from(k));
            }
        }
        revoked
    }

    /// Moves the writers' epoch after this process took entries out of the map (called
    /// with the writers' lock held): the other writer may hold some of them for a name it
    /// still justifies, and checks its ledger against the map when it sees the epoch move.
    fn bump_epoch(&self, seen_epoch: &mut u64, ring_mark: &mut RingMark, keyed: bool) {
        let before = self.shared.word(EPOCH).fetch_add(1, Ordering::AcqRel);
        if keyed {
            self.shared.word(KEYED).fetch_add(1, Ordering::AcqRel);
        }
        if before == *seen_epoch {
            // Nothing unseen from the other writer (its ring keys and bump come together,
            // under the lock held now).
            *seen_epoch = before + 1;
            // And when the repair is caught up too, this bump needs none, and the ring's
            // keys up to here are this process's own or checked (else the repair, pending,
            // reads them from where it stopped).
            if self
                .repaired
                .compare_exchange(before, before + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                *ring_mark = RingMark::now(&self.shared);
            }
        }
    }

    /// When the other writer removed entries since the last check (the writers' epoch
    /// moved): checks the entries it removed (read from the removal ring; the whole ledger
    /// when the ring no longer holds them all) against this ledger and the map, puts back
    /// what this ledger holds and its newest snapshot justifies, drops the rest from the
    /// ledger, then ends verify mode. The map is read through the second handles, without
    /// the ledger's lock, which is taken only to put back what is missing, a slice at a
    /// time. Cheap when the epoch has not moved (two atomic loads). Returns how many entries
    /// it put back.
    pub fn repair(&self) -> usize {
        let epoch = self.shared.word(EPOCH).load(Ordering::Acquire);
        if self.repaired.load(Ordering::Acquire) == epoch {
            return 0;
        }
        if self.behind_agent() {
            // Not now: the removals since the last repair stay to be read (the ring mark
            // stays), the ledger stays in verify mode (see the module documentation).
            self.deferred.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        // `mark`: where this repair starts reading the ring (put back if it is deferred).
        let (keys, mark) = {
            let mut guard = self.lock();
            let inner = &mut *guard;
            observe_epoch(&mut inner.seen_epoch, &mut inner.ledger, epoch);
            // The keys removed since the last repair, from the ring, when it holds them all
            // (every bump since gave its keys, none was overwritten); else the whole ledger.
            let writers = WritersLock::take(&inner.writers);
            let now = RingMark::now(&self.shared);
            let mark = std::mem::replace(&mut inner.ring_mark, now);
            let ring: Option<Vec<AllowKey>> = if writers.held() && mark.covers(now) {
                // A slot that does not decode (torn, or not a key): the whole ledger.
                (mark.head..now.head)
                    .map(|i| key_of(&self.shared.read_slot(i)))
                    .collect()
            } else {
                None
            };
            drop(writers);
            let keys = match ring {
                Some(keys) => {
                    self.ring_scans.fetch_add(1, Ordering::Relaxed);
                    keys
                }
                None => {
                    self.full_scans.fetch_add(1, Ordering::Relaxed);
                    inner.ledger.keys()
                }
            };
            (keys, mark)
        };
        let mut repaired = 0;
        let mut missing = Vec::new();
        for slice in keys.chunks(REVOKE_SLICE) {
            missing.clear();
            {
                let scan = self.scan.lock().unwrap_or_else(|e| e.into_inner());
                missing.extend(
                    slice
                        .iter()
                        .filter(|k| scan.map.get(&AllowMapKey::from(*k), 0).is_err()),
                );
            }
            if missing.is_empty() {
                continue;
            }
            let clock = Clock::now();
            let mut guard = self.lock();
            let inner = &mut *guard;
            let writers = WritersLock::take(&inner.writers);
            if !writers.held() || self.behind_agent() {
                // The agent put a newer policy in force since the check above (it publishes
                // before it removes, and removes under the writers' lock held here; without
                // the lock, after a stuck holder, that order is not known, so not now
                // either): the rest waits; the keys are read again then (those put back
                // already are skipped as present, and judged by the agent's revocation,
                // which adopts the map's entries after a hold of this lock).
                inner.ring_mark = mark;
                self.deferred.fetch_add(1, Ordering::Relaxed);
                return repaired;
            }
            for k in &missing {
                let key = AllowMapKey::from(k);
                if inner.map.get(&key, 0).is_ok() {
                    // Written again meanwhile.
                    continue;
                }
                // Put back only what this process's newest policy justifies (an entry taken
                // over from the other writer, or one this ledger holds from an older policy,
                // is judged again); what is not put back leaves the ledger too, so that the
                // next answer needing it is planned as new, never as "no change" with nothing
                // in the map.
                let Some((expires, name)) = inner.ledger.justified_entry(k, clock.instant) else {
                    inner.ledger.drop_unrepaired(k);
                    continue;
                };
                if inner.map.insert(key, clock.to_boot_ns(expires), 0).is_ok() {
                    if let Some(value) = name.as_ref().and_then(|n| NameValue::of(n.wire())) {
                        let _ = inner.names.insert(key, value, 0);
                    }
                    inner.ledger.count_repaired();
                    repaired += 1;
                } else {
                    inner.ledger.drop_unrepaired(k);
                }
            }
        }
        let mut guard = self.lock();
        if self.shared.word(EPOCH).load(Ordering::Acquire) == epoch && guard.seen_epoch == epoch {
            guard.ledger.set_verify(false);
        }
        drop(guard);
        self.repaired.fetch_max(epoch, Ordering::AcqRel);
        repaired
    }

    /// Removes up to `budget` expired entries (a slice: the shards' writes wait at most one
    /// slice). Returns how many.
    pub fn sweep(&self, budget: usize) -> usize {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.removed.clear();
        let clock = Clock::now();
        let n = inner
            .ledger
            .sweep(clock.instant, budget, &mut inner.removed);
        let _writers = (!inner.removed.is_empty()).then(|| WritersLock::take(&inner.writers));
        for k in &inner.removed {
            let key = AllowMapKey::from(k);
            // Extended by the other writer: keep it, with the map's expiry.
            if let Ok(expires) = inner.map.get(&key, 0)
                && expires > clock.boot_ns
            {
                let name = inner
                    .names
                    .get(&key, 0)
                    .ok()
                    .and_then(|n| dnsfence_matcher::Name::from_wire(n.bytes()).ok());
                inner
                    .ledger
                    .restore(*k, clock.to_instant(expires), name.as_ref());
                continue;
            }
            let _ = inner.map.remove(&key);
            let _ = inner.names.remove(&key);
        }
        n
    }
}

impl AllowSink for BpfAllow {
    fn epoch(&self) -> u64 {
        self.shared.word(EPOCH).load(Ordering::Acquire)
    }

    fn write(&mut self, _now: Instant, batch: &mut AllowBatch) {
        let clock = Clock::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let _writers = WritersLock::take(&inner.writers);
        let epoch = self.shared.word(EPOCH).load(Ordering::Acquire);
        observe_epoch(&mut inner.seen_epoch, &mut inner.ledger, epoch);
        for g in 0..batch.groups.len() {
            if inner.ledger.plan(batch, g, &mut inner.changes).is_err() {
                batch.settle_group(g, false, &[]);
                continue;
            }
            let mut failed_at = None;
            inner.previous.clear();
            // Entries new to the map get their name beside them, written first: whoever reads
            // the entry (the other writer's adopt, a start's seeding, without the lock) finds
            // its name too (review finding: read between the two, it stayed nameless). Best
            // effort: an entry without one is judged by its port spec alone after a restart;
            // one the map held keeps the name its first writer gave it.
            let name = batch
                .group_entries(g)
                .first()
                .and_then(|e| NameValue::of(batch.names[e.name as usize].wire()));
            for (i, c) in inner.changes.iter().enumerate() {
                let key = AllowMapKey::from(&c.key);
                // The other writer may hold a later expiry: never shorten it.
                let previous = inner.map.get(&key, 0).ok();
                inner.previous.push(previous);
                if let (None, Some(value)) = (previous, name) {
                    let _ = inner.names.insert(key, value, 0);
                }
                let expires = clock.to_boot_ns(c.expires).max(previous.unwrap_or(0));
                if inner.map.insert(key, expires, 0).is_err() {
                    failed_at = Some(i);
                    break;
                }
            }
            match failed_at {
                None => {
                    inner.ledger.commit(batch, g, &inner.changes);
                    batch.settle_group(g, true, inner.ledger.planned_justified());
                }
                Some(i) => {
                    // Undo this group's earlier updates: the map holds all of it or none (the
                    // failed entry's name, written before it, goes too).
                    for (c, previous) in inner.changes[..=i].iter().zip(&inner.previous) {
                        let key = AllowMapKey::from(&c.key);
                        let _ = match previous {
                            Some(prev) => inner.map.insert(key, *prev, 0),
                            None => {
                                let _ = inner.names.remove(&key);
                                inner.map.remove(&key)
                            }
                        };
                    }
                    inner.ledger.map_failed();
                    batch.settle_group(g, false, &[]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key goes through a ring slot unchanged, either family; an empty slot is no key.
    #[test]
    fn ring_slots_hold_keys_of_both_families() {
        for ip in ["203.0.113.7", "2001:db8::7", "::ffff:10.0.0.1", "0.0.0.0"] {
            let k = AllowKey {
                endpoint: dnsfence_policy::EndpointKey(0x0123_4567_89ab_cdef),
                ip: ip.parse().expect("address"),
                ports: dnsfence_engine::allow::PortSpec {
                    lo: 443,
                    hi: 8443,
                    protos: dnsfence_engine::allow::PortSpec::TCP,
                },
            };
            assert_eq!(key_of(&slot_of(&k)), Some(k), "{ip}");
        }
        assert_eq!(key_of(&[0; sys::SLOT_LEN]), None);
    }
}
