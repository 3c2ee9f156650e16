//! The replay buffer: overflow counting, ack/rewind, and a model-based test against a Vec.

use dnsfence_sync::replay::{Ack, Batch, ReplayBuffer};
use proptest::prelude::*;

fn filled(capacity: usize, items: std::ops::Range<u32>) -> ReplayBuffer<u32> {
    let mut b = ReplayBuffer::new(capacity);
    for i in items {
        b.push(i);
    }
    b
}

fn batch(b: &mut ReplayBuffer<u32>, max: usize) -> (u64, Vec<u32>) {
    let Batch { seq, items } = b.next_batch(max).expect("a batch");
    (seq, items.to_vec())
}

#[test]
fn overflow_drops_the_oldest_and_counts_it() {
    let mut b = ReplayBuffer::new(3);
    assert!(b.push(1) && b.push(2) && b.push(3));
    assert_eq!(b.overflowed(), 0);
    assert!(!b.push(4));
    assert!(!b.push(5));
    assert_eq!(b.overflowed(), 2);
    assert_eq!(b.len(), 3);
    assert_eq!(b.iter().copied().collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(batch(&mut b, 10), (1, vec![3, 4, 5]));

    // Capacity 0 keeps nothing and counts everything.
    let mut z = ReplayBuffer::new(0);
    assert!(!z.push(1));
    assert_eq!((z.len(), z.overflowed()), (0, 1));
    assert!(z.next_batch(1).is_none());
}

#[test]
fn overflow_of_items_already_sent() {
    let mut b = filled(4, 0..4);
    assert_eq!(batch(&mut b, 2), (1, vec![0, 1]));
    assert_eq!(batch(&mut b, 1), (2, vec![2]));
    // Two pushes drop 0 and 1: batch 1 now holds nothing.
    b.push(4);
    b.push(5);
    assert_eq!((b.in_flight(), b.unsent(), b.overflowed()), (1, 3, 2));
    // A third drops 2, of batch 2.
    b.push(6);
    assert_eq!((b.in_flight(), b.unsent()), (0, 4));
    // Both batches are still known to the ack, and remove nothing.
    assert_eq!(
        b.ack(2),
        Ack::Acked {
            batches: 2,
            items: 0
        }
    );
    assert_eq!(b.iter().copied().collect::<Vec<_>>(), [3, 4, 5, 6]);
    assert_eq!(batch(&mut b, 10), (3, vec![3, 4, 5, 6]));
}

#[test]
fn ack_with_hands_over_exactly_what_it_removes() {
    let mut b = filled(10, 0..6);
    let (s1, _) = batch(&mut b, 2);
    let (s2, _) = batch(&mut b, 2);
    let mut taken = Vec::new();
    assert_eq!(
        b.ack_with(s1, |i| taken.push(i)),
        Ack::Acked {
            batches: 1,
            items: 2
        }
    );
    assert_eq!(taken, [0, 1]);
    // Stale and unknown acks hand nothing over.
    assert_eq!(b.ack_with(s1, |i| taken.push(i)), Ack::Stale);
    assert_eq!(b.ack_with(99, |i| taken.push(i)), Ack::Unknown);
    assert_eq!(taken, [0, 1]);
    assert_eq!(
        b.ack_with(s2, |i| taken.push(i)),
        Ack::Acked {
            batches: 1,
            items: 2
        }
    );
    assert_eq!(taken, [0, 1, 2, 3]);
    assert_eq!(b.iter().copied().collect::<Vec<_>>(), [4, 5]);
}

#[test]
fn ack_removes_what_the_batches_held() {
    let mut b = filled(10, 0..6);
    assert_eq!(
        b.next_batch(0),
        None,
        "max 0 sends nothing and uses no number"
    );
    assert_eq!(batch(&mut b, 2), (1, vec![0, 1]));
    assert_eq!(batch(&mut b, 2), (2, vec![2, 3]));
    assert_eq!(batch(&mut b, 5), (3, vec![4, 5]));
    assert_eq!(b.next_batch(5), None);
    assert_eq!(b.outstanding_batches(), 3);
    assert_eq!(
        b.ack(1),
        Ack::Acked {
            batches: 1,
            items: 2
        }
    );
    assert_eq!(b.iter().copied().collect::<Vec<_>>(), [2, 3, 4, 5]);
    // Cumulative: 3 covers 2 as well.
    assert_eq!(
        b.ack(3),
        Ack::Acked {
            batches: 2,
            items: 4
        }
    );
    assert!(b.is_empty());
    assert_eq!(b.next_seq(), 4);
}

#[test]
fn duplicate_stale_and_unknown_acks_change_nothing() {
    let mut b = filled(10, 0..4);
    let (s1, _) = batch(&mut b, 2);
    assert_eq!(
        b.ack(s1),
        Ack::Acked {
            batches: 1,
            items: 2
        }
    );
    assert_eq!(b.ack(s1), Ack::Stale, "duplicate");
    assert_eq!(b.ack(0), Ack::Stale, "numbers start at 1");
    let (s2, _) = batch(&mut b, 1);
    assert_eq!(b.ack(s2 + 1), Ack::Unknown, "never handed out");
    assert_eq!(b.ack(u64::MAX), Ack::Unknown);
    assert_eq!((b.len(), b.in_flight()), (2, 1));
    // An ack for a batch abandoned by a rewind is stale, even though its items are held.
    b.rewind();
    assert_eq!(b.ack(s2), Ack::Stale);
    assert_eq!((b.len(), b.in_flight(), b.unsent()), (2, 0, 2));
}

#[test]
fn rewind_resends_everything_unacknowledged_in_order() {
    let mut b = filled(10, 0..5);
    assert_eq!(batch(&mut b, 2), (1, vec![0, 1]));
    assert_eq!(batch(&mut b, 2), (2, vec![2, 3]));
    assert_eq!(
        b.ack(1),
        Ack::Acked {
            batches: 1,
            items: 2
        }
    );
    // The connection drops with batch 2 in flight.
    assert_eq!(b.rewind(), 2);
    assert_eq!(b.rewind(), 0);
    b.push(5);
    // Numbers keep growing; nothing is lost or reordered.
    assert_eq!(batch(&mut b, 10), (3, vec![2, 3, 4, 5]));
    assert_eq!(
        b.ack(3),
        Ack::Acked {
            batches: 1,
            items: 4
        }
    );
    assert!(b.is_empty());
    assert_eq!(b.overflowed(), 0);
}

/// An item's weight under a byte bound in these tests.
fn weight(x: &u32) -> usize {
    (*x % 16) as usize
}

/// The obvious implementation: every item carries the batch it was sent in, if any.
#[derive(Debug, Default)]
struct Model {
    capacity: usize,
    /// The byte bound (None: none), items weighing [`weight`].
    max_bytes: Option<usize>,
    items: Vec<(u32, Option<u64>)>,
    outstanding: Vec<u64>,
    next_seq: u64,
    overflowed: u64,
}

impl Model {
    fn push(&mut self, x: u32) -> bool {
        let max = self.max_bytes.unwrap_or(usize::MAX);
        if self.capacity == 0 || weight(&x) > max {
            self.overflowed += 1;
            return false;
        }
        let mut full = false;
        while self.items.len() == self.capacity || self.bytes() + weight(&x) > max {
            self.items.remove(0);
            self.overflowed += 1;
            full = true;
        }
        self.items.push((x, None));
        !full
    }

    fn bytes(&self) -> usize {
        match self.max_bytes {
            Some(_) => self.items.iter().map(|(x, _)| weight(x)).sum(),
            None => 0,
        }
    }

    fn next_batch(&mut self, max: usize) -> Option<(u64, Vec<u32>)> {
        let unsent: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.items[i].1.is_none())
            .take(max)
            .collect();
        if unsent.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.push(seq);
        for &i in &unsent {
            self.items[i].1 = Some(seq);
        }
        Some((seq, unsent.iter().map(|&i| self.items[i].0).collect()))
    }

    fn ack(&mut self, seq: u64) -> Ack {
        if seq >= self.next_seq {
            return Ack::Unknown;
        }
        let batches = self.outstanding.iter().filter(|&&s| s <= seq).count();
        if batches == 0 {
            return Ack::Stale;
        }
        self.outstanding.retain(|&s| s > seq);
        let before = self.items.len();
        self.items
            .retain(|(_, b)| !matches!(b, Some(b) if *b <= seq));
        Ack::Acked {
            batches,
            items: before - self.items.len(),
        }
    }

    fn rewind(&mut self) -> usize {
        self.outstanding.clear();
        let mut n = 0;
        for (_, b) in &mut self.items {
            n += usize::from(b.take().is_some());
        }
        n
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push(u32),
    Batch(usize),
    /// Ack the batch this many back from the newest number handed out (0: the newest), or
    /// past it when negative.
    Ack(i64),
    Rewind,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u32>().prop_map(Op::Push),
        2 => (0usize..5).prop_map(Op::Batch),
        2 => (-2i64..6).prop_map(Op::Ack),
        1 => Just(Op::Rewind),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn matches_the_model(
        capacity in 0usize..8,
        max_bytes in proptest::option::of(0usize..40),
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let mut real = match max_bytes {
            Some(max) => ReplayBuffer::with_byte_bound(capacity, max, weight),
            None => ReplayBuffer::new(capacity),
        };
        let mut model = Model { capacity, max_bytes, next_seq: 1, ..Model::default() };
        let (mut pushed, mut acked) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Push(x) => {
                    pushed += 1;
                    prop_assert_eq!(real.push(x), model.push(x));
                }
                Op::Batch(max) => {
                    let got = real.next_batch(max).map(|b| (b.seq, b.items.to_vec()));
                    prop_assert_eq!(got, model.next_batch(max));
                }
                Op::Ack(back) => {
                    let seq = (model.next_seq as i64 - 1 - back).max(0) as u64;
                    let got = real.ack(seq);
                    prop_assert_eq!(got, model.ack(seq));
                    if let Ack::Acked { items, .. } = got {
                        acked += items as u64;
                    }
                }
                Op::Rewind => prop_assert_eq!(real.rewind(), model.rewind()),
            }
            prop_assert_eq!(real.len(), model.items.len());
            prop_assert_eq!(
                real.iter().copied().collect::<Vec<_>>(),
                model.items.iter().map(|(x, _)| *x).collect::<Vec<_>>()
            );
            let in_flight = model.items.iter().filter(|(_, b)| b.is_some()).count();
            prop_assert_eq!(real.in_flight(), in_flight);
            prop_assert_eq!(real.unsent(), model.items.len() - in_flight);
            prop_assert_eq!(real.outstanding_batches(), model.outstanding.len());
            prop_assert_eq!(real.overflowed(), model.overflowed);
            prop_assert_eq!(real.next_seq(), model.next_seq);
            prop_assert!(real.len() <= capacity);
            prop_assert_eq!(real.bytes(), model.bytes());
            prop_assert!(real.bytes() <= max_bytes.unwrap_or(usize::MAX));
            // Nothing is lost silently: every item pushed is acknowledged, counted as
            // overflowed, or still held.
            prop_assert_eq!(pushed, acked + real.overflowed() + real.len() as u64);
        }
    }
}
