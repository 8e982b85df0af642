//! The command line: every command, flag and its help (with examples).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use wharf_core::{RepoKey, RepoKind};

use crate::image_ref::ImageRef;

/// The control plane's default address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7000";

#[derive(Parser, Debug)]
#[command(
    name = "regctl",
    version = wharf_core::VERSION,
    about = "The operator's CLI of Wharf: repos, nodes, cache warming, CDN checks",
    after_help = "\
Examples:
  regctl repo add ghcr --kind ghcr --tag-ttl 10m
  regctl repo list -o json
  regctl node list
  regctl cache warm ghcr/org/image:v1 --platform linux/amd64
  regctl check-cdn https://cdn.example/v2/dockerhub/library/alpine/blobs/sha256:<hex>

The control plane is --server, else $WHARF_SERVER, else http://127.0.0.1:7000. An API token is read
from --token-file or $WHARF_TOKEN. Exit codes: 0 ok, 1 error, 2 usage."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// The control plane's URL (gRPC).
    #[arg(long, global = true, env = "WHARF_SERVER", default_value = DEFAULT_SERVER, value_name = "URL")]
    pub server: String,
    /// A file holding the API token (else $WHARF_TOKEN), sent as `authorization: Bearer`.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) that signed the control plane's certificate (https:// --server; default: the
    /// system's roots); also trusted, besides the system's roots, for nodes (cache warm, check-cdn).
    #[arg(long, global = true, env = "WHARF_CA_CERT", value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
    /// mTLS: a client certificate (PEM) for the control plane and the nodes ...
    #[arg(long = "cert", global = true, env = "WHARF_CLIENT_CERT", requires = "client_key", value_name = "PEM")]
    pub client_cert: Option<PathBuf>,
    /// ... and its private key (PEM).
    #[arg(long = "key", global = true, env = "WHARF_CLIENT_KEY", requires = "client_cert", value_name = "PEM")]
    pub client_key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// How long to wait for the control plane to answer one call.
    #[arg(long, global = true, value_parser = parse_duration, default_value = "30s", value_name = "DURATION")]
    pub timeout: Duration,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A readable table.
    Table,
    /// The full objects as JSON (stable for scripts).
    Json,
    /// The full objects as YAML.
    Yaml,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manage repos: the upstream registries the nodes serve under /v2/<repoKey>/.
    #[command(
        subcommand,
        after_help = "\
Examples:
  regctl repo add ghcr --kind ghcr --tag-ttl 10m
  regctl repo list
  regctl repo get ghcr -o json
  regctl repo update ghcr --tag-ttl 1m
  regctl repo rm ghcr --yes"
    )]
    Repo(RepoCmd),
    /// Data-plane nodes.
    #[command(
        subcommand,
        after_help = "\
Examples:
  regctl node list
  regctl node list -o yaml"
    )]
    Node(NodeCmd),
    /// API tokens: admin (everything), reader (reads), puller (pulls from nodes), node (config stream).
    #[command(
        subcommand,
        after_help = "\
Examples:
  regctl token create --role puller --repos 'ghcr/acme/*' --expires 90d > ci.token
  regctl token create --role node --description rack-a > node.token
  regctl token list
  regctl token revoke 3f9c2a1b7d4e6f80"
    )]
    Token(TokenCmd),
    /// The nodes' caches.
    #[command(
        subcommand,
        after_help = "\
Examples:
  regctl cache warm ghcr/org/image:v1 --platform linux/amd64
  regctl cache verify --node node-a"
    )]
    Cache(CacheCmd),
    /// Check that a blob or manifest URL is served in a CDN-friendly way.
    #[command(after_help = "\
Checks status, ETag, Cache-Control, Accept-Ranges, a Range request (206, bytes, Content-Range),
If-None-Match (304), HEAD against GET, and Docker-Content-Digest against the bytes. Exits 1 when any
check fails.

Examples:
  regctl check-cdn http://node1:5000/v2/dockerhub/library/alpine/blobs/sha256:<hex>
  regctl check-cdn https://cdn.example/v2/ghcr/org/image/manifests/sha256:<hex> -o json")]
    CheckCdn(CheckCdnArgs),
    /// Exit 0 if a health URL answers 2xx within --timeout: a container's HEALTHCHECK.
    #[command(after_help = "\
For images without a shell or curl (the Wharf image is one). Without URL: $WHARF_PROBE_URL, else
the /readyz of the node on the port of $WHARF_LISTEN (5000 when unset) on 127.0.0.1, so the
image's HEALTHCHECK follows the node's listen address. Prints nothing on success; on failure one
line saying what answered.

Examples:
  regctl probe
  regctl probe http://127.0.0.1:7000/readyz --timeout 2s")]
    Probe(ProbeArgs),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  regctl completion bash > /etc/bash_completion.d/regctl
  regctl completion zsh > \"${fpath[1]}/_regctl\"
  regctl completion fish > ~/.config/fish/completions/regctl.fish")]
    Completion {
        #[arg(value_enum)]
        shell: Shell,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Add a repo.
    #[command(after_help = "\
Examples:
  regctl repo add ghcr --kind ghcr --tag-ttl 10m
  regctl repo add corp --upstream https://registry.corp.example --username bot --password-stdin < secret
  regctl repo add ecr --kind ecr --upstream https://1234.dkr.ecr.eu-west-1.amazonaws.com \\
      --username AWS --password-file /run/secrets/ecr")]
    Add(RepoAddArgs),
    /// List every repo.
    #[command(after_help = "\
Examples:
  regctl repo list
  regctl repo list -o json | jq -r '.repos[].key'")]
    List,
    /// Show one repo.
    #[command(after_help = "\
Examples:
  regctl repo get ghcr
  regctl repo get ghcr -o yaml")]
    Get {
        /// The repoKey.
        #[arg(value_parser = parse_key)]
        key: RepoKey,
    },
    /// Change a repo: reads it, applies the flags, writes it back only if nobody changed it since.
    #[command(after_help = "\
A change made by someone else between the read and the write is reported (exit 1), not overwritten:
re-run the command. --revision N writes only if the repo is still at revision N.

Examples:
  regctl repo update ghcr --tag-ttl 1m
  regctl repo update corp --username bot --password-env CORP_PASSWORD
  regctl repo update corp --clear-credentials
  regctl repo update ghcr --tag-ttl 5m --revision 42")]
    Update(RepoUpdateArgs),
    /// Delete a repo (asks first on a terminal).
    #[command(
        visible_alias = "delete",
        after_help = "\
Examples:
  regctl repo rm ghcr
  regctl repo rm ghcr --yes      # no question: for scripts"
    )]
    Rm {
        /// The repoKey.
        #[arg(value_parser = parse_key)]
        key: RepoKey,
        /// Delete without asking.
        #[arg(long, short)]
        yes: bool,
    },
}

/// Where a password comes from: never a flag value (it would land in shell history).
#[derive(Args, Debug, Default)]
#[group(multiple = false)]
pub struct PasswordSource {
    /// Read the upstream password from standard input (one line or the whole input; a trailing newline is dropped).
    #[arg(long)]
    pub password_stdin: bool,
    /// Read the upstream password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
    /// Read the upstream password from this file (a trailing newline is dropped).
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
}

impl PasswordSource {
    pub fn given(&self) -> bool {
        self.password_stdin || self.password_env.is_some() || self.password_file.is_some()
    }
}

#[derive(Args, Debug)]
pub struct RepoAddArgs {
    /// The repoKey: [a-z0-9]+([._-][a-z0-9]+)*, at most 64 characters.
    #[arg(value_parser = parse_key)]
    pub key: RepoKey,
    /// dockerhub | ghcr | quay | ecr | gcr | acr | generic.
    #[arg(long, value_parser = parse_kind, default_value = "generic")]
    pub kind: RepoKind,
    /// scheme://host[:port]; optional for dockerhub, ghcr, quay, gcr.
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// How long a tag's digest is trusted before a revalidating HEAD (5m, 1h, ...).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub tag_ttl: Option<Duration>,
    /// Static upstream username (needs a password from one of the --password-* flags).
    #[arg(long)]
    pub username: Option<String>,
    #[command(flatten)]
    pub password: PasswordSource,
    /// Evict this repo's content when not accessed for this long (overrides the nodes' --cache-ttl).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub cache_ttl: Option<Duration>,
    /// Whose credentials go upstream: static (--username, or anonymous) or passthrough (each
    /// client's own; cached content only reaches clients the upstream accepts).
    #[arg(long, value_parser = ["static", "passthrough"])]
    pub auth: Option<String>,
    /// Who may pull: public, or token (a puller token whose --repos patterns match).
    #[arg(long, value_parser = ["public", "token"])]
    pub access: Option<String>,
    /// A PEM file of CA certificates the nodes trust for this upstream (beside the system roots).
    #[arg(long, value_name = "PATH")]
    pub ca_bundle_file: Option<PathBuf>,
    /// Tests only: the nodes accept any upstream certificate.
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// Registry hosts whose images the repo serves to clients using a node as a mirror
    /// (containerd's ?ns=, dockerd's registry-mirrors), comma-separated. Default: the kind's hosts
    /// (dockerhub: docker.io, ...) and the upstream's own.
    #[arg(long, value_delimiter = ',', value_name = "HOST")]
    pub mirror_of: Vec<String>,
    /// Credentials from the nodes' identity instead of a password: aws (the AWS credential
    /// chain, for an ECR or ECR Public token), azure (an Entra token, for an ACR refresh token),
    /// gcp (Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, or the metadata
    /// server), oauth2 (an OAuth2 server, as the --credential-file settings say).
    #[arg(long, value_parser = ["aws", "azure", "gcp", "oauth2"], conflicts_with_all = ["username", "password_stdin", "password_env", "password_file"])]
    pub credential_provider: Option<String>,
    /// A file on each node the provider reads (an absolute path): gcp: a Google credentials
    /// file; oauth2: its settings file.
    #[arg(long, value_name = "PATH", requires = "credential_provider")]
    pub credential_file: Option<String>,
}

#[derive(Args, Debug)]
#[command(group = clap::ArgGroup::new("change").multiple(true).required(true).args([
    "kind", "upstream", "tag_ttl", "username", "password_stdin", "password_env", "password_file", "clear_credentials",
    "cache_ttl", "auth", "access", "ca_bundle_file", "clear_ca_bundle", "insecure_skip_tls_verify", "mirror_of",
    "default_mirror_of", "credential_provider", "credential_file",
]))]
pub struct RepoUpdateArgs {
    /// The repoKey.
    #[arg(value_parser = parse_key)]
    pub key: RepoKey,
    /// New kind.
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<RepoKind>,
    /// New upstream URL (an empty string: the kind's default).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,
    /// New tag TTL.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub tag_ttl: Option<Duration>,
    /// New username (the stored password is kept unless a new one is given).
    #[arg(long, conflicts_with = "clear_credentials")]
    pub username: Option<String>,
    #[command(flatten)]
    pub password: PasswordSource,
    /// Remove the stored username and password.
    #[arg(long, conflicts_with_all = ["password_stdin", "password_env", "password_file"])]
    pub clear_credentials: bool,
    /// New cache TTL override for this repo's content.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub cache_ttl: Option<Duration>,
    /// static or passthrough.
    #[arg(long, value_parser = ["static", "passthrough"])]
    pub auth: Option<String>,
    /// public or token.
    #[arg(long, value_parser = ["public", "token"])]
    pub access: Option<String>,
    /// A new PEM file of CA certificates for this upstream.
    #[arg(long, value_name = "PATH", conflicts_with = "clear_ca_bundle")]
    pub ca_bundle_file: Option<PathBuf>,
    /// Remove the CA bundle: the system roots only.
    #[arg(long)]
    pub clear_ca_bundle: bool,
    /// Tests only: accept any upstream certificate (true) or verify again (false).
    #[arg(long, value_name = "BOOL")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// New registry hosts the repo mirrors, comma-separated (replacing the list).
    #[arg(long, value_delimiter = ',', value_name = "HOST", conflicts_with = "default_mirror_of")]
    pub mirror_of: Option<Vec<String>>,
    /// Mirror the kind's and the upstream's hosts again (an empty mirror_of).
    #[arg(long)]
    pub default_mirror_of: bool,
    /// Credentials from the nodes' identity (aws, azure, gcp, oauth2), or none (an empty string).
    #[arg(long, value_parser = ["aws", "azure", "gcp", "oauth2", ""])]
    pub credential_provider: Option<String>,
    /// The file on each node the provider reads, or none (an empty string).
    #[arg(long, value_name = "PATH")]
    pub credential_file: Option<String>,
    /// Write only if the repo is still at this revision (default: the revision just read).
    #[arg(long, value_name = "N")]
    pub revision: Option<i64>,
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Issue a token and print it once (stdout; the control plane keeps only its hash).
    Create(TokenCreateArgs),
    /// Every token: id, role, repos, expiry (never the secret).
    List,
    /// Revoke a token by id: the API refuses it at once, nodes once they have the new configuration.
    Revoke {
        /// The token's id (`token list`).
        id: String,
    },
}

#[derive(Args, Debug)]
pub struct TokenCreateArgs {
    /// admin | reader | puller | node
    #[arg(long)]
    pub role: String,
    /// Puller tokens: patterns over <repoKey>/<name> (`*` matches anything), comma-separated; default: every repo.
    #[arg(long, value_delimiter = ',', value_name = "PATTERN,...")]
    pub repos: Vec<String>,
    /// Lifetime (`90d`, `12h`); default: never expires.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub expires: Option<Duration>,
    /// A note shown in `token list`.
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Every node with an open config stream: address, applied revision, last seen, cache size, hit ratio.
    #[command(after_help = "\
Examples:
  regctl node list
  regctl node list -o json | jq -r '.nodes[].address'")]
    List,
}

#[derive(Subcommand, Debug)]
pub enum CacheCmd {
    /// Pre-pull an image through every node: the manifest(s), the config and every layer.
    #[command(after_help = "\
REF is <repoKey>/<name>:<tag> or <repoKey>/<name>@sha256:<hex>. The tag (and, for an index, the
platform's manifest) is resolved through one node; then every node fetches every blob, each checked
against its digest. Nodes come from `regctl node list` unless --node is given. A node that fails is
reported and the others go on; the exit code is 1 if any failed.

Examples:
  regctl cache warm ghcr/org/image:v1 --platform linux/amd64
  regctl cache warm dockerhub/library/alpine:3.20 --node 10.0.0.5:5000 --node 10.0.0.6:5000
  regctl cache warm corp/app@sha256:<hex> --parallel 8 -o json")]
    Warm(WarmArgs),
    /// Re-hash every cached blob and manifest on the nodes now; remove and list what does not match.
    #[command(after_help = "\
The control plane passes the request to the nodes (every node in `regctl node list`, or those named
with --node); each reads its whole cache once at --rate, removes every entry whose bytes do not match
its digest (the next pull fetches it again) and reports. regctl follows the reports until every node
is done, then prints what each found. The exit code is 1 if a node did not finish within --wait.

Examples:
  regctl cache verify
  regctl cache verify --node node-a --rate 200
  regctl cache verify --no-wait -o json")]
    Verify(VerifyArgs),
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// A node's id or address, as `regctl node list` shows it; repeatable. Default: every node.
    #[arg(long = "node", value_name = "ID|ADDR")]
    pub nodes: Vec<String>,
    /// How fast each node reads its cache, in MB/s; 0: as fast as its disk reads.
    #[arg(long, default_value_t = 50.0, value_name = "MB/S")]
    pub rate: f64,
    /// How long to follow the nodes' passes before giving up (the passes go on).
    #[arg(long, value_parser = parse_duration, default_value = "6h", value_name = "DURATION")]
    pub wait: Duration,
    /// Print the request's id and return at once; the results show in `regctl node list -o json`.
    #[arg(long, conflicts_with = "wait")]
    pub no_wait: bool,
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// <repoKey>/<name>:<tag> or <repoKey>/<name>@<digest>.
    #[arg(value_name = "REF", value_parser = parse_ref)]
    pub image: ImageRef,
    /// The platform to pick from an image index: os/arch[/variant].
    #[arg(long, default_value_t = default_platform(), value_name = "OS/ARCH")]
    pub platform: String,
    /// A node's address (host:port or URL); repeatable. Default: every node in `regctl node list`.
    #[arg(long = "node", value_name = "ADDR")]
    pub nodes: Vec<String>,
    /// Blob downloads at once, per node.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,
    /// Longest silence while reading from a node.
    #[arg(long, value_parser = parse_duration, default_value = "60s", value_name = "DURATION")]
    pub read_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The URL to GET, for example a node's or a control plane's /readyz.
    #[arg(env = "WHARF_PROBE_URL")]
    pub url: Option<String>,
}

#[derive(Args, Debug)]
pub struct CheckCdnArgs {
    /// The URL of a blob or manifest: .../v2/<repoKey>/<name>/blobs/<digest> or .../manifests/<ref>.
    pub url: String,
    /// Longest wait for each request.
    #[arg(long = "request-timeout", value_parser = parse_duration, default_value = "60s", value_name = "DURATION")]
    pub request_timeout: Duration,
}

fn default_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

fn parse_key(s: &str) -> Result<RepoKey, String> {
    s.parse::<RepoKey>().map_err(|e| e.to_string())
}

fn parse_kind(s: &str) -> Result<RepoKind, String> {
    s.parse::<RepoKind>().map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration like 30s, 10m, 1h)"))
}

fn parse_ref(s: &str) -> Result<ImageRef, String> {
    s.parse::<ImageRef>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
