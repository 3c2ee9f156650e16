//! The steering of the shared listen port in eBPF mode: each shard's sockets join the
//! datapath's `SK_REUSEPORT` selection once the shard polls and leave it when the shard
//! stops, so a stopping process drains without losing queries (see `datapath::reuseport`).

use std::net::SocketAddr;
use std::sync::Arc;

use dnsfence_datapath::reuseport::{self, Reuseport};
use dnsfence_engine::io::ListenFds;
use dnsfence_engine::shard::Steering;

use crate::enforce::Enforcer;
use crate::serve::{ReuseportFlag, ServeArgs};

/// How often a process says it lives (a quarter of `REUSE_STALE_NS`).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(5);

/// The steering of a process: None without eBPF, or when the program cannot be loaded (then
/// said in one line: the port is shared by plain `SO_REUSEPORT`, and a graceful stop may
/// lose what its sockets hold).
pub fn open(who: &str, enforcer: &Enforcer, args: &ServeArgs) -> Option<Arc<Reuseport>> {
    let owner = enforcer.owner()?;
    let mode = match args.reuseport_mode {
        ReuseportFlag::Balance => reuseport::Mode::Balance,
        ReuseportFlag::PreferAgent => reuseport::Mode::PreferAgent,
    };
    // At idle priority (engine::startup), like the rest of the start-up work: the kernel's
    // BTF parsed and the program verified while the other process serves.
    let opened =
        dnsfence_engine::startup::at_idle_priority(|| Reuseport::open(&args.bpf_pin, owner, mode));
    match opened {
        Ok(r) => {
            let r = Arc::new(r);
            // The heartbeat: while this process lives, its sockets stay in the choice; once
            // it dies (SIGKILL) the other process takes every new packet within
            // REUSE_STALE_NS, before the kernel has closed the dead sockets.
            let beating = Arc::clone(&r);
            let who_beats = who.to_owned();
            let spawned = std::thread::Builder::new()
                .name("dnsf-heartbeat".into())
                .spawn(move || {
                    // A failed beat is said (once per run of failures) and tried again: a
                    // heartbeat that stopped at its first error left a live process looking
                    // dead to the steering, given no new packet beside the other (review
                    // finding).
                    let mut failing = false;
                    loop {
                        match beating.beat() {
                            Ok(()) => failing = false,
                            Err(e) if !failing => {
                                failing = true;
                                eprintln!("{who_beats}: warning: steering heartbeat: {e}");
                            }
                            Err(_) => {}
                        }
                        std::thread::sleep(HEARTBEAT);
                    }
                });
            if let Err(e) = spawned {
                eprintln!("{who}: warning: no steering heartbeat ({e})");
            }
            Some(r)
        }
        Err(e) => {
            eprintln!(
                "{who}: warning: no SO_REUSEPORT steering ({e}; it needs CAP_BPF + \
                 CAP_PERFMON): a graceful stop may lose the queries its sockets hold"
            );
            None
        }
    }
}

/// One shard's steering: `index` is the shard's index among its process's shards on
/// `listen`.
pub fn shard(
    who: &'static str,
    reuseport: &Arc<Reuseport>,
    listen: SocketAddr,
    index: usize,
) -> Box<dyn Steering> {
    Box::new(ShardSteering {
        who,
        reuseport: Arc::clone(reuseport),
        ipv6: listen.is_ipv6(),
        index,
        slots: Vec::new(),
    })
}

struct ShardSteering {
    who: &'static str,
    reuseport: Arc<Reuseport>,
    ipv6: bool,
    index: usize,
    slots: Vec<u32>,
}

impl Steering for ShardSteering {
    fn join(&mut self, sockets: ListenFds<'_>) {
        let owner = self.reuseport.owner();
        for (fd, tcp) in [(Some(sockets.udp), false), (sockets.tcp, true)] {
            let Some(fd) = fd else { continue };
            let Some(slot) = reuseport::slot(owner, tcp, self.ipv6, self.index) else {
                eprintln!(
                    "{}: warning: shard {} on {} is beyond the {} steered sockets per \
                     process and address: it takes packets only when no other socket does",
                    self.who,
                    self.index,
                    sockets.addr,
                    dnsfence_datapath::maps::REUSE_OWNER_SLOTS
                );
                continue;
            };
            match self.reuseport.join(fd, slot) {
                Ok(()) => self.slots.push(slot),
                Err(e) => eprintln!(
                    "{}: warning: shard {} on {}: SO_REUSEPORT steering: {e}",
                    self.who, self.index, sockets.addr
                ),
            }
        }
    }

    fn leave(&mut self, sockets: ListenFds<'_>) {
        for slot in self.slots.drain(..) {
            if let Err(e) = self.reuseport.leave(slot) {
                eprintln!(
                    "{}: warning: shard {} on {}: SO_REUSEPORT steering: {e}",
                    self.who, self.index, sockets.addr
                );
            }
        }
    }
}
