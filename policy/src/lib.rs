//! Policy sources for dnsfence: CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy YAML and the
//! endpoints file, compiled into an immutable snapshot the data plane reads.
#![forbid(unsafe_code)]
