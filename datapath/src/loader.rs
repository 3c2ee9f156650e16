//! Loading, attaching and pinning the programs; opening, reusing and removing the maps.
//!
//! Layout under `--bpf-pin` (default `/sys/fs/bpf/dnsfence`):
//! - `maps-v<ABI>/<map>`: the maps, pinned by name. A restarted agent reuses them as they
//!   are (allow entries are not flushed); a new layout gets a new directory, into which
//!   `install` copies the older layout's allow entries (where their layout is the same)
//!   before its programs enforce, and then unpins the older directory.
//! - `links/<program>@<n>-<object digest>-<cgroup id>`: one pinned bpf_link per program,
//!   attached at the cgroup root. Pinned links keep the programs attached with no process
//!   alive. An upgrade attaches the new programs first, then unpins (detaches) the older
//!   links: enforcement never pauses. A restart of the same build on the same cgroup, whose
//!   programs still use the pinned maps, keeps them as they are: no verifier work (about
//!   0.1 s of CPU, half of an agent's start-up) on a node that is serving meanwhile.
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use dnsfence_engine::allow::{LedgerConfig, PortSpec};
use dnsfence_policy::Snapshot;

use crate::maps::{
    self, Addr, CLUSTER_INSIDE, CLUSTER_OUTSIDE, CLUSTER_UNKNOWN, CidrData, CidrValue, Config,
    EP_ENFORCE, Endpoint, MAX_L3_SPECS, MAX_SPECS, SCOPE_ANY, SCOPE_INSIDE, SCOPE_OUTSIDE, Spec,
    Stat, names,
};
use crate::sink::BpfAllow;
use crate::sys;

/// The object built from `ebpf/dnsfence.bpf.c` (checked current by `ebpf/build.sh --check`).
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!("../../ebpf/dnsfence.bpf.o");

/// The programs of the object, each attached once at the cgroup root.
pub const PROGRAMS: [&str; 9] = [
    "df_connect4",
    "df_connect6",
    "df_sendmsg4",
    "df_sendmsg6",
    "df_recvmsg4",
    "df_recvmsg6",
    "df_getpeername4",
    "df_getpeername6",
    "df_egress",
];

/// Why the datapath could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A filesystem step failed (creating a directory, mounting, reading a cgroup).
    #[error("{what} {path}: {source}")]
    Fs {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cgroup root is neither in a cgroup v2 hierarchy nor an empty directory.
    #[error(
        "{0} is not a cgroup v2 hierarchy and not empty (cgroup v1 or other files there): pass \
         --cgroup-root with a cgroup v2 directory (e.g. /sys/fs/cgroup/unified on a hybrid \
         host) or an empty directory to mount one on"
    )]
    NotCgroup2(PathBuf),
    /// Another process (an agent, or an uninstall) holds the pin directory.
    #[error(
        "{pin} is in use by another dnsfence process{holder}: one agent per --bpf-pin (stop it \
         first, or give this one another --bpf-pin)"
    )]
    Busy {
        /// The pin directory.
        pin: PathBuf,
        /// ` (pid N)` when known.
        holder: String,
    },
    /// The pin directory is not on a bpffs.
    #[error("{0} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs(PathBuf),
    /// Loading the object or a program failed (the verifier's log, or no permission).
    #[error("loading the BPF object: {0}")]
    Load(String),
    /// Attaching or pinning a program failed.
    #[error("attaching {program}: {reason}")]
    Attach {
        /// The program.
        program: &'static str,
        /// Why.
        reason: String,
    },
    /// A map operation failed.
    #[error("map {map}: {reason}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        reason: String,
    },
}

fn fs_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> DatapathError + 'p {
    move |source| DatapathError::Fs {
        what,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        reason: e.to_string(),
    }
}

/// Where and how to install.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The bpffs directory for maps and links.
    pub pin_dir: PathBuf,
    /// The cgroup v2 hierarchy to attach at (mounted there when it is not one).
    pub cgroup_root: PathBuf,
    /// Size of the allow map (node-wide capacity).
    pub allow_entries: u32,
    /// Size of the L3 prefix trie (all endpoints' toCIDR/toEndpoints/toEntities prefixes).
    pub l3_entries: u32,
    /// Size of the cluster map: the cluster's addresses, minimal (`--cluster-cidr` ranges
    /// stand for the pods inside them), plus two.
    pub cluster_entries: u32,
    /// Size of the endpoints map: the node's endpoint cgroups.
    pub endpoint_entries: u32,
}

/// The maps directory of a pin directory.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{}", maps::ABI))
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Makes sure `root` is in a cgroup v2 hierarchy, mounting one there when it is a new or
/// empty directory. Anything else (a cgroup v1 tmpfs such as `/sys/fs/cgroup` on a hybrid
/// host, a directory with files) is refused rather than mounted over.
pub fn ensure_cgroup2(root: &Path) -> Result<(), DatapathError> {
    fs::create_dir_all(root).map_err(fs_err("creating", root))?;
    if sys::fs_magic(root).map_err(fs_err("statfs", root))? == sys::CGROUP2_MAGIC {
        return Ok(());
    }
    let empty = fs::read_dir(root)
        .map_err(fs_err("reading", root))?
        .next()
        .is_none();
    if !empty {
        return Err(DatapathError::NotCgroup2(root.to_path_buf()));
    }
    sys::mount("cgroup2", root).map_err(fs_err("mounting cgroup2 at", root))
}

/// Makes sure `pin_dir` is on a bpffs (mounting /sys/fs/bpf when the pin directory is below
/// it and nothing is mounted there).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if sys::fs_magic(existing).map_err(fs_err("statfs", existing))? == sys::BPF_FS_MAGIC {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && existing == default {
        sys::mount("bpf", default).map_err(fs_err("mounting bpffs at", default))?;
        return Ok(());
    }
    Err(DatapathError::NotBpffs(pin_dir.to_path_buf()))
}

/// Where the lock of a pin directory lives (bpffs holds no regular files): a file under
/// `/run/dnsfence/` named after the pin directory, absolute and in normal form (a trailing
/// slash, `//` or `./` spell the same directory, so they are the same lock).
fn lock_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "pin")
}

/// The lock the writers of a pin directory's allow map (agent and standalone proxy) take
/// around a write or a sweep, so that a sweep's read-then-remove never falls between the
/// other writer's read and write of the same entry.
pub fn allow_lock_path(pin_dir: &Path) -> PathBuf {
    run_file(pin_dir, "allow")
}

/// Removes the lock files of `pin_dir` (its pin lock and its writers' lock). Only for a pin
/// directory no process uses or will use again (a test's or a demo's, after its uninstall and
/// once its processes have exited): a writer still running keeps the removed writers' lock
/// open and mapped while a new one would create another, and pin directories that differ
/// only in punctuation share lock files (their names keep letters and digits only). Without
/// this, each such directory left two files behind (64 KiB for the writers' lock): a test
/// run left thousands. Missing files are not an error.
pub fn remove_lock_files(pin_dir: &Path) -> io::Result<()> {
    for lock in [allow_lock_path(pin_dir), lock_path(pin_dir)] {
        match fs::remove_file(&lock) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// `/run/dnsfence/{prefix}{pin_dir as one name}.lock`.
fn run_file(pin_dir: &Path, prefix: &str) -> PathBuf {
    let absolute = std::path::absolute(pin_dir).unwrap_or_else(|_| pin_dir.to_path_buf());
    let normal: PathBuf = absolute.components().collect();
    let name: String = normal
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Path::new("/run/dnsfence").join(format!("{prefix}{name}.lock"))
}

/// An exclusive hold on a pin directory for the life of the process (the kernel drops it
/// when the process exits, however it exits: no stale lock after a kill -9).
#[derive(Debug)]
pub struct PinLock {
    _file: fs::File,
}

impl PinLock {
    /// Takes the lock of `pin_dir`, or says who holds it.
    pub fn take(pin_dir: &Path) -> Result<PinLock, DatapathError> {
        use std::io::{Read, Seek, Write};
        let path = lock_path(pin_dir);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(fs_err("creating", dir))?;
        }
        // `remove_lock_files` may remove the file between its opening and its locking here:
        // that file is no longer the lock (another taker may hold the new one): take it
        // again; still moving after three tries, it counts as busy.
        let mut tries = 0;
        let (mut file, locked) = loop {
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(fs_err("opening", &path))?;
            tries += 1;
            let locked = file.try_lock().is_ok();
            if !locked || is_at(&file, &path) {
                break (file, locked);
            }
            if tries == 3 {
                break (file, false);
            }
        };
        if !locked {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(DatapathError::Busy {
                pin: pin_dir.to_path_buf(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(PinLock { _file: file })
    }
}

/// Whether `path` names the file `file` has open (it was not removed or replaced since).
fn is_at(file: &fs::File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// The cgroup id of a cgroup v2 directory: its inode number.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The loaded, attached datapath and handles on its maps.
pub struct Datapath {
    /// Keeps the programs loaded while this process runs (the pinned links keep them after).
    _ebpf: Ebpf,
    /// This process's hold on the pin directory.
    _lock: PinLock,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    config: Array<MapData, Config>,
    endpoints: HashMap<MapData, u64, Endpoint>,
    stats: PerCpuArray<MapData, u64>,
    cidr: LpmTrie<MapData, CidrData, CidrValue>,
    cluster: LpmTrie<MapData, Addr, u8>,
    /// The cluster map's real size.
    cluster_capacity: usize,
    allow: Option<HashMap<MapData, maps::AllowMapKey, u64>>,
    allow_names: Option<HashMap<MapData, maps::AllowMapKey, maps::NameValue>>,
    /// The allow map's real size (a reused pinned map keeps the size it was created with).
    allow_capacity: u32,
    /// The endpoints map's real size (likewise).
    endpoint_capacity: u32,
    /// The generation of the newest snapshot synced: an older one is not synced over it.
    synced_generation: u64,
    /// What `install` carried over from an older map layout.
    carried: Option<CarriedOver>,
    /// Older layouts' map directories `install` unpinned, or why it could not.
    removed_layouts: Vec<Result<PathBuf, String>>,
    /// Whether `install` kept the programs an earlier start of this build attached.
    reused_programs: bool,
    /// Links of older programs `install` left attached over fresh maps: detached by the
    /// first `sync_endpoints`, once the new programs know the endpoints.
    detach_after_sync: Vec<PathBuf>,
    /// How many levels `cgroup_root` lies below the cgroup2 hierarchy's root.
    root_depth: usize,
}

/// Allow entries `install` copied from an older layout's pinned maps (`maps-v<N>`, N < ABI)
/// into the new ones, before the new programs were attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedOver {
    /// The older maps directory.
    pub from: PathBuf,
    /// Entries copied (or already present with a later expiry).
    pub entries: usize,
    /// Entries that did not fit in the new map (their addresses are allowed again by the
    /// next answer naming them).
    pub left: usize,
    /// Entries copied whose name could not be (judged by address and ports alone).
    pub without_name: usize,
    /// Why copying stopped early, if it did: the older directory is then left pinned, for a
    /// later start to try again.
    pub error: Option<String>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

/// What `sync_endpoints` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointSync {
    /// Endpoints written (cgroup found).
    pub written: usize,
    /// Stale endpoints removed from the map.
    pub removed: usize,
    /// Endpoints whose cgroup directory does not exist (yet): not redirected or enforced
    /// until it does (the next sync picks it up).
    pub missing: Vec<String>,
    /// Endpoints with more than `MAX_SPECS` distinct port specs: the extra specs are not
    /// opened (fail closed).
    pub too_many_specs: Vec<String>,
    /// Endpoints whose cgroup lies deeper than `MAX_DEPTH` levels below the hierarchy's
    /// root: the programs never look that deep, so they are neither redirected nor enforced.
    pub too_deep: Vec<String>,
    /// L3 prefix entries written (all endpoints).
    pub l3_entries: usize,
    /// Endpoints whose L3 entries did not fit in the trie: enforced with nothing allowed but
    /// DNS (fail closed) until they fit.
    pub l3_failed_closed: usize,
    /// Endpoints with an L3 prefix carrying more than `MAX_L3_SPECS` port entries: extra
    /// allowed ports stay closed, extra denied ones make the prefix deny every port.
    pub too_many_l3_specs: Vec<String>,
    /// The cluster's prefixes written to the cluster map.
    pub cluster_entries: usize,
    /// The cluster's prefixes did not all fit in the cluster map: an address not found there
    /// may be inside the cluster, so `world`, `cluster` and CIDR allows reach no address
    /// missing from it and their denies reach all of them (fail closed) until they fit.
    pub cluster_partial: bool,
    /// Not even the cluster map's "unknown" markers could be written: every endpoint with
    /// world, cluster or CIDR rules is denied everything but DNS (counted in
    /// `l3_failed_closed`) until a sync succeeds.
    pub cluster_failed: bool,
    /// Older programs of an upgrade that could not be detached once the endpoints were
    /// written (they keep judging from their own maps).
    pub detach_errors: Vec<String>,
    /// Endpoints whose entry the map refused (full: more endpoint cgroups than
    /// `endpoint_entries`; out of memory), with why: a new one is neither redirected nor
    /// enforced, one already there keeps its previous entry, until a sync writes it. The rest
    /// of the sync goes on (review finding: the first refusal ended it, leaving every later
    /// endpoint, the stale L3 entries and the cluster map's final keys unwritten).
    pub refused: Vec<String>,
}

impl Datapath {
    /// Loads the programs (reusing pinned maps), attaches them at the cgroup root, pins the
    /// links, and detaches what an earlier install left attached.
    pub fn install(config: &InstallConfig) -> Result<Datapath, DatapathError> {
        let lock = PinLock::take(&config.pin_dir)?;
        ensure_cgroup2(&config.cgroup_root)?;
        ensure_bpffs(&config.pin_dir)?;
        let maps_dir = maps_dir(&config.pin_dir);
        let links_dir = links_dir(&config.pin_dir);
        for dir in [&config.pin_dir, &maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(fs_err("creating", dir))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(names::ALLOW, config.allow_entries.max(1))
            .map_max_entries(names::ALLOW_NAMES, config.allow_entries.max(1))
            .map_max_entries(names::CIDR, config.l3_entries.max(1))
            .map_max_entries(names::CLUSTER, config.cluster_entries.max(4))
            .map_max_entries(names::ENDPOINTS, config.endpoint_entries.max(1))
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(format!("{e:#}")))?;
        // Before the new programs enforce from the new maps: what an older layout's agent
        // allowed stays allowed.
        let carried = carry_allow_over(&config.pin_dir, &mut ebpf);
        let cgroup = fs::File::open(&config.cgroup_root)
            .map_err(fs_err("opening cgroup", &config.cgroup_root))?;
        let cgroup_id = cgroup_id(&config.cgroup_root)
            .map_err(fs_err("reading the cgroup id of", &config.cgroup_root))?;
        let old_links = pinned_links(&links_dir)?;
        // No endpoint in this layout's map (made now by an upgrade from an older layout, or
        // left empty by a start of it that stopped before its first sync): the new programs
        // see no endpoint until the first `sync_endpoints`.
        let fresh_maps = ebpf
            .map(names::ENDPOINTS)
            .and_then(|m| HashMap::<_, u64, Endpoint>::try_from(m).ok())
            .is_none_or(|m| m.keys().next().is_none());
        let suffix = link_suffix(object_digest(), cgroup_id);
        // A restart of this very build: its programs are attached already, over these maps.
        let kept = reusable_links(&old_links, &suffix, &maps_dir, cgroup_id);
        let reused_programs = kept.is_some();
        let kept = kept.unwrap_or_default();
        if !reused_programs {
            let stamp = sys::boottime_ns();
            for program in PROGRAMS {
                let link = attach(&mut ebpf, program, &cgroup)?;
                let path = links_dir.join(format!("{program}@{stamp}{suffix}"));
                link.pin(&path).map_err(|e| DatapathError::Attach {
                    program,
                    reason: format!("pinning at {}: {e}", path.display()),
                })?;
            }
        }
        // The new programs enforce (or the kept ones do): now detach the others. Over fresh
        // maps they enforce only once `sync_endpoints` has written the endpoints (review
        // finding: an upgrade to a new layout left every workload unredirected and
        // unenforced from here to the first sync, the allow map's walks included): the
        // older programs, still judging from their own maps, stay attached until then
        // (both judge meanwhile: a connection needs both to allow it).
        let mut detach_after_sync = Vec::new();
        for path in old_links.iter().filter(|p| !kept.contains(p)) {
            if fresh_maps {
                detach_after_sync.push(path.clone());
            } else {
                unpin_link(path)?;
            }
        }
        // Unpin an older layout's maps (a program still attached to them, until the first
        // sync, or a process holding one keeps them until it goes), except one whose entries
        // could not all be carried over. A standalone proxy of the older version then cannot start again
        // (its maps are gone) until it is upgraded: better than one that would attach the
        // older steering program, take every query and allow through maps nothing enforces.
        let keep = carried
            .as_ref()
            .filter(|c| c.error.is_some())
            .map(|c| c.from.clone());
        let removed_layouts = remove_older_layouts(&config.pin_dir, keep.as_deref());
        let config_map = take(&mut ebpf, names::CONFIG)?;
        let endpoints = take(&mut ebpf, names::ENDPOINTS)?;
        let endpoint_capacity = capacity(&endpoints, config.endpoint_entries);
        let stats = take(&mut ebpf, names::STATS)?;
        let allow = take(&mut ebpf, names::ALLOW)?;
        let allow_capacity = capacity(&allow, config.allow_entries);
        let cidr = take(&mut ebpf, names::CIDR)?;
        let cluster = take(&mut ebpf, names::CLUSTER)?;
        let cluster_capacity = capacity(&cluster, config.cluster_entries) as usize;
        let allow_names = take(&mut ebpf, names::ALLOW_NAMES)?;
        Ok(Datapath {
            cidr: LpmTrie::try_from(cidr).map_err(map_err(names::CIDR))?,
            cluster: LpmTrie::try_from(cluster).map_err(map_err(names::CLUSTER))?,
            cluster_capacity,
            config: Array::try_from(config_map).map_err(map_err(names::CONFIG))?,
            endpoints: HashMap::try_from(endpoints).map_err(map_err(names::ENDPOINTS))?,
            stats: PerCpuArray::try_from(stats).map_err(map_err(names::STATS))?,
            allow: Some(HashMap::try_from(allow).map_err(map_err(names::ALLOW))?),
            allow_names: Some(HashMap::try_from(allow_names).map_err(map_err(names::ALLOW_NAMES))?),
            _ebpf: ebpf,
            _lock: lock,
            allow_capacity,
            endpoint_capacity,
            synced_generation: 0,
            carried,
            removed_layouts,
            reused_programs,
            detach_after_sync,
            root_depth: cgroup_depth(&config.cgroup_root),
            pin_dir: config.pin_dir.clone(),
            cgroup_root: config.cgroup_root.clone(),
        })
    }

    /// Detaches every program and removes every pin under `pin_dir`. Returns how many links
    /// were detached. Nothing pinned is not an error.
    pub fn uninstall(pin_dir: &Path) -> Result<usize, DatapathError> {
        // Not while an agent enforces from it: it would keep serving with nothing enforced.
        let _lock = PinLock::take(pin_dir)?;
        let links_dir = links_dir(pin_dir);
        let mut detached = 0;
        if links_dir.exists() {
            for path in pinned_links(&links_dir)? {
                unpin_link(&path)?;
                detached += 1;
            }
        }
        if pin_dir.exists() {
            // Maps are unpinned by removing their files; they are freed once no program or
            // process holds them.
            fs::remove_dir_all(pin_dir).map_err(fs_err("removing", pin_dir))?;
        }
        Ok(detached)
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Tells the programs where the proxy listens (redirect target for each family).
    pub fn set_proxy(&mut self, listen: &[SocketAddr]) -> Result<(), DatapathError> {
        let mut c = Config::default();
        for addr in listen {
            c.port = addr.port();
            match addr {
                SocketAddr::V4(v4) => {
                    c.proxy4 = Addr::of((*v4.ip()).into());
                    c.has4 = 1;
                }
                SocketAddr::V6(v6) => {
                    c.proxy6 = Addr::of((*v6.ip()).into());
                    c.has6 = 1;
                }
            }
        }
        self.config.set(0, c, 0).map_err(map_err(names::CONFIG))
    }

    /// Makes the endpoints map match `snapshot`: each endpoint with a cgroup gets its cgroup
    /// id, its key, whether it is enforced and the port specs of its toFQDNs rules; entries
    /// of endpoints no longer there are removed. A snapshot of an older generation than the
    /// newest one synced changes nothing.
    pub fn sync_endpoints(&mut self, snapshot: &Snapshot) -> Result<EndpointSync, DatapathError> {
        let mut sync = EndpointSync::default();
        // A caller may hold a snapshot a reload has already replaced (the cgroup watcher
        // loads the published one, which a reload publishes only after syncing the new one):
        // syncing it would undo the reload until the next sync.
        if snapshot.generation() < self.synced_generation {
            return Ok(sync);
        }
        self.synced_generation = snapshot.generation();
        // The cluster's prefixes land before the L3 entries scoped by them, and stale ones go
        // after (`finish_cluster`): no scoped allow ever meets a cluster address missing.
        let (finish_cluster, cluster_trusted) = self.sync_cluster(snapshot, &mut sync)?;
        sync.cluster_failed = !cluster_trusted;
        // Endpoints with scoped L3 entries (world, cluster, CIDR rules): they fail closed
        // when the cluster map could not be made right.
        let mut scoped = std::collections::HashSet::new();
        let mut wanted = std::collections::HashMap::new();
        let mut wanted_l3 = std::collections::HashMap::new();
        for (path, ep) in snapshot.cgroups() {
            let name = snapshot.endpoint_name(ep).to_string();
            let dir = self.cgroup_root.join(path.trim_start_matches('/'));
            let Ok(id) = cgroup_id(&dir) else {
                sync.missing.push(name);
                continue;
            };
            if self.root_depth + path.split('/').filter(|c| !c.is_empty()).count() > maps::MAX_DEPTH
            {
                sync.too_deep.push(name.clone());
            }
            let (value, too_many_specs) = endpoint_value(snapshot, ep);
            if too_many_specs {
                sync.too_many_specs.push(name.clone());
            }
            wanted.insert(id, (value, name));
            let mut truncated = false;
            let table = snapshot.l3_table(ep);
            for entry in table {
                if !cluster_trusted
                    && entry
                        .allow
                        .iter()
                        .chain(&entry.deny)
                        .any(|p| p.scope != dnsfence_policy::cidr::Scope::Any)
                {
                    scoped.insert(value.key);
                }
                let (key, value, cut) = l3_map_entry(value.key, entry);
                truncated |= cut;
                wanted_l3.insert(key, value);
            }
            if let Some((key, value)) = ipv4_shadow(value.key, table) {
                wanted_l3.entry(key).or_insert(value);
            }
            if truncated {
                sync.too_many_l3_specs
                    .push(snapshot.endpoint_name(ep).to_string());
            }
        }
        let present: Vec<u64> = self.endpoints.keys().filter_map(Result::ok).collect();
        for id in present {
            if !wanted.contains_key(&id) {
                self.endpoints
                    .remove(&id)
                    .map_err(map_err(names::ENDPOINTS))?;
                sync.removed += 1;
            }
        }
        // L3 entries first (a new endpoint is enforced only once its endpoints entry lands,
        // and by then its L3 allows are in place); stale ones go after. An endpoint whose
        // entries do not all fit (the trie is full) fails closed: its L3 entries are removed
        // and it is enforced with no port spec, so only DNS to the proxy passes; it is never
        // left out of the endpoints map (that would leave it unenforced).
        let mut degraded = scoped;
        for (&(len, data), value) in &wanted_l3 {
            let key = Key::new(len, data);
            if degraded.contains(&u64::from_ne_bytes(data.endpoint)) {
                continue;
            }
            if self.cidr.get(&key, 0).ok() != Some(*value)
                && self.cidr.insert(&key, *value, 0).is_err()
            {
                degraded.insert(u64::from_ne_bytes(data.endpoint));
            }
        }
        sync.l3_entries = wanted_l3.len();
        for (id, (mut value, name)) in wanted {
            if degraded.contains(&value.key) {
                value.flags = EP_ENFORCE;
                value.nspecs = 0;
                sync.l3_failed_closed += 1;
            }
            if self.endpoints.get(&id, 0).ok() != Some(value)
                && let Err(e) = self.endpoints.insert(id, value, 0)
            {
                sync.refused.push(format!("{name} ({e})"));
                continue;
            }
            sync.written += 1;
        }
        let present: Vec<Key<CidrData>> = self.cidr.keys().filter_map(Result::ok).collect();
        for key in present {
            let stale = !wanted_l3.contains_key(&(key.prefix_len(), key.data()));
            if stale || degraded.contains(&u64::from_ne_bytes(key.data().endpoint)) {
                self.cidr.remove(&key).map_err(map_err(names::CIDR))?;
            }
        }
        for key in finish_cluster.stale {
            self.cluster.remove(&key).map_err(map_err(names::CLUSTER))?;
        }
        // (Not when even "unknown" could not be written: what is there stays.)
        let finals = if cluster_trusted {
            finish_cluster.finals
        } else {
            Vec::new()
        };
        for ((len, addr), value) in finals {
            let key = Key::new(len, addr);
            match value {
                Some(v) => self
                    .cluster
                    .insert(&key, v, 0)
                    .map_err(map_err(names::CLUSTER))?,
                None => {
                    // Absent already is fine.
                    let _ = self.cluster.remove(&key);
                }
            }
        }
        // Refused entries are sorted: the log says a sync's result once, not again for
        // another order (review finding).
        sync.refused.sort();
        // The endpoints are written: the older programs of an upgrade can go. Not while an
        // endpoint's entry was refused: the older programs are all that enforce it (review
        // finding).
        if !sync.refused.is_empty() {
            return Ok(sync);
        }
        for path in std::mem::take(&mut self.detach_after_sync) {
            if let Err(e) = unpin_link(&path) {
                // Tried again at the next sync (while the pin is there).
                sync.detach_errors.push(e.to_string());
                if path.exists() {
                    self.detach_after_sync.push(path);
                }
            }
        }
        Ok(sync)
    }

    /// Links of older programs still attached until the first `sync_endpoints` (see
    /// `install`).
    pub fn awaiting_detach(&self) -> usize {
        self.detach_after_sync.len()
    }

    /// Writes the cluster map's prefixes (the snapshot's [`Snapshot::inside_prefixes`]) and
    /// returns what is left for the caller to do once the L3 entries are synced, with
    /// whether the map can be trusted (false: the caller fails closed every endpoint with
    /// scoped entries).
    ///
    /// Besides the prefixes the map has two boundary keys: `::/0` ("unknown" when the
    /// prefixes do not all fit: two entries stay free for the keys) and the IPv4 shadow at
    /// `::ffff:0:0/96` ("outside" where an IPv6 prefix such as `::/64` contains that region,
    /// "unknown" when partial). Any wrong answer is a hole for some rule (read inside, a
    /// `cluster` allow opens; read outside, a `world` allow does), so while those keys change
    /// both say "unknown" (scoped allows closed, scoped denies applied), from before the first
    /// prefix is written until after the last stale one is removed; they get their final
    /// values last ([`ClusterFinish`]). Pod churn changes neither key, so it never closes
    /// `world` for the node: a new prefix is written at once, a stale one removed at the end.
    fn sync_cluster(
        &mut self,
        snapshot: &Snapshot,
        sync: &mut EndpointSync,
    ) -> Result<(ClusterFinish, bool), DatapathError> {
        use dnsfence_policy::cidr::Cidr;
        let (any, shadow) = (trie_key(Cidr::ALL6), trie_key(Cidr::ALL4));
        let mut inside: Vec<(u32, Addr)> = snapshot.inside_prefixes().map(trie_key).collect();
        // IPv4 sits at ::ffff:0:0/96 in the map: an IPv6 prefix containing that region
        // must not make IPv4 addresses inside.
        let mapped = Cidr {
            addr: std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().into(),
            len: 96,
        };
        let mut final_shadow = snapshot
            .inside_prefixes()
            .any(|c| c.addr.is_ipv6() && c.contains(&mapped))
            .then_some(CLUSTER_OUTSIDE);
        if let Some(i) = inside.iter().position(|k| *k == shadow) {
            // 0.0.0.0/0 inside: the shadow key is that prefix.
            inside.swap_remove(i);
            final_shadow = Some(CLUSTER_INSIDE);
        }
        let room = self.cluster_capacity.saturating_sub(2);
        sync.cluster_partial = inside.len() + usize::from(final_shadow.is_some()) > room;
        let mut final_any = None;
        if sync.cluster_partial {
            final_any = Some(CLUSTER_UNKNOWN);
            final_shadow = Some(CLUSTER_UNKNOWN);
        }
        let current = |map: &LpmTrie<MapData, Addr, u8>, (len, addr): (u32, Addr)| {
            map.get(&Key::new(len, addr), 0).ok()
        };
        let boundary_changes = current(&self.cluster, any) != final_any
            || current(&self.cluster, shadow) != final_shadow;
        let wanted: std::collections::HashSet<(u32, Addr)> = inside.iter().copied().collect();
        let present: Vec<Key<Addr>> = self.cluster.keys().filter_map(Result::ok).collect();
        let is_boundary = |k: &Key<Addr>| [any, shadow].contains(&(k.prefix_len(), k.data()));
        let mut stale: Vec<Key<Addr>> = present
            .iter()
            .filter(|k| !is_boundary(k) && !wanted.contains(&(k.prefix_len(), k.data())))
            .copied()
            .collect();
        let known: std::collections::HashSet<(u32, Addr)> =
            present.iter().map(|k| (k.prefix_len(), k.data())).collect();
        let new = wanted.iter().filter(|k| !known.contains(k)).count();
        if present.len() + new + 2 > self.cluster_capacity {
            // Perhaps no room for old and new together: the stale prefixes go first (they
            // are outside in this snapshot already).
            for key in stale.drain(..) {
                self.cluster.remove(&key).map_err(map_err(names::CLUSTER))?;
            }
        }
        let mut trusted = true;
        let unknown = |map: &mut LpmTrie<MapData, Addr, u8>| {
            [any, shadow]
                .into_iter()
                .all(|(len, addr)| map.insert(&Key::new(len, addr), CLUSTER_UNKNOWN, 0).is_ok())
        };
        let mut finals = Vec::new();
        if boundary_changes {
            trusted = unknown(&mut self.cluster);
            finals = vec![(any, final_any), (shadow, final_shadow)];
        }
        // The shortest first: in a partial map one range stands for more addresses than one
        // host.
        inside.sort_unstable_by_key(|&(len, addr)| (len, addr.0));
        let mut written = 0;
        for (len, addr) in inside {
            if !trusted {
                break;
            }
            let key = Key::new(len, addr);
            if self.cluster.get(&key, 0).ok() == Some(CLUSTER_INSIDE)
                || self.cluster.insert(&key, CLUSTER_INSIDE, 0).is_ok()
            {
                written += 1;
            } else if !sync.cluster_partial {
                // Out of memory with the map thought complete: "unknown" from now on.
                sync.cluster_partial = true;
                trusted = unknown(&mut self.cluster);
                finals = vec![
                    (any, Some(CLUSTER_UNKNOWN)),
                    (shadow, Some(CLUSTER_UNKNOWN)),
                ];
            }
        }
        sync.cluster_entries = written;
        Ok((ClusterFinish { stale, finals }, trusted))
    }

    /// The directories to watch so that an endpoint's cgroup is known the moment it appears
    /// (or is recreated, with a new id): every existing directory from the cgroup root down
    /// to each endpoint cgroup's parent, and the endpoint cgroups themselves (for their
    /// children).
    pub fn watch_dirs(&self, snapshot: &Snapshot) -> Vec<PathBuf> {
        let mut dirs = vec![self.cgroup_root.clone()];
        for (path, _) in snapshot.cgroups() {
            let mut dir = self.cgroup_root.clone();
            for part in path.trim_start_matches('/').split('/') {
                dir.push(part);
                if !dir.is_dir() {
                    break;
                }
                dirs.push(dir.clone());
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&s| {
                let n = self
                    .stats
                    .get(&(s as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (s, n)
            })
            .collect()
    }

    /// The allow map's real size: the pinned map's when one was reused (a pinned map keeps
    /// the size it was created with; `--uninstall` and a restart resize it).
    pub fn allow_capacity(&self) -> u32 {
        self.allow_capacity
    }

    /// The endpoints map's real size (as [`Datapath::allow_capacity`]).
    pub fn endpoint_capacity(&self) -> u32 {
        self.endpoint_capacity
    }

    /// Whether `install` kept the programs that an earlier start of this same build
    /// attached to this cgroup over these same pinned maps, instead of loading (verifying)
    /// and attaching them again: a restart costs no verifier work.
    pub fn reused_programs(&self) -> bool {
        self.reused_programs
    }

    /// What `install` carried over from an older map layout, if one was pinned.
    pub fn carried_over(&self) -> Option<&CarriedOver> {
        self.carried.as_ref()
    }

    /// Older layouts' map directories `install` unpinned (Err: which, and why not).
    pub fn removed_layouts(&self) -> &[Result<PathBuf, String>] {
        &self.removed_layouts
    }

    /// The allow-map sink shared by the shards (call once): its ledger is seeded with the
    /// entries already in the pinned map, which stay as they are. The ledger's capacity is
    /// never above the map's.
    pub fn allow_sink(&mut self, mut config: LedgerConfig) -> Result<BpfAllow, DatapathError> {
        config.capacity = config.capacity.min(self.allow_capacity as usize);
        let (Some(map), Some(names_map)) = (self.allow.take(), self.allow_names.take()) else {
            return Err(DatapathError::Map {
                map: names::ALLOW,
                reason: "sink already taken".into(),
            });
        };
        BpfAllow::new(map, names_map, config, &self.pin_dir).map(BpfAllow::publishing)
    }
}

/// The `df_endpoints` value of endpoint `ep` (before any degradation for L3 entries that
/// did not fit), and whether it has more port specs than the entry holds.
pub(crate) fn endpoint_value(
    snapshot: &Snapshot,
    ep: dnsfence_policy::EndpointId,
) -> (Endpoint, bool) {
    let ports = snapshot.fqdn_ports(ep);
    let mut value = Endpoint {
        key: snapshot.endpoint_key(ep).0,
        flags: if snapshot.is_restricted(ep) {
            EP_ENFORCE
        } else {
            0
        },
        nspecs: ports.len().min(MAX_SPECS) as u32,
        specs: [Spec::default(); MAX_SPECS],
    };
    for (dst, p) in value.specs.iter_mut().zip(ports) {
        *dst = PortSpec::of(p).into();
    }
    (value, ports.len() > MAX_SPECS)
}

/// A map's real size: a reused pinned map keeps the size it was created with.
fn capacity(map: &aya::maps::Map, asked: u32) -> u32 {
    let data = match map {
        aya::maps::Map::HashMap(data) | aya::maps::Map::LpmTrie(data) => data,
        _ => return asked,
    };
    data.info().map(|i| i.max_entries()).unwrap_or(asked)
}

/// The oldest map layout whose allow maps (`df_allow`, `df_allow_names`: key, value and
/// name layouts) are this one's: v3 only gave `df_spec`'s padding a `scope` byte, zero in
/// allow keys.
const ALLOW_LAYOUT_SINCE: u32 = 2;

/// The older layouts' map directories under `pin_dir`, newest first.
fn older_layouts(pin_dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let version: u32 = name.to_str()?.strip_prefix("maps-v")?.parse().ok()?;
            (version < maps::ABI).then(|| (version, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found
}

/// Copies the allow entries of the newest older layout with the same allow maps into the
/// new maps of `ebpf`: an entry missing there, or there with an earlier expiry, is written.
/// None when there is no such layout.
fn carry_allow_over(pin_dir: &Path, ebpf: &mut Ebpf) -> Option<CarriedOver> {
    let (_, from) = older_layouts(pin_dir)
        .into_iter()
        .find(|(v, dir)| *v >= ALLOW_LAYOUT_SINCE && dir.join(names::ALLOW).exists())?;
    let mut carried = CarriedOver {
        from: from.clone(),
        entries: 0,
        left: 0,
        without_name: 0,
        error: None,
    };
    if let Err(e) = carry_maps(&from, ebpf, &mut carried) {
        carried.error = Some(e);
    }
    Some(carried)
}

fn carry_maps(from: &Path, ebpf: &mut Ebpf, carried: &mut CarriedOver) -> Result<(), String> {
    let open = |name: &str| -> Result<aya::maps::Map, String> {
        let path = from.join(name);
        MapData::from_pin(&path)
            .map(aya::maps::Map::HashMap)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let old_allow: HashMap<MapData, maps::AllowMapKey, u64> =
        HashMap::try_from(open(names::ALLOW)?).map_err(|e| e.to_string())?;
    // A missing names map only loses the names (restored entries are then judged by
    // address alone, as entries of an agent without names were).
    let old_names: Option<HashMap<MapData, maps::AllowMapKey, maps::NameValue>> =
        open(names::ALLOW_NAMES)
            .ok()
            .and_then(|m| HashMap::try_from(m).ok());
    let mut allow: HashMap<&mut MapData, maps::AllowMapKey, u64> = HashMap::try_from(
        ebpf.map_mut(names::ALLOW)
            .ok_or_else(|| format!("{} not in the object", names::ALLOW))?,
    )
    .map_err(|e| e.to_string())?;
    let mut copied = Vec::new();
    let now = sys::boottime_ns();
    for item in old_allow.iter() {
        let (key, expires) = item.map_err(|e| e.to_string())?;
        if expires <= now {
            // Expired: nothing to carry (and no room taken from live entries).
            continue;
        }
        if allow.get(&key, 0).is_ok_and(|have| have >= expires) {
            carried.entries += 1;
            continue;
        }
        match allow.insert(key, expires, 0) {
            Ok(()) => {
                carried.entries += 1;
                copied.push(key);
            }
            Err(_) => carried.left += 1,
        }
    }
    let Some(old_names) = old_names else {
        return Ok(());
    };
    let mut names_map: HashMap<&mut MapData, maps::AllowMapKey, maps::NameValue> =
        HashMap::try_from(
            ebpf.map_mut(names::ALLOW_NAMES)
                .ok_or_else(|| format!("{} not in the object", names::ALLOW_NAMES))?,
        )
        .map_err(|e| e.to_string())?;
    for key in copied {
        if let Ok(name) = old_names.get(&key, 0)
            && names_map.insert(key, name, 0).is_err()
        {
            // The entry stays, judged by its address and ports until it expires.
            carried.without_name += 1;
        }
    }
    Ok(())
}

/// Unpins the map directories of older layouts under `pin_dir`, but `keep`.
fn remove_older_layouts(pin_dir: &Path, keep: Option<&Path>) -> Vec<Result<PathBuf, String>> {
    older_layouts(pin_dir)
        .into_iter()
        .filter(|(_, dir)| Some(dir.as_path()) != keep)
        .map(|(_, dir)| {
            fs::remove_dir_all(&dir)
                .map(|()| dir.clone())
                .map_err(|e| format!("{}: {e}", dir.display()))
        })
        .collect()
}

/// What is left of a cluster-map sync once the L3 entries are synced: the stale prefixes to
/// remove, then the boundary keys' final values (None: removed).
struct ClusterFinish {
    stale: Vec<Key<Addr>>,
    finals: Vec<((u32, Addr), Option<u8>)>,
}

/// A prefix as a key of the LPM maps (`df_cluster`; `df_cidr` after the endpoint):
/// (prefixlen, address), IPv4 mapped.
fn trie_key(cidr: dnsfence_policy::cidr::Cidr) -> (u32, Addr) {
    let len = u32::from(cidr.len) + if cidr.addr.is_ipv4() { 96 } else { 0 };
    (len, Addr::of(cidr.addr))
}

/// In the trie IPv4 prefixes sit under `::ffff:0:0/96`, inside IPv6 prefixes such as `::/0`,
/// but an IPv6 rule decides nothing for IPv4 (the policy's table keeps the families apart).
/// When some IPv6 entry of `table` contains that region, an empty entry at `0.0.0.0/0` (no
/// ports allowed or denied) stops IPv4 lookups from reaching it; the caller keeps a real
/// `0.0.0.0/0` entry of the table where there is one.
fn ipv4_shadow(
    endpoint: u64,
    table: &[dnsfence_policy::cidr::L3Entry],
) -> Option<((u32, CidrData), CidrValue)> {
    use dnsfence_policy::cidr::{Cidr, L3Entry};
    let mapped = Cidr {
        addr: std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().into(),
        len: 96,
    };
    table
        .iter()
        .any(|e| e.cidr.addr.is_ipv6() && e.cidr.contains(&mapped))
        .then(|| {
            let empty = L3Entry {
                cidr: Cidr::ALL4,
                allow: Vec::new(),
                deny: Vec::new(),
            };
            let (key, value, _) = l3_map_entry(endpoint, &empty);
            (key, value)
        })
}

/// The `df_cidr` entry of one L3 table entry of an endpoint: (prefixlen, data), the value,
/// and whether port entries had to be cut (allow: closed; deny: every port denied).
fn l3_map_entry(
    endpoint: u64,
    entry: &dnsfence_policy::cidr::L3Entry,
) -> ((u32, CidrData), CidrValue, bool) {
    let (len, addr) = trie_key(entry.cidr);
    let data = CidrData {
        endpoint: endpoint.to_ne_bytes(),
        addr,
    };
    let mut value = CidrValue::default();
    let mut cut = false;
    for (dst, p) in value.allow.iter_mut().zip(&entry.allow) {
        *dst = spec_of(p);
    }
    value.nallow = entry.allow.len().min(MAX_L3_SPECS) as u8;
    cut |= entry.allow.len() > MAX_L3_SPECS;
    if entry.deny.len() > MAX_L3_SPECS {
        // Every port denied: on the denies' side of the cluster's boundary when they share
        // one, else on both.
        let first = entry.deny[0].scope;
        value.deny[0] = spec_of(&dnsfence_policy::cidr::L3Port {
            scope: if entry.deny.iter().all(|p| p.scope == first) {
                first
            } else {
                dnsfence_policy::cidr::Scope::Any
            },
            ports: dnsfence_policy::PortProto::EVERY,
        });
        value.ndeny = 1;
        cut = true;
    } else {
        for (dst, p) in value.deny.iter_mut().zip(&entry.deny) {
            *dst = spec_of(p);
        }
        value.ndeny = entry.deny.len() as u8;
    }
    ((64 + len, data), value, cut)
}

/// The `df_cidr` spec of an L3 port entry.
fn spec_of(p: &dnsfence_policy::cidr::L3Port) -> Spec {
    use dnsfence_policy::cidr::Scope;
    Spec {
        scope: match p.scope {
            Scope::Any => SCOPE_ANY,
            Scope::Outside => SCOPE_OUTSIDE,
            Scope::Inside => SCOPE_INSIDE,
        },
        ..PortSpec::of(&p.ports).into()
    }
}

pub(crate) fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::Map {
        map: name,
        reason: "not in the object".into(),
    })
}

fn attach(
    ebpf: &mut Ebpf,
    program: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, DatapathError> {
    let err = |reason: String| DatapathError::Attach { program, reason };
    let prog = ebpf
        .program_mut(program)
        .ok_or_else(|| err("not in the object".into()))?;
    if program == "df_egress" {
        let skb: &mut CgroupSkb = prog.try_into().map_err(|e| err(format!("{e}")))?;
        skb.load().map_err(|e| err(format!("{e:#}")))?;
        let id = skb
            .attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::Single,
            )
            .map_err(|e| err(format!("{e:#}")))?;
        let link = skb.take_link(id).map_err(|e| err(format!("{e}")))?;
        FdLink::try_from(link).map_err(|e| err(format!("{e}")))
    } else {
        let sa: &mut CgroupSockAddr = prog.try_into().map_err(|e| err(format!("{e}")))?;
        sa.load().map_err(|e| err(format!("{e:#}")))?;
        let id = sa
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|e| err(format!("{e:#}")))?;
        let link = sa.take_link(id).map_err(|e| err(format!("{e}")))?;
        FdLink::try_from(link).map_err(|e| err(format!("{e}")))
    }
}

/// A digest of the object's bytes (FNV-1a, 64 bits): the same for every start of one build.
fn object_digest() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The map `name` an agent pinned under `pin_dir`, for the standalone proxy (which loads no
/// program): a missing pin says so, with a hint.
pub(crate) fn open_pinned_map(
    pin_dir: &Path,
    name: &'static str,
) -> Result<MapData, DatapathError> {
    let path = maps_dir(pin_dir).join(name);
    MapData::from_pin(&path).map_err(|e| DatapathError::Map {
        map: name,
        reason: format!(
            "{}: {e} (is an agent installed with this --bpf-pin?)",
            path.display()
        ),
    })
}

/// The cgroup ids the links pinned under `pin_dir` are attached to, as their pin names say
/// (see [`link_suffix`]); empty when none is pinned.
pub(crate) fn attached_cgroups(pin_dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = fs::read_dir(links_dir(pin_dir))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.rsplit_once('-')?.1.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The end of a link's pin name, `<program>@<boot ns><suffix>`: which object attached it
/// to which cgroup.
fn link_suffix(digest: u64, cgroup_id: u64) -> String {
    format!("-{digest:016x}-{cgroup_id}")
}

/// The links an earlier install of this object on this cgroup pinned, one per program (its
/// newest), if every program has one, each is still attached to this cgroup, and each such
/// program uses only maps pinned in `maps_dir` now (a map pin removed and made anew since
/// means a new map, which the kept program would not see). None otherwise: the programs are
/// loaded and attached anew.
fn reusable_links(
    links: &[PathBuf],
    suffix: &str,
    maps_dir: &Path,
    cgroup_id: u64,
) -> Option<Vec<PathBuf>> {
    let mut kept = Vec::with_capacity(PROGRAMS.len());
    for program in PROGRAMS {
        let newest = links
            .iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                let stamp = name.strip_prefix(program)?.strip_prefix('@')?;
                let stamp: u64 = stamp.strip_suffix(suffix)?.parse().ok()?;
                Some((stamp, p))
            })
            .max_by_key(|(stamp, _)| *stamp)?;
        kept.push(newest.1.clone());
    }
    let mut pinned_maps = std::collections::HashSet::new();
    for entry in fs::read_dir(maps_dir).ok()? {
        let map = MapData::from_pin(entry.ok()?.path()).ok()?;
        pinned_maps.insert(map.info().ok()?.id());
    }
    let mut program_ids = Vec::with_capacity(kept.len());
    for (path, program) in kept.iter().zip(PROGRAMS) {
        // Still attached, to this cgroup (a detached link keeps its pin and its program but
        // enforces nothing: its cgroup reads 0).
        let link = sys::pinned_link_info(path).ok()?;
        if link.link_type != sys::BPF_LINK_TYPE_CGROUP || link.cgroup_id != cgroup_id {
            return None;
        }
        program_ids.push((link.prog_id, program));
    }
    let mut confirmed = 0;
    for info in aya::programs::loaded_programs() {
        // A program of someone else's that went away meanwhile: not ours.
        let Ok(info) = info else {
            continue;
        };
        let Some(&(_, program)) = program_ids.iter().find(|(id, _)| *id == info.id()) else {
            continue;
        };
        let maps = info.map_ids().ok()??;
        if info.name_as_str() != Some(program)
            || maps.is_empty()
            || !maps.iter().all(|m| pinned_maps.contains(m))
        {
            return None;
        }
        confirmed += 1;
    }
    (confirmed == kept.len()).then_some(kept)
}

fn pinned_links(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(fs_err("reading", dir))? {
        let entry = entry.map_err(fs_err("reading", dir))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// How many levels `dir` lies below the root of the cgroup2 hierarchy: the level the
/// programs' ancestor lookups count by. Read from `/proc/self/mountinfo` (the mount's root
/// within the hierarchy, not `/` for a bind mount of a subtree, plus the levels below the
/// mount point); else the levels below the mount point, by `statfs` of its ancestors. (An
/// agent in a cgroup namespace sees its namespace's root as the hierarchy's: its figure is
/// then too low.)
fn cgroup_depth(dir: &Path) -> usize {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Some(depth) = fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| depth_in(&info, &dir))
    {
        return depth;
    }
    let mut dir = dir;
    let mut depth = 0;
    while let Some(parent) = dir.parent() {
        if sys::fs_magic(parent).ok() != Some(sys::CGROUP2_MAGIC) {
            break;
        }
        depth += 1;
        dir = parent.to_path_buf();
    }
    depth
}

/// [`cgroup_depth`] from the text of a `mountinfo` file: the cgroup2 mount whose mount point
/// holds `dir` most closely, its root's levels plus `dir`'s below the mount point.
fn depth_in(mountinfo: &str, dir: &Path) -> Option<usize> {
    let unescape = |s: &str| s.replace("\\040", " ").replace("\\011", "\t");
    let levels = |p: &Path| {
        p.components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count()
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            (fields.get(dash + 1) == Some(&"cgroup2")).then_some(())?;
            let root = PathBuf::from(unescape(fields.get(3)?));
            let point = PathBuf::from(unescape(fields.get(4)?));
            let below = dir.strip_prefix(&point).ok()?;
            Some((levels(&point), levels(&root) + levels(below)))
        })
        .max_by_key(|&(point_levels, _)| point_levels)
        .map(|(_, depth)| depth)
}

fn unpin_link(path: &Path) -> Result<(), DatapathError> {
    let link = PinnedLink::from_pin(path).map_err(|e| DatapathError::Map {
        map: "links",
        reason: format!("opening {}: {e}", path.display()),
    })?;
    // Unpinning drops the last reference once `fd` goes: the link detaches.
    let fd = link.unpin().map_err(fs_err("unpinning", path))?;
    drop(fd);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth of a cgroup counts from the hierarchy's root: a bind mount of a subtree
    /// (its root field not `/`) adds the subtree's levels; the closest mount wins; other
    /// filesystems do not count.
    #[test]
    fn cgroup_depth_counts_from_the_hierarchy_root() {
        let info = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw
30 25 0:22 /kubepods.slice/pod\\040x /host/cg rw - cgroup2 cgroup2 rw
31 1 8:1 / /host rw - ext4 /dev/sda1 rw
";
        let depth = |dir: &str| depth_in(info, Path::new(dir));
        assert_eq!(depth("/sys/fs/cgroup"), Some(0));
        assert_eq!(depth("/sys/fs/cgroup/a/b"), Some(2));
        assert_eq!(depth("/host/cg"), Some(2));
        assert_eq!(depth("/host/cg/c"), Some(3));
        assert_eq!(depth("/host/other"), None);
        assert_eq!(depth("/elsewhere"), None);
    }

    /// `install` copies allow entries from layouts since `ALLOW_LAYOUT_SINCE` byte for byte:
    /// this pins the allow maps' layout of that ABI (2), in the header and in Rust. When it
    /// fails, the allow layout changed: raise `ALLOW_LAYOUT_SINCE` to the new ABI (older
    /// layouts are then unpinned without a copy) and pin the new layout here.
    #[test]
    fn the_allow_layout_is_the_one_carried_over() {
        use std::mem::{offset_of, size_of};
        assert_eq!(ALLOW_LAYOUT_SINCE, 2);
        assert_eq!(size_of::<maps::AllowMapKey>(), 32);
        assert_eq!(offset_of!(maps::AllowMapKey, endpoint), 0);
        assert_eq!(offset_of!(maps::AllowMapKey, addr), 8);
        assert_eq!(offset_of!(maps::AllowMapKey, spec), 24);
        assert_eq!(size_of::<Spec>(), 8);
        assert_eq!(offset_of!(Spec, lo), 0);
        assert_eq!(offset_of!(Spec, hi), 2);
        assert_eq!(offset_of!(Spec, protos), 4);
        assert_eq!(size_of::<maps::NameValue>(), 256);
        assert_eq!(offset_of!(maps::NameValue, wire), 1);
        let header: String = include_str!("../../ebpf/dnsfence.h")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for block in [
            "struct df_addr { __u32 w[4];",
            "struct df_spec { __u16 lo; __u16 hi; __u8 protos; __u8 scope; __u8 pad[2]; };",
            "struct df_allow_key { __u64 endpoint; struct df_addr addr; struct df_spec spec; };",
            "struct df_name { __u8 len; __u8 wire[255]; };",
        ] {
            assert!(header.contains(block), "dnsfence.h no longer has `{block}`");
        }
    }

    /// A directory that is neither cgroup2 nor empty is refused, never mounted over (this
    /// runs without root: the refusal comes before any mount).
    #[test]
    fn a_non_empty_non_cgroup2_root_is_refused() {
        let dir = std::env::temp_dir().join(format!("dnsfence-cg-refuse-{}", std::process::id()));
        fs::create_dir_all(dir.join("cpu")).unwrap();
        let err = ensure_cgroup2(&dir).unwrap_err();
        assert!(matches!(err, DatapathError::NotCgroup2(_)), "{err}");
        assert!(err.to_string().contains("not a cgroup v2 hierarchy"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// More deny specs than a prefix holds deny every port, on the denies' side of the
    /// cluster's boundary when they share one (a `world` deny list must not cut off the
    /// pods), on both sides otherwise; scopes reach the map's specs.
    #[test]
    fn scoped_specs_and_deny_overflow() {
        use dnsfence_policy::cidr::{Cidr, L3Entry, L3Port, Scope};
        use dnsfence_policy::{PortProto, PortProtocol};
        let tcp = |port, scope| L3Port {
            scope,
            ports: PortProto {
                port,
                end_port: port,
                proto: PortProtocol::Tcp,
            },
        };
        let entry = |deny: Vec<L3Port>| L3Entry {
            cidr: Cidr::ALL4,
            allow: vec![tcp(443, Scope::Inside), tcp(80, Scope::Any)],
            deny,
        };
        let outside: Vec<L3Port> = (1..=9).map(|p| tcp(p, Scope::Outside)).collect();
        let (_, v, cut) = l3_map_entry(1, &entry(outside.clone()));
        assert!(cut);
        assert_eq!((v.ndeny, v.deny[0].scope), (1, SCOPE_OUTSIDE));
        assert_eq!((v.deny[0].lo, v.deny[0].hi), (0, u16::MAX));
        assert_eq!(v.nallow, 2);
        assert_eq!((v.allow[0].lo, v.allow[0].scope), (443, SCOPE_INSIDE));
        assert_eq!((v.allow[1].lo, v.allow[1].scope), (80, SCOPE_ANY));
        let mut mixed = outside;
        mixed[0].scope = Scope::Inside;
        let (_, v, _) = l3_map_entry(1, &entry(mixed));
        assert_eq!((v.ndeny, v.deny[0].scope), (1, SCOPE_ANY));
        let (_, v, cut) = l3_map_entry(1, &entry(vec![tcp(22, Scope::Outside)]));
        assert!(!cut);
        assert_eq!(
            (v.ndeny, v.deny[0].lo, v.deny[0].scope),
            (1, 22, SCOPE_OUTSIDE)
        );
    }
}
