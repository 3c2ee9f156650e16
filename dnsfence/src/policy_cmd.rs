//! `dnsfence policy validate|check` (shared/spec/interfaces.md).

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dnsfence policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCommand {
    /// Validate CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy files or directories.
    Validate {
        /// Files or directories of CNP/CCNP YAML.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Runs `dnsfence policy ...`.
pub fn run(args: &PolicyArgs) -> ExitCode {
    match &args.command {
        PolicyCommand::Validate { paths } => {
            eprintln!(
                "dnsfence policy validate: not implemented yet ({} paths)",
                paths.len()
            );
            ExitCode::FAILURE
        }
    }
}
