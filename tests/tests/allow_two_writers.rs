//! The agent and the standalone proxy write one pinned allow map, each with its own ledger
//! (root; a real pinned map): an entry's expiry only grows whoever writes it, and one
//! process's expiry sweep never removes an entry the other extended.
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_datapath::{BpfAllow, Datapath};
use dnsfence_engine::allow::{AllowBatch, AllowKey, AllowSink, LedgerConfig, PortSpec};
use dnsfence_matcher::Name;
use dnsfence_policy::EndpointKey;
use dnsfence_tests::bpf::{EXCLUSIVE, Env, require_root};

fn key(ip: &str) -> AllowKey {
    AllowKey {
        endpoint: EndpointKey(7),
        ip: ip.parse::<IpAddr>().expect("address"),
        ports: PortSpec {
            lo: 443,
            hi: 443,
            protos: PortSpec::TCP,
        },
    }
}

/// Writes `key` until `ttl` from now through `sink`; whether the group was written.
fn write(sink: &mut BpfAllow, key: AllowKey, ttl: Duration) -> bool {
    let mut batch = AllowBatch::with_capacity(4);
    batch.begin_group(&Name::from_text("www.example.test").expect("name"));
    batch.push(key, Instant::now() + ttl);
    sink.write(Instant::now(), &mut batch);
    batch.groups[0].ok
}

/// The entries in the pinned map now (a fresh sink's ledger is seeded from it), after a
/// sweep of the expired ones as the map says.
fn live_entries(pin: &std::path::Path) -> usize {
    let fresh = BpfAllow::open_pinned(pin, LedgerConfig::default()).expect("open");
    fresh.sweep(1024);
    fresh.stats().entries
}

#[test]
fn two_writers_never_shorten_or_sweep_each_others_entries() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("twowriters", &["a"]);
    let mut datapath = env.install_allow(1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");

    // The agent opens for a minute; the proxy's shorter write of the same entry does not
    // shorten it.
    assert!(write(
        &mut agent,
        key("127.0.0.81"),
        Duration::from_secs(60)
    ));
    assert!(write(
        &mut proxy,
        key("127.0.0.81"),
        Duration::from_millis(300)
    ));
    // The proxy opens for 300 ms; the agent (whose ledger never saw it) extends it.
    assert!(write(
        &mut proxy,
        key("127.0.0.82"),
        Duration::from_millis(300)
    ));
    assert!(write(
        &mut agent,
        key("127.0.0.82"),
        Duration::from_secs(60)
    ));
    // One only the proxy wrote expires.
    assert!(write(
        &mut proxy,
        key("127.0.0.83"),
        Duration::from_millis(300)
    ));
    assert_eq!(live_entries(&env.pin), 3);

    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        proxy.sweep(1024),
        3,
        "the proxy's ledger sees three expired"
    );
    assert_eq!(
        live_entries(&env.pin),
        2,
        "the agent's two minute-long entries stay in the map"
    );
    // The proxy's ledger took the map's expiry back: its next sweep removes nothing.
    assert_eq!(proxy.sweep(1024), 0);
    assert_eq!(proxy.stats().entries, 2);
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// Review finding: a reload revokes what the new policy does not justify whichever process
/// wrote it (the agent's ledger takes the proxy's entries in first).
#[test]
fn a_revocation_covers_the_other_writers_entries() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworevoke", &["a"]);
    let mut datapath = env.install_allow(1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");
    assert!(write(
        &mut agent,
        key("127.0.0.91"),
        Duration::from_secs(3600)
    ));
    assert!(write(
        &mut proxy,
        key("127.0.0.92"),
        Duration::from_secs(3600)
    ));
    assert_eq!(live_entries(&env.pin), 2);
    // A policy that justifies nothing: both entries go, the proxy's too.
    let revoked = agent.revoke(std::sync::Arc::new(dnsfence_policy::Snapshot::empty()));
    assert_eq!(revoked, 2);
    assert_eq!(live_entries(&env.pin), 0);
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

fn write_many(sink: &mut BpfAllow, keys: &[AllowKey], ttl: Duration) -> usize {
    let mut ok = 0;
    for (i, k) in keys.iter().enumerate() {
        let mut batch = AllowBatch::with_capacity(4);
        batch.begin_group(&Name::from_text(&format!("n{}.example.test", i % 100)).expect("name"));
        batch.push(*k, Instant::now() + ttl);
        sink.write(Instant::now(), &mut batch);
        ok += usize::from(batch.groups[0].ok);
    }
    ok
}

/// Entries in the pinned map (a fresh sink's ledger is seeded from it).
fn map_entries(pin: &std::path::Path) -> usize {
    BpfAllow::open_pinned(pin, LedgerConfig::default())
        .expect("open")
        .stats()
        .entries
}

/// Review finding: one writer's sweep (read the map's expiry, then remove) must never remove
/// an entry the other writer wrote in between (its ledger would believe it lives, and its
/// answers would be released with nothing behind them): both take the writers' lock. A race,
/// so the test is probabilistic: without the lock it failed in about half of its runs here.
#[test]
fn a_sweep_never_removes_an_entry_the_other_writer_just_wrote() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworace", &["a"]);
    let mut datapath = env.install_allow(65536);
    let cfg = LedgerConfig {
        capacity: 65536,
        ..LedgerConfig::default()
    };
    let agent = datapath.allow_sink(cfg).expect("sink");
    let mut proxy = Some(BpfAllow::open_pinned(&env.pin, cfg).expect("open"));
    let mut lost_total = 0;
    let mut rounds = 0;
    for round in 0..60u32 {
        rounds += 1;
        let keys: Vec<AllowKey> = (0..2000u32)
            .map(|i| key(&std::net::Ipv4Addr::from(0x0a00_0000 + round * 4096 + i).to_string()))
            .collect();
        let mut a = agent.clone();
        assert_eq!(
            write_many(&mut a, &keys, Duration::from_millis(20)),
            keys.len()
        );
        std::thread::sleep(Duration::from_millis(40));
        // The proxy writes in another order (answers arrive in any order).
        let mut pkeys = keys.clone();
        let mut x = 0x9e37_79b9u64 + u64::from(round);
        for i in (1..pkeys.len()).rev() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            pkeys.swap(i, (x >> 33) as usize % (i + 1));
        }
        let mut p = proxy.take().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let b2 = std::sync::Arc::clone(&barrier);
        let writer = std::thread::spawn(move || {
            b2.wait();
            let n = write_many(&mut p, &pkeys, Duration::from_secs(600));
            (p, n)
        });
        barrier.wait();
        while agent.sweep(16) > 0 {}
        let (p, n) = writer.join().unwrap();
        assert_eq!(n, keys.len());
        let in_map = map_entries(&env.pin);
        let believed = p.stats().entries;
        let lost = believed.saturating_sub(in_map);
        lost_total += lost;
        if lost > 0 {
            eprintln!(
                "round {round}: proxy's ledger holds {believed} live entries, the map {in_map}: {lost} just-written entries removed by the agent's sweep"
            );
            break;
        }
        let _ = p.revoke(std::sync::Arc::new(dnsfence_policy::Snapshot::empty()));
        proxy = Some(p);
    }
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
    assert_eq!(
        lost_total, 0,
        "entries lost to the sweep race in {rounds} rounds"
    );
}

/// Writes `key` for `name` until `ttl` from now through `sink`; whether the group was
/// written.
fn write_for(sink: &mut BpfAllow, name: &str, key: AllowKey, ttl: Duration) -> bool {
    let mut batch = AllowBatch::with_capacity(4);
    batch.begin_group(&Name::from_text(name).expect("name"));
    batch.push(key, Instant::now() + ttl);
    sink.write(Instant::now(), &mut batch);
    batch.groups[0].ok
}

/// A snapshot where endpoint default/a may reach `name` on TCP 443 (loopback opened).
fn fqdn_snapshot(name: &str) -> dnsfence_policy::Snapshot {
    fqdn_snapshot_of(&[name])
}

/// A snapshot where endpoint default/a may reach `names` on TCP 443 (loopback opened).
fn fqdn_snapshot_of(names: &[&str]) -> dnsfence_policy::Snapshot {
    let names: Vec<String> = names
        .iter()
        .map(|n| format!("{{matchName: \"{n}\"}}"))
        .collect();
    let names = names.join(", ");
    let text = format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - toFQDNs: [{names}]
    toPorts: [{{ports: [{{port: "443", protocol: TCP}}]}}]
"#
    );
    // The test's addresses are in 127.0.0.0/8: opened as by `--open-loopback-answers`.
    let node = dnsfence_policy::cidr::NodeFacts {
        open_loopback: true,
        ..Default::default()
    };
    dnsfence_tests::bpf::compile_a(&text, &node)
}

/// Review finding: one address answered for two names, one per writer. A reload that drops
/// the first writer's name removed the entry from the map while the second writer's ledger,
/// whose name the reload keeps, still held it: its next answers needed "no change" and were
/// released with the address closed, until the TTL ran out. The second writer now puts the
/// entry back: at once for an answer that needs it, and by its repair for the others.
#[test]
fn an_entry_one_writer_revokes_is_put_back_by_the_other_that_still_justifies_it() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworepair", &["a"]);
    let mut datapath = env.install(None, 1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");
    let endpoint = EndpointKey::of("default", "a");
    let [k1, k2, k3] = ["127.0.0.71", "127.0.0.72", "127.0.0.73"].map(|ip| AllowKey {
        endpoint,
        ..key(ip)
    });
    let hour = Duration::from_secs(3600);
    for k in [k1, k2] {
        assert!(write_for(&mut agent, "x.example.test", k, hour));
        assert!(write_for(&mut proxy, "y.example.test", k, hour));
    }
    assert_eq!(map_entries(&env.pin), 2);
    // The proxy has the new policy (it keeps y, drops x): nothing of its own goes.
    let keeps_y = std::sync::Arc::new(fqdn_snapshot("y.example.test"));
    assert_eq!(proxy.revoke(std::sync::Arc::clone(&keeps_y)), 0);
    // k3 only the agent wrote, for x; the proxy takes it into its books (its periodic
    // adopt), unjudged.
    assert!(write_for(&mut agent, "x.example.test", k3, hour));
    assert_eq!(proxy.adopt(), 1);
    // The agent's reload: its entries, known to it by x, leave the map.
    assert_eq!(agent.revoke(keeps_y), 3);
    assert_eq!(map_entries(&env.pin), 0, "the reload removed all three");
    assert_eq!(agent.repair(), 0, "the agent's own removal needs no repair");
    // The proxy's next answer for y needs k1: written again, not taken as "no change".
    assert!(write_for(
        &mut proxy,
        "y.example.test",
        k1,
        Duration::from_secs(60)
    ));
    assert_eq!(map_entries(&env.pin), 1, "the answer's entry is back");
    // k2, which no answer has needed since, comes back with the repair; k3, which the
    // proxy's policy does not justify (x), does not, and leaves its books.
    assert_eq!(proxy.repair(), 1);
    assert_eq!(map_entries(&env.pin), 2);
    let stats = proxy.stats();
    assert_eq!((stats.repaired, stats.repair_dropped), (1, 1), "{stats:?}");
    assert_eq!(
        proxy.repair_scans(),
        (1, 0),
        "the three keys read from the removal ring, not the whole ledger"
    );
    // Checked: no more rewrites of entries the ledger holds long enough, nothing to repair.
    let verified = proxy.stats().verified;
    assert!(write_for(
        &mut proxy,
        "y.example.test",
        k1,
        Duration::from_secs(60)
    ));
    assert_eq!(proxy.stats().verified, verified);
    assert_eq!(proxy.repair(), 0);
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// `snapshot` marked as compiled from the policy texts numbered `id` (as `ha::policy_id`
/// marks the agent's and the proxy's).
fn with_id(mut snapshot: dnsfence_policy::Snapshot, id: u64) -> Arc<dnsfence_policy::Snapshot> {
    snapshot.set_policy_id(id);
    Arc::new(snapshot)
}

/// Review finding (HA): a proxy whose policy is older than the agent's (the agent's new
/// snapshot not compiled yet, or the proxy cut off from the agent) put back, at its next
/// repair (every 50 ms), every entry the agent's newer policy revoked that the proxy's older
/// one still justified, for as long as it lagged. The agent publishes the identity of the
/// policy it revokes under; the proxy's repair waits until it has that policy, then puts
/// back only what that policy justifies.
#[test]
fn a_proxy_behind_the_agents_policy_puts_nothing_back_until_it_has_that_policy() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("twobehind", &["a"]);
    let mut datapath = env.install(None, 1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");
    let endpoint = EndpointKey::of("default", "a");
    let [k1, k2] = ["127.0.0.51", "127.0.0.52"].map(|ip| AllowKey {
        endpoint,
        ..key(ip)
    });
    let hour = Duration::from_secs(3600);
    // Policy 1 allows x and y, in both processes.
    let xy = with_id(fqdn_snapshot_of(&["x.example.test", "y.example.test"]), 1);
    assert_eq!(agent.revoke(Arc::clone(&xy)), 0);
    assert_eq!(proxy.revoke(xy), 0);
    // k1 answered for x by the agent and for y by the proxy; k2 for y by the proxy only.
    assert!(write_for(&mut agent, "x.example.test", k1, hour));
    assert!(write_for(&mut proxy, "y.example.test", k1, hour));
    assert!(write_for(&mut proxy, "y.example.test", k2, hour));
    assert_eq!(map_entries(&env.pin), 2);

    // The agent's policy 2 keeps y only: its x entry k1 leaves the map (k2, taken into its
    // books by name y, stays).
    let y = with_id(fqdn_snapshot("y.example.test"), 2);
    assert_eq!(agent.revoke(Arc::clone(&y)), 1);
    assert_eq!(map_entries(&env.pin), 1);
    // The proxy, still on policy 1, waits: k1 stays out (fail closed) for now.
    assert_eq!(proxy.repair(), 0, "the repair waits for the agent's policy");
    assert_eq!(map_entries(&env.pin), 1);
    assert_eq!(proxy.stats().repairs_deferred, 1);
    assert_eq!(agent.repair(), 0);
    // Policy 2 reaches the proxy: the repair judges the removed key by it, and y justifies k1.
    assert_eq!(proxy.revoke(y), 0);
    assert_eq!(
        proxy.repair(),
        1,
        "k1 is back, justified by y under policy 2"
    );
    assert_eq!(map_entries(&env.pin), 2);

    // The agent's policy 3 allows nothing: both entries leave the map.
    let none = with_id(dnsfence_policy::Snapshot::empty(), 3);
    assert_eq!(agent.revoke(Arc::clone(&none)), 2);
    assert_eq!(map_entries(&env.pin), 0);
    // The proxy, on policy 2 (which justifies both), puts neither back.
    for _ in 0..3 {
        assert_eq!(proxy.repair(), 0, "nothing put back under an older policy");
    }
    assert_eq!(map_entries(&env.pin), 0);
    assert!(proxy.stats().repairs_deferred >= 2);
    // Policy 3 reaches the proxy: its books follow, nothing comes back.
    assert_eq!(proxy.revoke(none), 2);
    assert_eq!(proxy.repair(), 0);
    assert_eq!(map_entries(&env.pin), 0);
    let stats = proxy.stats();
    assert_eq!(stats.repaired, 1, "{stats:?}");
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// Review finding: a standalone proxy serving its persisted policy has no snapshot in its
/// ledger until the agent's first arrives. Its repair then puts back what its own answers
/// wrote, and drops what it only took in from the map (it cannot judge those).
#[test]
fn without_a_snapshot_the_repair_puts_back_only_its_own_entries() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworepair0", &["a"]);
    let mut datapath = env.install(None, 1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let hour = Duration::from_secs(3600);
    // The agent's entry is in the map when the proxy opens it: taken in, not its own.
    assert!(write_for(
        &mut agent,
        "x.example.test",
        key("127.0.0.61"),
        hour
    ));
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");
    assert!(write_for(
        &mut proxy,
        "y.example.test",
        key("127.0.0.62"),
        hour
    ));
    assert_eq!(map_entries(&env.pin), 2);
    // A reload that justifies nothing: the agent takes both out (the proxy's too).
    let none = std::sync::Arc::new(dnsfence_policy::Snapshot::empty());
    assert_eq!(agent.revoke(none), 2);
    assert_eq!(map_entries(&env.pin), 0);
    assert_eq!(proxy.repair(), 1, "the proxy's own entry is back");
    assert_eq!(map_entries(&env.pin), 1);
    let stats = proxy.stats();
    assert_eq!((stats.repaired, stats.repair_dropped), (1, 1), "{stats:?}");
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// A revocation that takes out more entries than the removal ring holds: the other writer's
/// repair cannot know them all from the ring and checks its whole ledger instead.
#[test]
fn a_removal_ring_overrun_falls_back_to_the_whole_ledger() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworing", &["a"]);
    let mut datapath = env.install_allow(8192);
    let cfg = LedgerConfig {
        capacity: 8192,
        per_endpoint: 8192,
        per_name: 8192,
    };
    let mut agent = datapath.allow_sink(cfg).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, cfg).expect("open");
    let endpoint = EndpointKey::of("default", "a");
    let at = |i: u32| AllowKey {
        endpoint,
        ..key(&std::net::Ipv4Addr::from(0x7f00_1000 + i).to_string())
    };
    let hour = Duration::from_secs(3600);
    // 2,500 entries of the agent's, for x (more than the ring's 2,046 slots); the proxy
    // holds the first for y too.
    for i in 0..2500 {
        assert!(write_for(&mut agent, "x.example.test", at(i), hour), "{i}");
    }
    assert!(write_for(&mut proxy, "y.example.test", at(0), hour));
    let keeps_y = std::sync::Arc::new(fqdn_snapshot("y.example.test"));
    assert_eq!(agent.revoke(keeps_y), 2500);
    assert_eq!(map_entries(&env.pin), 0);
    assert_eq!(agent.repair(), 0);
    assert_eq!(proxy.repair(), 1);
    assert_eq!(proxy.repair_scans(), (0, 1), "the ring was overrun");
    assert_eq!(map_entries(&env.pin), 1);
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// Review finding: a writer that bumps the epoch without giving the ring its keys (an older
/// build, or one that could not take the lock) followed by a bump that gave them made the
/// ring look complete, and the keys of the first were never checked. The repair counts the
/// bumps that gave keys against all bumps since it last looked.
#[test]
fn a_bump_without_keys_makes_the_repair_check_the_whole_ledger() {
    use std::os::unix::fs::FileExt;
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("tworingold", &["a"]);
    let mut datapath = env.install(None, 1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    let mut proxy = BpfAllow::open_pinned(&env.pin, LedgerConfig::default()).expect("open");
    let endpoint = EndpointKey::of("default", "a");
    let [k1, k2] = ["127.0.0.51", "127.0.0.52"].map(|ip| AllowKey {
        endpoint,
        ..key(ip)
    });
    let hour = Duration::from_secs(3600);
    assert!(write_for(&mut agent, "x.example.test", k1, hour));
    assert!(write_for(&mut proxy, "y.example.test", k1, hour));
    assert!(write_for(&mut proxy, "z.example.test", k2, hour));
    // An older build's agent takes k1 out: removed from the map, the epoch moved, no keys.
    let map = dnsfence_datapath::loader::maps_dir(&env.pin).join("df_allow");
    let mut k = endpoint.0.to_ne_bytes().to_vec();
    k.extend_from_slice(&dnsfence_datapath::maps::Addr::of(k1.ip).0);
    k.extend_from_slice(&443u16.to_ne_bytes());
    k.extend_from_slice(&443u16.to_ne_bytes());
    k.extend_from_slice(&[PortSpec::TCP, 0, 0, 0]);
    let mut args = vec![
        "map".to_owned(),
        "delete".into(),
        "pinned".into(),
        map.display().to_string(),
        "key".into(),
        "hex".into(),
    ];
    args.extend(k.iter().map(|b| format!("{b:02x}")));
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dnsfence_datapath::loader::allow_lock_path(&env.pin))
        .expect("the writers' lock file");
    let mut epoch = [0u8; 8];
    lock.read_exact_at(&mut epoch, 0).expect("read the epoch");
    let bumped = u64::from_ne_bytes(epoch) + 1;
    lock.write_all_at(&bumped.to_ne_bytes(), 0)
        .expect("bump the epoch");
    assert_eq!(map_entries(&env.pin), 1);
    // The proxy takes the same snapshot and takes out k2 (z) itself: a bump with its keys.
    let keeps_y = std::sync::Arc::new(fqdn_snapshot("y.example.test"));
    assert_eq!(proxy.revoke(keeps_y), 1);
    assert_eq!(map_entries(&env.pin), 0);
    // The ring holds k2 only: the repair must look at the whole ledger to find k1.
    assert_eq!(proxy.repair(), 1);
    assert_eq!(proxy.repair_scans(), (0, 1));
    assert_eq!(map_entries(&env.pin), 1);
    drop(datapath);
    let _ = Datapath::uninstall(&env.pin);
}

/// A writer holding the writers' lock for long (stopped, frozen, being killed) does not stall
/// the other's writes for ever: one write waits a second, then writes without the lock, and
/// the next ones do not wait (review finding: a blocking flock, taken behind the ledger's
/// mutex, stalled every shard needing a write).
#[test]
fn a_writer_stuck_holding_the_lock_does_not_stall_the_other() {
    if !require_root("allow_two_writers") {
        return;
    }
    let _serial = EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner());
    let env = Env::new("stucklock", &["a"]);
    let mut datapath = env.install_allow(1024);
    let mut agent = datapath.allow_sink(LedgerConfig::default()).expect("sink");
    // The other writer, stuck with the lock (held here, in another open file description).
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dnsfence_datapath::loader::allow_lock_path(&env.pin))
        .expect("the writers' lock file");
    held.lock().expect("flock");
    // The first write waits out the patience (1 s, far past a working writer's holds)...
    let start = Instant::now();
    assert!(write(
        &mut agent,
        key("127.0.0.91"),
        Duration::from_secs(60)
    ));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "the first write waited {took:?}"
    );
    // ... and the next ones do not wait while the holder stays stuck.
    let start = Instant::now();
    assert!(write(
        &mut agent,
        key("127.0.0.92"),
        Duration::from_secs(60)
    ));
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "the next write waited {took:?}"
    );
    assert_eq!(live_entries(&env.pin), 2);
    held.unlock().expect("unlock");
    // Taken again once free (which ends the back-off for the tests after this one).
    let start = Instant::now();
    assert!(write(
        &mut agent,
        key("127.0.0.93"),
        Duration::from_secs(60)
    ));
    assert!(start.elapsed() < Duration::from_millis(200));
    drop(datapath);
}
