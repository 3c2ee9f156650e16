//! `dnsfence proxy`: the standalone HA proxy (`../shared/spec/ha.md`). The same data plane as
//! the agent's (`serve.rs`) on the same `--listen` (SO_REUSEPORT: both serve), with policy
//! from the agent over the agent socket, persisted in `--state-dir` so that it serves at
//! once after a restart, even with no agent; allow entries written into the maps the agent
//! pinned; what it learns kept for the agent until acknowledged (`ha.rs`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dnsfence_engine::shard::PolicyHandle;
use dnsfence_policy::Snapshot;

use crate::agent::DEFAULT_AGENT_SOCKET;
use crate::enforce::Enforcer;
use crate::ha::{self, Pending, ProxySync};
use crate::health::{Health, Role};
use crate::serve::{self, ServeArgs, Server, Start, UnknownFlag};

/// Most records per replay buffer. Each buffer is bounded in bytes as well
/// (`ha::REPLAY_BYTES`), so two full buffers stay under the state file's 256 MiB bound
/// whatever their records weigh (an observation may carry `--max-ips-per-name` addresses).
const MAX_REPLAY: usize = 1 << 18;

/// The snapshot in force (and whether it is persisted) is now persisted.
fn mark_persisted(in_force: &mut Option<(dnsfence_sync::proto::PolicySnapshot, bool)>) {
    if let Some((_, persisted)) = in_force {
        *persisted = true;
    }
}

/// How often, while no agent is connected, the proxy looks for endpoint cgroups without an
/// endpoints-map entry (a stat per endpoint cgroup of the node).
const FILL_INTERVAL: Duration = Duration::from_millis(200);

/// With a persisted policy, how long the proxy looks for the agent before serving from it.
const AGENT_PROBE: Duration = Duration::from_millis(300);

/// Flags of `dnsfence proxy`.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// The data-plane flags (the same as the agent's; give the same --listen).
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Observations (and flow records, see --flow-history) kept for the agent while it is
    /// away, each; beyond it, or beyond 120 MiB of records each, the oldest are dropped and
    /// counted. At most 262144.
    #[arg(long, default_value_t = 1 << 16)]
    pub replay_capacity: usize,
    /// With no persisted policy, how long to wait for the agent's before serving (then
    /// every query is refused until it comes).
    #[arg(long, default_value = "5s", value_parser = crate::serve::parse_duration)]
    pub first_policy_wait: Duration,
    /// The agent's --cgroup-root (eBPF mode): while no agent is connected, an endpoint
    /// cgroup created again under a new id (a service restart, a pod's sandbox) gets its
    /// endpoints-map entry from the proxy, so that it is enforced before the agent returns.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
}

/// Runs the proxy until SIGTERM/SIGINT, then drains and exits 0.
pub fn run(args: &ProxyArgs) -> Result<()> {
    const WHO: &str = "dnsfence proxy";
    let Some(state_dir) = &args.serve.state_dir else {
        bail!("--state-dir is required: the proxy serves from the policy it persisted there");
    };
    let plan = serve::plan(&args.serve)?;
    let state = Arc::new(ha::open_state(Some(state_dir))?.context("state directory")?);
    // The policy in force: the one persisted, else none (every query refused) until the
    // agent sends one. A corrupt state file is set aside, said in one line, and fails closed.
    // What the agent refuses to serve (cgroup-only endpoints under --no-bpf and
    // --unknown-source allow: unrestricted), the proxy refuses to put in force (review
    // finding: it did not check).
    let unenforceable = {
        let no_bpf = args.serve.no_bpf;
        let unknown_allow = matches!(args.serve.unknown_source, UnknownFlag::Allow);
        move |snapshot: &Snapshot| {
            crate::agent::unenforceable(no_bpf, unknown_allow, snapshot.stats().without_ips)
                .map_err(anyhow::Error::msg)
        }
    };
    let (snapshot, version) = match ha::load_policy(&state) {
        Ok(Some(msg)) => match ha::compile(&msg).and_then(|compiled| {
            unenforceable(&compiled.1)?;
            Ok(compiled)
        }) {
            Ok((_, snapshot, lines)) => {
                lines.iter().for_each(|l| eprintln!("{WHO}: {l}"));
                eprintln!(
                    "{WHO}: policy persisted in {} (snapshot {}) loaded; in force unless the agent sends its own",
                    state_dir.display(),
                    msg.version
                );
                (snapshot, Some(msg.version))
            }
            // Intact but not for this build (written by another version, say): fail closed
            // like a corrupt file, not exit (review finding).
            Err(e) => {
                eprintln!(
                    "{WHO}: policy persisted in {} (snapshot {}) cannot be used: {e:#}; every \
                     query is refused until the agent sends a policy",
                    state_dir.display(),
                    msg.version
                );
                (Snapshot::empty(), None)
            }
        },
        Ok(None) => {
            eprintln!(
                "{WHO}: no policy persisted in {}: every query is refused until the agent \
                 sends one",
                state_dir.display()
            );
            (Snapshot::empty(), None)
        }
        Err(e) => {
            eprintln!("{WHO}: {e:#}; every query is refused until the agent sends a policy");
            (Snapshot::empty(), None)
        }
    };
    if version.is_none() && matches!(args.serve.unknown_source, UnknownFlag::Allow) {
        // With no policy every client is an unknown source: allowed, it would be unrestricted.
        bail!(
            "no policy to serve with, and --unknown-source allow would forward everything: \
             start the agent (or restore {}) first",
            state_dir.display()
        );
    }
    let policy = Arc::new(PolicyHandle::new(Arc::new(snapshot)));
    let enforcer = Arc::new(if args.serve.no_bpf {
        Enforcer::userspace(args.serve.ledger())
    } else {
        // The maps the agent pinned; nothing is revoked against the persisted snapshot (it
        // may be older than the agent's policy that wrote them): only snapshots from the
        // agent revoke.
        Enforcer::attached(&args.serve.bpf_pin, &args.cgroup_root, args.serve.ledger())?
    });
    // Its repairs of what the agent removes wait while the agent's policy is another.
    enforcer.follow_policy(policy.load().policy_id());
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    if args.replay_capacity > MAX_REPLAY {
        bail!("--replay-capacity: at most {MAX_REPLAY} (the state file's bound)");
    }
    let pending = Arc::new(Pending::new(args.replay_capacity.max(1)));
    pending.restore(WHO, &state);
    let cache = ha::load_cache(WHO, Some(&state), &args.serve);
    let sync_stats = Arc::new(ha::SyncStats::default());
    let health = Arc::new(Health::new(Role::Proxy, Arc::clone(&stop)));
    if let Some(version) = version {
        health.policy_loaded(version);
    }
    // Each snapshot from the agent: compiled, then the allow entries follow it, then the
    // shards, then it is persisted (so a restart serves it) and acknowledged. One whose texts
    // are those of the snapshot the agent last sent (a restarted agent sends its policy
    // again, numbered from 1) changes nothing: it is persisted under its number and
    // acknowledged, and the shards keep their tables (issue 8: an agent's restart cost the
    // proxy serving beside it a compile, a walk of the allow ledger and every shard's cache).
    let generation = Arc::new(AtomicU64::new(1));
    let apply = {
        let (policy, enforcer, state, generation, health) = (
            Arc::clone(&policy),
            Arc::clone(&enforcer),
            Arc::clone(&state),
            Arc::clone(&generation),
            Arc::clone(&health),
        );
        // The agent's last snapshot in force in this process (not the persisted one, which
        // revoked nothing: the first from the agent is always applied), and whether it is
        // persisted yet.
        let mut in_force: Option<(dnsfence_sync::proto::PolicySnapshot, bool)> = None;
        move |msg: &dnsfence_sync::proto::PolicySnapshot| -> Result<(), ha::ApplyError> {
            if let Some((last, persisted)) = &in_force
                && ha::same_policy(last, msg)
            {
                // The same texts: the agent's identity for them is this process's now (an
                // agent of another build may give them another).
                enforcer.follow_policy(ha::sent_policy_id(msg));
                let retry = !*persisted;
                if retry || last.version != msg.version {
                    in_force = Some((msg.clone(), false));
                    ha::save_policy(&state, msg).map_err(ha::ApplyError::NotPersisted)?;
                    mark_persisted(&mut in_force);
                }
                health.policy_loaded(msg.version);
                if retry {
                    eprintln!(
                        "{WHO}: policy snapshot {} from the agent in force, persisted now",
                        msg.version
                    );
                } else {
                    eprintln!(
                        "{WHO}: policy snapshot {} from the agent: the policy in force, unchanged",
                        msg.version
                    );
                }
                return Ok(());
            }
            // Unknown until it is in force: a failure part-way (the allow entries may already
            // follow it) must not let a later message equal to the older policy be taken as
            // in force (review finding).
            in_force = None;
            let (_, mut snapshot, lines) = ha::compile(msg).map_err(ha::ApplyError::NotApplied)?;
            unenforceable(&snapshot).map_err(ha::ApplyError::NotApplied)?;
            lines.iter().for_each(|l| eprintln!("{WHO}: {l}"));
            snapshot.set_generation(generation.fetch_add(1, Ordering::Relaxed) + 1);
            let snapshot = Arc::new(snapshot);
            // Persisted before it is put in force (review finding: a crash between the two
            // left the older, maybe wider, policy on disk for a restart without the agent);
            // a failed save does not hold it back, and is retried.
            let saved = ha::save_policy(&state, msg);
            for line in enforcer
                .apply(&snapshot)
                .map_err(ha::ApplyError::NotApplied)?
            {
                eprintln!("{WHO}: {line}");
            }
            policy.store(snapshot);
            health.policy_loaded(msg.version);
            in_force = Some((msg.clone(), false));
            saved.map_err(ha::ApplyError::NotPersisted)?;
            mark_persisted(&mut in_force);
            eprintln!(
                "{WHO}: policy snapshot {} from the agent in force",
                msg.version
            );
            Ok(())
        }
    };
    let socket = args
        .serve
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    // Probes get 503 while the proxy waits for its first policy below.
    let endpoints = crate::serve::bind_metrics(&args.serve, Role::Proxy)?;
    let sync = ProxySync::start(
        socket,
        Arc::clone(&pending),
        apply,
        Arc::clone(&sync_stats),
        Arc::clone(&stop),
    )?;

    // Ready before serving: when the agent answers (or there is no persisted policy), wait
    // (bounded) for the agent's policy, so that the proxy does not join the port only to
    // refuse what the agent would answer, nor answer with a persisted policy older than the
    // agent's (review finding: a narrowed policy leaked for ~200 ms). The persisted policy
    // serves only when no agent answers.
    // While connected it waits as long as the agent takes (the agent serves meanwhile; a
    // hung agent is dropped after the peer timeout), but not past a snapshot it cannot put in
    // force (review finding: it waited for ever, and when the agent then went, DNS stopped
    // until the proxy had started): it serves the policy it has, as it does when that
    // happens later.
    let started = Instant::now();
    while generation.load(Ordering::Relaxed) == 1
        && !stop.load(Ordering::Relaxed)
        && sync_stats.snapshots_refused.load(Ordering::Relaxed) == 0
    {
        let connected = sync_stats.connected.load(Ordering::Relaxed) > 0;
        let waited = started.elapsed();
        if !connected
            && match version {
                Some(_) => waited >= AGENT_PROBE,
                None => waited >= args.first_policy_wait,
            }
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut server = Server::start(Start {
        who: WHO,
        args: &args.serve,
        plan,
        policy: Arc::clone(&policy),
        enforcer: Arc::clone(&enforcer),
        observations: cache,
        forward: Some(pending.forward()),
        sync: Arc::clone(&sync_stats),
        pending: Some(Arc::clone(&pending)),
        health,
        endpoints,
    })?;

    let mut failed = None;
    let mut ticked = Instant::now();
    let mut persisted = Instant::now();
    let mut filled = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        enforcer.repair();
        // No agent to pick up endpoint cgroups created again meanwhile: the proxy does.
        if filled.elapsed() >= FILL_INTERVAL && sync_stats.connected.load(Ordering::Relaxed) == 0 {
            filled = Instant::now();
            enforcer.fill_endpoints(&policy.load());
        }
        if let Some(i) = server.check() {
            failed = Some(i);
            break;
        }
        if ticked.elapsed() >= Duration::from_secs(1) {
            ticked = Instant::now();
            enforcer.tick(&policy.load());
        }
        if persisted.elapsed() >= ha::CACHE_PERSIST_INTERVAL {
            persisted = Instant::now();
            pending.persist(WHO, &state);
            ha::save_cache(WHO, Some(&state), &server.observations);
        }
    }
    if failed.is_none() {
        eprintln!("{WHO}: stopping; draining in-flight queries");
    }
    stop.store(true, Ordering::Relaxed);
    let observations = Arc::clone(&server.observations);
    server.shutdown();
    sync.join();
    pending.persist(WHO, &state);
    ha::save_cache(WHO, Some(&state), &observations);
    let (held, overflowed) = pending.counts();
    if held > 0 || overflowed > 0 {
        eprintln!(
            "{WHO}: {held} records kept for the agent in {} ({overflowed} dropped by overflow)",
            state_dir.display()
        );
    }
    match failed {
        Some(what) => bail!("{what} stopped unexpectedly; exiting so a supervisor restarts us"),
        None => Ok(()),
    }
}
