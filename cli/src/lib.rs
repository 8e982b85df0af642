//! `regctl`, the operator's CLI: a gRPC client of the control plane (repos, nodes) that also talks
//! to the nodes' registry API (`cache warm`; `cache verify` goes through the control plane) and to anything serving it (`check-cdn`).

pub mod args;
pub mod cdn;
pub mod client;
pub mod error;
pub mod image_ref;
pub mod node;
pub mod output;
pub mod registry;
pub mod repo;
pub mod tls;
pub mod token;
pub mod verify;
pub mod warm;

use args::{CacheCmd, Cli, Command};
pub use error::CliError;

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let global = cli.global;
    match cli.command {
        Command::Repo(cmd) => repo::run(&global, cmd).await,
        Command::Node(cmd) => node::run(&global, cmd).await,
        Command::Token(cmd) => token::run(&global, cmd).await,
        Command::Cache(CacheCmd::Warm(args)) => warm::run(&global, args).await,
        Command::Cache(CacheCmd::Verify(args)) => verify::run(&global, args).await,
        Command::CheckCdn(args) => cdn::run(&global, args).await,
        Command::Completion { shell } => completion(shell),
    }
}

fn completion(shell: args::Shell) -> Result<(), CliError> {
    use clap::CommandFactory as _;
    use clap_complete::Shell as S;
    let shell = match shell {
        args::Shell::Bash => S::Bash,
        args::Shell::Zsh => S::Zsh,
        args::Shell::Fish => S::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "regctl", &mut out);
    output::print(&String::from_utf8_lossy(&out))
}
