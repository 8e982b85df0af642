//! A real etcd (Debian `etcd-server`) on loopback: one member or a cluster of several, data in a temp
//! dir, ports chosen at run time. Every member is killed when the cluster drops, also when a test fails.
//!
//! etcd cannot listen on port 0 and report the port, so free ports are found by binding listeners on
//! 127.0.0.1:0 (all at once, so they differ), closing them and handing the numbers to etcd. Another
//! process could take one in between: a member that exits with "address already in use" before the
//! cluster is healthy makes the whole start retry with new ports.
//!
//! Elections are tuned for tests (50 ms heartbeats, 500 ms election timeout), which also makes etcd's
//! minimum lease TTL 1 s instead of 2 s.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::process::ChildGuard;

/// Where Debian's etcd-server puts etcd.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
/// How long a cluster may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// One member of an [`EtcdCluster`].
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    child: Option<ChildGuard>,
}

impl EtcdMember {
    /// `http://127.0.0.1:<client port>`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Whether the member's process is running (not killed and not exited).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().is_none())
    }

    /// The last `n` lines of the member's output.
    pub fn tail(&self, n: usize) -> String {
        self.child.as_ref().map(|c| c.tail(n)).unwrap_or_else(|| format!("{} is not running", self.name))
    }
}

/// A running etcd cluster of one or more members on 127.0.0.1.
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    token: String,
    // Dropped after the members (fields drop in order): the processes die before their data goes.
    _dir: TempDir,
}

/// Why one start attempt failed.
enum StartError {
    /// A port was taken between choosing it and etcd binding it: try again with new ports.
    PortTaken(String),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(e: anyhow::Error) -> Self {
        StartError::Other(e)
    }
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::Other(e.into())
    }
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until every member reports healthy.
    pub fn start(n: usize) -> anyhow::Result<Self> {
        if n == 0 {
            bail!("an etcd cluster needs at least one member");
        }
        if !Path::new(ETCD_BIN).exists() {
            bail!("{ETCD_BIN} is missing: apt-get install etcd-server (or `make test`)");
        }
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(n) {
                Ok(c) => return Ok(c),
                Err(StartError::PortTaken(why)) => {
                    eprintln!("etcd: port taken on attempt {attempt}, retrying with new ports: {why}");
                    last = why;
                }
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        bail!("etcd did not start after {START_ATTEMPTS} attempts, ports kept being taken: {last}")
    }

    fn start_once(n: usize) -> Result<Self, StartError> {
        let dir = tempfile::Builder::new().prefix("wharf-etcd-").tempdir()?;
        let ports = free_ports(2 * n)?;
        let mut members: Vec<EtcdMember> = (0..n)
            .map(|i| EtcdMember {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let token = format!("wharf-test-{}", crate::random_name(""));
        let initial = initial_cluster(&members);
        for m in &mut members {
            m.child = Some(spawn(m, &initial, &token, "new")?);
        }
        let mut cluster = Self { members, token, _dir: dir };
        cluster.wait_healthy_all(START_TIMEOUT)?;
        Ok(cluster)
    }

    /// Client URLs of all members (also those killed: clients are meant to fail over).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }

    /// The client URL of the first member.
    pub fn endpoint(&self) -> String {
        self.members[0].client_url()
    }

    /// The members.
    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    /// SIGKILLs member `i`; its data dir stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            c.kill();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its ports and data dir, and waits until it is healthy. Fails when its
    /// port was taken meanwhile (rare; the test should then start a new cluster).
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let initial = initial_cluster(&self.members);
        let child = spawn(&self.members[i], &initial, &self.token, "existing")?;
        self.members[i].child = Some(child);
        match self.wait_healthy(i, START_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(StartError::PortTaken(why)) => bail!("restarting etcd member {i}: {why}"),
            Err(StartError::Other(e)) => Err(e),
        }
    }

    /// The index of the current leader, asked of the running members (etcd's JSON gateway,
    /// `/v3/maintenance/status`). `None` while there is none (an election) or no member answers.
    pub fn leader(&mut self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                continue;
            }
            let Ok(body) = http_call(self.members[i].client_port, "POST", "/v3/maintenance/status", "{}") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(json_part(&body)) else { continue };
            let Some(leader) = v["leader"].as_str() else { continue };
            // Find the member whose id is the leader's, by asking each its own id.
            for j in 0..self.members.len() {
                let Ok(b) = http_call(self.members[j].client_port, "POST", "/v3/maintenance/status", "{}") else {
                    continue;
                };
                let Ok(w) = serde_json::from_str::<serde_json::Value>(json_part(&b)) else { continue };
                if w["header"]["member_id"].as_str() == Some(leader) {
                    return Some(j);
                }
            }
        }
        None
    }

    fn wait_healthy_all(&mut self, timeout: Duration) -> Result<(), StartError> {
        for i in 0..self.members.len() {
            self.wait_healthy(i, timeout)?;
        }
        Ok(())
    }

    /// Polls member `i`'s `/health` until it answers healthy (it has a leader), or fails early when the
    /// process exits.
    fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        let m = &mut self.members[i];
        loop {
            if !m.is_running() {
                let tail = m.tail(40);
                if tail.contains("address already in use") {
                    return Err(StartError::PortTaken(format!("{} on {}/{}", m.name, m.client_port, m.peer_port)));
                }
                return Err(StartError::Other(anyhow::anyhow!("etcd member {} exited while starting\n{tail}", m.name)));
            }
            if health(m.client_port).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = m.tail(40);
                return Err(StartError::Other(anyhow::anyhow!(
                    "etcd member {} not healthy within {timeout:?}\n{tail}",
                    m.name
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn initial_cluster(members: &[EtcdMember]) -> String {
    members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",")
}

fn spawn(m: &EtcdMember, initial: &str, token: &str, state: &str) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new(ETCD_BIN);
    cmd.arg("--name")
        .arg(&m.name)
        .arg("--data-dir")
        .arg(&m.data_dir)
        .arg("--listen-client-urls")
        .arg(m.client_url())
        .arg("--advertise-client-urls")
        .arg(m.client_url())
        .arg("--listen-peer-urls")
        .arg(m.peer_url())
        .arg("--initial-advertise-peer-urls")
        .arg(m.peer_url())
        .arg("--initial-cluster")
        .arg(initial)
        .arg("--initial-cluster-state")
        .arg(state)
        .arg("--initial-cluster-token")
        .arg(token)
        .arg("--heartbeat-interval=50")
        .arg("--election-timeout=500")
        .arg("--logger=zap")
        .arg("--log-outputs=stderr");
    // Keep the environment (ETCD_* variables) from overriding the flags.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    ChildGuard::spawn(&format!("etcd-{}", m.name), &mut cmd).with_context(|| format!("starting etcd member {}", m.name))
}

/// `n` distinct free ports on 127.0.0.1 (all listeners held until every port is chosen).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// A port on 127.0.0.1 that nothing listens on (for "store unreachable" tests).
pub fn closed_port() -> u16 {
    free_ports(1).ok().and_then(|p| p.first().copied()).unwrap_or(1)
}

/// Whether etcd's `/health` on `port` says healthy.
fn health(port: u16) -> std::io::Result<bool> {
    let resp = http_call(port, "GET", "/health", "")?;
    Ok(resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.contains(r#""health":"true""#))
}

/// A plain blocking HTTP/1.0 request to 127.0.0.1:`port` with short timeouts (used while polling,
/// also outside any async runtime). Returns the whole response, head and body.
fn http_call(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}

/// The body of an HTTP response.
fn json_part(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}
