//! Allow entries: which endpoint may reach which address, on which ports, until when.
//!
//! Shards do not write them per answer: the core collects the entries of a batch of answers
//! in an [`AllowBatch`] (one group per held answer) and the shard hands the batch to an
//! [`AllowSink`] once, before any of those answers is sent. Each group is written whole or
//! not at all; a group that fails turns its answer into SERVFAIL.
//!
//! Both sinks keep their books in a [`Ledger`]: the userspace table of `--no-bpf` mode is a
//! ledger alone; the eBPF sink (the `dnsfence-datapath` crate) mirrors every ledger change
//! into the pinned allow map under the same lock. The ledger owns the semantics:
//! - **expiry only grows**: an entry lives until the latest expiry any answer gave it;
//! - **justified by policy**: an entry is written, and kept, only while the newest snapshot
//!   the ledger was given still lets its endpoint reach one of its names on its port spec
//!   ([`Ledger::revoke`] prunes at a reload; writes judged by an older snapshot are
//!   re-judged, so a query in flight across a reload cannot write what the new policy forbids),
//!   and never for an address inside the cluster (`Snapshot::in_cluster`: DNS rebinding);
//! - **bounded per workload**: a node-wide capacity, a per-endpoint and a per-name quota, so
//!   one workload resolving random names cannot fill the table for the others;
//! - **swept in slices**: expired entries leave through a heap, a bounded number per call.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dnsfence_matcher::{Name, RuleSet};
use dnsfence_policy::{EndpointKey, PortProto, PortProtocol, Snapshot};

/// A port range and the transport protocols it applies to, as the datapath stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
    /// Protocol bits: [`PortSpec::TCP`], [`PortSpec::UDP`], [`PortSpec::SCTP`],
    /// [`PortSpec::ICMP`], [`PortSpec::ICMPV6`] (for the ICMP bits, `lo..=hi` are types).
    pub protos: u8,
}

impl PortSpec {
    /// TCP.
    pub const TCP: u8 = 1;
    /// UDP.
    pub const UDP: u8 = 2;
    /// SCTP.
    pub const SCTP: u8 = 4;
    /// ICMP (the spec's range is of ICMP types).
    pub const ICMP: u8 = 8;
    /// ICMPv6 (the spec's range is of ICMPv6 types).
    pub const ICMPV6: u8 = 16;
    /// Every port over every protocol, ICMP and ICMPv6 (every type) included: a toFQDNs rule
    /// without `toPorts` is an L3 allow of the names' addresses, as in Cilium.
    pub const ALL: PortSpec = PortSpec {
        lo: 0,
        hi: u16::MAX,
        protos: PortSpec::TCP | PortSpec::UDP | PortSpec::SCTP | PortSpec::ICMP | PortSpec::ICMPV6,
    };

    /// The spec of a policy port entry (`ANY` is TCP, UDP and SCTP, as in Cilium).
    pub fn of(p: &PortProto) -> PortSpec {
        PortSpec {
            lo: p.port,
            hi: p.end_port,
            protos: match p.proto {
                PortProtocol::Tcp => PortSpec::TCP,
                PortProtocol::Udp => PortSpec::UDP,
                PortProtocol::Sctp => PortSpec::SCTP,
                PortProtocol::Any => PortSpec::TCP | PortSpec::UDP | PortSpec::SCTP,
                PortProtocol::Icmp => PortSpec::ICMP,
                PortProtocol::Icmp6 => PortSpec::ICMPV6,
                PortProtocol::Every => {
                    PortSpec::TCP
                        | PortSpec::UDP
                        | PortSpec::SCTP
                        | PortSpec::ICMP
                        | PortSpec::ICMPV6
                }
            },
        }
    }

    /// Whether the spec covers `port` over protocol bit `proto`.
    pub fn covers(&self, port: u16, proto: u8) -> bool {
        self.protos & proto != 0 && (self.lo..=self.hi).contains(&port)
    }
}

/// The identity of an allow entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowKey {
    /// The endpoint (its stable key: entries outlive policy reloads).
    pub endpoint: EndpointKey,
    /// The address it may reach (IPv4-mapped IPv6 is stored as IPv4).
    pub ip: IpAddr,
    /// On which ports.
    pub ports: PortSpec,
}

/// One allow entry of a batch: `key` until `expires`, justified by the batch's name `name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry {
    /// What is allowed.
    pub key: AllowKey,
    /// Until when (at least the answer's TTL, raised to `--min-ttl`).
    pub expires: Instant,
    /// Index of the question name in [`AllowBatch::names`].
    pub name: u32,
    /// Set by the sink: the entry is in the table (written now, or already there with a
    /// later expiry). False for entries the newest policy does not justify, and for every
    /// entry of a group that failed.
    pub written: bool,
}

/// The entries one answer needs, written together or not at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowGroup {
    /// Range of [`AllowBatch::entries`].
    pub start: u32,
    /// End of the range (exclusive).
    pub end: u32,
    /// Set by the sink: whether the group was written (or needed nothing).
    pub ok: bool,
}

/// Allow entries of one shard batch, grouped by answer. Sized once; cleared per batch.
#[derive(Debug, Default)]
pub struct AllowBatch {
    /// Every entry.
    pub entries: Vec<AllowEntry>,
    /// The question names the entries refer to.
    pub names: Vec<Name>,
    /// One group per answer.
    pub groups: Vec<AllowGroup>,
}

impl AllowBatch {
    /// A batch with room for `entries` entries without allocating.
    pub fn with_capacity(entries: usize) -> AllowBatch {
        AllowBatch {
            entries: Vec::with_capacity(entries),
            names: Vec::with_capacity(entries / 4 + 1),
            groups: Vec::with_capacity(entries / 4 + 1),
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Empties the batch, keeping its memory.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.names.clear();
        self.groups.clear();
    }

    /// Starts the group of an answer for question `name`; returns the group's index.
    pub fn begin_group(&mut self, name: &Name) -> usize {
        self.names.push(name.clone());
        let start = self.entries.len() as u32;
        self.groups.push(AllowGroup {
            start,
            end: start,
            ok: false,
        });
        self.groups.len() - 1
    }

    /// Adds an entry to the group begun last.
    pub fn push(&mut self, key: AllowKey, expires: Instant) {
        let name = (self.names.len() - 1) as u32;
        self.entries.push(AllowEntry {
            key,
            expires,
            name,
            written: false,
        });
        if let Some(g) = self.groups.last_mut() {
            g.end = self.entries.len() as u32;
        }
    }

    /// The entries of group `g`.
    pub fn group_entries(&self, g: usize) -> &[AllowEntry] {
        let group = self.groups[g];
        &self.entries[group.start as usize..group.end as usize]
    }

    /// Marks group `g` written or not, and its entries: the justified ones when `ok`, none
    /// otherwise (see [`AllowEntry::written`]). Sinks call it after writing a group.
    pub fn settle_group(&mut self, g: usize, ok: bool, justified: &[bool]) {
        let group = self.groups[g];
        self.groups[g].ok = ok;
        let entries = &mut self.entries[group.start as usize..group.end as usize];
        for (i, e) in entries.iter_mut().enumerate() {
            e.written = ok && justified.get(i).copied().unwrap_or(false);
        }
    }
}

/// Why an allow group was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    /// The node-wide table is full.
    #[error("allow table full ({capacity} entries)")]
    Full {
        /// Its capacity.
        capacity: usize,
    },
    /// The endpoint holds its quota of entries.
    #[error("endpoint allow quota reached ({quota} entries)")]
    EndpointQuota {
        /// The quota.
        quota: usize,
    },
    /// The endpoint, below its quota, holds as many entries as the table has free.
    #[error("endpoint's fair share of the allow table reached ({held} held, {free} free)")]
    FairShare {
        /// Entries it holds.
        held: usize,
        /// Entries free in the table.
        free: usize,
    },
    /// The name holds its quota of entries for this endpoint.
    #[error("per-name allow quota reached ({quota} entries)")]
    NameQuota {
        /// The quota.
        quota: usize,
    },
    /// The kernel refused a map update.
    #[error("allow map update failed: {0}")]
    Map(String),
}

/// Where allow entries are written: the userspace table or the eBPF map.
pub trait AllowSink {
    /// Writes each group of `batch` whole or not at all, setting its `ok`; an entry already
    /// present keeps the later of its two expiries.
    fn write(&mut self, now: Instant, batch: &mut AllowBatch);

    /// A number that changes whenever entries may have left the table behind this writer's
    /// back (another process sharing the table revoked some): a shard that remembers
    /// entries as written forgets them when it changes. Read once per poll of a shard, so
    /// it must cost no syscall. A table only this process writes never changes it.
    fn epoch(&self) -> u64 {
        0
    }
}

/// Bounds of a [`Ledger`]; each is a flag of `dnsfence agent`.
#[derive(Debug, Clone, Copy)]
pub struct LedgerConfig {
    /// Most entries on the node (the allow map's size).
    pub capacity: usize,
    /// Most entries one endpoint may hold (and never more than are left free: its fair
    /// share, see `Ledger::plan`).
    pub per_endpoint: usize,
    /// Most entries one (endpoint, name) may hold (a name answering fresh addresses each
    /// time cannot take the endpoint's whole quota).
    pub per_name: usize,
}

impl Default for LedgerConfig {
    fn default() -> LedgerConfig {
        LedgerConfig {
            capacity: 1 << 20,
            per_endpoint: 1 << 16,
            per_name: 256,
        }
    }
}

/// Counters of a ledger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerStats {
    /// Entries now held.
    pub entries: usize,
    /// Entries created.
    pub created: u64,
    /// Entries whose expiry a write extended.
    pub extended: u64,
    /// Groups refused at the node-wide capacity.
    pub full: u64,
    /// Groups refused at an endpoint's quota.
    pub endpoint_quota: u64,
    /// Groups refused at an endpoint's fair share (below its quota, it held as many entries
    /// as the table had free).
    pub fair_share: u64,
    /// Groups refused at a name's quota.
    pub name_quota: u64,
    /// Groups refused because the map write failed.
    pub map_errors: u64,
    /// Entries not written because the newest policy does not justify them.
    pub unjustified: u64,
    /// Of those, entries refused because their address is inside the cluster
    /// (`Snapshot::in_cluster`: a name resolving to a pod, service or node reaches nothing).
    pub in_cluster: u64,
    /// Entries removed by a reload.
    pub revoked: u64,
    /// Entries removed on expiry.
    pub expired: u64,
    /// Entries rewritten unchanged in verify mode (see [`Ledger::set_verify`]).
    pub verified: u64,
    /// Entries put back into a shared table after another writer removed them while this
    /// ledger still held them (and its newest snapshot justifies them).
    pub repaired: u64,
    /// Entries another writer removed that this ledger dropped instead of putting back: its
    /// snapshot does not justify them (or it has none yet), they expired, or the table
    /// refused them.
    pub repair_dropped: u64,
    /// Repairs of a shared table put off because the other writer, the agent, removed its
    /// entries under a policy this process does not have yet (set by the sink, not the
    /// ledger). Counts repair turns (every 50 ms while it lasts), not episodes.
    pub repairs_deferred: u64,
    /// Whether the agent's policy (published in the shared region) is now another than this
    /// process's, so that its repairs wait (set by the sink; always false for the agent).
    pub behind_agent: bool,
}

/// An interned name: its endpoint, wire bytes and number of references.
type InternedName = (EndpointKey, Box<[u8]>, u32);

/// Interned question names (per endpoint): entries refer to names by index, with a count of
/// references. Looked up by the name's wire bytes without copying them; a new name costs one
/// allocation (its bytes), a known one none.
#[derive(Debug, Default)]
struct NameTable {
    index: hashbrown::HashTable<u32>,
    names: Vec<Option<InternedName>>,
    free: Vec<u32>,
    hasher: foldhash::fast::RandomState,
}

impl NameTable {
    fn with_capacity(n: usize) -> NameTable {
        NameTable {
            index: hashbrown::HashTable::with_capacity(n),
            names: Vec::with_capacity(n),
            free: Vec::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Writes every page of the index once, in address order (see [`Ledger::new`] and
    /// [`EntryTable::prefault`]).
    fn prefault(&mut self, n: usize) {
        let stride = prefault_stride(self.index.capacity(), n);
        for i in 0..n as u64 {
            self.index
                .insert_unique(i * stride, 0, |_| unreachable!("within capacity"));
        }
        self.index.clear();
    }

    fn hash(&self, endpoint: EndpointKey, wire: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((endpoint, wire))
    }

    fn find(&self, endpoint: EndpointKey, name: &Name) -> Option<u32> {
        let wire = name.wire();
        let names = &self.names;
        self.index
            .find(self.hash(endpoint, wire), |&id| {
                names[id as usize]
                    .as_ref()
                    .is_some_and(|(e, w, _)| *e == endpoint && **w == *wire)
            })
            .copied()
    }

    fn refs(&self, id: u32) -> u32 {
        self.names
            .get(id as usize)
            .and_then(|n| n.as_ref())
            .map_or(0, |n| n.2)
    }

    fn acquire(&mut self, endpoint: EndpointKey, name: &Name) -> u32 {
        if let Some(id) = self.find(endpoint, name) {
            if let Some(n) = self.names[id as usize].as_mut() {
                n.2 += 1;
            }
            return id;
        }
        let entry = Some((endpoint, Box::from(name.wire()), 1));
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = entry;
                id
            }
            None => {
                self.names.push(entry);
                (self.names.len() - 1) as u32
            }
        };
        let hash = self.hash(endpoint, name.wire());
        let (names, hasher) = (&self.names, &self.hasher);
        self.index.insert_unique(hash, id, |&other| {
            use std::hash::BuildHasher;
            let (e, w, _) = names[other as usize].as_ref().expect("indexed names exist");
            hasher.hash_one((*e, &**w))
        });
        id
    }

    fn release(&mut self, id: u32) {
        let Some(n) = self.names.get_mut(id as usize).and_then(|n| n.as_mut()) else {
            return;
        };
        n.2 -= 1;
        if n.2 == 0 {
            let (endpoint, wire, _) = self.names[id as usize].take().expect("present");
            let hash = self.hash(endpoint, &wire);
            if let Ok(entry) = self.index.find_entry(hash, |&other| other == id) {
                entry.remove();
            }
            self.free.push(id);
        }
    }

    /// The name `id` stands for (rebuilt from its wire bytes: for reloads, not the write path).
    fn name(&self, id: u32) -> Option<Name> {
        let (_, wire, _) = self.names.get(id as usize)?.as_ref()?;
        Name::from_wire(wire).ok()
    }

    /// Whether `id` stands for `name`.
    fn is(&self, id: u32, name: &Name) -> bool {
        self.names
            .get(id as usize)
            .and_then(|n| n.as_ref())
            .is_some_and(|(_, w, _)| **w == *name.wire())
    }
}

const NO_NAME: u32 = u32::MAX;
/// Entries a revocation judges (and a sink's repair checks) per turn of a shared ledger's
/// lock.
pub const REVOKE_SLICE: usize = 4096;
/// Names remembered per allow entry.
const NAMES_PER_ENTRY: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Slot {
    expires: Instant,
    /// Up to `NAMES_PER_ENTRY` names that justify the entry (the first ones seen; a further
    /// name is not remembered, so a reload dropping all the remembered ones revokes the
    /// entry even if that further name still justifies it: fail closed, until it is answered
    /// again).
    names: [u32; NAMES_PER_ENTRY],
    /// Written (or confirmed) by this process's answers, not only taken in from a shared
    /// table (`restore`): a ledger with no snapshot yet puts back only these.
    own: bool,
}

impl Slot {
    /// Whether `name` is not among the entry's names and there is room for it.
    fn would_learn(&self, names: &NameTable, name: &Name) -> bool {
        !self.names.iter().any(|&id| names.is(id, name)) && self.names.contains(&NO_NAME)
    }

    /// Adds `name` (of `endpoint`) to the entry's names, if [`Slot::would_learn`].
    fn remember(&mut self, names: &mut NameTable, endpoint: EndpointKey, name: &Name) {
        if self.would_learn(names, name)
            && let Some(free) = self.names.iter_mut().find(|n| **n == NO_NAME)
        {
            *free = names.acquire(endpoint, name);
        }
    }
}

/// The hash step that spreads `n` placeholder entries evenly over the buckets of a
/// `hashbrown` table of `capacity` (its buckets are the power of two that holds it at a
/// load of 7/8): entry `i` hashed `i * step` lands in bucket `i * step`, so that `n` inserts
/// write the table in address order and touch each of its pages.
fn prefault_stride(capacity: usize, n: usize) -> u64 {
    let buckets = (capacity.max(1) * 8 / 7).next_power_of_two();
    (buckets / n.max(1)).max(1) as u64
}

/// The ledger's small maps: foldhash, seeded per process (as the shards' tables and the
/// name index). SipHash, the standard default, cost about 0.3 µs an insert.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The entries: a hash table (foldhash, seeded per process) whose memory is written once at
/// start, in address order (see [`EntryTable::prefault`]).
#[derive(Debug)]
struct EntryTable {
    table: hashbrown::HashTable<(AllowKey, Slot)>,
    hasher: foldhash::fast::RandomState,
}

impl EntryTable {
    fn with_capacity(n: usize) -> EntryTable {
        EntryTable {
            table: hashbrown::HashTable::with_capacity(n),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn hash(&self, key: &AllowKey) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.table.capacity()
    }

    fn get(&self, key: &AllowKey) -> Option<&Slot> {
        self.table
            .find(self.hash(key), |(k, _)| k == key)
            .map(|(_, s)| s)
    }

    fn get_mut(&mut self, key: &AllowKey) -> Option<&mut Slot> {
        let h = self.hash(key);
        self.table.find_mut(h, |(k, _)| k == key).map(|(_, s)| s)
    }

    /// Adds `key`, or replaces its slot.
    fn insert(&mut self, key: AllowKey, slot: Slot) {
        use std::hash::BuildHasher;
        let h = self.hash(&key);
        let hasher = &self.hasher;
        match self
            .table
            .entry(h, |(k, _)| *k == key, |(k, _)| hasher.hash_one(k))
        {
            hashbrown::hash_table::Entry::Occupied(mut o) => o.get_mut().1 = slot,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert((key, slot));
            }
        }
    }

    fn remove(&mut self, key: &AllowKey) -> Option<Slot> {
        let h = self.hash(key);
        let entry = self.table.find_entry(h, |(k, _)| k == key).ok()?;
        Some(entry.remove().0.1)
    }

    fn iter(&self) -> impl Iterator<Item = (&AllowKey, &Slot)> + '_ {
        self.table.iter().map(|(k, s)| (k, s))
    }

    /// Writes every page of the table once: `n` placeholder entries (`n` within its
    /// capacity, so it never grows) whose hashes spread them evenly over the buckets in
    /// address order, then cleared. Random hashes (the real ones) made each insert a cache
    /// and TLB miss: twice the time.
    fn prefault(&mut self, n: usize) {
        let stride = prefault_stride(self.table.capacity(), n);
        let now = Instant::now();
        for i in 0..n as u64 {
            let key = AllowKey {
                endpoint: EndpointKey(i),
                ip: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                ports: PortSpec::ALL,
            };
            let slot = Slot {
                expires: now,
                names: [NO_NAME; NAMES_PER_ENTRY],
                own: false,
            };
            self.table
                .insert_unique(i * stride, (key, slot), |_| unreachable!("within capacity"));
        }
        self.table.clear();
    }
}

/// One change a group makes, for a sink to mirror (and to undo if it cannot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The entry.
    pub key: AllowKey,
    /// Its expiry after the change.
    pub expires: Instant,
    /// Its expiry before (None: the entry is new).
    pub previous: Option<Instant>,
}

/// The books of the allow entries of one process. See the module documentation.
#[derive(Debug)]
pub struct Ledger {
    config: LedgerConfig,
    entries: EntryTable,
    per_endpoint: FastMap<EndpointKey, u32>,
    names: NameTable,
    /// (expiry, key) of every write; stale items (extended or removed entries) are skipped.
    expiries: BinaryHeap<Reverse<(Instant, AllowKey)>>,
    snapshot: Option<Arc<Snapshot>>,
    rules: RuleSet,
    /// Per entry of the group planned last: whether the policy justifies it.
    justified_scratch: Vec<bool>,
    /// Entries of the group planned last that need no change but do not know its name yet:
    /// `commit` adds the name, so that a reload dropping the name that made the entry keeps
    /// it for this one (review finding: only a name that pushed the expiry later was kept).
    name_only: Vec<AllowKey>,
    /// Scratch of `plan`: new entries per endpoint, and per (endpoint, name).
    new_for: Vec<(EndpointKey, usize)>,
    new_for_name: Vec<(EndpointKey, u32, usize)>,
    /// Scratch of `apply`.
    changes_scratch: Vec<Change>,
    /// Whether an entry that needs no change is planned as a rewrite of its expiry (the
    /// table mirrored may have lost it: see [`Ledger::set_verify`]).
    verify: bool,
    stats: LedgerStats,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Ledger {
        // Sized at start for the capacity, so no write ever pays a whole-table rehash under
        // the lock the shards share; and the hash tables written once, so that their pages
        // are in memory before the process serves (else each of the first writes, landing
        // on a page at random, paid a page fault under that lock: a 100-300 ms p99 in the
        // second a process started). The heap and the name bytes grow in order: their
        // pages are touched one at a time.
        // That is start-up work: done at idle priority (see `startup`), so that a process
        // starting beside one that serves does not take its CPU meanwhile.
        let room = config.capacity.min(1 << 22);
        let (entries, names) = crate::startup::at_idle_priority(|| {
            let mut entries = EntryTable::with_capacity(room);
            entries.prefault(room);
            let mut names = NameTable::with_capacity(room);
            names.prefault(room);
            (entries, names)
        });
        Ledger {
            config,
            entries,
            per_endpoint: FastMap::with_capacity_and_hasher(1024, Default::default()),
            names,
            expiries: BinaryHeap::with_capacity(2 * room + 1024),
            snapshot: None,
            rules: RuleSet::with_max_rule(0),
            justified_scratch: Vec::with_capacity(64),
            name_only: Vec::with_capacity(64),
            new_for: Vec::with_capacity(64),
            new_for_name: Vec::with_capacity(64),
            changes_scratch: Vec::with_capacity(64),
            verify: false,
            stats: LedgerStats::default(),
        }
    }

    /// With `on`, every entry a group needs is planned as a change, even one the ledger holds
    /// long enough: its expiry written again (a sink takes the later of the table's and
    /// this), so an entry another writer of a shared table removed is put back before the
    /// answer that needs it is released. A sink turns it on when it learns that the other
    /// writer removed entries, and off once it has checked them against the ledger.
    pub fn set_verify(&mut self, on: bool) {
        self.verify = on;
    }

    /// The ledger's entries (their keys), for a sink that checks them against its table.
    pub fn keys(&self) -> Vec<AllowKey> {
        self.entries.iter().map(|(k, _)| *k).collect()
    }

    /// Entry `key`'s expiry and its first name, if the ledger holds it, it lives at `now` and
    /// the newest snapshot justifies it; without a snapshot yet (a standalone proxy serving
    /// its persisted policy before the agent's first), if this process's answers wrote it.
    /// What a sink puts back into its table must pass this (review finding: the repair put
    /// back entries taken over from the other writer, never judged).
    pub fn justified_entry(
        &mut self,
        key: &AllowKey,
        now: Instant,
    ) -> Option<(Instant, Option<Name>)> {
        let slot = *self.entries.get(key)?;
        let justified = match self.snapshot {
            None => slot.own,
            Some(_) => self.entry_justified(key, slot.names),
        };
        if slot.expires <= now || !justified {
            return None;
        }
        let name = slot.names.iter().find_map(|&id| self.names.name(id));
        Some((slot.expires, name))
    }

    /// Counters.
    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            entries: self.entries.len(),
            ..self.stats
        }
    }

    /// The entries now held, with their expiry.
    pub fn iter(&self) -> impl Iterator<Item = (&AllowKey, Instant)> + '_ {
        self.entries.iter().map(|(k, s)| (k, s.expires))
    }

    /// Whether `endpoint` may reach `ip` on `port` over protocol bit `proto` at `now`.
    pub fn is_allowed(
        &self,
        endpoint: EndpointKey,
        ip: IpAddr,
        port: u16,
        proto: u8,
        now: Instant,
    ) -> bool {
        let ip = canonical(ip);
        self.entries.iter().any(|(k, s)| {
            k.endpoint == endpoint && k.ip == ip && k.ports.covers(port, proto) && s.expires > now
        })
    }

    /// Whether `name` justifies entry `key` (its endpoint, address and ports) under the
    /// ledger's snapshot: a toFQDNs rule of the endpoint selects the name and opens the ports,
    /// and the address is outside the cluster. Without a snapshot (none given yet)
    /// everything the core asks for is justified.
    fn justified(&mut self, key: &AllowKey, name: &Name) -> bool {
        let (endpoint, ports) = (key.endpoint, key.ports);
        let Some(snapshot) = &self.snapshot else {
            return true;
        };
        if snapshot.in_cluster(key.ip) {
            self.stats.in_cluster += 1;
            return false;
        }
        let Some(ep) = snapshot.endpoint_by_key(endpoint) else {
            return false;
        };
        if !snapshot.is_restricted(ep) || !snapshot.fqdn_rules(ep, name, &mut self.rules) {
            return false;
        }
        self.rules.as_slice().iter().any(|&rule| {
            let opened = snapshot.rule_ports(rule);
            if opened.is_empty() {
                ports == PortSpec::ALL
            } else {
                opened.iter().any(|p| PortSpec::of(p) == ports)
            }
        })
    }

    /// Whether `key`'s endpoint is enforced, its ports one of the endpoint's port specs and
    /// its address outside the cluster under the ledger's snapshot (the check for entries
    /// restored without names).
    fn spec_justified(&self, key: &AllowKey) -> bool {
        let (endpoint, ports) = (key.endpoint, key.ports);
        let Some(snapshot) = &self.snapshot else {
            return true;
        };
        if snapshot.in_cluster(key.ip) {
            return false;
        }
        snapshot.endpoint_by_key(endpoint).is_some_and(|ep| {
            snapshot.is_restricted(ep)
                && snapshot
                    .fqdn_ports(ep)
                    .iter()
                    .any(|p| PortSpec::of(p) == ports)
        })
    }

    /// Plans group `g` of `batch`: the changes it makes, or why it cannot be written.
    /// Entries the newest snapshot does not justify are left out (and counted). Nothing
    /// changes until [`Ledger::commit`].
    pub fn plan(
        &mut self,
        batch: &AllowBatch,
        g: usize,
        changes: &mut Vec<Change>,
    ) -> Result<(), AllowError> {
        changes.clear();
        self.justified_scratch.clear();
        self.name_only.clear();
        let mut new_total = 0usize;
        let mut new_for = std::mem::take(&mut self.new_for);
        let mut new_for_name = std::mem::take(&mut self.new_for_name);
        new_for.clear();
        new_for_name.clear();
        for e in batch.group_entries(g) {
            let key = AllowKey {
                ip: canonical(e.key.ip),
                ..e.key
            };
            let name = &batch.names[e.name as usize];
            let justified = self.justified(&key, name);
            self.justified_scratch.push(justified);
            if !justified {
                self.stats.unjustified += 1;
                continue;
            }
            if changes.iter().any(|c| c.key == key) {
                continue;
            }
            match self.entries.get(&key) {
                Some(slot) => {
                    if e.expires > slot.expires {
                        changes.push(Change {
                            key,
                            expires: e.expires,
                            previous: Some(slot.expires),
                        });
                    } else if self.verify {
                        changes.push(Change {
                            key,
                            expires: slot.expires,
                            previous: Some(slot.expires),
                        });
                    } else if slot.would_learn(&self.names, name) {
                        // Grows like `justified_scratch` (to the largest group seen, then
                        // never again).
                        self.name_only.push(key);
                    }
                }
                None => {
                    new_total += 1;
                    match new_for.iter_mut().find(|(k, _)| *k == key.endpoint) {
                        Some((_, n)) => *n += 1,
                        None => new_for.push((key.endpoint, 1)),
                    }
                    match new_for_name
                        .iter_mut()
                        .find(|(k, n, _)| *k == key.endpoint && *n == e.name)
                    {
                        Some((_, _, n)) => *n += 1,
                        None => new_for_name.push((key.endpoint, e.name, 1)),
                    }
                    changes.push(Change {
                        key,
                        expires: e.expires,
                        previous: None,
                    });
                }
            }
        }
        let result = self.check_bounds(batch, new_total, &new_for, &new_for_name);
        self.new_for = new_for;
        self.new_for_name = new_for_name;
        result
    }

    /// The bounds a group's new entries must fit: node-wide, per endpoint, per name.
    fn check_bounds(
        &mut self,
        batch: &AllowBatch,
        new_total: usize,
        new_for: &[(EndpointKey, usize)],
        new_for_name: &[(EndpointKey, u32, usize)],
    ) -> Result<(), AllowError> {
        if self.entries.len() + new_total > self.config.capacity {
            self.stats.full += 1;
            return Err(AllowError::Full {
                capacity: self.config.capacity,
            });
        }
        // An endpoint also stops at its fair share: it never holds more than is free (k
        // endpoints filling the table together leave about 1/(k+1) of it to the others;
        // review finding: at the default quota, a quarter of the table, four endpoints could
        // take all of it).
        let free = self.config.capacity.saturating_sub(self.entries.len());
        for &(endpoint, n) in new_for {
            let held = self.per_endpoint.get(&endpoint).copied().unwrap_or(0) as usize;
            if held + n > self.config.per_endpoint {
                self.stats.endpoint_quota += 1;
                return Err(AllowError::EndpointQuota {
                    quota: self.config.per_endpoint,
                });
            }
            if held + n > free {
                self.stats.fair_share += 1;
                return Err(AllowError::FairShare { held, free });
            }
        }
        for &(endpoint, name, n) in new_for_name {
            let name = &batch.names[name as usize];
            let held = self
                .names
                .find(endpoint, name)
                .map_or(0, |id| self.names.refs(id)) as usize;
            if held + n > self.config.per_name {
                self.stats.name_quota += 1;
                return Err(AllowError::NameQuota {
                    quota: self.config.per_name,
                });
            }
        }
        Ok(())
    }

    /// Per entry of the group planned last, whether the policy justified it (for
    /// [`AllowBatch::settle_group`]).
    pub fn planned_justified(&self) -> &[bool] {
        &self.justified_scratch
    }

    /// Applies what [`Ledger::plan`] planned for group `g` (after the sink mirrored it).
    pub fn commit(&mut self, batch: &AllowBatch, g: usize, changes: &[Change]) {
        let name = batch
            .group_entries(g)
            .first()
            .map(|e| &batch.names[e.name as usize]);
        // Taken and put back (with its capacity: no allocation here).
        let mut name_only = std::mem::take(&mut self.name_only);
        for key in name_only.drain(..) {
            if let Some(name) = name
                && let Some(slot) = self.entries.get_mut(&key)
            {
                slot.remember(&mut self.names, key.endpoint, name);
            }
        }
        self.name_only = name_only;
        for c in changes {
            match self.entries.get_mut(&c.key) {
                Some(slot) => {
                    // Remember this name too (it may be the one a reload keeps).
                    if let Some(name) = name {
                        slot.remember(&mut self.names, c.key.endpoint, name);
                    }
                    slot.own = true;
                    if c.expires <= slot.expires {
                        // A rewrite of the expiry held (verify mode): nothing else changes.
                        self.stats.verified += 1;
                        continue;
                    }
                    slot.expires = c.expires;
                    self.stats.extended += 1;
                }
                None => {
                    let id = name.map_or(NO_NAME, |n| self.names.acquire(c.key.endpoint, n));
                    self.entries.insert(
                        c.key,
                        Slot {
                            expires: c.expires,
                            names: {
                                let mut names = [NO_NAME; NAMES_PER_ENTRY];
                                names[0] = id;
                                names
                            },
                            own: true,
                        },
                    );
                    *self.per_endpoint.entry(c.key.endpoint).or_insert(0) += 1;
                    self.stats.created += 1;
                }
            }
            self.expiries.push(Reverse((c.expires, c.key)));
        }
        // Stale heap items pile up when entries are extended: compact now and then.
        if self.expiries.len() > 2 * self.entries.len() + 1024 {
            self.expiries = self
                .entries
                .iter()
                .map(|(k, s)| Reverse((s.expires, *k)))
                .collect();
        }
    }

    /// Takes in an entry found in a pinned map at start, with the name that justified it when
    /// the map beside it kept one (then it is judged like any entry); without a name it is
    /// kept while its endpoint is enforced and its port spec is still one of the endpoint's
    /// (see [`Ledger::revoke`]).
    pub fn restore(&mut self, key: AllowKey, expires: Instant, name: Option<&Name>) {
        let key = AllowKey {
            ip: canonical(key.ip),
            ..key
        };
        if let Some(slot) = self.entries.get_mut(&key) {
            // Known without a name (read from the map before its writer put the name beside
            // it): it takes the name now, and is judged by it from here on (review finding:
            // it stayed nameless, judged by port spec alone, and a repair put back what a
            // revocation of its name removed).
            if let Some(name) = name
                && slot.names == [NO_NAME; NAMES_PER_ENTRY]
            {
                slot.names[0] = self.names.acquire(key.endpoint, name);
            }
            return;
        }
        let mut names = [NO_NAME; NAMES_PER_ENTRY];
        if let Some(name) = name {
            names[0] = self.names.acquire(key.endpoint, name);
        }
        self.entries.insert(
            key,
            Slot {
                expires,
                names,
                own: false,
            },
        );
        *self.per_endpoint.entry(key.endpoint).or_insert(0) += 1;
        self.expiries.push(Reverse((expires, key)));
    }

    /// Plans and commits every group of `batch` with nothing to mirror (the userspace
    /// table), settling each group. Allocates nothing once warm.
    pub fn apply(&mut self, batch: &mut AllowBatch) {
        let mut changes = std::mem::take(&mut self.changes_scratch);
        for g in 0..batch.groups.len() {
            let ok = self.plan(batch, g, &mut changes).is_ok();
            if ok {
                self.commit(batch, g, &changes);
            }
            batch.settle_group(g, ok, self.planned_justified());
        }
        self.changes_scratch = changes;
    }

    /// Counts an entry a sink put back into its table (see [`LedgerStats::repaired`]).
    pub fn count_repaired(&mut self) {
        self.stats.repaired += 1;
    }

    /// Forgets an entry a sink's table lost and that it does not put back (see
    /// [`LedgerStats::repair_dropped`]).
    pub fn drop_unrepaired(&mut self, key: &AllowKey) {
        if self.remove(key) {
            self.stats.repair_dropped += 1;
        }
    }

    /// Counts a group whose map write failed (its plan was not committed).
    pub fn map_failed(&mut self) {
        self.stats.map_errors += 1;
    }

    fn remove(&mut self, key: &AllowKey) -> bool {
        let Some(slot) = self.entries.remove(key) else {
            return false;
        };
        for id in slot.names {
            if id != NO_NAME {
                self.names.release(id);
            }
        }
        if let Some(n) = self.per_endpoint.get_mut(&key.endpoint) {
            *n -= 1;
            if *n == 0 {
                self.per_endpoint.remove(&key.endpoint);
            }
        }
        true
    }

    /// Takes `snapshot` as the newest policy: removes every entry it does not justify
    /// (appending their keys to `removed`), and judges every later write by it.
    pub fn revoke(&mut self, snapshot: Arc<Snapshot>, removed: &mut Vec<AllowKey>) {
        let keys = self.take_snapshot(snapshot);
        self.revoke_keys(&keys, removed);
    }

    /// Judges every later write by `snapshot`, and returns the keys of the entries held now:
    /// [`Ledger::revoke_keys`] then judges them, in slices if the caller likes (a ledger
    /// shared by shards is locked for a slice at a time, not for the whole table).
    pub fn take_snapshot(&mut self, snapshot: Arc<Snapshot>) -> Vec<AllowKey> {
        self.rules = snapshot.rule_set();
        self.snapshot = Some(snapshot);
        self.keys()
    }

    /// Whether the newest snapshot justifies entry `key` with `names`: by one of its names,
    /// or by its port spec alone for an entry restored without one.
    fn entry_justified(&mut self, key: &AllowKey, names: [u32; NAMES_PER_ENTRY]) -> bool {
        if names == [NO_NAME; NAMES_PER_ENTRY] {
            self.spec_justified(key)
        } else {
            names.iter().any(|&id| {
                let Some(name) = self.names.name(id) else {
                    return false;
                };
                self.justified(key, &name)
            })
        }
    }

    /// Removes those of `keys` the newest snapshot does not justify (appending them to
    /// `removed`); keys no longer held are skipped.
    pub fn revoke_keys(&mut self, keys: &[AllowKey], removed: &mut Vec<AllowKey>) {
        for key in keys {
            let Some(names) = self.entries.get(key).map(|s| s.names) else {
                continue;
            };
            let key = *key;
            if !self.entry_justified(&key, names) && self.remove(&key) {
                self.stats.revoked += 1;
                removed.push(key);
            }
        }
    }

    /// Removes up to `budget` entries expired at `now`, appending their keys to `removed`;
    /// returns how many. Cost: O(budget × log n), never a pass over the whole table.
    pub fn sweep(&mut self, now: Instant, budget: usize, removed: &mut Vec<AllowKey>) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(Reverse((expires, key))) = self.expiries.peek().copied() else {
                break;
            };
            if expires > now {
                break;
            }
            self.expiries.pop();
            // Skip stale items: the entry was removed or extended since.
            if self.entries.get(&key).is_some_and(|s| s.expires <= now) && self.remove(&key) {
                self.stats.expired += 1;
                removed.push(key);
                n += 1;
            }
        }
        n
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address (the datapath stores both alike).
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The allow table of `--no-bpf` mode, shared by all shards: a [`Ledger`] behind a lock
/// taken once per batch that has new entries (never per query; most answers need no write).
#[derive(Debug)]
pub struct UserspaceAllowTable {
    ledger: Mutex<Ledger>,
}

impl UserspaceAllowTable {
    /// An empty table with these bounds.
    pub fn new(config: LedgerConfig) -> UserspaceAllowTable {
        UserspaceAllowTable {
            ledger: Mutex::new(Ledger::new(config)),
        }
    }

    /// The ledger, locked.
    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `endpoint` may reach `ip` on `port` over protocol bit `proto` at `now`.
    pub fn is_allowed(
        &self,
        endpoint: EndpointKey,
        ip: IpAddr,
        port: u16,
        proto: u8,
        now: Instant,
    ) -> bool {
        self.ledger().is_allowed(endpoint, ip, port, proto, now)
    }

    /// Number of entries, expired ones included until the next sweep.
    pub fn len(&self) -> usize {
        self.ledger().stats().entries
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes up to `budget` entries expired at `now`; returns how many.
    pub fn sweep(&self, now: Instant, budget: usize) -> usize {
        let mut removed = Vec::new();
        self.ledger().sweep(now, budget, &mut removed)
    }

    /// Takes a new snapshot and removes what it does not justify, judging the entries held
    /// a slice at a time (the lock, which the shards' writes need, is released between
    /// slices). Returns how many were removed.
    pub fn revoke(&self, snapshot: Arc<Snapshot>) -> usize {
        let keys = self.ledger().take_snapshot(snapshot);
        let mut removed = Vec::new();
        for slice in keys.chunks(REVOKE_SLICE) {
            self.ledger().revoke_keys(slice, &mut removed);
        }
        removed.len()
    }
}

impl AllowSink for &UserspaceAllowTable {
    fn write(&mut self, _now: Instant, batch: &mut AllowBatch) {
        self.ledger().apply(batch);
    }
}

#[cfg(test)]
mod tests;
