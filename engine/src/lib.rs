//! The dnsfence data plane: the sans-IO per-query core and the per-core shards around it.
