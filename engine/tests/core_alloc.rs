//! Steady state allocates nothing: a counting global allocator watches the core answer
//! thousands of allowed, denied and malformed queries after a warm-up.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use dnsfence_engine::allow::{LedgerConfig, UserspaceAllowTable};
use dnsfence_engine::core::{Client, Core, CoreConfig, Destination};
use dnsfence_engine::wire::TYPE_A;

#[global_allocator]
static GLOBAL: dnsfence_testkit::CountingAllocator = dnsfence_testkit::CountingAllocator;

/// Drives the core through `warm` then `measured` rounds of 64 allowed, 64 denied and 64
/// malformed queries; with `fresh`, every answer carries an address never seen before and a
/// 60 s TTL, so every answer goes through the allow write (ledger, batch, shard memory).
/// Returns the allocations of the measured rounds, the stats and the allow table's size.
fn drive(fresh: bool) -> (u64, dnsfence_engine::core::Stats, usize) {
    let upstream = "127.0.0.53:53".parse().unwrap();
    let mut config = CoreConfig::new(upstream);
    config.max_pending = 1024;
    let mut core = Core::new(config, Arc::new(test_snapshot()));
    let table = UserspaceAllowTable::new(LedgerConfig::default());
    let client = Client::Udp(CLIENT.parse().unwrap());
    let t0 = Instant::now();

    // Pre-built packets: allowed names (answered), denied names, malformed packets.
    let names: Vec<String> = (0..64).map(|i| format!("host{i}.allowed.test")).collect();
    let queries: Vec<Vec<u8>> = names.iter().map(|n| query(7, n, TYPE_A)).collect();
    let denied = query(8, "evil.example.com", TYPE_A);
    let mut malformed = query(9, "x.allowed.test", TYPE_A);
    malformed[5] = 2;
    let mut answers: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::with_capacity(64);
    let mut run = |core: &mut Core, rounds: usize, answers: &mut Vec<Vec<u8>>, first: usize| {
        for round in first..first + rounds {
            let now = t0 + Duration::from_millis(round as u64);
            for (i, q) in queries.iter().enumerate() {
                core.handle_client(now, client, None, q);
                core.handle_client(now, client, None, &denied);
                core.handle_client(now, client, None, &malformed);
                out.clear();
                while let Some(t) = core.poll_transmit() {
                    if let Destination::UpstreamUdp { socket } = t.to {
                        let id = u16::from_be_bytes([t.data[0], t.data[1]]);
                        // The upstream echoes the 0x20 spelling of the question.
                        let mut spelled = [0u8; 32];
                        let n = (t.data.len() - 12).min(32);
                        spelled[..n].copy_from_slice(&t.data[12..12 + n]);
                        out.push((socket, id, spelled));
                    }
                }
                for &(socket, id, spelled) in &out {
                    // Answer buffers are reused across rounds: only the ID changes.
                    if answers.len() <= i {
                        let ip = format!("127.0.1.{i}");
                        answers.push(answer(
                            id,
                            &names[i],
                            TYPE_A,
                            &[(&names[i], TYPE_A, 3600, &rdata_a(&ip))],
                        ));
                    }
                    answers[i][0..2].copy_from_slice(&id.to_be_bytes());
                    if fresh {
                        // A new address per answer (10/8 by a counter), TTL 60.
                        let n = answers[i].len();
                        let fresh_ip = 0x0a00_0000 | (round as u32 * 64 + i as u32);
                        answers[i][n - 4..].copy_from_slice(&fresh_ip.to_be_bytes());
                        answers[i][n - 10..n - 6].copy_from_slice(&60u32.to_be_bytes());
                    }
                    let name_len = names[i].len() + 2;
                    answers[i][12..12 + name_len].copy_from_slice(&spelled[..name_len]);
                    core.handle_upstream(now, socket, upstream, &answers[i]);
                }
                core.handle_timeout(now);
                core.commit_allows(now, &mut &table);
                while core.poll_transmit().is_some() {}
                while core.poll_record().is_some() {}
            }
        }
    };

    run(&mut core, 20, &mut answers, 0);
    let before = dnsfence_testkit::allocations();
    run(&mut core, 100, &mut answers, 20);
    let allocated = dnsfence_testkit::allocations() - before;
    (allocated as u64, *core.stats(), table.len())
}

/// One test (the counter is process-wide and libtest allocates in its own threads): the
/// steady state, then the allow-write path.
#[test]
fn steady_state_and_the_allow_write_path_do_not_allocate() {
    steady_state_queries_do_not_allocate();
    fresh_addresses_through_the_allow_write_path_do_not_allocate();
}

fn steady_state_queries_do_not_allocate() {
    let (allocated, s, _) = drive(false);
    assert_eq!(s.answered, 120 * 64);
    assert_eq!(s.refused, 120 * 64);
    assert_eq!(s.malformed_answered, 120 * 64);
    assert_eq!(
        allocated,
        0,
        "{allocated} allocations for {} queries",
        100 * 64 * 3
    );
}

/// The allow-write path itself (issue 11: measured, not skipped): every answer a new
/// address, written through the ledger, allocates nothing either (tables sized at start;
/// names interned once).
fn fresh_addresses_through_the_allow_write_path_do_not_allocate() {
    let (allocated, s, entries) = drive(true);
    assert_eq!(s.answered, 120 * 64);
    assert_eq!(s.allow_writes, 120 * 64, "every answer wrote its entry");
    assert_eq!(entries, 120 * 64);
    assert_eq!(
        allocated,
        0,
        "{allocated} allocations for {} answers each writing an allow entry",
        100 * 64
    );
}
