//! `dnsfence agent`: the complete single-process deployment (policy and endpoint files,
//! the eBPF datapath, shards, consumer, metrics), and the agent side of the sync with the
//! standalone proxy (`ha.rs`). The data plane is shared with the proxy (`serve.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dnsfence_engine::shard::PolicyHandle;
use dnsfence_policy::reload::{Outcome, Sources};
use dnsfence_policy::{Endpoints, Snapshot};

use crate::enforce::Enforcer;
use crate::ha::{self, AgentSync};
use crate::health::{Health, Role};
use crate::observe::{FlowHistory, ObserveServer};
use crate::serve::{self, ServeArgs, Server, Start, UnknownFlag, parse_duration};

/// The agent socket when `--agent-socket` is not given.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/dnsfence/agent.sock";
/// The observe socket's file name, beside the agent socket when `--observe-socket` is not
/// given (`/run/dnsfence/observe.sock` by default).
pub const OBSERVE_SOCKET_NAME: &str = "observe.sock";

/// Flags of `dnsfence agent` (shared/spec/interfaces.md; every tunable is a flag).
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The data-plane flags (shared with `dnsfence proxy`).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy files or directories (with
    /// --k8s: optional, applied beside the API's policies).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["uninstall", "k8s"])]
    pub policy: Vec<PathBuf>,
    /// Endpoints file.
    #[arg(long, value_name = "FILE")]
    pub endpoints: Option<PathBuf>,
    /// Take workloads (pods), services and Cilium policies (CNP, CCNP) from the Kubernetes
    /// API, watched (in-cluster configuration, or --kubeconfig). Replaces --endpoints. The
    /// agent serves once the API gave a full state, and keeps the last one in force while
    /// the API server is unreachable.
    #[arg(long, conflicts_with_all = ["endpoints", "uninstall"])]
    pub k8s: bool,
    /// kubeconfig file for --k8s (default: the in-cluster service account).
    #[arg(long, value_name = "FILE", requires = "k8s")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name for --k8s: the pods scheduled on it are its workloads. Default: the
    /// NODE_NAME environment variable (the downward API), else the host name.
    #[arg(long, value_name = "NAME", requires = "k8s")]
    pub node_name: Option<String>,
    /// The kubelet's cgroup driver (how pod cgroups are named below --cgroup-root).
    #[arg(long, value_enum, default_value_t = CgroupDriverFlag::Systemd)]
    pub k8s_cgroup_driver: CgroupDriverFlag,
    /// Path below --cgroup-root where the kubelet's `kubepods` hierarchy starts (default:
    /// at the root).
    #[arg(long, value_name = "PATH", default_value = "")]
    pub k8s_cgroup_prefix: String,
    /// The cluster's name (Cilium's `cluster-name`): every pod's
    /// `io.cilium.k8s.policy.cluster` label, which policies may select on.
    #[arg(long, value_name = "NAME", default_value = "default", requires = "k8s")]
    pub k8s_cluster_name: String,
    /// Watch this node's pods only: peers on other nodes are then reached through their
    /// services only (toEndpoints). For very large clusters.
    #[arg(long, requires = "k8s")]
    pub k8s_local_pods_only: bool,
    /// Cilium's CRDs may be absent from the cluster: a CNP or CCNP kind the API server does
    /// not serve (404) before its first list counts as empty. Without it the agent waits for
    /// them (a restarting API server answers 404 for a while: an agent starting then must not
    /// start with no policy). After a list, a 404 always keeps what was listed.
    #[arg(long, requires = "k8s")]
    pub k8s_optional_crds: bool,
    /// How long the agent waits at start for the API's first full state (then exits 1).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub k8s_sync_timeout: Duration,
    /// Detach the eBPF programs and remove everything pinned under --bpf-pin, then exit.
    #[arg(long, conflicts_with = "no_bpf")]
    pub uninstall: bool,
    /// cgroup v2 hierarchy to attach to (cgroup2 is mounted there if it is not one); endpoint
    /// cgroup paths are relative to it.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// The cluster's pod and service ranges (repeatable, or comma-separated): `toEntities:
    /// cluster` covers them (with the node and the registered endpoints); `world`, CIDR rules
    /// and toFQDNs answers leave them out. Give them on large clusters: one range stands for
    /// all its pods in the cluster map (--cluster-entries), instead of one entry per pod.
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr, value_delimiter = ',')]
    pub cluster_cidr: Vec<dnsfence_policy::cidr::Cidr>,
    /// The node's own addresses besides loopback (repeatable, or comma-separated; addresses,
    /// not prefixes): `toEntities: host`; CIDR rules and toFQDNs answers leave them out.
    #[arg(long, value_name = "IP", value_parser = dnsfence_policy::cidr::Cidr::parse_host, value_delimiter = ',')]
    pub node_ip: Vec<dnsfence_policy::cidr::Cidr>,
    /// Let a toFQDNs answer in the node's loopback (127.0.0.0/8, ::1) open it. By default an
    /// allowed name answered with a node-local address (unspecified, loopback, link-local:
    /// the cloud metadata service among them) opens nothing, counted as
    /// `addresses_in_cluster`: DNS rebinding onto the node. For nodes whose host-process
    /// endpoints meet their servers on loopback (and for tests).
    #[arg(long)]
    pub open_loopback_answers: bool,
    /// Ranges a toFQDNs answer never opens (repeatable, or comma-separated), besides the
    /// cluster's (--cluster-cidr) and the node-local ones, whatever the policy and
    /// --open-loopback-answers say: networks DNS rebinding must not reach (an on-premises
    /// range, a metadata address this list of clouds lacks). Counted as
    /// `addresses_in_cluster`; an L3 rule (toCIDR, toEntities: world) still opens them.
    /// Synced to the proxy: upgrade the proxy first (an older one ignores them; the agent
    /// says so when it connects).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr, value_delimiter = ',')]
    pub deny_answer_cidr: Vec<dnsfence_policy::cidr::Cidr>,
    /// The Kubernetes API server's addresses (repeatable): `toEntities: kube-apiserver`
    /// (without it, that entity allows nothing).
    #[arg(long, value_name = "CIDR", value_parser = parse_cidr)]
    pub kube_apiserver: Vec<dnsfence_policy::cidr::Cidr>,
    /// How often policy and endpoint files are checked for changes. A changed file loads once
    /// it is the same at two checks in a row (one it keeps changing never replaces the last
    /// good state).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Size of the L3 prefix map: the (endpoint, prefix) pairs of every endpoint's toCIDR,
    /// toCIDRSet, toEndpoints and toEntities rules. An endpoint whose entries do not fit is
    /// denied everything but DNS until they do (logged).
    #[arg(long, default_value_t = 65536)]
    pub l3_entries: u32,
    /// Size of the cluster map: the cluster's addresses (registered endpoints and services,
    /// nodes, --cluster-cidr ranges, which stand for the pods inside them), shared by every
    /// endpoint. `world`, `cluster` and CIDR rules look there. When they do not all fit,
    /// those rules allow nothing and deny everything they cover (logged) until they do.
    #[arg(long, default_value_t = 65536)]
    pub cluster_entries: u32,
    /// Size of the endpoints map: the node's endpoint cgroups (pods, services). An endpoint
    /// whose entry does not fit is neither redirected nor enforced until it does (logged).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub endpoint_entries: u32,
    /// Where `dnsfence observe` asks for flows (mode 0600; the agent's user or root only).
    /// Default: `observe.sock` beside the agent socket (/run/dnsfence/observe.sock).
    #[arg(long, value_name = "PATH")]
    pub observe_socket: Option<PathBuf>,
}

/// `--k8s-cgroup-driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupDriverFlag {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`.
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// Starts the Kubernetes source of `--k8s`; also says the node name it took.
fn start_k8s(args: &AgentArgs) -> Result<(dnsfence_k8s::K8sSource, String)> {
    let node_name = match &args.node_name {
        Some(name) => name.clone(),
        None => match std::env::var("NODE_NAME") {
            Ok(name) if !name.is_empty() => name,
            _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("--node-name not given, NODE_NAME unset, and no host name")?
                .trim()
                .to_string(),
        },
    };
    let config = dnsfence_k8s::K8sConfig {
        kubeconfig: args.kubeconfig.clone(),
        node_name: node_name.clone(),
        cgroup_driver: match args.k8s_cgroup_driver {
            CgroupDriverFlag::Systemd => dnsfence_k8s::CgroupDriver::Systemd,
            CgroupDriverFlag::Cgroupfs => dnsfence_k8s::CgroupDriver::Cgroupfs,
        },
        cgroup_prefix: args.k8s_cgroup_prefix.trim_matches('/').to_string(),
        remote_pods: !args.k8s_local_pods_only,
        require_ips: args.serve.no_bpf,
        optional_crds: args.k8s_optional_crds,
        cluster_name: args.k8s_cluster_name.clone(),
    };
    eprintln!(
        "dnsfence agent: watching the Kubernetes API (node {}, {} pods)",
        config.node_name,
        if config.remote_pods {
            "all"
        } else {
            "this node's"
        }
    );
    Ok((dnsfence_k8s::K8sSource::start(config)?, node_name))
}

/// The Kubernetes source's state as texts to put in force.
fn api_state(state: dnsfence_k8s::ClusterState) -> dnsfence_policy::reload::InForce {
    dnsfence_policy::reload::InForce {
        policies: state.policies,
        endpoints: Some(state.endpoints),
    }
}

/// Parses a prefix or an address (`10.0.0.0/8`, `192.0.2.7`).
fn parse_cidr(s: &str) -> Result<dnsfence_policy::cidr::Cidr, String> {
    dnsfence_policy::cidr::Cidr::parse(s)
}

/// Refuses combinations that would quietly widen enforcement (at start and at every reload
/// of the endpoints): `without_ips` endpoints recognised by cgroup only.
pub fn refuse_unenforceable(args: &ServeArgs, without_ips: usize) -> Result<(), String> {
    unenforceable(
        args.no_bpf,
        matches!(args.unknown_source, UnknownFlag::Allow),
        without_ips,
    )
}

/// [`refuse_unenforceable`] from the two flags it depends on.
pub fn unenforceable(no_bpf: bool, unknown_allow: bool, without_ips: usize) -> Result<(), String> {
    if no_bpf && without_ips > 0 && unknown_allow {
        return Err(format!(
            "{without_ips} endpoints have no source address (cgroup only) and cannot be \
             recognised without the eBPF datapath; with --unknown-source allow they would be \
             unrestricted: give them ips, or use --unknown-source deny"
        ));
    }
    Ok(())
}

/// Says, once the agent serves, what this configuration does not enforce.
fn warn_about_limits(args: &AgentArgs, snapshot: &Snapshot) {
    let stats = snapshot.stats();
    if !args.serve.no_bpf {
        eprintln!(
            "dnsfence agent: eBPF datapath: DNS of {} cgroup endpoints redirected from {}, \
             egress of {} restricted endpoints filtered by the allow map ({} toFQDNs rules, \
             port-aware); maps pinned under {}",
            snapshot.cgroups().count(),
            args.cgroup_root.display(),
            stats.restricted,
            stats.fqdn_rules,
            args.serve.bpf_pin.display()
        );
    } else if stats.without_ips > 0 {
        eprintln!(
            "dnsfence agent: warning: {} endpoints have no source address (cgroup only); without \
             the eBPF datapath their queries are refused as unknown sources",
            stats.without_ips
        );
    }
    if args.serve.no_bpf && stats.fqdn_rules > 0 {
        eprintln!(
            "dnsfence agent: warning: --no-bpf: {} toFQDNs rules are tracked in the userspace \
             allow table but no connection filter enforces them",
            stats.fqdn_rules
        );
    }
}

/// What is in force instead of a rejected file version, for the log.
fn outcome_text(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::KeptLastGood => "its last good version stays in force",
        Outcome::PartlyLoaded => {
            "its valid documents load; the endpoints its invalid documents select are denied \
             everything"
        }
        Outcome::FailedClosed => {
            "it never loaded: every endpoint it could concern is denied everything"
        }
        Outcome::KeptLastGoodEndpoints => "the last good endpoint registry stays in force",
    }
}

/// Runs the agent until SIGTERM/SIGINT, then drains and exits 0.
pub fn run(args: &AgentArgs) -> Result<()> {
    const WHO: &str = "dnsfence agent";
    if args.uninstall {
        let detached = dnsfence_datapath::Datapath::uninstall(&args.serve.bpf_pin)?;
        eprintln!(
            "{WHO}: uninstalled: {detached} programs detached, {} removed",
            args.serve.bpf_pin.display()
        );
        return Ok(());
    }
    if args.policy.is_empty() && !args.k8s {
        bail!("--policy is required");
    }
    let plan = serve::plan(&args.serve)?;
    let (mut sources, _) = Sources::load(&args.policy, args.endpoints.as_deref())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("cannot load policy")?;
    let accept = |endpoints: &Endpoints| {
        let without_ips = endpoints.endpoints.iter().filter(|e| e.ips.is_empty());
        refuse_unenforceable(&args.serve, without_ips.count())
    };
    // The Kubernetes source: the agent serves only once the API gave a full state (until
    // then the standalone proxy, or the pinned datapath alone, enforces the last one).
    let k8s = match args.k8s {
        false => None,
        true => {
            let (source, node_name) = start_k8s(args)?;
            let Some(state) = source.wait_synced(args.k8s_sync_timeout) else {
                let status = source.status();
                if let Some(why) = status.stopped {
                    bail!("the Kubernetes source stopped before its first full state: {why}");
                }
                bail!(
                    "the Kubernetes API gave no full state within {:?} (connected: {}, {} \
                     errors; last: {})",
                    args.k8s_sync_timeout,
                    status.connected,
                    status.watch_errors,
                    status.last_error.as_deref().unwrap_or("none")
                );
            };
            // Review finding: a node name that is not the Node object's (the host name often
            // is not) made no pod this node's, so none was enforced, and nothing said so.
            if !source.status().render.local_node {
                eprintln!(
                    "{WHO}: warning: the Kubernetes API has no Node named {:?}: no pod is \
                     this node's, so none is enforced here (give --node-name, or NODE_NAME \
                     from the downward API, the Node's name)",
                    node_name
                );
            }
            let report = sources.apply_objects(&api_state(state), &accept);
            for rejection in &report.rejections {
                eprintln!(
                    "{WHO}: {}: {}:\n{}",
                    rejection.file.display(),
                    outcome_text(rejection.outcome),
                    rejection.errors
                );
            }
            // Serving with no registry would leave every workload unknown (in eBPF mode:
            // not enforced at all): the first one must load.
            if sources.endpoints().is_none() {
                bail!(
                    "the Kubernetes API's first registry of workloads does not load (see above); \
                     not serving"
                );
            }
            Some(source)
        }
    };
    let mut node = dnsfence_policy::cidr::NodeFacts {
        cluster: args.cluster_cidr.clone(),
        kube_apiserver: args.kube_apiserver.clone(),
        open_loopback: args.open_loopback_answers,
        deny_answers: args.deny_answer_cidr.clone(),
        ..Default::default()
    };
    node.host.extend(args.node_ip.iter().copied());
    let mut snapshot = sources.set_node(node);
    snapshot.set_generation(1);
    // The texts in force once: their identity now, and what the proxy gets below.
    let mut message = ha::policy_message(0, &sources);
    snapshot.set_policy_id(message.policy_id);
    refuse_unenforceable(&args.serve, snapshot.stats().without_ips).map_err(anyhow::Error::msg)?;
    // Accepted but not enforced (ingress sections, host policies): said once per note.
    let mut noted = std::collections::HashSet::new();
    for note in sources.notes() {
        eprintln!("{WHO}: {note}");
        noted.insert(note);
    }
    let policy = Arc::new(PolicyHandle::new(Arc::new(snapshot)));
    let ledger = args.serve.ledger();
    let state = ha::open_state(args.serve.state_dir.as_deref())?;
    let enforcer = Arc::new(if args.serve.no_bpf {
        Enforcer::userspace(ledger)
    } else {
        let install = dnsfence_datapath::InstallConfig {
            pin_dir: args.serve.bpf_pin.clone(),
            cgroup_root: args.cgroup_root.clone(),
            allow_entries: args.serve.allow_entries as u32,
            l3_entries: args.l3_entries,
            cluster_entries: args.cluster_entries,
            endpoint_entries: args.endpoint_entries,
        };
        Enforcer::bpf(&install, &plan.listen, ledger)?
    });
    for line in enforcer.apply(&policy.load())? {
        eprintln!("{WHO}: {line}");
    }
    let watch_stop = Arc::new(AtomicBool::new(false));
    let cgroup_watch = enforcer.watch_cgroups(Arc::clone(&policy), Arc::clone(&watch_stop));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    // The agent socket: where the standalone proxy gets policy and hands back what it
    // learned. Named: it must bind. The default: a warning when it cannot (another agent on
    // this node holds it, or no permission for /run/dnsfence).
    let socket_path = args
        .serve
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let sync = match AgentSync::bind(&socket_path, Arc::clone(&stop)) {
        Ok(sync) => Some(sync),
        Err(e) if args.serve.agent_socket.is_some() => return Err(e),
        Err(e) => {
            eprintln!(
                "{WHO}: warning: no agent socket ({e:#}): a standalone proxy cannot sync with \
                 this agent (--agent-socket names another path)"
            );
            None
        }
    };
    // The observe socket: where `dnsfence observe` gets the flow history. Named: it must
    // bind; the default (beside the agent socket): a warning when it cannot.
    let observe_path = args.observe_socket.clone().unwrap_or_else(|| {
        socket_path
            .parent()
            .unwrap_or_else(|| std::path::Path::new("."))
            .join(OBSERVE_SOCKET_NAME)
    });
    if args.serve.flow_history == 0 && args.observe_socket.is_some() {
        bail!("--observe-socket: no flows to serve with --flow-history 0");
    }
    let observe = match args.serve.flow_history {
        0 => None,
        _ => match ObserveServer::bind(&observe_path) {
            Ok(server) => Some(server),
            Err(e) if args.observe_socket.is_some() => return Err(e),
            Err(e) => {
                eprintln!(
                    "{WHO}: warning: no observe socket ({e:#}): `dnsfence observe` cannot \
                     reach this agent (--observe-socket names another path)"
                );
                None
            }
        },
    };
    let sync_stats = sync
        .as_ref()
        .map_or_else(Default::default, |s| Arc::clone(&s.stats));
    let history = (args.serve.flow_history > 0).then(|| {
        Arc::new(FlowHistory::new(
            args.serve.flow_history,
            Arc::clone(&policy),
            Arc::clone(&sync_stats),
        ))
    });
    let cache = ha::load_cache(WHO, state.as_ref(), &args.serve);
    let health = Arc::new(Health::new(Role::Agent, Arc::clone(&stop)));
    // The policy from the files is in force from the start (version 1 for the sync).
    health.policy_loaded(1);
    let endpoints = crate::serve::bind_metrics(&args.serve, Role::Agent)?;
    let mut server = Server::start(Start {
        who: WHO,
        args: &args.serve,
        plan,
        policy: Arc::clone(&policy),
        enforcer: Arc::clone(&enforcer),
        observations: cache,
        forward: history.as_ref().map(FlowHistory::forward),
        sync: sync_stats,
        pending: None,
        health: Arc::clone(&health),
        endpoints,
    })?;
    if let Some(history) = &history {
        history.attach(Arc::clone(&server.observations));
    }
    let mut version = 1;
    if let Some(sync) = &sync {
        message.version = version;
        sync.publish(message);
        sync.start(
            Arc::clone(&server.observations),
            history.clone(),
            ha::MergeLimits::of(&args.serve),
        )?;
        eprintln!("{WHO}: agent socket {}", socket_path.display());
    }
    if let (Some(observe), Some(history)) = (observe, &history) {
        observe.start(Arc::clone(history), Arc::clone(&stop))?;
        eprintln!(
            "{WHO}: observe socket {} (the last {} flows)",
            observe_path.display(),
            args.serve.flow_history
        );
    }
    warn_about_limits(args, &policy.load());

    // Control loop: hot reload and expiry sweeps until a signal arrives or a shard dies.
    // Each file reloads on its own and only as one consistent, settled version; what cannot
    // be used is reported and never widens enforcement (dnsfence_policy::reload).
    let reload = Arc::clone(&server.reload);
    let mut generation = 1;
    let mut last_check = Instant::now();
    let mut persisted = Instant::now();
    let mut failed = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        enforcer.repair();
        if let Some(i) = server.check() {
            failed = Some(i.to_string());
            break;
        }
        if persisted.elapsed() >= ha::CACHE_PERSIST_INTERVAL {
            persisted = Instant::now();
            ha::save_cache(WHO, state.as_ref(), &server.observations);
        }
        // What changed: the API's newest state (at once: a new pod is enforced before its
        // first query), and the files at each reload interval.
        let mut reports = Vec::new();
        if let Some(k8s) = &k8s {
            let status = k8s.status();
            reload.k8s.store(&status);
            // A dead watcher would leave its kind as it was, the status connected (review
            // finding): the standalone proxy serves while the supervisor restarts us.
            if let Some(why) = status.stopped {
                eprintln!("{WHO}: the Kubernetes source stopped: {why}");
                failed = Some("the Kubernetes source".to_string());
                break;
            }
            if let Some(state) = k8s.latest() {
                reports.push(sources.apply_objects(&api_state(state), &accept));
            }
        }
        if last_check.elapsed() >= args.reload_interval {
            last_check = Instant::now();
            enforcer.tick(&policy.load());
            reports.push(sources.check(&accept));
        }
        for report in reports {
            for rejection in &report.rejections {
                reload.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "{WHO}: policy reload rejected {}: {}:\n{}",
                    rejection.file.display(),
                    outcome_text(rejection.outcome),
                    rejection.errors
                );
            }
            if let Some(mut snapshot) = report.snapshot {
                generation += 1;
                snapshot.set_generation(generation);
                // Published to the standalone proxy's allow writer with the revocations; the
                // same message, numbered, goes to the proxy.
                let mut message = ha::policy_message(0, &sources);
                snapshot.set_policy_id(message.policy_id);
                let before = policy.load().stats();
                let after = snapshot.stats();
                // The allow entries follow the new policy before the shards do: a name the
                // reload allows is then written as soon as a shard forwards it, and a name it
                // removes is no longer written even by a shard still on the old snapshot.
                let snapshot = Arc::new(snapshot);
                match enforcer.apply(&snapshot) {
                    Ok(lines) => lines.iter().for_each(|l| eprintln!("{WHO}: {l}")),
                    Err(e) => eprintln!("{WHO}: datapath update failed: {e:#}"),
                }
                policy.store(snapshot);
                if let Some(sync) = &sync {
                    version += 1;
                    message.version = version;
                    sync.publish(message);
                }
                health.policy_loaded(version);
                for note in sources.notes() {
                    if noted.insert(note.clone()) {
                        eprintln!("{WHO}: {note}");
                    }
                }
                eprintln!(
                    "{WHO}: policy reloaded (generation {generation}){}",
                    match after.fail_closed {
                        0 => String::new(),
                        n => format!(
                            "; {n} endpoints denied everything: a policy selecting them failed to load"
                        ),
                    }
                );
                if (before.without_ips, before.fqdn_rules) != (after.without_ips, after.fqdn_rules)
                {
                    warn_about_limits(args, &policy.load());
                }
            }
        }
        let status = sources.status();
        reload
            .rejected
            .store(status.rejected as u64, Ordering::Relaxed);
        reload
            .pending
            .store(status.pending as u64, Ordering::Relaxed);
    }

    if failed.is_none() {
        eprintln!("{WHO}: stopping; draining in-flight queries");
    }
    // The agent socket goes first: a proxy reconnecting while the shards drain must find
    // no listener rather than one that no longer answers.
    drop(sync);
    drop(k8s);
    let observations = Arc::clone(&server.observations);
    server.shutdown();
    ha::save_cache(WHO, state.as_ref(), &observations);
    watch_stop.store(true, Ordering::Relaxed);
    if let Some(w) = cgroup_watch {
        let _ = w.join();
    }
    match failed {
        Some(what) => bail!("{what} stopped unexpectedly; exiting so a supervisor restarts us"),
        None => Ok(()),
    }
}
