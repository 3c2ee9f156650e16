//! Steering of the shared listen port: the `df_reuseport` program (`SK_REUSEPORT`) picks the
//! socket of each new datagram or TCP connection among the *active* serving sockets of the
//! agent and the standalone proxy (`df_reuse_socks`, a `REUSEPORT_SOCKARRAY`, and
//! `df_reuse_state`, both pinned under `<bpf-pin>/maps-v<ABI>/`, so both processes share
//! them). A shard's sockets join once it polls and leave when it stops: a stopping process
//! gets no new packets while it drains what it holds (ha.md, promise 5).
//!
//! Each process loads the program from the embedded object (the pinned maps are reused) and
//! attaches it to the reuseport group of each of its sockets (`SO_ATTACH_REUSEPORT_EBPF`:
//! it then applies to the whole group; the last process to attach wins, and every process
//! attaches the same program over the same maps). It is attached as
//! `sk_reuseport/migrate`: a closing TCP listener's accept queue goes to an active listener.
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Mutex;

use aya::maps::{Array, MapData, ReusePortSockArray};
use aya::programs::SkReuseport;
use aya::{Ebpf, EbpfLoader};

use crate::loader::{DatapathError, map_err, maps_dir, take};
use crate::maps::{
    REUSE_GROUP_SLOTS, REUSE_GROUPS, REUSE_OWNER_SLOTS, ReuseConf, ReuseOwner, names,
};

/// The program's name in the object.
pub const PROGRAM: &str = "df_reuseport";

/// Which process a socket belongs to: each owns its own slots of every group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// `dnsfence agent`: the first `REUSE_OWNER_SLOTS` slots of a group.
    Agent,
    /// `dnsfence proxy`: the next ones.
    Proxy,
}

/// How new packets are spread (`--reuseport-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Over every active socket of both processes.
    Balance,
    /// Over the agent's active sockets when it has any, the proxy's otherwise.
    PreferAgent,
}

/// The socket-array slot of a socket: its group (protocol, family), its owner's half, and the
/// shard's index among its process's shards on that listen address. None beyond the owner's
/// slots (such a socket is never picked while another is active).
pub fn slot(owner: Owner, tcp: bool, ipv6: bool, index: usize) -> Option<u32> {
    let index = u32::try_from(index)
        .ok()
        .filter(|&i| i < REUSE_OWNER_SLOTS)?;
    let group = u32::from(tcp) * 2 + u32::from(ipv6);
    let half = match owner {
        Owner::Agent => 0,
        Owner::Proxy => REUSE_OWNER_SLOTS,
    };
    Some(group * REUSE_GROUP_SLOTS + half + index)
}

struct Maps {
    socks: ReusePortSockArray<MapData>,
    state: Array<MapData, ReuseOwner>,
    conf: Array<MapData, ReuseConf>,
    alive: Array<MapData, u64>,
    /// This process's active slots, per group (it is the only writer of its entries).
    active: [u32; REUSE_GROUPS as usize],
}

/// A process's handle on the steering maps and its loaded program; shared by its shards
/// (they use it only when they join or leave).
pub struct Reuseport {
    /// Holds the loaded program.
    ebpf: Ebpf,
    maps: Mutex<Maps>,
    owner: Owner,
    mode: Mode,
}

impl std::fmt::Debug for Reuseport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reuseport")
            .field("owner", &self.owner)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Reuseport {
    /// Loads the program over the maps pinned under `pin_dir` (creating and pinning the
    /// steering maps if an older agent did not).
    pub fn open(pin_dir: &Path, owner: Owner, mode: Mode) -> Result<Reuseport, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir(pin_dir))
            .load(crate::loader::OBJECT)
            .map_err(|e| DatapathError::Load(format!("{e:#}")))?;
        let err = |reason: String| DatapathError::Attach {
            program: PROGRAM,
            reason,
        };
        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| err("not in the object".into()))?
            .try_into()
            .map_err(|e| err(format!("{e}")))?;
        program.load().map_err(|e| err(format!("{e:#}")))?;
        let mut take = |name| take(&mut ebpf, name);
        let socks = ReusePortSockArray::try_from(take(names::REUSE_SOCKS)?)
            .map_err(map_err(names::REUSE_SOCKS))?;
        let state =
            Array::try_from(take(names::REUSE_STATE)?).map_err(map_err(names::REUSE_STATE))?;
        let conf = Array::try_from(take(names::REUSE_CONF)?).map_err(map_err(names::REUSE_CONF))?;
        let alive =
            Array::try_from(take(names::REUSE_ALIVE)?).map_err(map_err(names::REUSE_ALIVE))?;
        Ok(Reuseport {
            ebpf,
            maps: Mutex::new(Maps {
                socks,
                state,
                conf,
                alive,
                active: [0; REUSE_GROUPS as usize],
            }),
            owner,
            mode,
        })
    }

    /// Says this process lives (`df_reuse_alive`): call it every few milliseconds. An owner
    /// silent for `REUSE_STALE_NS` (a SIGKILLed process, whose sockets linger until the
    /// kernel has torn it down) gets no new packets while the other has active sockets.
    pub fn beat(&self) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let owner = match self.owner {
            Owner::Agent => 0,
            Owner::Proxy => 1,
        };
        maps.alive
            .set(owner, crate::sys::boottime_ns(), 0)
            .map_err(map_err(names::REUSE_ALIVE))
    }

    /// The process these sockets belong to.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Puts `socket` (a listen socket with `SO_REUSEPORT`, bound) at `slot`, attaches the
    /// program to its group, writes the mode, and marks the slot active: the socket takes
    /// new packets from now on.
    pub fn join(&self, socket: BorrowedFd<'_>, slot: u32) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.socks
            .set(slot, &socket, 0)
            .map_err(map_err(names::REUSE_SOCKS))?;
        let err = |reason: String| DatapathError::Attach {
            program: PROGRAM,
            reason,
        };
        let program: &SkReuseport = self
            .ebpf
            .program(PROGRAM)
            .ok_or_else(|| err("not in the object".into()))?
            .try_into()
            .map_err(|e| err(format!("{e}")))?;
        program
            .attach(socket)
            .map_err(|e| err(format!("SO_ATTACH_REUSEPORT_EBPF: {e:#}")))?;
        let mode = match self.mode {
            Mode::Balance => crate::maps::REUSE_BALANCE,
            Mode::PreferAgent => crate::maps::REUSE_PREFER_AGENT,
        };
        maps.conf
            .set(0, ReuseConf { mode, pad: 0 }, 0)
            .map_err(map_err(names::REUSE_CONF))?;
        self.set_active(&mut maps, slot, true)
    }

    /// Takes `slot` out of the choice for new packets (while any other socket of its group
    /// is active). The socket stays in the array until it closes.
    pub fn leave(&self, slot: u32) -> Result<(), DatapathError> {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        self.set_active(&mut maps, slot, false)
    }

    fn set_active(&self, maps: &mut Maps, slot: u32, on: bool) -> Result<(), DatapathError> {
        let group = slot / REUSE_GROUP_SLOTS;
        let bit = 1u32 << (slot % REUSE_OWNER_SLOTS);
        let Some(mask) = maps.active.get_mut(group as usize) else {
            return Ok(());
        };
        match on {
            true => *mask |= bit,
            false => *mask &= !bit,
        }
        let value = ReuseOwner {
            active: *mask,
            pid: owner_token(),
        };
        let key = group * 2
            + match self.owner {
                Owner::Agent => 0,
                Owner::Proxy => 1,
            };
        // A process of the same kind that started since (it took these slots over) keeps
        // its sockets active: a leaving process clears only its own entry.
        if !on
            && maps
                .state
                .get(&key, 0)
                .is_ok_and(|o| o.pid != value.pid && o.active != 0)
        {
            return Ok(());
        }
        maps.state
            .set(key, value, 0)
            .map_err(map_err(names::REUSE_STATE))
    }
}

/// This process's mark in its owner entry (the field bpftool shows as `pid`): its pid mixed
/// with random bits, never 0. A pid alone repeats across pid namespaces (review finding: two
/// proxies of a rollout, each pid 1 in its own pod, took each other's entry for their own, and
/// the old one leaving cleared the new one's active sockets).
fn owner_token() -> u32 {
    static TOKEN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *TOKEN.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u64(crate::sys::boottime_ns());
        let bits = h.finish();
        ((bits as u32) ^ ((bits >> 32) as u32)).max(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mark is the same for the process's whole life, and not its pid alone.
    #[test]
    fn the_owner_token_is_stable_and_not_zero() {
        let t = owner_token();
        assert_ne!(t, 0);
        assert_eq!(owner_token(), t);
    }

    #[test]
    fn slots_are_per_group_and_owner() {
        assert_eq!(slot(Owner::Agent, false, false, 0), Some(0));
        assert_eq!(slot(Owner::Proxy, false, false, 0), Some(32));
        assert_eq!(slot(Owner::Agent, false, true, 3), Some(67));
        assert_eq!(slot(Owner::Proxy, true, false, 31), Some(128 + 63));
        assert_eq!(slot(Owner::Proxy, true, true, 0), Some(192 + 32));
        assert_eq!(slot(Owner::Agent, false, false, 32), None);
    }
}
