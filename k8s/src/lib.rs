//! dnsfence's Kubernetes source: watches the API server with kube-rs and renders the cluster
//! as the texts dnsfence's policy loader parses: one policy text per CiliumNetworkPolicy /
//! CiliumClusterwideNetworkPolicy and one endpoints text (pods and services).
//!
//! [`K8sSource::start`] runs the watchers (pods, namespaces, services, EndpointSlices and the
//! two Cilium kinds) on one thread with a single-threaded tokio runtime. A state is published
//! once every watcher has finished its initial list, then after each change (debounced), and
//! only when a text changed. A relist (410 Gone) replaces a store at once (the store is swapped
//! when the list is complete), so no half-listed view is ever rendered; a watch event that
//! cannot be decoded (kube's watcher would skip it) starts such a relist, with backoff. A
//! watcher or the thread that stops is reported ([`K8sStatus::stopped`]). While the API server
//! cannot be reached nothing is published: the last state stays in force.
//!
//! The rendering itself is [`render()`], a pure function of a [`ClusterView`].
#![forbid(unsafe_code)]

mod render;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use k8s_openapi;
pub use kube;
pub use render::{
    CCNP_DIR, CNP_DIR, ClusterView, ENDPOINTS_PATH, MIRROR_ANNOTATION, NAMESPACE_LABELS_PREFIX,
    RenderStats, Rendered, SERVICE_ACCOUNT_LABEL, pod_cgroup, render,
};
pub use watch::trim_pod;

/// The kubelet's cgroup driver: how pod cgroups are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
}

/// What to watch and how to render it.
#[derive(Debug, Clone)]
pub struct K8sConfig {
    /// `None`: the in-cluster configuration (the pod's service account, never
    /// `$KUBECONFIG` or `~/.kube/config`); else this kubeconfig file.
    pub kubeconfig: Option<PathBuf>,
    /// Pods with `spec.nodeName` equal to this are this node's workloads (with a cgroup).
    pub node_name: String,
    /// How the kubelet names pod cgroups.
    pub cgroup_driver: CgroupDriver,
    /// Prepended to every pod cgroup path (`""`: none); no leading or trailing `/`.
    pub cgroup_prefix: String,
    /// Also list the pods of other nodes, as peers (addresses, no cgroup) for `toEndpoints`.
    pub remote_pods: bool,
    /// Leave out pods without an address (the agent sets this without BPF).
    pub require_ips: bool,
    /// Cilium's CRDs may be absent: a Cilium kind the API server does not serve (404) before
    /// its first complete list is an empty kind. Without it such a 404 is an error, and the
    /// source does not sync until the kind is served. A 404 after a complete list is always
    /// an error (the last list stays).
    pub optional_crds: bool,
    /// The cluster's name, every pod's `io.cilium.k8s.policy.cluster` label (Cilium's
    /// `cluster-name`, `default` unless set).
    pub cluster_name: String,
}

/// The cluster as texts for the policy loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    /// One text per Cilium policy, sorted by path: `k8s/ciliumnetworkpolicies/<ns>/<name>`,
    /// `k8s/ciliumclusterwidenetworkpolicies/<name>`.
    pub policies: Vec<(PathBuf, Arc<str>)>,
    /// The endpoints text, at path `k8s/endpoints`.
    pub endpoints: (PathBuf, Arc<str>),
    /// Increases with each published state (1 for the first).
    pub generation: u64,
}

/// The source's health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sStatus {
    /// Every watcher has finished its initial list (a state has been published).
    pub synced: bool,
    /// The API server answered the latest request (cleared by an error, set again by the next
    /// event or a successful probe of `/version`).
    pub connected: bool,
    /// Watch and list errors so far (a missing Cilium CRD's 404s are not counted).
    pub watch_errors: u64,
    /// Full relists after the initial one (410 Gone, watch desync).
    pub relists: u64,
    /// The latest error.
    pub last_error: Option<String>,
    /// What the latest rendering left out.
    pub render: RenderStats,
    /// The source, or one of its watchers, stopped (a panic): nothing it should see is seen
    /// any more. The agent exits on it, for its supervisor to restart it.
    pub stopped: Option<String>,
}

/// Errors starting the source.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The kubeconfig file could not be read or used.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No in-cluster configuration (not in a pod: give `--kubeconfig`).
    #[error("no in-cluster Kubernetes configuration (outside a pod, give --kubeconfig): {0}")]
    Infer(String),
    /// The client could not be built (TLS, authentication).
    #[error("Kubernetes client: {0}")]
    Client(String),
    /// The runtime or its thread could not be started.
    #[error("cannot start the Kubernetes source: {0}")]
    Runtime(String),
}

/// The running source: one thread watching the API server.
pub struct K8sSource {
    shared: Arc<watch::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl K8sSource {
    /// Loads the configuration, builds the client and starts the watchers on their own thread.
    /// Fails when the configuration cannot be loaded; an unreachable API server is not an
    /// error here (see [`K8sSource::status`]).
    pub fn start(config: K8sConfig) -> Result<K8sSource, K8sError> {
        watch::start(config)
    }

    /// The newest state not taken yet: `None` before every watcher has synced, and when
    /// nothing changed since the last call. Never blocks.
    pub fn latest(&self) -> Option<ClusterState> {
        self.shared.take(false)
    }

    /// Waits (at most `timeout`) for the first full state and returns the newest one (taking
    /// it, as [`K8sSource::latest`] does); `None` on timeout.
    pub fn wait_synced(&self, timeout: Duration) -> Option<ClusterState> {
        self.shared.wait(timeout)
    }

    /// The source's health.
    pub fn status(&self) -> K8sStatus {
        self.shared.status()
    }
}

impl Drop for K8sSource {
    fn drop(&mut self) {
        self.shared.stopping();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for K8sSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sSource")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}
