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
        Command::Probe(args) => probe(&global, &args.url.unwrap_or_else(default_probe_url)).await,
        Command::Completion { shell } => completion(shell),
    }
}

/// The node's `/readyz` on loopback, at the port of `$WHARF_LISTEN` (the node's own variable), else 5000.
fn default_probe_url() -> String {
    let listen = std::env::var("WHARF_LISTEN").unwrap_or_default();
    let port = listen.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(5000);
    format!("http://127.0.0.1:{port}/readyz")
}

/// `regctl probe URL`: the global --timeout bounds the whole request.
async fn probe(global: &args::Global, url: &str) -> Result<(), CliError> {
    let client = tls::http_client(global)?
        .timeout(global.timeout)
        .build()
        .map_err(|e| CliError::Failed(format!("building the HTTP client: {}", client::error_chain(&e))))?;
    let resp =
        client.get(url).send().await.map_err(|e| CliError::Failed(format!("{url}: {}", client::error_chain(&e))))?;
    if resp.status().is_success() {
        return Ok(());
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    Err(CliError::Failed(format!("{url}: {status} {}", body.split_whitespace().collect::<Vec<_>>().join(" "))))
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
