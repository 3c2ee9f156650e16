//! The CI performance gate: instruction counts of the hot paths under callgrind, compared with
//! committed baselines (`bench/gate/baselines.txt`). See `BENCHMARKING.md` at the repository
//! root.
//!
//! ```text
//! gate check [--baselines FILE] [--tolerance PCT] [--update] [--only NAME,...] [--jobs N]
//! gate run NAME ITERS      # the workload alone (what `check` runs under valgrind)
//! gate list                # the workload names
//! ```
//!
//! `check` runs `valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect=*gate_measured*` on this same executable with `run NAME ITERS` for every
//! workload, so only the measured loop is counted (setup, policy compilation and warm-up are
//! not), reads the `totals:` line, divides by ITERS and compares with the baseline: more than
//! `--tolerance` percent (default 5) above it fails (exit 1). `--update` rewrites the baselines
//! file with the measured figures instead.
//!
//! Instruction counts do not depend on machine load, so the gate is stable on noisy CI runners;
//! they do depend on the code, the compiler version and the profile (`[profile.gate]`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dnsfence_bench::{build, patterns, queries, to_wire};
use dnsfence_engine::allow::{LedgerConfig, UserspaceAllowTable};
use dnsfence_engine::core::{Client, Core, CoreConfig, Destination};
use dnsfence_engine::wire::{self, CLASS_IN, TYPE_A, TYPE_AAAA};
use dnsfence_matcher::{Matcher, Name};
use dnsfence_policy::{Endpoints, PolicySet, Snapshot};

/// Pattern-set seed, as in the criterion benches and `lookup_loop`.
const SEED: u64 = 0x00d5_fe5e;

/// The workloads: name, iterations counted, what one iteration is.
const WORKLOADS: &[(&str, u64, &str)] = &[
    (
        "matcher/is_match/10",
        4 * 4096,
        "one `is_match` on a parsed `Name`, 10 patterns",
    ),
    (
        "matcher/is_match/10k",
        4 * 4096,
        "one `is_match` on a parsed `Name`, 10k patterns",
    ),
    (
        "matcher/wire+is_match/10",
        4 * 4096,
        "`Name::from_wire` + `is_match`, 10 patterns",
    ),
    (
        "matcher/wire+is_match/10k",
        4 * 4096,
        "`Name::from_wire` + `is_match`, 10k patterns",
    ),
    (
        "matcher/wire+is_match/100k-cold",
        COLD_NAMES as u64,
        "`Name::from_wire` + `is_match`, 100k patterns, 64k distinct names each once",
    ),
    (
        "matcher/wire+is_match/100k-cold/misses",
        COLD_NAMES as u64,
        "the same; figure: `is_match` data reads missing a simulated 1 MiB last-level cache per 1,000 iterations (not Ir)",
    ),
    (
        "wire/parse_query+from_wire",
        4 * 4096,
        "`wire::parse_query` + `Name::from_wire`",
    ),
    (
        "core/denied",
        8192,
        "`handle_client` (denied) + `poll_transmit` drain",
    ),
    (
        "core/allowed",
        8192,
        "`handle_client` (allowed) + `handle_upstream` + `commit_allows` + drains",
    ),
    (
        "core/allowed-fresh",
        8192,
        "as core/allowed, each answer a fresh address: every answer writes an allow entry",
    ),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => {
            let (Some(name), Some(iters)) = (args.get(1), args.get(2)) else {
                usage();
            };
            let iters: u64 = iters.parse().unwrap_or_else(|_| usage());
            run(name, iters);
        }
        Some("list") => {
            for (name, iters, what) in WORKLOADS {
                println!("{name}\t{iters}\t{what}");
            }
        }
        Some("check") => std::process::exit(check(&args[1..])),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: gate check [--baselines FILE] [--tolerance PCT] [--update] [--only NAME,...] [--jobs N]\n       gate run NAME ITERS\n       gate list"
    );
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// One prepared workload; `step(i)` is one iteration.
trait Workload {
    fn step(&mut self, i: usize);
}

/// The only function callgrind counts (`--toggle-collect=*gate_measured*`): everything it calls
/// is counted, inlined or not. Never inlined, so its symbol exists in the optimised binary.
#[inline(never)]
fn gate_measured(w: &mut dyn Workload, iters: u64) {
    for i in 0..iters as usize {
        w.step(black_box(i));
    }
}

fn run(name: &str, iters: u64) {
    let mut w: Box<dyn Workload> = match name {
        "matcher/is_match/10" => Box::new(MatchName::new(10)),
        "matcher/is_match/10k" => Box::new(MatchName::new(10_000)),
        "matcher/wire+is_match/10" => Box::new(MatchWire::new(10)),
        "matcher/wire+is_match/10k" => Box::new(MatchWire::new(10_000)),
        "matcher/wire+is_match/100k-cold" | "matcher/wire+is_match/100k-cold/misses" => {
            Box::new(MatchWire::cold())
        }
        "wire/parse_query+from_wire" => Box::new(ParseQuery::new()),
        "core/denied" => Box::new(CoreDenied::new()),
        "core/allowed" => Box::new(CoreAllowed::new(false)),
        "core/allowed-fresh" => Box::new(CoreAllowed::new(true)),
        _ => {
            eprintln!("gate: unknown workload {name} (see `gate list`)");
            std::process::exit(2);
        }
    };
    // Warm-up outside the counted function: tables, caches and lazily sized buffers settle.
    for i in 0..iters.min(4096) as usize {
        w.step(i);
    }
    gate_measured(w.as_mut(), iters);
}

struct MatchName {
    matcher: Matcher,
    names: Vec<Name>,
    hits: usize,
}

impl MatchName {
    fn new(n: usize) -> MatchName {
        let ps = patterns(n, SEED);
        let q = queries(&ps, 4096, SEED + 1);
        MatchName {
            matcher: build(&ps),
            names: q.names,
            hits: 0,
        }
    }
}

impl Workload for MatchName {
    fn step(&mut self, i: usize) {
        let name = &self.names[i % self.names.len()];
        self.hits += usize::from(self.matcher.is_match(black_box(name)));
    }
}

struct MatchWire {
    matcher: Matcher,
    wire: Vec<Vec<u8>>,
    hits: usize,
}

impl MatchWire {
    fn new(n: usize) -> MatchWire {
        let ps = patterns(n, SEED);
        let q = queries(&ps, 4096, SEED + 1);
        MatchWire {
            matcher: build(&ps),
            wire: q.wire,
            hits: 0,
        }
    }
}

/// Distinct names of the cold workload: each is looked up once in the counted loop.
const COLD_NAMES: usize = 1 << 16;

impl MatchWire {
    /// 100k patterns and 64k distinct names, each looked up once by the counted loop: the
    /// trie paths of a large working set rather than of 4,096 names cycled. Callgrind counts
    /// instructions, not cache misses, so what this gates is the work per label over many
    /// distinct parents (the exact-edge probes of unsuccessful lookups above all); the cache
    /// behaviour itself is measured by the criterion group `cold` (bench/RESULTS.md).
    fn cold() -> MatchWire {
        let ps = patterns(100_000, SEED);
        let q = queries(&ps, COLD_NAMES, SEED + 2);
        MatchWire {
            matcher: build(&ps),
            wire: q.wire,
            hits: 0,
        }
    }
}

impl Workload for MatchWire {
    fn step(&mut self, i: usize) {
        let wire = &self.wire[i % self.wire.len()];
        if let Ok(name) = Name::from_wire(black_box(wire)) {
            self.hits += usize::from(self.matcher.is_match(&name));
        }
    }
}

/// A client query packet (RD set) for `name`, with an EDNS0 OPT record when `edns`.
fn query_packet(id: u16, name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, u8::from(edns)]);
    q.extend_from_slice(&to_wire(name));
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    if edns {
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

struct ParseQuery {
    packets: Vec<Vec<u8>>,
    labels: usize,
}

impl ParseQuery {
    fn new() -> ParseQuery {
        let ps = patterns(10_000, SEED);
        let q = queries(&ps, 4096, SEED + 1);
        let packets = q
            .text
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let qtype = if i % 3 == 0 { TYPE_AAAA } else { TYPE_A };
                query_packet(i as u16, t, qtype, i % 2 == 0)
            })
            .collect();
        ParseQuery { packets, labels: 0 }
    }
}

impl Workload for ParseQuery {
    fn step(&mut self, i: usize) {
        let packet = &self.packets[i % self.packets.len()];
        if let Ok(query) = wire::parse_query(black_box(packet))
            && let Ok(name) = Name::from_wire(query.name_wire(packet))
        {
            self.labels += name.label_count();
        }
    }
}

use dnsfence_testkit::fixtures::{CLIENT, ENDPOINTS, POLICY};
const UPSTREAM: &str = "127.0.0.53:53";

/// A core over the test policy, with its ID generator seeded (the default seed is fixed).
fn test_core() -> Core {
    let policies = PolicySet::from_yaml(Path::new("gate-policy.yaml"), POLICY)
        .unwrap_or_else(|e| panic!("gate policy: {e}"));
    let endpoints = Endpoints::from_yaml(Path::new("gate-endpoints.yaml"), ENDPOINTS)
        .unwrap_or_else(|e| panic!("gate endpoints: {e}"));
    let snapshot = Snapshot::compile(&policies, &endpoints);
    let mut config = CoreConfig::new(UPSTREAM.parse().unwrap());
    config.max_pending = 1024;
    Core::new(config, Arc::new(snapshot))
}

struct CoreDenied {
    core: Core,
    client: Client,
    packets: Vec<Vec<u8>>,
    t0: Instant,
    sent: usize,
}

impl CoreDenied {
    fn new() -> CoreDenied {
        let packets = (0..64)
            .map(|i| query_packet(i, &format!("host{i}.denied.example.com"), TYPE_A, false))
            .collect();
        CoreDenied {
            core: test_core(),
            client: Client::Udp(CLIENT.parse().unwrap()),
            packets,
            t0: Instant::now(),
            sent: 0,
        }
    }
}

impl Workload for CoreDenied {
    fn step(&mut self, i: usize) {
        let now = self.t0 + Duration::from_micros(i as u64);
        let packet = &self.packets[i % self.packets.len()];
        self.core.handle_client(now, self.client, None, packet);
        while let Some(t) = self.core.poll_transmit() {
            self.sent += t.data.len();
        }
        while self.core.poll_record().is_some() {}
    }
}

struct CoreAllowed {
    core: Core,
    client: Client,
    upstream: SocketAddr,
    table: UserspaceAllowTable,
    queries: Vec<Vec<u8>>,
    answers: Vec<Vec<u8>>,
    t0: Instant,
    sent: usize,
    /// Give each answer an address never seen before (the allow-write path every time).
    fresh: bool,
}

/// An answer (QR, RD, RA) to `name`/A with one A record (compressed owner), TTL 3600.
fn answer_packet(name: &str, ip: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    p.extend_from_slice(&to_wire(name));
    p.extend_from_slice(&TYPE_A.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    p.extend_from_slice(&[0xc0, 0x0c]);
    p.extend_from_slice(&TYPE_A.to_be_bytes());
    p.extend_from_slice(&CLASS_IN.to_be_bytes());
    p.extend_from_slice(&3600u32.to_be_bytes());
    p.extend_from_slice(&4u16.to_be_bytes());
    p.extend_from_slice(&ip);
    p
}

impl CoreAllowed {
    fn new(fresh: bool) -> CoreAllowed {
        let names: Vec<String> = (0..64).map(|i| format!("host{i}.allowed.test")).collect();
        CoreAllowed {
            core: test_core(),
            client: Client::Udp(CLIENT.parse().unwrap()),
            upstream: UPSTREAM.parse().unwrap(),
            table: UserspaceAllowTable::new(LedgerConfig::default()),
            queries: names
                .iter()
                .enumerate()
                .map(|(i, n)| query_packet(i as u16, n, TYPE_A, false))
                .collect(),
            answers: names
                .iter()
                .enumerate()
                .map(|(i, n)| answer_packet(n, [198, 18, 1, i as u8]))
                .collect(),
            t0: Instant::now(),
            sent: 0,
            fresh,
        }
    }
}

impl Workload for CoreAllowed {
    fn step(&mut self, i: usize) {
        let now = self.t0 + Duration::from_micros(i as u64);
        let k = i % self.queries.len();
        self.core
            .handle_client(now, self.client, None, &self.queries[k]);
        let answer = &mut self.answers[k];
        let mut forwarded = None;
        while let Some(t) = self.core.poll_transmit() {
            if let Destination::UpstreamUdp { socket } = t.to {
                // The upstream's part: the query's ID, and its question in the 0x20 spelling
                // sent (a few instructions of the measured total are this copy).
                answer[..2].copy_from_slice(&t.data[..2]);
                let question = 12..answer.len().min(t.data.len()).min(12 + 64);
                answer[question.clone()].copy_from_slice(&t.data[question]);
                forwarded = Some(socket);
            }
        }
        let Some(socket) = forwarded else {
            panic!("gate: the allowed query was not forwarded");
        };
        if self.fresh {
            // 10.0.0.0/8 by iteration: a new (endpoint, address) entry per answer.
            let at = answer.len() - 4;
            answer[at..].copy_from_slice(&(0x0a00_0000 | i as u32).to_be_bytes());
        }
        self.core
            .handle_upstream(now, socket, self.upstream, answer);
        self.core.handle_timeout(now);
        self.core.commit_allows(now, &mut &self.table);
        // The shard replaces the upstream sockets the core retires (every 256 queries).
        while let Some(socket) = self.core.poll_replace() {
            self.core.upstream_replaced(socket, true);
        }
        while let Some(t) = self.core.poll_transmit() {
            self.sent += t.data.len();
        }
        while self.core.poll_record().is_some() {}
    }
}

// ---------------------------------------------------------------------------------------------
// The check: run every workload under callgrind, compare with the baselines

struct Options {
    baselines: PathBuf,
    tolerance: f64,
    update: bool,
    only: Option<Vec<String>>,
    jobs: usize,
}

fn parse_options(args: &[String]) -> Options {
    let mut o = Options {
        baselines: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/gate/baselines.txt")),
        tolerance: 5.0,
        update: false,
        only: None,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--baselines" => o.baselines = PathBuf::from(value()),
            "--tolerance" => o.tolerance = value().parse().unwrap_or_else(|_| usage()),
            "--update" => o.update = true,
            "--only" => o.only = Some(value().split(',').map(str::to_owned).collect()),
            "--jobs" => o.jobs = value().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    o
}

/// The baselines file: missing or unreadable is an error unless `--update` writes it anew.
fn read_baselines(path: &Path, update: bool) -> Result<BTreeMap<String, f64>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            dnsfence_bench::parse_baselines(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(_) if update => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read the baselines {}: {e}", path.display())),
    }
}

/// glibc picks memcpy/memset/memcmp variants by CPU feature (AVX2, ERMS, ...), and they are
/// 5-15 % of some workloads' instructions: the counts would depend on the runner's CPU. This
/// masks every optional feature glibc dispatches on, so the baseline SSE2 variants run on any
/// x86-64 (masking a feature the CPU lacks changes nothing). Other architectures ignore it.
const GLIBC_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX2,-AVX,-ERMS,-FSRM,\
-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-EVEX,-SSSE3,-SSE4_1,-SSE4_2,-MOVBE,-BMI2,-LZCNT,-POPCNT,-RTM";

/// Workloads named `.../misses` count, instead of instructions, the data reads of
/// `Matcher::is_match` (the trie walk alone: not `Name::from_wire` reading the cold name) that
/// miss callgrind's simulated last-level cache, per 1,000 iterations. The simulated caches are
/// fixed (not the host's), so the count is the same on every machine: L1 32 KiB, last level
/// 1 MiB, far smaller than the 100k-pattern trie (about 7 MB).
const MISSES_SUFFIX: &str = "/misses";
const CACHE_SIM: &[&str] = &[
    "--cache-sim=yes",
    "--I1=32768,8,64",
    "--D1=32768,8,64",
    "--LL=1048576,16,64",
    "--toggle-collect=*Matcher::is_match*",
];

/// Runs one workload under callgrind; returns instructions per iteration (or misses, above).
fn measure(exe: &Path, dir: &Path, name: &str, iters: u64) -> Result<f64, String> {
    let out = dir.join(format!("callgrind.{}.out", name.replace('/', "_")));
    let misses = name.ends_with(MISSES_SUFFIX);
    let result = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(["--collect-atstart=no", "--dump-line=no"])
        .args(if misses {
            CACHE_SIM
        } else {
            &["--toggle-collect=*gate_measured*"]
        })
        .arg(exe)
        .arg("run")
        .arg(name.strip_suffix(MISSES_SUFFIX).unwrap_or(name))
        .arg(iters.to_string())
        .env("GLIBC_TUNABLES", GLIBC_TUNABLES)
        .output()
        .map_err(|e| format!("cannot start valgrind: {e} (install valgrind)"))?;
    if !result.status.success() {
        return Err(format!(
            "{name}: valgrind failed ({}):\n{}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    let text = std::fs::read_to_string(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    // The column: Ir (the first), or DLmr (last-level data read misses) of the cache simulation.
    let column = if misses {
        text.lines()
            .find_map(|l| l.strip_prefix("events:"))
            .and_then(|events| events.split_whitespace().position(|e| e == "DLmr"))
            .ok_or_else(|| format!("{name}: no DLmr event in callgrind output"))?
    } else {
        0
    };
    let total: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().nth(column)?.parse().ok())
        .ok_or_else(|| format!("{name}: no totals in callgrind output"))?;
    if total == 0 {
        return Err(format!(
            "{name}: callgrind counted nothing: is `gate_measured` in the symbol table?"
        ));
    }
    let per = if misses { 1000.0 } else { 1.0 };
    Ok(total as f64 * per / iters as f64)
}

fn check(args: &[String]) -> i32 {
    let o = parse_options(args);
    let exe = std::env::current_exe().expect("own path");
    let dir = std::env::temp_dir().join(format!("dnsfence-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    if let Some(only) = &o.only
        && let Some(unknown) = only
            .iter()
            .find(|n| WORKLOADS.iter().all(|w| w.0 != n.as_str()))
    {
        eprintln!("gate: unknown workload {unknown} (see `gate list`)");
        return 2;
    }
    // Read (and check) the baselines before spending minutes under valgrind.
    let baselines = match read_baselines(&o.baselines, o.update) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gate: FAILED: {e}");
            return 1;
        }
    };
    if let Some(stale) = baselines
        .keys()
        .find(|n| WORKLOADS.iter().all(|w| w.0 != n.as_str()))
        && !o.update
    {
        eprintln!("gate: FAILED: a baseline names no workload: {stale} (run --update)");
        return 1;
    }
    let selected: Vec<(&str, u64, &str)> = WORKLOADS
        .iter()
        .copied()
        .filter(|(n, ..)| {
            o.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|x| x == n))
        })
        .collect();

    // At most `jobs` valgrind processes at once.
    let mut measured: Vec<(&str, Result<f64, String>)> = Vec::new();
    for chunk in selected.chunks(o.jobs.max(1)) {
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(name, iters, _)| {
                    let (exe, dir) = (&exe, &dir);
                    s.spawn(move || (name, measure(exe, dir, name, iters)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        measured.extend(results);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut failed = 0;
    println!(
        "| workload | baseline Ir/iter | measured Ir/iter | change | verdict (tolerance +{}%) |",
        o.tolerance
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    for (name, r) in &measured {
        let now = match r {
            Ok(v) => *v,
            Err(e) => {
                eprintln!("gate: {e}");
                failed += 1;
                println!("| {name} | | | | ERROR |");
                continue;
            }
        };
        let (base, change, verdict) = match baselines.get(*name) {
            None if o.update => ("-".to_owned(), "-".to_owned(), "new (no baseline)"),
            None => {
                failed += 1;
                ("-".to_owned(), "-".to_owned(), "NO BASELINE (run --update)")
            }
            Some(&b) => {
                let pct = (now / b - 1.0) * 100.0;
                let verdict = if pct > o.tolerance {
                    failed += 1;
                    "REGRESSION"
                } else if pct < -o.tolerance {
                    "improved: update the baseline"
                } else {
                    "ok"
                };
                (format!("{b:.1}"), format!("{pct:+.2}%"), verdict)
            }
        };
        println!("| {name} | {base} | {now:.1} | {change} | {verdict} |");
    }

    if o.update {
        if measured.iter().any(|(_, r)| r.is_err()) {
            eprintln!("gate: not updating the baselines: some workloads failed");
            return 1;
        }
        let mut all = baselines;
        for (name, r) in &measured {
            all.insert((*name).to_owned(), *r.as_ref().unwrap());
        }
        let mut text = String::from(
            "# Instructions per iteration of each gate workload (callgrind Ir, [profile.gate]).\n\
             # Regenerate: bench/gate/run.sh --update ; commit with the reason for the change.\n",
        );
        text.push_str(&format!("# toolchain: {}\n", toolchain()));
        for (name, iters, what) in WORKLOADS {
            if let Some(v) = all.get(*name) {
                text.push_str(&format!("# {name}: {what} ({iters} iterations)\n"));
                text.push_str(&format!("{name} {v:.1}\n"));
            }
        }
        std::fs::write(&o.baselines, text).expect("write baselines");
        println!("\ngate: baselines written to {}", o.baselines.display());
        return 0;
    }
    if failed > 0 {
        println!(
            "\ngate: FAILED: {failed} workload(s) above their baseline by more than {}% \
             (or errors). If the change is intended, run bench/gate/run.sh --update and commit \
             bench/gate/baselines.txt with the reason (see BENCHMARKING.md).",
            o.tolerance
        );
        1
    } else {
        println!("\ngate: ok");
        0
    }
}

/// `rustc --version` and `valgrind --version`, for the baselines file header.
fn toolchain() -> String {
    let version = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| format!("{cmd}: unknown"))
    };
    format!("{}; {}", version("rustc"), version("valgrind"))
}
