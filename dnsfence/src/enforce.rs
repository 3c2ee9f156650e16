//! Where allow entries go and who enforces them: the userspace table of `--no-bpf`, or the
//! eBPF datapath (programs attached at `--cgroup-root`, maps pinned under `--bpf-pin`).
//! The agent talks to one [`Enforcer`] at start, at each reload and on each tick.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dnsfence_datapath::{
    BpfAllow, BpfOrigins, Datapath, EndpointFill, EndpointSync, InstallConfig,
};
use dnsfence_engine::allow::{AllowSink, LedgerConfig, LedgerStats, UserspaceAllowTable};
use dnsfence_engine::shard::OriginSource;
use dnsfence_policy::Snapshot;

/// Expired entries removed per tick (a slice: a shard's write waits at most for one).
const SWEEP_BUDGET: usize = 4096;

/// How often the other writer's entries are taken into the ledger for the sweep.
const ADOPT_INTERVAL: Duration = Duration::from_secs(60);

/// The enforcement backend of a running agent.
pub enum Enforcer {
    /// `--no-bpf`: allow entries are kept (and revoked, and expired) but nothing filters
    /// connections.
    Userspace(Arc<UserspaceAllowTable>),
    /// The eBPF datapath.
    Bpf {
        /// The loaded programs and the maps the control plane writes (the agent's); None for
        /// the standalone proxy, which only writes allow entries into the maps an agent
        /// pinned.
        datapath: Option<Box<Mutex<Datapath>>>,
        /// The allow-map sink the shards share.
        allow: BpfAllow,
        /// When the other writer's entries were last taken into the ledger.
        adopted: Mutex<Instant>,
        /// What the last endpoint sync had to say (a later sync says what changed).
        reported: Mutex<Vec<String>>,
        /// Whether the last repair found the agent's policy another than this process's
        /// (said once each way in the log).
        behind: std::sync::atomic::AtomicBool,
        /// The standalone proxy's handle on the endpoints map (None for the agent, whose
        /// sync owns it).
        fill: Option<Box<Mutex<Fill>>>,
    },
}

/// The standalone proxy's endpoint filling, and the last reason it could not fill that it
/// said (said again only when it changes).
pub struct Fill {
    fill: EndpointFill,
    said: Option<String>,
}

/// Prints what a sync (of the ticks, of the cgroup watcher) says, unless the last sync said
/// the same: an endpoint found too deep, or missing, after start is said once.
fn report_sync(
    reported: &Mutex<Vec<String>>,
    result: Result<EndpointSync, dnsfence_datapath::DatapathError>,
) {
    let lines = match result {
        Ok(sync) => describe_sync(&sync),
        Err(e) => vec![format!("warning: syncing the endpoints map: {e}")],
    };
    let mut last = reported.lock().unwrap_or_else(|e| e.into_inner());
    if *last != lines {
        for line in &lines {
            eprintln!("dnsfence agent: {line}");
        }
        *last = lines;
    }
}

impl Enforcer {
    /// The userspace table.
    pub fn userspace(config: LedgerConfig) -> Enforcer {
        Enforcer::Userspace(Arc::new(UserspaceAllowTable::new(config)))
    }

    /// Installs (or re-attaches to) the datapath and loads `snapshot` into it.
    pub fn bpf(
        install: &InstallConfig,
        listen: &[SocketAddr],
        ledger: LedgerConfig,
    ) -> Result<Enforcer> {
        // At idle priority (engine::startup): the kernel's BTF parsed and the verifier run
        // while the proxy beside this agent serves on the same CPUs.
        let installed = dnsfence_engine::startup::at_idle_priority(|| Datapath::install(install));
        let mut datapath = installed.with_context(|| {
            format!(
                "eBPF datapath (pins under {}, cgroup root {}; needs CAP_BPF + CAP_NET_ADMIN + \
                 CAP_PERFMON, and CAP_SYS_ADMIN where cgroup2 must be mounted; --no-bpf runs \
                 without it)",
                install.pin_dir.display(),
                install.cgroup_root.display()
            )
        })?;
        datapath.set_proxy(listen)?;
        if datapath.reused_programs() {
            eprintln!(
                "dnsfence agent: the programs this build attached before are still attached \
                 over the pinned maps: kept as they are (not loaded again)"
            );
        }
        if let Some(c) = datapath.carried_over() {
            let mut notes = String::new();
            if c.left > 0 {
                notes += &format!(
                    "; {} did not fit (allowed again by the next answer naming them)",
                    c.left
                );
            }
            if c.without_name > 0 {
                notes += &format!("; {} without their names", c.without_name);
            }
            if let Some(e) = &c.error {
                notes += &format!("; stopped early ({e}): the older maps stay pinned");
            }
            eprintln!(
                "dnsfence agent: carried {} allow entries over from the older map layout at {}{notes}",
                c.entries,
                c.from.display(),
            );
        }
        for removed in datapath.removed_layouts() {
            match removed {
                Ok(dir) => eprintln!(
                    "dnsfence agent: unpinned the older map layout at {}",
                    dir.display()
                ),
                Err(e) => {
                    eprintln!("dnsfence agent: warning: could not unpin an older map layout: {e}")
                }
            }
        }
        if datapath.endpoint_capacity() < install.endpoint_entries {
            eprintln!(
                "dnsfence agent: warning: the pinned endpoints map holds {} entries, fewer than \
                 --endpoint-entries {}: it was created with that size and is reused as it is \
                 (run `dnsfence agent --uninstall` while no agent runs to recreate it)",
                datapath.endpoint_capacity(),
                install.endpoint_entries
            );
        }
        if (datapath.allow_capacity() as usize) < ledger.capacity {
            eprintln!(
                "dnsfence agent: warning: the pinned allow map holds {} entries, fewer than \
                 --allow-entries {}: it was created with that size and is reused as it is \
                 (run `dnsfence agent --uninstall` while no agent runs to recreate it)",
                datapath.allow_capacity(),
                ledger.capacity
            );
        }
        let allow = datapath.allow_sink(ledger)?;
        Ok(Enforcer::Bpf {
            datapath: Some(Box::new(Mutex::new(datapath))),
            allow,
            adopted: Mutex::new(Instant::now()),
            reported: Mutex::new(Vec::new()),
            behind: std::sync::atomic::AtomicBool::new(false),
            fill: None,
        })
    }

    /// The standalone proxy's: the allow maps an agent pinned under `pin_dir` (no program
    /// loaded or attached, no pin lock taken: the agent owns those), and the endpoints map
    /// for the entries of endpoint cgroups below `cgroup_root` created while no agent runs.
    pub fn attached(pin_dir: &Path, cgroup_root: &Path, ledger: LedgerConfig) -> Result<Enforcer> {
        let allow = BpfAllow::open_pinned(pin_dir, ledger).with_context(|| {
            format!(
                "eBPF datapath pinned under {} (start `dnsfence agent` once with this \
                 --bpf-pin; --no-bpf runs without it)",
                pin_dir.display()
            )
        })?;
        let fill = EndpointFill::open(pin_dir, cgroup_root)
            .with_context(|| format!("eBPF datapath pinned under {}", pin_dir.display()))?;
        Ok(Enforcer::Bpf {
            datapath: None,
            allow,
            adopted: Mutex::new(Instant::now()),
            reported: Mutex::new(Vec::new()),
            behind: std::sync::atomic::AtomicBool::new(false),
            fill: Some(Box::new(Mutex::new(Fill { fill, said: None }))),
        })
    }

    /// Whose sockets these are in the port's steering: eBPF mode only (the agent installs
    /// the datapath, the standalone proxy attaches to it).
    pub fn owner(&self) -> Option<dnsfence_datapath::reuseport::Owner> {
        use dnsfence_datapath::reuseport::Owner;
        match self {
            Enforcer::Userspace(_) => None,
            Enforcer::Bpf { datapath, .. } => Some(match datapath {
                Some(_) => Owner::Agent,
                None => Owner::Proxy,
            }),
        }
    }

    /// A sink for one shard.
    pub fn sink(&self) -> Box<dyn AllowSink + Send> {
        match self {
            Enforcer::Userspace(table) => Box::new(SharedTable(Arc::clone(table))),
            Enforcer::Bpf { allow, .. } => Box::new(allow.clone()),
        }
    }

    /// An origin lookup for one shard (eBPF mode only).
    pub fn origin(&self, pin_dir: &Path) -> Result<Option<Box<dyn OriginSource>>> {
        match self {
            Enforcer::Userspace(_) => Ok(None),
            Enforcer::Bpf { .. } => Ok(Some(Box::new(BpfOrigins::open(pin_dir)?))),
        }
    }

    /// Applies a new snapshot: revokes the entries it no longer justifies and (eBPF) updates
    /// the endpoints map. Returns a line for the log when something is worth saying.
    pub fn apply(&self, snapshot: &Arc<Snapshot>) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        let revoked = match self {
            Enforcer::Userspace(table) => table.revoke(Arc::clone(snapshot)),
            Enforcer::Bpf {
                datapath,
                allow,
                reported,
                ..
            } => {
                // Revoke first: a narrowing reload closes before the endpoint map changes.
                let revoked = allow.revoke(Arc::clone(snapshot));
                if let Some(datapath) = datapath {
                    let sync = datapath
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .sync_endpoints(snapshot)?;
                    let described = describe_sync(&sync);
                    *reported.lock().unwrap_or_else(|e| e.into_inner()) = described.clone();
                    lines.extend(described);
                }
                revoked
            }
        };
        if revoked > 0 {
            lines.push(format!(
                "{revoked} allow entries revoked (no longer justified by policy)"
            ));
        }
        Ok(lines)
    }

    /// (eBPF, standalone proxy; call while no agent is connected) Writes the endpoints-map
    /// entry of every endpoint cgroup of `snapshot` that has none (created again while the
    /// agent is away; see `EndpointFill`), unless the agent's published policy is another
    /// than this process's or its programs are attached elsewhere than `--cgroup-root`; says
    /// what it wrote, and each new reason it could not (once).
    pub fn fill_endpoints(&self, snapshot: &Snapshot) {
        let Enforcer::Bpf {
            fill: Some(fill),
            allow,
            ..
        } = self
        else {
            return;
        };
        // A path the agent's newer policy gives another endpoint, or none, must not get the
        // older one's entry (review finding).
        if allow.behind_agent() {
            return;
        }
        let mut state = fill.lock().unwrap_or_else(|e| e.into_inner());
        let problem = match state.fill.root_is_the_agents() {
            Err(why) => Some(format!("endpoint cgroups are not filled: {why}")),
            Ok(()) => {
                let filled = state.fill.fill(snapshot);
                if !filled.written.is_empty() {
                    eprintln!(
                        "dnsfence proxy: endpoint cgroups without an entry while no agent \
                         runs, enforced: {}",
                        filled.written.join(", ")
                    );
                }
                (!filled.failed.is_empty()).then(|| {
                    format!(
                        "endpoints map: entries refused: {}",
                        filled.failed.join("; ")
                    )
                })
            }
        };
        if problem.is_some() && problem != state.said {
            eprintln!("dnsfence proxy: {}", problem.as_deref().unwrap_or_default());
        }
        state.said = problem;
    }

    /// (eBPF) Sets this process's policy identity without revoking (the standalone proxy on
    /// its persisted snapshot; see `BpfAllow::follow_policy`).
    pub fn follow_policy(&self, id: u64) {
        if let Enforcer::Bpf { allow, .. } = self {
            allow.follow_policy(id);
        }
    }

    /// (eBPF) Puts back the entries this process's policy justifies that the other writer
    /// removed (see `BpfAllow::repair`): called every turn of the main loop, it costs two
    /// atomic loads unless the other writer revoked something.
    pub fn repair(&self) {
        if let Enforcer::Bpf { allow, behind, .. } = self {
            let now = allow.behind_agent();
            if now != behind.swap(now, std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "{}",
                    if now {
                        "the agent's policy is newer than this process's: repairs of what it \
                         removes from the allow map wait until this process has it"
                    } else {
                        "this process has the agent's policy: repairs of the allow map go on"
                    }
                );
            }
            let repaired = allow.repair();
            if repaired > 0 {
                eprintln!(
                    "{repaired} allow entries put back: the other writer's reload removed them, \
                     this process's policy still justifies them"
                );
            }
        }
    }

    /// Periodic work: one slice of the expiry sweep; (eBPF) endpoints whose cgroup appeared.
    pub fn tick(&self, snapshot: &Snapshot) {
        match self {
            Enforcer::Userspace(table) => {
                table.sweep(Instant::now(), SWEEP_BUDGET);
            }
            Enforcer::Bpf {
                datapath,
                allow,
                adopted,
                reported,
                ..
            } => {
                // Now and then, the other writer's entries join the sweep (one whose writer
                // is gone would otherwise stay until this process restarts).
                let mut last = adopted.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= ADOPT_INTERVAL {
                    *last = Instant::now();
                    allow.adopt();
                }
                drop(last);
                allow.sweep(SWEEP_BUDGET);
                if let Some(datapath) = datapath {
                    let sync = datapath
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .sync_endpoints(snapshot);
                    report_sync(reported, sync);
                }
            }
        }
    }

    /// eBPF mode: a thread that syncs the endpoints map the moment a directory appears or
    /// goes under the cgroups of the endpoints (a service restart recreates its cgroup with
    /// a new id: without this it would be unprotected until the next tick). Runs until
    /// `stop`; None in userspace mode or when inotify is unavailable (then ticks only).
    pub fn watch_cgroups(
        self: &Arc<Self>,
        policy: Arc<dnsfence_engine::shard::PolicyHandle>,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> Option<std::thread::JoinHandle<()>> {
        use std::sync::atomic::Ordering;
        let Enforcer::Bpf {
            datapath: Some(_), ..
        } = **self
        else {
            return None;
        };
        let watch = match dnsfence_datapath::DirWatch::new() {
            Ok(w) => w,
            Err(e) => {
                eprintln!(
                    "dnsfence agent: warning: inotify unavailable ({e}): new cgroups are \
                     picked up at each --reload-interval only"
                );
                return None;
            }
        };
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("dnsf-cgwatch".into())
            .spawn(move || {
                let Enforcer::Bpf {
                    datapath: Some(datapath),
                    reported,
                    ..
                } = &*me
                else {
                    return;
                };
                let mut generation = 0;
                while !stop.load(Ordering::Relaxed) {
                    let g = policy.generation();
                    if g != generation {
                        generation = g;
                        let dirs = datapath
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .watch_dirs(&policy.load());
                        for dir in dirs {
                            let _ = watch.add(&dir);
                        }
                    }
                    match watch.wait(200) {
                        Ok(true) => {
                            let snapshot = policy.load();
                            let mut dp = datapath.lock().unwrap_or_else(|e| e.into_inner());
                            report_sync(reported, dp.sync_endpoints(&snapshot));
                            // Directories that appeared may hold endpoint cgroups to come.
                            for dir in dp.watch_dirs(&snapshot) {
                                let _ = watch.add(&dir);
                            }
                        }
                        Ok(false) => {}
                        Err(_) => std::thread::sleep(Duration::from_millis(200)),
                    }
                }
            })
            .ok()
    }

    /// The allow entries' counters.
    pub fn allow_stats(&self) -> LedgerStats {
        match self {
            Enforcer::Userspace(table) => table.ledger().stats(),
            Enforcer::Bpf { allow, .. } => allow.stats(),
        }
    }

    /// The datapath programs' counters (eBPF mode).
    pub fn datapath_stats(&self) -> Vec<(&'static str, u64)> {
        match self {
            Enforcer::Userspace(_) => Vec::new(),
            Enforcer::Bpf { datapath, .. } => datapath
                .iter()
                .flat_map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).stats())
                .map(|(s, n)| (s.name(), n))
                .collect(),
        }
    }
}

fn describe_sync(sync: &EndpointSync) -> Vec<String> {
    let mut lines = Vec::new();
    if !sync.too_deep.is_empty() {
        lines.push(format!(
            "warning: the cgroups of {} endpoints lie deeper than {} levels below the cgroup \
             hierarchy's root, where the programs do not look: NOT redirected or enforced: {}",
            sync.too_deep.len(),
            dnsfence_datapath::maps::MAX_DEPTH,
            sync.too_deep.join(", ")
        ));
    }
    for e in &sync.detach_errors {
        lines.push(format!(
            "warning: an older program of the upgrade stays attached (it keeps judging from \
             the older maps): {e}"
        ));
    }
    if !sync.refused.is_empty() {
        const SHOWN: usize = 20;
        let more = match sync.refused.len().saturating_sub(SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        lines.push(format!(
            "warning: the endpoints map refused the entries of {} endpoints (a new one is NOT \
             redirected or enforced, one already there keeps its previous entry, until they \
             fit: --endpoint-entries, recreated by `dnsfence agent --uninstall`): {}{more}",
            sync.refused.len(),
            sync.refused[..sync.refused.len().min(SHOWN)].join(", ")
        ));
    }
    if !sync.missing.is_empty() {
        lines.push(format!(
            "warning: the cgroups of {} endpoints do not exist yet (not redirected or \
             enforced until they do): {}",
            sync.missing.len(),
            sync.missing.join(", ")
        ));
    }
    if sync.l3_failed_closed > 0 {
        lines.push(format!(
            "warning: the L3 prefix map is full: {} endpoints are denied everything but DNS \
             until their entries fit (fewer toCIDR/toEndpoints prefixes, or fewer endpoints)",
            sync.l3_failed_closed
        ));
    }
    if sync.cluster_failed {
        lines.push(
            "warning: the cluster map could not be written: endpoints with world, cluster or \
             CIDR rules are denied everything but DNS until it can"
                .to_string(),
        );
    } else if sync.cluster_partial {
        lines.push(format!(
            "warning: the cluster map is full ({} entries written): world, cluster and CIDR \
             rules allow nothing and deny everything they cover until the cluster's addresses \
             fit (--cluster-entries, or --cluster-cidr ranges for the pods)",
            sync.cluster_entries
        ));
    }
    if !sync.too_many_l3_specs.is_empty() {
        lines.push(format!(
            "warning: {} endpoints have an address prefix with more than {} port entries \
             (extra allowed ports stay closed, extra denied ones deny every port): {}",
            sync.too_many_l3_specs.len(),
            dnsfence_datapath::maps::MAX_L3_SPECS,
            sync.too_many_l3_specs.join(", ")
        ));
    }
    if !sync.too_many_specs.is_empty() {
        lines.push(format!(
            "warning: {} endpoints have more than {} distinct toFQDNs port entries; the rest \
             stay closed: {}",
            sync.too_many_specs.len(),
            dnsfence_datapath::maps::MAX_SPECS,
            sync.too_many_specs.join(", ")
        ));
    }
    lines
}

/// The userspace table shared by all shards.
struct SharedTable(Arc<UserspaceAllowTable>);

impl AllowSink for SharedTable {
    fn write(&mut self, now: Instant, batch: &mut dnsfence_engine::allow::AllowBatch) {
        (&*self.0).write(now, batch)
    }
}
