//! The dnsfence data plane: the sans-IO per-query core and the per-core shards around it.
pub mod allow;
pub mod consumer;
pub mod core;
pub mod histogram;
pub mod io;
pub mod shard;
pub mod startup;
pub mod wire;
