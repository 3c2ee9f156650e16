//! The bounded buffer of what the proxy learned while the agent was away (or had not yet
//! acknowledged): observations and flow records, replayed until acknowledged.
//!
//! Items enter with [`ReplayBuffer::push`], leave in numbered batches
//! ([`ReplayBuffer::next_batch`]), and are removed only when the peer acknowledges a batch
//! ([`ReplayBuffer::ack`], cumulative: an ack for `seq` covers every earlier batch). When the
//! connection drops, [`ReplayBuffer::rewind`] puts every unacknowledged item back in line, so
//! the next connection sends them again under new sequence numbers: delivery is
//! at-least-once (a batch whose ack was lost in the disconnect arrives twice; observations are
//! merged as a union, so that is harmless; flow records may be logged twice).
//!
//! When full, a push drops the oldest item (sent or not) and counts it in
//! [`ReplayBuffer::overflowed`]: never silently. Full means `capacity` items, or, for a
//! buffer made by [`ReplayBuffer::with_byte_bound`], items whose weights (an upper bound on
//! each one's persisted size: an observation may carry hundreds of addresses) add up to the
//! byte bound, so that what the buffer holds always fits the state file it is persisted to. Every item pushed is therefore, at any time,
//! acknowledged, counted as overflowed, or still held.
//!
//! Sequence numbers start at 1 and only grow over the life of the buffer (across rewinds), so
//! an ack from an old connection can never be taken for a new batch.
//!
//! Not thread-safe by itself and never blocks: own it in the thread that talks to the agent
//! (or behind a `Mutex` held for a push).

use std::collections::VecDeque;

/// A bounded FIFO of items waiting for the peer's acknowledgement.
#[derive(Debug, Clone)]
pub struct ReplayBuffer<T> {
    items: VecDeque<T>,
    capacity: usize,
    /// The most the held items may weigh, and what they weigh now.
    max_bytes: usize,
    bytes: usize,
    weigh: fn(&T) -> usize,
    /// How many items at the front belong to batches sent and not yet acknowledged.
    in_flight: usize,
    /// Unacknowledged batches, oldest first: (sequence number, items of it still held).
    batches: VecDeque<(u64, usize)>,
    next_seq: u64,
    overflowed: u64,
}

/// A batch to send: its sequence number and its items, oldest first.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch<'a, T> {
    /// Send it with the items; the peer's ack names it.
    pub seq: u64,
    /// The items (borrowed from the buffer: encode them before the next call).
    pub items: &'a [T],
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// It covered `batches` outstanding batches; `items` items were removed (fewer than were
    /// sent when some were dropped by overflow meanwhile).
    Acked {
        /// Batches acknowledged.
        batches: usize,
        /// Items removed.
        items: usize,
    },
    /// No outstanding batch has that number or an older one: a duplicate ack, or one for a
    /// batch abandoned by [`ReplayBuffer::rewind`]. Nothing changed.
    Stale,
    /// A number never handed out: a confused peer. Nothing changed.
    Unknown,
}

impl<T> ReplayBuffer<T> {
    /// An empty buffer holding at most `capacity` items (with 0, every push overflows).
    /// Allocates as items arrive, up to `capacity`.
    pub fn new(capacity: usize) -> ReplayBuffer<T> {
        ReplayBuffer::with_byte_bound(capacity, usize::MAX, |_| 0)
    }

    /// An empty buffer holding at most `capacity` items whose weights (`weigh`: for a buffer
    /// that is persisted, at least the length of an item's encoding) add up to at most
    /// `max_bytes`. An item heavier than `max_bytes` by itself is dropped at its push
    /// (counted as overflowed).
    pub fn with_byte_bound(
        capacity: usize,
        max_bytes: usize,
        weigh: fn(&T) -> usize,
    ) -> ReplayBuffer<T> {
        ReplayBuffer {
            items: VecDeque::new(),
            capacity,
            max_bytes,
            bytes: 0,
            weigh,
            in_flight: 0,
            batches: VecDeque::new(),
            next_seq: 1,
            overflowed: 0,
        }
    }

    /// Adds an item. Returns `false` when the buffer was full and the oldest item was
    /// dropped (and counted in [`ReplayBuffer::overflowed`]) to make room, or, at capacity 0,
    /// the item itself.
    pub fn push(&mut self, item: T) -> bool {
        let weight = (self.weigh)(&item);
        if self.capacity == 0 || weight > self.max_bytes {
            self.overflowed += 1;
            return false;
        }
        let mut kept_all = true;
        while self.items.len() >= self.capacity || self.max_bytes - self.bytes < weight {
            self.drop_oldest();
            kept_all = false;
        }
        self.items.push_back(item);
        self.bytes += weight;
        kept_all
    }

    fn drop_oldest(&mut self) {
        let Some(oldest) = self.items.pop_front() else {
            return;
        };
        self.bytes -= (self.weigh)(&oldest);
        self.overflowed += 1;
        if self.in_flight > 0 {
            self.in_flight -= 1;
            // The oldest held item belongs to the oldest batch that still holds any.
            if let Some(batch) = self.batches.iter_mut().find(|b| b.1 > 0) {
                batch.1 -= 1;
            }
        }
    }

    /// The next batch to send: up to `max` items not in any outstanding batch, under a new
    /// sequence number. `None` (and no number used) when there is nothing to send or `max`
    /// is 0. Several batches may be outstanding at once.
    pub fn next_batch(&mut self, max: usize) -> Option<Batch<'_, T>> {
        let n = self.unsent().min(max);
        if n == 0 {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.batches.push_back((seq, n));
        let start = self.in_flight;
        self.in_flight += n;
        let items = &self.items.make_contiguous()[start..start + n];
        Some(Batch { seq, items })
    }

    /// The peer has everything up to and including batch `seq`: removes the items of every
    /// outstanding batch numbered `seq` or lower.
    pub fn ack(&mut self, seq: u64) -> Ack {
        self.ack_with(seq, drop)
    }

    /// [`ReplayBuffer::ack`], handing each removed item to `take`, oldest first (to keep
    /// what a peer acknowledged but may not have persisted yet).
    pub fn ack_with(&mut self, seq: u64, take: impl FnMut(T)) -> Ack {
        if seq >= self.next_seq {
            return Ack::Unknown;
        }
        let mut batches = 0;
        let mut items = 0;
        while let Some(&(s, n)) = self.batches.front() {
            if s > seq {
                break;
            }
            self.batches.pop_front();
            batches += 1;
            items += n;
        }
        if batches == 0 {
            return Ack::Stale;
        }
        let (weigh, mut freed, mut take) = (self.weigh, 0, take);
        self.items.drain(..items).for_each(|item| {
            freed += weigh(&item);
            take(item);
        });
        self.bytes -= freed;
        self.in_flight -= items;
        Ack::Acked { batches, items }
    }

    /// The connection is gone: forgets the outstanding batches, so their items go out again
    /// (first, in order) in the next batches. Returns how many items were put back.
    pub fn rewind(&mut self) -> usize {
        self.batches.clear();
        std::mem::take(&mut self.in_flight)
    }

    /// Items held (sent and unacknowledged, or not sent yet).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items not in any outstanding batch.
    pub fn unsent(&self) -> usize {
        self.items.len() - self.in_flight
    }

    /// Items in outstanding batches.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Outstanding (sent, unacknowledged) batches.
    pub fn outstanding_batches(&self) -> usize {
        self.batches.len()
    }

    /// The most items held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// What the held items weigh (see [`ReplayBuffer::with_byte_bound`]; 0 without a bound).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most the held items may weigh.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Items dropped because the buffer was full, over its whole life (a metric:
    /// `..._replay_overflow_total`).
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Iterates over the held items, oldest first (to persist them at shutdown).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &T> {
        self.items.iter()
    }
}
