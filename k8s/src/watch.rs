//! The runtime thread: one watcher + reflector store per kind, and the loop that renders and
//! publishes the stores' contents.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::render::{ClusterView, MIRROR_ANNOTATION, mirror_uid, render};
use crate::{ClusterState, K8sConfig, K8sError, K8sSource, K8sStatus};

/// A burst of events within this window gives one state.
const DEBOUNCE: Duration = Duration::from_millis(15);
/// At most one error line per this interval (the others are counted).
const LOG_INTERVAL: Duration = Duration::from_secs(30);
/// How often the API server is probed while the watchers report errors.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A list (or relist) still unanswered after this says the source is not connected: its
/// kind's changes are not being seen.
const LIST_STALL: Duration = Duration::from_secs(10);
/// No byte from the API server for this long on one request fails it (kube's client has
/// none by default, so a LIST whose server died without a reset would wait forever). Above
/// the watches' own 290 s server-side timeout, so a quiet watch is never cut by it.
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// A watch restarted for a fresh list because an event could not be applied goes on for about
/// this long first (half to one and a half times it, at random: every node's agent meets the
/// same bad line at once, and their lists must not hit the API server together), doubled at
/// each restart up to [`RELIST_PAUSE_MAX`]; back to the first pause after [`RELIST_QUIET`]
/// without a restart.
const RELIST_PAUSE: Duration = Duration::from_secs(4);
const RELIST_PAUSE_MAX: Duration = Duration::from_secs(300);
const RELIST_QUIET: Duration = Duration::from_secs(600);

/// What the caller's thread and the runtime thread share.
#[derive(Default)]
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    /// Set when the owner drops the source: what ends after it has not failed.
    stopping: AtomicBool,
}

#[derive(Default)]
struct Inner {
    current: Option<ClusterState>,
    taken: u64,
    status: K8sStatus,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn take(&self, again: bool) -> Option<ClusterState> {
        let mut inner = self.lock();
        let current = inner.current.clone()?;
        if !again && current.generation <= inner.taken {
            return None;
        }
        inner.taken = current.generation;
        Some(current)
    }

    pub(crate) fn wait(&self, timeout: Duration) -> Option<ClusterState> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        while inner.current.is_none() {
            if inner.status.stopped.is_some() {
                return None;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            inner = self
                .cond
                .wait_timeout(inner, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(inner);
        self.take(true)
    }

    pub(crate) fn status(&self) -> K8sStatus {
        self.lock().status.clone()
    }

    fn update(&self, f: impl FnOnce(&mut K8sStatus)) {
        f(&mut self.lock().status);
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn publish(&self, state: ClusterState) {
        let mut inner = self.lock();
        inner.status.synced = true;
        inner.current = Some(state);
        drop(inner);
        self.cond.notify_all();
    }
}

/// Marks the source stopped ([`K8sStatus::stopped`]) when dropped, unless the owner is
/// dropping the source: held by the runtime thread and by each task on it, so a panic there
/// (or a task that ends) is seen by the agent instead of leaving a kind, or the whole source,
/// silently frozen while the status still says connected (review finding).
struct Alive {
    shared: Arc<Shared>,
    what: String,
}

impl Drop for Alive {
    fn drop(&mut self) {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let why = if std::thread::panicking() {
            "panicked"
        } else {
            "ended"
        };
        let line = format!("{} {why}", self.what);
        self.shared.update(|s| {
            s.stopped.get_or_insert(line);
        });
        // A caller waiting for the first state gives up (see `Shared::wait`).
        self.shared.cond.notify_all();
    }
}

pub(crate) fn start(config: K8sConfig) -> Result<K8sSource, K8sError> {
    let shared = Arc::new(Shared::default());
    let (init_tx, init_rx) = std::sync::mpsc::channel::<Result<(), K8sError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let thread_shared = shared.clone();
    let thread = std::thread::Builder::new()
        .name("dnsfence-k8s".into())
        .spawn(move || {
            let alive = Alive {
                shared: thread_shared.clone(),
                what: "the source's thread".into(),
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    alive.shared.stopping();
                    let _ = init_tx.send(Err(K8sError::Runtime(e.to_string())));
                    return;
                }
            };
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(async move {
                    let client = match make_client(&config).await {
                        Ok(c) => {
                            let _ = init_tx.send(Ok(()));
                            c
                        }
                        Err(e) => {
                            thread_shared.stopping();
                            let _ = init_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::select! {
                        () = run(client, config, thread_shared) => {}
                        _ = stop_rx => {}
                    }
                })
            }));
            // Said before the runtime goes (its tasks' guards would name a watcher).
            if ran.is_err() && !alive.shared.stopping.load(Ordering::SeqCst) {
                alive.shared.update(|s| {
                    s.stopped
                        .get_or_insert_with(|| "the source's thread panicked".into());
                });
                alive.shared.cond.notify_all();
            }
            rt.shutdown_timeout(Duration::from_millis(500));
            drop(alive);
        })
        .map_err(|e| K8sError::Runtime(e.to_string()))?;
    let init = init_rx
        .recv()
        .unwrap_or_else(|_| Err(K8sError::Runtime("the runtime thread ended".into())));
    match init {
        Ok(()) => Ok(K8sSource {
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

async fn make_client(config: &K8sConfig) -> Result<Client, K8sError> {
    let cfg = match &config.kubeconfig {
        Some(path) => {
            let err = |e: &dyn std::fmt::Display| K8sError::Kubeconfig {
                path: path.clone(),
                message: e.to_string(),
            };
            let kc = Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
        // The pod's service account only (review finding: `Config::infer` took
        // $KUBECONFIG or ~/.kube/config first, so an agent on a control-plane node, run by
        // systemd as root, used root's admin kubeconfig, or another cluster's).
        None => kube::Config::incluster().map_err(|e| K8sError::Infer(e.to_string()))?,
    };
    let mut cfg = cfg;
    cfg.read_timeout = Some(READ_TIMEOUT);
    Client::try_from(cfg).map_err(|e| K8sError::Client(e.to_string()))
}

/// The watched kinds, in [`KINDS`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pods,
    Namespaces,
    Services,
    EndpointSlices,
    NetworkPolicies,
    ClusterwidePolicies,
    Nodes,
}

const KINDS: [Kind; 7] = [
    Kind::Pods,
    Kind::Namespaces,
    Kind::Services,
    Kind::EndpointSlices,
    Kind::NetworkPolicies,
    Kind::ClusterwidePolicies,
    Kind::Nodes,
];

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Namespaces => "namespaces",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices.discovery.k8s.io",
            Kind::NetworkPolicies => "ciliumnetworkpolicies.cilium.io",
            Kind::ClusterwidePolicies => "ciliumclusterwidenetworkpolicies.cilium.io",
            Kind::Nodes => "nodes",
        }
    }

    /// A Cilium CRD: may be absent from the cluster (404), then empty.
    fn optional(self) -> bool {
        matches!(self, Kind::NetworkPolicies | Kind::ClusterwidePolicies)
    }
}

/// What a watcher task reports to the loop.
#[derive(Debug)]
enum Note {
    /// A (re)list started.
    Init(Kind),
    /// A list completed; the store holds it.
    InitDone(Kind),
    /// An object was added, changed or deleted.
    Changed(Kind),
    /// The kind does not exist on the server (404).
    Missing(Kind),
    /// A list or watch failed (the watcher retries with backoff).
    Error(Kind, String),
    /// The API server answered a probe.
    Reachable,
    /// Time passes (every probe interval): stalled lists are noticed.
    Tick,
}

fn cilium_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What the stores keep of an object: everything but its managed fields and annotations,
/// which rendering never reads (review finding: whole objects were kept, so a tenant's
/// pods with hundreds of KB of annotations, unschedulable and costing no node anything,
/// could push every node's agent out of memory at once).
fn trim_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// [`trim_meta`], and of a pod also what rendering never reads of its spec and status:
/// containers, volumes, scheduling constraints, conditions, container statuses. Of its
/// annotations only [`MIRROR_ANNOTATION`] stays (it names a static pod's cgroup).
pub fn trim_pod(pod: &mut Pod) {
    // Only a usable value (bounded); another is kept empty, still saying "a mirror pod" (its
    // own UID names no cgroup).
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
        .then(|| {
            let uid = mirror_uid(pod).unwrap_or_default();
            (MIRROR_ANNOTATION.to_string(), uid.to_string())
        });
    trim_meta(pod);
    pod.metadata.annotations = mirror.map(|m| [m].into());
    if let Some(spec) = &mut pod.spec {
        spec.containers.clear();
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        spec.topology_spread_constraints = None;
        spec.node_selector = None;
        spec.readiness_gates = None;
        spec.resource_claims = None;
        spec.resources = None;
    }
    if let Some(status) = &mut pod.status {
        status.conditions = None;
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
        status.resource_claim_statuses = None;
        status.message = None;
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    wc: watcher::Config,
    mut writer: Writer<K>,
    kind: Kind,
    tx: mpsc::UnboundedSender<Note>,
    trim: fn(&mut K),
    shared: Arc<Shared>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    tokio::spawn(async move {
        let _alive = Alive {
            shared,
            what: format!("watching {}", kind.name()),
        };
        // The store is written here rather than by kube's `reflector`, so that it outlives a
        // watcher: a watch event that cannot be applied restarts the watcher, whose fresh list
        // then replaces the store whole (when complete, as any relist). Until the restart the
        // old watch goes on (review finding: a kind paused for its relist saw no new pod).
        let mut pause = RELIST_PAUSE;
        let mut last_restart: Option<tokio::time::Instant> = None;
        loop {
            let stream = watcher(api.clone(), wc.clone())
                .default_backoff()
                .modify(trim);
            let mut stream = Box::pin(stream);
            let mut restart_at: Option<tokio::time::Instant> = None;
            loop {
                let event = match restart_at {
                    None => stream.next().await,
                    Some(at) => tokio::select! {
                        event = stream.next() => event,
                        () = tokio::time::sleep_until(at) => break,
                    },
                };
                // A watcher's stream does not end (it retries with backoff).
                let Some(event) = event else {
                    return;
                };
                let note = match event {
                    Ok(event) => {
                        writer.apply_watcher_event(&event);
                        match event {
                            watcher::Event::Init => Note::Init(kind),
                            watcher::Event::InitApply(_) => continue,
                            watcher::Event::InitDone => Note::InitDone(kind),
                            watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                                Note::Changed(kind)
                            }
                        }
                    }
                    Err(e) if kind.optional() && not_found(&e) => Note::Missing(kind),
                    Err(e) if lost_event(&e) => {
                        let at = *restart_at.get_or_insert_with(|| {
                            if last_restart.is_some_and(|t| t.elapsed() > RELIST_QUIET) {
                                pause = RELIST_PAUSE;
                            }
                            // Spread over the pause: every node's agent meets the same line.
                            let wait = pause.mul_f64(0.5 + random_fraction());
                            pause = (pause * 2).min(RELIST_PAUSE_MAX);
                            tokio::time::Instant::now() + wait
                        });
                        Note::Error(
                            kind,
                            format!(
                                "{e}: an event could not be read; listing again in {:?}",
                                at.saturating_duration_since(tokio::time::Instant::now())
                            ),
                        )
                    }
                    Err(e) => Note::Error(kind, e.to_string()),
                };
                if tx.send(note).is_err() {
                    return;
                }
            }
            // The old watch's connection goes before the new one.
            drop(stream);
            last_restart = Some(tokio::time::Instant::now());
        }
    });
}

/// A number in [0, 1), different in every process and call (std's per-process hash keys).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `e` is a watch event that kube could not decode, which its watcher skips and goes
/// on (review finding: the change was lost until the next relist, maybe hours away: a deleted
/// pod stayed an endpoint, an edited policy stayed as it was). Such a line reaches us as a
/// decoding error, or, since every JSON object reads as a `Status` with all fields
/// defaulted, as an API error without a code. A transport error is none of these: the watcher
/// resumes from the last resourceVersion it saw and misses nothing.
fn lost_event(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchFailed(kube::Error::SerdeError(_)) => true,
        watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 0,
        _ => false,
    }
}

fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => {
            matches!(e, kube::Error::Api(status) if status.code == 404)
        }
        watcher::Error::WatchError(status) => status.code == 404,
        _ => false,
    }
}

/// The stores of every kind.
struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    network_policies: Store<DynamicObject>,
    clusterwide_policies: Store<DynamicObject>,
    nodes: Store<Node>,
}

fn spawn_watchers(
    client: &Client,
    config: &K8sConfig,
    tx: &mpsc::UnboundedSender<Note>,
    shared: &Arc<Shared>,
) -> Stores {
    let pods_wc = if config.remote_pods {
        watcher::Config::default()
    } else {
        watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name))
    };
    let (pods, w) = reflector::store();
    spawn_watch(
        Api::<Pod>::all(client.clone()),
        pods_wc,
        w,
        Kind::Pods,
        tx.clone(),
        trim_pod,
        shared.clone(),
    );
    let (namespaces, w) = reflector::store();
    spawn_watch(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        w,
        Kind::Namespaces,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    let (services, w) = reflector::store();
    spawn_watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        w,
        Kind::Services,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    let (endpoint_slices, w) = reflector::store();
    spawn_watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        w,
        Kind::EndpointSlices,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    let cnp = cilium_resource("CiliumNetworkPolicy", "ciliumnetworkpolicies");
    let w = Writer::new(cnp.clone());
    let network_policies = w.as_reader();
    spawn_watch(
        Api::<DynamicObject>::all_with(client.clone(), &cnp),
        watcher::Config::default(),
        w,
        Kind::NetworkPolicies,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    let ccnp = cilium_resource(
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
    );
    let w = Writer::new(ccnp.clone());
    let clusterwide_policies = w.as_reader();
    spawn_watch(
        Api::<DynamicObject>::all_with(client.clone(), &ccnp),
        watcher::Config::default(),
        w,
        Kind::ClusterwidePolicies,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    let (nodes, w) = reflector::store();
    spawn_watch(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        w,
        Kind::Nodes,
        tx.clone(),
        trim_meta,
        shared.clone(),
    );
    Stores {
        nodes,
        pods,
        namespaces,
        services,
        endpoint_slices,
        network_policies,
        clusterwide_policies,
    }
}

/// Error lines, at most one per [`LOG_INTERVAL`]; the others are counted.
#[derive(Default)]
struct LogLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    fn log(&mut self, line: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            eprintln!(
                "dnsfence: k8s: {line} ({} more errors in the last {}s)",
                self.suppressed,
                LOG_INTERVAL.as_secs()
            );
        } else {
            eprintln!("dnsfence: k8s: {line}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The loop's view of the watchers.
#[derive(Default)]
struct Progress {
    /// The kind's store holds a complete list.
    synced: [bool; KINDS.len()],
    /// The kind answered 404 since its last complete list: rendered empty.
    missing: [bool; KINDS.len()],
    /// The missing kind was logged.
    missing_logged: [bool; KINDS.len()],
    /// The latest request of the kind failed.
    failing: [bool; KINDS.len()],
    /// When the kind's current (re)list started; None when it is not listing.
    listing_since: [Option<Instant>; KINDS.len()],
}

impl Progress {
    fn ready(&self) -> bool {
        KINDS
            .iter()
            .all(|k| self.synced[k.index()] || self.missing[k.index()])
    }
}

async fn run(client: Client, config: K8sConfig, shared: Arc<Shared>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stores = spawn_watchers(&client, &config, &tx, &shared);
    let probe_alive = Alive {
        shared: shared.clone(),
        what: "the source's probe task".into(),
    };
    tokio::spawn(probe(client, shared.clone(), tx, probe_alive));

    let mut progress = Progress::default();
    let mut log = LogLimit::default();
    let mut last: Option<ClusterState> = None;
    while let Some(note) = rx.recv().await {
        // Only what can change the stores (or their use) calls for a rendering.
        let mut dirty = !matches!(note, Note::Tick | Note::Reachable | Note::Error(..));
        handle(note, &mut progress, &mut log, &shared, config.optional_crds);
        // Debounce: take what else arrives within the window, then render once.
        let deadline = tokio::time::Instant::now() + DEBOUNCE;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(note)) => {
                    dirty |= !matches!(note, Note::Tick | Note::Reachable | Note::Error(..));
                    handle(note, &mut progress, &mut log, &shared, config.optional_crds);
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if !dirty || !progress.ready() {
            continue;
        }
        let empty_if = |kind: Kind, objs: Vec<Arc<DynamicObject>>| {
            if progress.missing[kind.index()] {
                Vec::new()
            } else {
                objs
            }
        };
        let view = ClusterView {
            pods: stores.pods.state(),
            namespaces: stores.namespaces.state(),
            services: stores.services.state(),
            endpoint_slices: stores.endpoint_slices.state(),
            network_policies: empty_if(Kind::NetworkPolicies, stores.network_policies.state()),
            clusterwide_policies: empty_if(
                Kind::ClusterwidePolicies,
                stores.clusterwide_policies.state(),
            ),
            nodes: stores.nodes.state(),
        };
        let rendered = render(&view, &config);
        shared.update(|s| s.render = rendered.stats);
        let mut state = rendered.state;
        if let Some(prev) = &last
            && prev.policies == state.policies
            && prev.endpoints == state.endpoints
        {
            continue;
        }
        state.generation = last.as_ref().map_or(1, |p| p.generation + 1);
        shared.publish(state.clone());
        last = Some(state);
    }
}

/// Whether a list has been waiting longer than [`LIST_STALL`].
fn stalled(progress: &Progress) -> Option<Kind> {
    KINDS.into_iter().find(|k| {
        progress.listing_since[k.index()].is_some_and(|since| since.elapsed() > LIST_STALL)
    })
}

fn handle(
    note: Note,
    progress: &mut Progress,
    log: &mut LogLimit,
    shared: &Shared,
    optional_crds: bool,
) {
    let ok = |kind: Kind, progress: &mut Progress| {
        progress.failing[kind.index()] = false;
        let connected = !progress.failing.iter().any(|f| *f) && stalled(progress).is_none();
        shared.update(|s| s.connected = connected);
    };
    match note {
        Note::Init(kind) => {
            if progress.synced[kind.index()] {
                shared.update(|s| s.relists += 1);
            }
            progress.listing_since[kind.index()] = Some(Instant::now());
            ok(kind, progress);
        }
        Note::InitDone(kind) => {
            progress.synced[kind.index()] = true;
            progress.missing[kind.index()] = false;
            progress.listing_since[kind.index()] = None;
            ok(kind, progress);
        }
        Note::Changed(kind) => ok(kind, progress),
        // A Cilium kind not served. Before its first complete list, and only when the CRDs
        // may be absent (--k8s-optional-crds), it is an empty kind. Otherwise it is an error
        // and the store stays as listed: an API server that restarts serves custom resources
        // as 404 until it registered their CRDs again, and emptying the kind then would drop
        // every policy for that window (fail open).
        Note::Missing(kind) if optional_crds && !progress.synced[kind.index()] => {
            progress.missing[kind.index()] = true;
            progress.listing_since[kind.index()] = None;
            if !progress.missing_logged[kind.index()] {
                progress.missing_logged[kind.index()] = true;
                eprintln!(
                    "dnsfence: k8s: {} is not served (CRD not installed): treated as empty, still watching",
                    kind.name()
                );
            }
            ok(kind, progress);
        }
        Note::Missing(kind) => handle(
            Note::Error(
                kind,
                "404: not served (CRD not installed? --k8s-optional-crds makes an absent \
                 Cilium CRD an empty kind); what was listed stays"
                    .into(),
            ),
            progress,
            log,
            shared,
            optional_crds,
        ),
        Note::Tick => {
            if let Some(kind) = stalled(progress) {
                log.log(&format!(
                    "listing {} unanswered for more than {LIST_STALL:?}",
                    kind.name()
                ));
                shared.update(|s| s.connected = false);
            }
        }
        Note::Error(kind, message) => {
            progress.failing[kind.index()] = true;
            let line = format!("watching {}: {message}", kind.name());
            log.log(&line);
            shared.update(|s| {
                s.connected = false;
                s.watch_errors += 1;
                s.last_error = Some(line);
            });
        }
        Note::Reachable => {
            progress.failing = [false; KINDS.len()];
            let connected = stalled(progress).is_none();
            shared.update(|s| s.connected = connected);
        }
    }
}

/// While the watchers report errors, asks the API server for `/version` now and then: a
/// watch that resumes says nothing until the next change, so this is how `connected` comes
/// back.
async fn probe(
    client: Client,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Note>,
    _alive: Alive,
) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        if tx.send(Note::Tick).is_err() {
            return;
        }
        if shared.status().connected {
            continue;
        }
        if client.apiserver_version().await.is_ok() && tx.send(Note::Reachable).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CgroupDriver;
    use dnsfence_testkit::kube::{FakeApi, Res};
    use serde_json::json;

    fn panics(_: &mut Namespace) {
        panic!("a trim that panics (test)");
    }

    /// A watcher task that dies (here: a panic while it trims an object) is seen in the
    /// status; before, its kind stayed frozen at its last list and nothing said so.
    #[test]
    fn a_watcher_that_dies_marks_the_source_stopped() {
        let api = FakeApi::start();
        api.apply(Res::Namespaces, json!({"metadata": {"name": "a"}}));
        let dir = tempfile::tempdir().expect("temp dir");
        let config = K8sConfig {
            kubeconfig: Some(api.kubeconfig(dir.path())),
            node_name: "n1".into(),
            cgroup_driver: CgroupDriver::Systemd,
            cgroup_prefix: String::new(),
            remote_pods: true,
            require_ips: false,
            optional_crds: false,
            cluster_name: "default".into(),
        };
        let shared = Arc::new(Shared::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = make_client(&config).await.expect("client");
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (_store, writer) = reflector::store();
            spawn_watch(
                Api::<Namespace>::all(client),
                watcher::Config::default(),
                writer,
                Kind::Namespaces,
                tx,
                panics,
                shared.clone(),
            );
            // The task's sender goes with it.
            tokio::time::timeout(Duration::from_secs(10), async {
                while rx.recv().await.is_some() {}
            })
            .await
            .expect("the watcher task ended");
        });
        let stopped = shared.status().stopped.expect("stopped");
        assert!(stopped.starts_with("watching namespaces"), "{stopped}");
    }
}
