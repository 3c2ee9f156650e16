//! The eBPF datapath of dnsfence: the programs of `ebpf/` (embedded), their loader, the
//! pinned maps, the allow-map sink the shards write through, and the origin lookup that
//! tells the proxy who sent a redirected query.
//!
//! The engine knows nothing of this crate: it owns the [`AllowSink`] and [`OriginSource`]
//! traits, implemented here, so the engine and its tests need no kernel, root or aya.
//!
//! [`AllowSink`]: dnsfence_engine::allow::AllowSink
//! [`OriginSource`]: dnsfence_engine::shard::OriginSource
pub mod fill;
pub mod loader;
pub mod maps;
pub mod origin;
pub mod reuseport;
pub mod sink;
mod sys;

pub use fill::EndpointFill;
pub use loader::{
    CarriedOver, Datapath, DatapathError, EndpointSync, InstallConfig, PROGRAMS, PinLock,
    cgroup_id, ensure_cgroup2,
};
pub use origin::BpfOrigins;
pub use reuseport::Reuseport;
pub use sink::BpfAllow;
pub use sys::DirWatch;
