//! A real distribution registry (`docker-registry serve`), filesystem storage in a temp dir, on
//! 127.0.0.1 with a port chosen at run time. Its access log is captured so tests can count requests.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::process::ChildGuard;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Options for [`Registry::start_with`].
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// `proxy.remoteurl`: run the registry as a pull-through cache of that URL.
    pub proxy_remote_url: Option<String>,
}

/// One line of the registry's access log (combined log format on its stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLine {
    pub method: String,
    pub uri: String,
    pub status: u16,
}

impl AccessLine {
    fn parse(line: &str) -> Option<Self> {
        // 127.0.0.1 - - [29/Nov/2026:01:08:29 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
        let start = line.find('"')?;
        let rest = &line[start + 1..];
        let end = rest.find('"')?;
        let mut req = rest[..end].split(' ');
        let method = req.next()?.to_string();
        let uri = req.next()?.to_string();
        let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
        Some(Self { method, uri, status })
    }
}

/// A running distribution registry. Killed when dropped.
pub struct Registry {
    child: ChildGuard,
    addr: SocketAddr,
    dir: TempDir,
}

impl Registry {
    /// Starts a plain registry (no auth) on 127.0.0.1:<random>.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts a registry with `opts`.
    pub fn start_with(opts: RegistryOptions) -> anyhow::Result<Self> {
        if !Path::new(REGISTRY_BIN).exists() {
            bail!("{REGISTRY_BIN} is missing: apt-get install docker-registry (or `make test`)");
        }
        let dir = tempfile::Builder::new().prefix("wharf-registry-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: json\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:0\n  secret: wharf-tests-secret\n",
            data.display()
        );
        if let Some(remote) = &opts.proxy_remote_url {
            config.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve").arg(&config_path).current_dir(dir.path());
        // Keep the environment from overriding our config (REGISTRY_HTTP_ADDR etc.).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(k);
            }
        }
        let mut child = ChildGuard::spawn("docker-registry", &mut cmd)?;
        // `addr: 127.0.0.1:0` works: the registry logs "listening on 127.0.0.1:<port>" on stderr.
        let line = child.stderr.wait_for(0, Duration::from_secs(20), |l| l.contains("listening on "));
        let Some(line) = line else {
            let tail = child.tail(40);
            child.kill();
            bail!("docker-registry did not report 'listening on' within 20 s\n{tail}");
        };
        let addr = parse_listening(&line).with_context(|| format!("no address in registry log line {line}"))?;
        let reg = Self { child, addr, dir };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        crate::wait_until(Duration::from_secs(10), "registry to answer /v2/", || {
            std::net::TcpStream::connect(self.addr).ok()
        })?;
        Ok(())
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`, as used in image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The registry's storage root.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Every request in the access log so far.
    pub fn requests(&self) -> Vec<AccessLine> {
        self.child.stdout.lines().iter().filter_map(|l| AccessLine::parse(l)).collect()
    }

    /// How many requests with `method` had a URI containing `uri_contains`.
    pub fn count(&self, method: &str, uri_contains: &str) -> usize {
        self.requests().iter().filter(|r| r.method == method && r.uri.contains(uri_contains)).count()
    }

    /// How many `GET .../blobs/...` requests the registry received.
    pub fn blob_gets(&self) -> usize {
        self.count("GET", "/blobs/")
    }

    /// Makes a marker request and waits until its access-log line appears, so that every request
    /// that completed before this call is in the log.
    pub fn sync_log(&self) -> anyhow::Result<()> {
        let marker = crate::random_name("sync");
        let path = format!("/v2/?marker={marker}");
        let resp = crate::http::raw_request(self.addr, "GET", &path, &[])?;
        if resp.status != 200 {
            bail!("registry /v2/ answered {}", resp.status);
        }
        let found = self.child.stdout.wait_for(0, Duration::from_secs(10), |l| l.contains(&marker));
        if found.is_none() {
            bail!("registry access log never showed the marker request");
        }
        Ok(())
    }

    /// Registry log tail, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.tail(n)
    }
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    let idx = line.find("listening on ")?;
    let rest = &line[idx + "listening on ".len()..];
    let addr: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
    addr.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_lines_and_listen_lines() {
        let l = r#"127.0.0.1 - - [29/Nov/2026:01:08:29 +0000] "GET /v2/foo/blobs/sha256:00 HTTP/1.1" 404 157 "" "curl/7.88.1""#;
        assert_eq!(
            AccessLine::parse(l),
            Some(AccessLine { method: "GET".into(), uri: "/v2/foo/blobs/sha256:00".into(), status: 404 })
        );
        let j = r#"{"level":"info","msg":"listening on 127.0.0.1:43869","time":"x"}"#;
        assert_eq!(parse_listening(j), Some("127.0.0.1:43869".parse().expect("addr")));
    }
}
