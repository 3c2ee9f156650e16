//! The origin lookup: who sent a redirected query, and which server it addressed, from the
//! `df_origin` map the egress program writes before the packet reaches the proxy.
use std::net::SocketAddr;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};
use dnsfence_engine::core::Origin;
use dnsfence_engine::shard::OriginSource;
use dnsfence_policy::{EndpointKey, Proto};

use crate::loader::{DatapathError, maps_dir};
use crate::maps::{OriginKey, OriginValue, names};

/// One shard's handle on the origin map (each shard opens its own).
pub struct BpfOrigins {
    map: HashMap<MapData, OriginKey, OriginValue>,
}

impl std::fmt::Debug for BpfOrigins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfOrigins").finish_non_exhaustive()
    }
}

impl BpfOrigins {
    /// Opens the pinned origin map under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<BpfOrigins, DatapathError> {
        let path = maps_dir(pin_dir).join(names::ORIGIN);
        let err = |reason: String| DatapathError::Map {
            map: names::ORIGIN,
            reason,
        };
        let data = MapData::from_pin(&path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let map = HashMap::try_from(Map::LruHashMap(data)).map_err(|e| err(e.to_string()))?;
        Ok(BpfOrigins { map })
    }

    /// The origin of `client` over `proto`, if recorded.
    pub fn lookup(&self, client: SocketAddr, proto: Proto) -> Option<Origin> {
        let proto = match proto {
            Proto::Udp => libc::IPPROTO_UDP,
            Proto::Tcp => libc::IPPROTO_TCP,
        } as u8;
        let v = self.map.get(&OriginKey::of(client, proto), 0).ok()?;
        Some(Origin {
            endpoint: (v.endpoint != 0).then_some(EndpointKey(v.endpoint)),
            // Port 0: the client addressed the proxy itself (nothing was redirected).
            server: (v.server_port != 0).then(|| SocketAddr::new(v.server.ip(), v.server_port)),
        })
    }
}

impl OriginSource for BpfOrigins {
    fn origin(&mut self, client: SocketAddr, proto: Proto) -> Option<Origin> {
        self.lookup(client, proto)
    }
}
