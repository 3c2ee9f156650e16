//! `dnsfence`: the agent, the standalone HA proxy, and the command-line tools.
#![forbid(unsafe_code)]

mod agent;
mod demo;
mod enforce;
mod ha;
mod health;
mod http;
mod match_cmd;
mod metrics;
mod observe;
mod observe_cmd;
mod policy_cmd;
mod proxy;
mod serve;
mod status_cmd;
mod steer;

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// FQDN egress policy enforcement through DNS.
#[derive(Debug, Parser)]
#[command(name = "dnsfence", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Would this pattern set match this name? (matchPattern semantics, Cilium v1.19)
    Match(match_cmd::MatchArgs),
    /// Validate policy files, or check what a policy allows for an endpoint.
    Policy(policy_cmd::PolicyArgs),
    /// Run the complete single-process proxy (policy, shards, metrics).
    Agent(Box<agent::AgentArgs>),
    /// Run the standalone HA proxy beside an agent (same --listen; policy from the agent).
    Proxy(Box<proxy::ProxyArgs>),
    /// Health, policy, shards, allow map and sync of the running agent and proxy (asked at
    /// their metrics addresses); exits non-zero when one is unreachable, not dnsfence, unhealthy
    /// or not ready.
    Status(status_cmd::StatusArgs),
    /// DNS flows of the agent (and of the standalone proxy, once synced), like
    /// `hubble observe --protocol dns`: history, then live with --follow.
    Observe(observe_cmd::ObserveArgs),
    /// Prove it: load, SIGKILL and restart of an agent, and the verdict counts, on loopback.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    // Before the threads and tables exist: small pages (engine::startup::small_pages_only).
    dnsfence_engine::startup::small_pages_only();
    let cli = Cli::parse();
    match cli.command {
        Command::Match(args) => match_cmd::run(&args),
        Command::Policy(args) => policy_cmd::run(&args),
        Command::Status(args) => status_cmd::run(&args),
        Command::Observe(args) => observe_cmd::run(&args),
        Command::Demo(args) => match demo::run(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("dnsfence demo: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Agent(args) => match agent::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dnsfence agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Proxy(args) => match proxy::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dnsfence proxy: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
