//! The standalone proxy's share of the endpoints map, while no agent syncs it.
//!
//! The agent writes `df_endpoints` (one entry per endpoint cgroup id) and its cgroup watcher
//! picks up a cgroup created again under a new id (a service restart, a pod's sandbox)
//! within milliseconds. While the agent is away nobody did: such a cgroup had no entry, and
//! its processes were not enforced at all until the agent returned (review finding: the
//! proxy kept enforcement going for the names it answered, not for a workload restarted
//! meanwhile). [`EndpointFill`] closes that gap from the proxy: for each endpoint cgroup of
//! its snapshot that exists and has no entry, it writes the entry the agent wrote for the
//! same endpoint under its earlier cgroup id (copied as it is, so a degraded endpoint stays
//! degraded), or, for an endpoint the map holds no entry of, the one its snapshot gives,
//! failed closed (enforced, no port spec: DNS to the proxy only) when the endpoint has L3
//! entries, which the agent removed with its last entry and the proxy does not write (an
//! `egressDeny` among them would otherwise be missing: review finding). It never changes or
//! removes an entry: the agent's sync, when it returns, makes the map its own again (and
//! removes the entries of cgroups that are gone). The caller fills only while no agent is
//! connected and the agent's published policy is the proxy's own (else a path the agent's
//! newer policy gives another endpoint, or none, would get the older one's entry); and only
//! when the agent's programs are attached at the proxy's `--cgroup-root` (the pinned links
//! name the cgroup they are attached to), so that relative paths resolve as the agent's do.
use std::collections::HashMap as StdHashMap;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};
use dnsfence_policy::Snapshot;

use crate::loader::{DatapathError, cgroup_id, endpoint_value, map_err, open_pinned_map};
use crate::maps::{EP_ENFORCE, Endpoint, names};

/// `BPF_NOEXIST`: an update that fails when the key is present.
const NO_EXIST: u64 = 1;

/// The proxy's handle on the pinned endpoints map.
pub struct EndpointFill {
    map: HashMap<MapData, u64, Endpoint>,
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
}

/// What one [`EndpointFill::fill`] did.
#[derive(Debug, Default)]
pub struct Filled {
    /// The endpoints whose entries it wrote.
    pub written: Vec<String>,
    /// The endpoints whose entries the kernel refused (each with why); the others were
    /// still written.
    pub failed: Vec<String>,
}

impl std::fmt::Debug for EndpointFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointFill")
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

impl EndpointFill {
    /// Opens the endpoints map an agent pinned under `pin_dir`; endpoint cgroup paths are
    /// taken below `cgroup_root` (the agent's `--cgroup-root`).
    pub fn open(pin_dir: &Path, cgroup_root: &Path) -> Result<EndpointFill, DatapathError> {
        let data = open_pinned_map(pin_dir, names::ENDPOINTS)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err(names::ENDPOINTS))?;
        Ok(EndpointFill {
            map,
            cgroup_root: cgroup_root.to_owned(),
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Whether the agent's programs are attached at this `--cgroup-root` (its pinned links
    /// end in the id of the cgroup they are attached to): else an endpoint's relative path
    /// could name another cgroup here than the agent's. `Err`: why not.
    pub fn root_is_the_agents(&self) -> Result<(), String> {
        let root = cgroup_id(&self.cgroup_root)
            .map_err(|e| format!("--cgroup-root {}: {e}", self.cgroup_root.display()))?;
        let links = crate::loader::attached_cgroups(&self.pin_dir);
        if links.contains(&root) {
            Ok(())
        } else {
            Err(format!(
                "the agent's programs pinned under {} are not attached at --cgroup-root {} \
                 (attached at cgroup ids {links:?}, this one is {root})",
                self.pin_dir.display(),
                self.cgroup_root.display()
            ))
        }
    }

    /// Writes the entry of every endpoint cgroup of `snapshot` that exists and has none (see
    /// the module documentation); one the kernel refuses does not stop the others.
    pub fn fill(&mut self, snapshot: &Snapshot) -> Filled {
        let mut missing = Vec::new();
        for (path, ep) in snapshot.cgroups() {
            let dir = self.cgroup_root.join(path.trim_start_matches('/'));
            let Ok(id) = cgroup_id(&dir) else {
                continue;
            };
            if self.map.get(&id, 0).is_err() {
                missing.push((id, ep));
            }
        }
        let mut filled = Filled::default();
        if missing.is_empty() {
            return filled;
        }
        // What the agent wrote for each endpoint, under whichever of its cgroup ids.
        let written: StdHashMap<u64, Endpoint> = self
            .map
            .iter()
            .filter_map(Result::ok)
            .map(|(_, value)| (value.key, value))
            .collect();
        for (id, ep) in missing {
            let key = snapshot.endpoint_key(ep).0;
            let value = match written.get(&key) {
                Some(value) => *value,
                None => {
                    let (mut value, _) = endpoint_value(snapshot, ep);
                    if value.flags & EP_ENFORCE != 0 && !snapshot.l3_table(ep).is_empty() {
                        value.nspecs = 0;
                    }
                    value
                }
            };
            let name = snapshot.endpoint_name(ep).to_string();
            // Only where there is still none (BPF_NOEXIST): an agent's sync meanwhile wins.
            match self.map.insert(id, value, NO_EXIST) {
                Ok(()) => filled.written.push(name),
                Err(_) if self.map.get(&id, 0).is_ok() => {}
                Err(e) => filled.failed.push(format!("{name}: {e}")),
            }
        }
        filled
    }
}
