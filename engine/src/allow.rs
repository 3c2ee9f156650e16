//! The allow table: which endpoint may reach which address until when.
//!
//! Shards do not write it per answer: the core queues the entries a batch of answers needs and
//! the shard hands them to an [`AllowSink`] once per batch, before any of those answers is sent.
//! [`UserspaceAllowTable`] is the sink of `--no-bpf` mode; the eBPF map sink implements the
//! same trait.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::Instant;

use dnsfence_policy::EndpointKey;

/// One allow entry: `endpoint` may connect to `ip` until `expires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowEntry {
    /// The endpoint (its stable key: entries outlive policy reloads).
    pub endpoint: EndpointKey,
    /// The address it may reach.
    pub ip: IpAddr,
    /// Until when (the answer's TTL, raised to `--min-ttl`).
    pub expires: Instant,
}

/// Why an allow write failed.
#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    /// The table is full.
    #[error("allow table full ({capacity} entries)")]
    Full {
        /// Its capacity.
        capacity: usize,
    },
    /// The kernel refused a map update.
    #[error("allow map update failed: {0}")]
    Map(#[source] std::io::Error),
}

/// Where allow entries are written: the userspace table or the eBPF map.
pub trait AllowSink {
    /// Writes every entry or fails; an entry already present gets the later expiry.
    fn write(&mut self, entries: &[AllowEntry]) -> Result<(), AllowError>;
}

/// The allow table of `--no-bpf` mode, shared by all shards: a lock taken once per batch of
/// new entries (never per query; most answers need no write at all).
#[derive(Debug)]
pub struct UserspaceAllowTable {
    entries: RwLock<HashMap<(EndpointKey, IpAddr), Instant>>,
    capacity: usize,
}

impl UserspaceAllowTable {
    /// An empty table holding at most `capacity` entries.
    pub fn new(capacity: usize) -> UserspaceAllowTable {
        UserspaceAllowTable {
            entries: RwLock::new(HashMap::new()),
            capacity,
        }
    }

    /// Whether `endpoint` may reach `ip` at `now`.
    pub fn is_allowed(&self, endpoint: EndpointKey, ip: IpAddr, now: Instant) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .get(&(endpoint, ip))
            .is_some_and(|&expires| expires > now)
    }

    /// Number of entries, expired ones included until the next sweep.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes entries expired at `now`; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let before = entries.len();
        entries.retain(|_, expires| *expires > now);
        before - entries.len()
    }

    /// Writes `batch` (see [`AllowSink::write`]).
    pub fn insert(&self, batch: &[AllowEntry]) -> Result<(), AllowError> {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        for e in batch {
            let len = entries.len();
            match entries.get_mut(&(e.endpoint, e.ip)) {
                Some(expires) => *expires = (*expires).max(e.expires),
                None if len >= self.capacity => {
                    return Err(AllowError::Full {
                        capacity: self.capacity,
                    });
                }
                None => {
                    entries.insert((e.endpoint, e.ip), e.expires);
                }
            }
        }
        Ok(())
    }
}

impl AllowSink for &UserspaceAllowTable {
    fn write(&mut self, entries: &[AllowEntry]) -> Result<(), AllowError> {
        self.insert(entries)
    }
}
