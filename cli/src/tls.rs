//! TLS towards the control plane (gRPC) and the nodes (HTTP): `--ca-cert`, and `--cert` / `--key`
//! for mTLS.

use std::path::Path;

use crate::args::Global;
use crate::error::CliError;

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    let bytes = std::fs::read(path).map_err(|source| CliError::ReadFile { what, path: path.into(), source })?;
    Ok(bytes)
}

/// A client certificate and its key, PEM.
struct ClientPem {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// `--cert` and `--key`, read; `None` when neither is given.
fn identity(global: &Global) -> Result<Option<ClientPem>, CliError> {
    match (&global.client_cert, &global.client_key) {
        (Some(c), Some(k)) => {
            Ok(Some(ClientPem { cert: read("the client certificate", c)?, key: read("the client key", k)? }))
        }
        (None, None) => Ok(None),
        _ => Err(CliError::Usage("--cert and --key go together".into())),
    }
}

/// The gRPC channel's TLS: the `--ca-cert` CA (else the system's roots), the client certificate.
pub fn tonic_config(global: &Global) -> Result<tonic::transport::ClientTlsConfig, CliError> {
    let mut config = tonic::transport::ClientTlsConfig::new();
    config = match &global.ca_cert {
        Some(ca) => {
            let pem = read("the CA certificate", ca)?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(CliError::Input(format!("--ca-cert {}: no PEM certificate in it", ca.display())));
            }
            config.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => config.with_native_roots(),
    };
    if let Some(id) = identity(global)? {
        config = config.identity(tonic::transport::Identity::from_pem(id.cert, id.key));
    }
    Ok(config)
}

/// A reqwest client builder for the nodes and CDNs: the system's roots plus the `--ca-cert` CA, and
/// the client certificate.
pub fn http_client(global: &Global) -> Result<reqwest::ClientBuilder, CliError> {
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = &global.ca_cert {
        let certs = reqwest::Certificate::from_pem_bundle(&read("the CA certificate", ca)?)
            .map_err(|e| CliError::Input(format!("--ca-cert {}: {e}", ca.display())))?;
        builder = builder.tls_certs_merge(certs);
    }
    if let Some(ClientPem { mut cert, key }) = identity(global)? {
        cert.push(b'\n');
        cert.extend_from_slice(&key);
        let id = reqwest::Identity::from_pem(&cert)
            .map_err(|e| CliError::Input(format!("--cert/--key: not a PEM certificate and key: {e}")))?;
        builder = builder.identity(id);
    }
    Ok(builder)
}
