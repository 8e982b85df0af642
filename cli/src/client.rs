//! The control plane's gRPC API: one connection, the token as `authorization: Bearer` metadata, and
//! every `Status` turned into one clear line.

use std::future::Future;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};
use wharf_proto::v1 as pb;

use crate::args::Global;
use crate::error::CliError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds the API token to every call.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Repos = pb::repo_service_client::RepoServiceClient<InterceptedService<Channel, Auth>>;
pub type Nodes = pb::node_service_client::NodeServiceClient<InterceptedService<Channel, Auth>>;
pub type Tokens = pb::token_service_client::TokenServiceClient<InterceptedService<Channel, Auth>>;

/// A connected control plane.
pub struct ControlPlane {
    pub url: String,
    channel: Channel,
    auth: Auth,
    timeout: Duration,
}

/// The token from `--token-file`, else `$WHARF_TOKEN`; `None` when neither is set.
pub fn token(global: &Global) -> Result<Option<String>, CliError> {
    let raw = match &global.token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| CliError::ReadFile {
            what: "the token",
            path: path.clone(),
            source,
        })?,
        None => match std::env::var("WHARF_TOKEN") {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let t = raw.trim();
    if t.is_empty() {
        return match &global.token_file {
            Some(p) => Err(CliError::Input(format!("the token file {} is empty", p.display()))),
            None => Ok(None),
        };
    }
    Ok(Some(t.to_owned()))
}

impl ControlPlane {
    /// Connects to `--server` (checks that something listens there).
    pub async fn connect(global: &Global) -> Result<Self, CliError> {
        let url = global.server.trim_end_matches('/').to_owned();
        let auth = match token(global)? {
            Some(t) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {t}")
                    .parse()
                    .map_err(|_| CliError::Input("the token holds characters a header cannot carry".into()))?;
                v.set_sensitive(true);
                Auth(Some(v))
            }
            None => Auth(None),
        };
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(CliError::BadServerUrl(format!(
                "--server {url:?} is not an http:// or https:// URL (for example http://127.0.0.1:7000)"
            )));
        }
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CliError::BadServerUrl(format!("--server {url:?} is not a valid URL: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(global.timeout);
        if https {
            endpoint = endpoint
                .tls_config(crate::tls::tonic_config(global)?)
                .map_err(|e| CliError::Input(format!("TLS settings: {}", error_chain(&e))))?;
        }
        let channel = match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let mut why = error_chain(&e);
                if why.contains("certificate") {
                    why.push_str(" (a TLS certificate problem: give the CA that signed the server's certificate with --ca-cert, and a client certificate with --cert/--key if the server requires one)");
                }
                return Err(CliError::Unreachable { url, why });
            }
            Err(_) => return Err(CliError::Unreachable { url, why: format!("no answer within {CONNECT_TIMEOUT:?}") }),
        };
        Ok(Self { url, channel, auth, timeout: global.timeout })
    }

    pub fn repos(&self) -> Repos {
        pb::repo_service_client::RepoServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn nodes(&self) -> Nodes {
        pb::node_service_client::NodeServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn tokens(&self) -> Tokens {
        pb::token_service_client::TokenServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// Runs one call with the timeout; `key` names the repo the call is about (for not found etc.).
    pub async fn call<T>(
        &self,
        key: &str,
        fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        match tokio::time::timeout(self.timeout + Duration::from_secs(1), fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.status(&s, key)),
            Err(_) => Err(CliError::Timeout(self.timeout)),
        }
    }

    /// A gRPC status as a one-line error.
    pub fn status(&self, s: &Status, key: &str) -> CliError {
        let mut msg = one_line(s.message());
        if let Some(src) = std::error::Error::source(s) {
            let chain = error_chain(src);
            if chain.starts_with(&msg) {
                msg = chain;
            } else if !msg.contains(&chain) {
                msg = format!("{msg}: {chain}");
            }
        }
        let url = self.url.clone();
        let protocol = |m: &str| {
            let m = m.to_ascii_lowercase();
            ["protocol error", "frame", "grpc-status", "content-type", "decode", "invalid", "http2", "h2"]
                .iter()
                .any(|w| m.contains(w))
        };
        match s.code() {
            Code::NotFound => CliError::RepoNotFound { key: key.to_owned() },
            Code::AlreadyExists => CliError::RepoExists { key: key.to_owned() },
            Code::FailedPrecondition => CliError::Stale { key: key.to_owned() },
            Code::InvalidArgument => CliError::Invalid(msg),
            Code::Unauthenticated | Code::PermissionDenied => CliError::Denied(msg),
            Code::DeadlineExceeded => CliError::Timeout(self.timeout),
            Code::Cancelled if msg.to_ascii_lowercase().contains("timeout") => CliError::Timeout(self.timeout),
            Code::Unavailable if msg.starts_with("the configuration store") => CliError::Unavailable(msg),
            Code::Unavailable if !protocol(&msg) => CliError::Unreachable { url, why: msg },
            Code::Internal if msg.starts_with("internal error") => CliError::Server(msg),
            Code::Unimplemented => {
                CliError::NotControlPlane { url, why: format!("the call is not implemented ({msg})") }
            }
            _ => CliError::NotControlPlane { url, why: format!("{:?}: {msg}", s.code()) },
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its sources, `: `-separated, on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = one_line(&e.to_string());
    let mut src = e.source();
    while let Some(s) = src {
        let t = one_line(&s.to_string());
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}
