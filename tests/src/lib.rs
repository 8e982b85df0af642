//! End-to-end harness for Wharf.
//!
//! Everything here starts real things on loopback with ports chosen at run time:
//! - [`Registry`]: a real distribution registry (`docker-registry`), with its access log captured;
//! - [`TestImage`]: OCI images made of random bytes, pushed with skopeo;
//! - [`Proxy`]: the real `wharf-proxy` binary, its JSON log captured;
//! - [`FakeUpstream`]: an in-process registry for what a real one cannot do on demand (token auth,
//!   redirects, faults, request recording);
//! - [`http`]: a small client (reqwest, plus a raw HTTP/1.1 client for paths reqwest would normalise).
//! - [`prom`]: the Prometheus text format parsed into a map, for exact assertions on `/metrics`.
//! - [`control::ControlPlane`], [`control::Node`]: `wharf-control` and managed `wharf-proxy` nodes;
//! - [`etcd::EtcdCluster`]: a real etcd (one member or several) for the control plane's store.
//! - [`regctl::Regctl`]: the `regctl` binary, its exit code and output captured; golden files.
//! - [`otlp::Collector`]: an in-process OTLP trace collector recording every exported span.
//! - [`docker::Dockerd`]: a private real dockerd (with its containerd and `ctr`) as a mirror's client.
//!
//! Every process is killed and reaped when its guard drops, also when a test fails.

pub mod checks;
pub mod control;
pub mod docker;
pub mod etcd;
pub mod fake;
pub mod http;
pub mod image;
pub mod layers;
pub mod otlp;
pub mod pki;
pub mod podman;
pub mod process;
pub mod prom;
pub mod proxy;
pub mod regctl;
pub mod registry;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use fake::{AuthMode, FakeUpstream, Fault, RecordedRequest};
pub use image::{Blob, TestImage, skopeo_copy_to_dir, skopeo_inspect, skopeo_try_copy, verify_dir_copy};
pub use process::ChildGuard;
pub use proxy::{Proxy, ProxyOptions};
pub use registry::{AccessLine, Registry, RegistryOptions};

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    // aws-lc's SHA-256 is assembly, fast even in debug builds (sha2 does ~30 MB/s there).
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut v).expect("random bytes");
    v
}

/// A short random lowercase name, handy for unique repository names.
pub fn random_name(prefix: &str) -> String {
    use rand::Rng as _;
    let n: u32 = rand::rng().random();
    format!("{prefix}{n:08x}")
}

/// Polls `f` until it returns `Some`, or fails with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Async variant of [`wait_until`], for use inside tokio tests.
pub async fn wait_until_async<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// All regular files below `dir` (recursively); empty when `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            let p = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

/// All entries (files and folders) below `dir`, recursively, relative to `dir`.
pub fn entries_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in rd.flatten() {
            let p = entry.path();
            if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_path_buf());
            }
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}
