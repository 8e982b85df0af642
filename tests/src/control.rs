//! The control plane and managed nodes, as real processes:
//! - [`ControlPlane`]: `wharf-control` on its embedded store (a temp `--data-dir`) or on etcd, on a
//!   port chosen up front so that a restart comes back on the same address (nodes keep their
//!   endpoint list);
//! - [`Node`]: `wharf-proxy --control-plane ...` (managed mode), its JSON log captured, restartable
//!   on the same cache dir;
//! - [`rest`] and [`expect_problem`]: a JSON client for the REST gateway and the RFC 9457 checks.
//!
//! Every process is killed and reaped when its guard drops.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use tempfile::TempDir;

use crate::http::Resp;
use crate::process::{ChildGuard, LogBuf, expect_listening, fields, message, wait_listening};

const START_TIMEOUT: Duration = Duration::from_secs(20);
const START_ATTEMPTS: usize = 4;

/// The path of a workspace binary: `$<env>`, or `target/<profile>/<name>` next to the running test
/// executable (`target/<profile>/deps/<test>`).
fn bin(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no grandparent folder")?;
    let bin = profile_dir.join(name);
    if !bin.exists() {
        bail!("{} does not exist: run `cargo build --bins` first (or set {env})", bin.display());
    }
    Ok(bin)
}

/// The path of `wharf-control` (`$WHARF_CONTROL_BIN` overrides).
pub fn control_bin() -> anyhow::Result<PathBuf> {
    bin("wharf-control", "WHARF_CONTROL_BIN")
}

/// The path of `wharf`, the all-in-one binary (`$WHARF_BIN` overrides).
pub fn wharf_bin() -> anyhow::Result<PathBuf> {
    bin("wharf", "WHARF_BIN")
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Environment variables that must not leak from the test's environment into a child.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("WHARF_") || k_str.starts_with("ETCD") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_PROXY", "*");
}

/// The admin token every control plane a test starts is bootstrapped with (one per test process,
/// so replicas on one etcd agree), and what [`rest`], [`grpc`], regctl and managed nodes send
/// unless a test says otherwise.
pub fn admin_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(wharf_control::tokens::new_token_text)
}

/// Writes [`admin_token`] to `dir/<name>` (mode 0600); returns the path.
pub fn write_token_file(dir: &Path, name: &str, token: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    Ok(path)
}

/// Adds a bearer token to every gRPC call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// `token`; `None`: no authorization at all.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| format!("Bearer {t}").parse().expect("a token is ASCII")))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A gRPC channel to `url` whose calls carry `token`.
pub type Grpc = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Connects to `url`; calls carry the admin token.
pub async fn grpc(url: &str) -> anyhow::Result<Grpc> {
    grpc_as(url, Some(admin_token())).await
}

/// Connects to `url`; calls carry `token` (none when `None`).
pub async fn grpc_as(url: &str, token: Option<&str>) -> anyhow::Result<Grpc> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, Bearer::new(token)))
}

/// How to start a control plane.
#[derive(Clone, Debug, Default)]
pub struct ControlOptions {
    /// etcd client URLs; empty: the embedded store.
    pub etcd: Vec<String>,
    /// The embedded store's `--data-dir`; a fresh temp dir when `None`.
    pub data_dir: Option<PathBuf>,
    /// Extra arguments (`--store-timeout 1s`, ...).
    pub args: Vec<String>,
    /// Run `wharf dev` (a control plane with an in-process node) instead of `wharf-control`.
    pub dev: bool,
    /// Extra environment variables (`OTEL_BSP_SCHEDULE_DELAY`, ...).
    pub env: Vec<(String, String)>,
}

/// A running `wharf-control`, listening on `127.0.0.1:<port>` (the same port across restarts).
pub struct ControlPlane {
    child: ChildGuard,
    port: u16,
    opts: ControlOptions,
    data_dir: PathBuf,
    _data_tmp: Option<TempDir>,
}

impl ControlPlane {
    /// On the embedded store in a fresh temp dir.
    pub fn embedded() -> anyhow::Result<Self> {
        Self::spawn(ControlOptions::default())
    }

    /// On etcd at `endpoints`, with `args`.
    pub fn etcd(endpoints: &[String], args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(ControlOptions {
            etcd: endpoints.to_vec(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
    }

    /// Starts `wharf-control` with `opts` on a free port (another one when that port was taken).
    pub fn spawn(opts: ControlOptions) -> anyhow::Result<Self> {
        let (data_dir, data_tmp) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("wharf-control-").tempdir()?;
                (t.path().join("data"), Some(t))
            }
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            match start_control(&opts, &data_dir, port) {
                Ok(child) => return Ok(Self { child, port, opts, data_dir, _data_tmp: data_tmp }),
                Err(e) if format!("{e:#}").contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("wharf-control did not start")))
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:<port>`: the gRPC endpoint and the REST base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.url())
    }

    /// The embedded store's data dir (unused with etcd).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill_9(&mut self) {
        self.child.kill();
    }

    /// SIGTERM, and wait up to `timeout` for it to exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.child.terminate(timeout)
    }

    /// Kills the process if it runs, and starts it again with the same options, data dir and port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill();
        self.child = start_control(&self.opts, &self.data_dir, self.port)?;
        Ok(())
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none() && self.child.id().is_some()
    }

    /// The process id (for resource measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The raw stdout lines.
    pub fn stdout(&self) -> &LogBuf {
        &self.child.stdout
    }

    /// Every stdout line that parses as JSON.
    pub fn logs(&self) -> Vec<Value> {
        self.child.json_logs()
    }

    /// Everything the process printed (stdout and stderr), for searching for leaked secrets.
    pub fn all_output(&self) -> String {
        self.child.all_output()
    }

    /// Process output tail, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.tail(n)
    }

    /// With `dev`: the address of the in-process node (its own `"listening"` event).
    pub fn dev_node_addr(&self) -> anyhow::Result<SocketAddr> {
        wait_listening(&self.child, "wharf_proxy", START_TIMEOUT)
            .with_context(|| format!("no \"listening\" event of the dev node\n{}", self.log_tail(30)))
    }
}

fn start_control(opts: &ControlOptions, data_dir: &Path, port: u16) -> anyhow::Result<ChildGuard> {
    let bin = if opts.dev { wharf_bin()? } else { control_bin()? };
    let mut cmd = Command::new(&bin);
    if opts.dev {
        cmd.arg("dev");
    }
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--log-format", "json", "--log-level", "debug"]);
    if opts.etcd.is_empty() {
        cmd.arg("--data-dir").arg(data_dir);
    } else {
        cmd.arg("--etcd").arg(opts.etcd.join(","));
    }
    cmd.args(&opts.args);
    if let Some(parent) = data_dir.parent() {
        cmd.current_dir(parent);
        let token_file = write_token_file(parent, "admin.token", admin_token())?;
        cmd.arg("--bootstrap-token-file").arg(token_file);
    }
    clean_env(&mut cmd);
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    let mut child = ChildGuard::spawn("wharf-control", &mut cmd)?;
    match wait_listening(&child, "wharf_control", START_TIMEOUT) {
        Some(a) if a.port() == port => Ok(child),
        other => {
            let exited = child.try_wait();
            let tail = child.tail(40);
            child.kill();
            bail!(
                "wharf-control ({}) logged no \"listening\" event on port {port} within {START_TIMEOUT:?} (got {other:?}, exit status: {exited:?})\n{tail}",
                bin.display()
            )
        }
    }
}

/// A running `wharf-proxy` in managed mode. Killed (SIGKILL) and reaped when dropped.
pub struct Node {
    child: ChildGuard,
    addr: SocketAddr,
    id: String,
    endpoints: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cache_dir: PathBuf,
    _cache_tmp: Option<TempDir>,
}

impl Node {
    /// Starts node `id` following `endpoints`, with a fresh cache dir.
    pub fn spawn(id: &str, endpoints: &[String]) -> anyhow::Result<Self> {
        Self::spawn_with(id, endpoints, None, &[])
    }

    /// Starts node `id` following `endpoints` with `cache_dir` (a fresh temp dir when `None`) and
    /// extra `args`.
    pub fn spawn_with(id: &str, endpoints: &[String], cache_dir: Option<&Path>, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_with_env(id, endpoints, cache_dir, args, &[])
    }

    /// [`Node::spawn_with`], with extra environment variables (`GCE_METADATA_HOST`, ...).
    pub fn spawn_with_env(
        id: &str,
        endpoints: &[String],
        cache_dir: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let (cache_dir, cache_tmp) = match cache_dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new().prefix("wharf-node-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let (child, addr) = start_node(id, endpoints, &cache_dir, &args, &env)?;
        Ok(Self {
            child,
            addr,
            id: id.to_string(),
            endpoints: endpoints.to_vec(),
            args,
            env,
            cache_dir,
            _cache_tmp: cache_tmp,
        })
    }

    /// The node id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:<port>/v2/<path>`.
    pub fn v2(&self, path: &str) -> String {
        format!("http://{}/v2/{}", self.addr, path.trim_start_matches('/'))
    }

    /// The cache dir.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Where the node keeps its last snapshot.
    pub fn snapshot_path(&self) -> PathBuf {
        self.cache_dir.join("config.snapshot")
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill_9(&mut self) {
        self.child.kill();
    }

    /// Sends SIGTERM (or SIGINT): the node shuts down gracefully, in its own time.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.child.id().context("the node is not running")?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        self.child.wait_exit(timeout)
    }

    /// Files left in `<cache-dir>/staging` (partial downloads).
    pub fn staging_files(&self) -> Vec<PathBuf> {
        crate::files_under(&self.cache_dir.join("staging"))
    }

    /// Kills the process if it runs (SIGKILL), then starts it again with the same id, endpoints and
    /// cache dir (on a new port). The log starts afresh.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill();
        let (child, addr) = start_node(&self.id, &self.endpoints, &self.cache_dir, &self.args, &self.env)?;
        self.child = child;
        self.addr = addr;
        Ok(())
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_none() && self.child.id().is_some()
    }

    /// Every stdout line that parses as JSON.
    pub fn logs(&self) -> Vec<Value> {
        self.child.json_logs()
    }

    /// The revisions of the `"configuration applied"` events so far, in order.
    pub fn applied(&self) -> Vec<i64> {
        self.logs()
            .iter()
            .filter(|v| message(v) == Some("configuration applied"))
            .filter_map(|v| fields(v).get("revision").and_then(Value::as_i64))
            .collect()
    }

    /// Waits until the node logs `"configuration applied"` for a revision >= `revision`; returns it.
    pub fn wait_applied(&self, revision: i64, timeout: Duration) -> anyhow::Result<i64> {
        let mut got = None;
        self.child.stdout.wait_for(0, timeout, |l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else { return false };
            if message(&v) != Some("configuration applied") {
                return false;
            }
            let rev = fields(&v).get("revision").and_then(Value::as_i64).unwrap_or(0);
            if rev >= revision {
                got = Some(rev);
            }
            got.is_some()
        });
        got.with_context(|| {
            format!(
                "node {} applied no revision >= {revision} within {timeout:?} (applied: {:?})\n{}",
                self.id,
                self.applied(),
                self.log_tail(30)
            )
        })
    }

    /// Waits until a stdout line after the first `from` satisfies `pred` (JSON events only).
    pub fn wait_log(
        &self,
        from: usize,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let line =
            self.child.stdout.wait_for(from, timeout, |l| serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v)));
        match line {
            Some(l) => Ok(serde_json::from_str(&l)?),
            None => bail!("node {}: no matching log event within {timeout:?}\n{}", self.id, self.log_tail(30)),
        }
    }

    /// The number of stdout lines so far (a mark for [`Node::wait_log`]).
    pub fn log_len(&self) -> usize {
        self.child.stdout.len()
    }

    /// Everything the process printed (stdout and stderr).
    pub fn all_output(&self) -> String {
        self.child.all_output()
    }

    /// Process output tail, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.tail(n)
    }
}

fn start_node(
    id: &str,
    endpoints: &[String],
    cache_dir: &Path,
    args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let bin = crate::proxy::proxy_bin()?;
    let mut cmd = Command::new(&bin);
    // Admin tokens may follow the configuration stream too; tests of node tokens pass their own.
    if !args.iter().any(|a| a == "--control-plane-token-file") {
        cmd.arg("--control-plane-token-file").arg(write_token_file(cache_dir, "node.token", admin_token())?);
    }
    cmd.arg("--control-plane")
        .arg(endpoints.join(","))
        .args(["--node-id", id])
        .arg("--cache-dir")
        .arg(cache_dir)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "debug"])
        .args(args);
    if let Some(parent) = cache_dir.parent() {
        cmd.current_dir(parent);
    }
    clean_env(&mut cmd);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let child = ChildGuard::spawn(&format!("wharf-proxy {id}"), &mut cmd)?;
    expect_listening(child, "wharf_proxy", START_TIMEOUT, &format!("managed wharf-proxy {id} ({})", bin.display()))
}

/// How long a REST call may take before the test fails instead of hanging.
pub const REST_TIMEOUT: Duration = Duration::from_secs(30);

/// A reqwest client for the REST gateway (no proxy from the environment, no redirects).
pub fn rest_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REST_TIMEOUT)
        .build()
        .expect("building reqwest client")
}

/// Sends `method url` with `headers` and `body`; reads the whole response. Carries the admin token
/// unless `headers` has an `authorization` (an empty one: none at all).
pub async fn rest(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> anyhow::Result<Resp> {
    let m = reqwest::Method::from_bytes(method.as_bytes())?;
    let mut req = rest_client().request(m, url);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
        req = req.bearer_auth(admin_token());
    }
    for (k, v) in headers.iter().filter(|(k, v)| !(k.eq_ignore_ascii_case("authorization") && v.is_empty())) {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_vec());
    }
    let resp = req.send().await.with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.with_context(|| format!("reading the body of {method} {url} (status {status})"))?;
    Ok(Resp { status, headers, body: body.to_vec() })
}

/// `method url` with a JSON body (and `content-type: application/json`).
pub async fn rest_json(method: &str, url: &str, headers: &[(&str, &str)], body: &Value) -> anyhow::Result<Resp> {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    rest(method, url, &h, Some(body.to_string().as_bytes())).await
}

/// Checks that `resp` is an RFC 9457 problem with `status` and (when given) `field`; returns the
/// problem document.
pub fn expect_problem(resp: &Resp, status: u16, field: Option<&str>) -> anyhow::Result<Value> {
    ensure!(resp.status == status, "expected status {status}, got {}: {}", resp.status, resp.text());
    let ct = resp.header("content-type").unwrap_or("");
    ensure!(ct.starts_with("application/problem+json"), "content-type {ct:?} is not problem JSON: {}", resp.text());
    let v = resp.json()?;
    ensure!(v.get("status").and_then(Value::as_u64) == Some(u64::from(status)), "\"status\" is not {status}: {v}");
    ensure!(v.get("type").and_then(Value::as_str).is_some_and(|s| !s.is_empty()), "no \"type\": {v}");
    ensure!(v.get("title").and_then(Value::as_str).is_some_and(|s| !s.is_empty()), "no \"title\": {v}");
    ensure!(v.get("detail").and_then(Value::as_str).is_some_and(|s| !s.is_empty()), "no \"detail\": {v}");
    if let Some(f) = field {
        ensure!(v.get("field").and_then(Value::as_str) == Some(f), "expected \"field\": {f:?} in {v}");
    }
    Ok(v)
}

/// The revision in an `ETag: "<n>"` header.
pub fn etag_revision(resp: &Resp) -> anyhow::Result<i64> {
    let etag = resp.header("etag").with_context(|| format!("no ETag (status {}): {}", resp.status, resp.text()))?;
    etag.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .with_context(|| format!("ETag {etag:?} is not a quoted revision"))
}

/// Polls `f` (async) every 25 ms until it returns `Some`, or fails with `what` after `timeout`.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The body of a repo for `POST /api/repos`: a generic repo on `upstream`.
pub fn repo_json(key: &str, upstream: &str) -> Value {
    serde_json::json!({ "key": key, "kind": "generic", "upstream": upstream, "tag_ttl": "5m" })
}

/// `POST /api/repos` on `cp`; fails unless 201. Returns the new revision.
pub async fn create_repo(cp_url: &str, body: &Value) -> anyhow::Result<i64> {
    let resp = rest_json("POST", &format!("{cp_url}/api/repos"), &[], body).await?;
    ensure!(resp.status == 201, "POST /api/repos {body}: {} {}", resp.status, resp.text());
    etag_revision(&resp)
}

/// `GET /api/nodes` on `cp`: the node objects.
pub async fn list_nodes(cp_url: &str) -> anyhow::Result<Vec<Value>> {
    let resp = rest("GET", &format!("{cp_url}/api/nodes"), &[], None).await?;
    ensure!(resp.status == 200, "GET /api/nodes: {} {}", resp.status, resp.text());
    Ok(resp.json()?.get("nodes").and_then(Value::as_array).cloned().unwrap_or_default())
}

/// GETs `<key>/<name>/manifests/<tag>` from `node` (OCI accept header): (status, body digest, OCI
/// error code or "").
pub async fn get_manifest(node: &Node, key: &str, name: &str, tag: &str) -> anyhow::Result<(u16, String, String)> {
    let resp =
        crate::http::get(&node.v2(&format!("{key}/{name}/manifests/{tag}")), &[("accept", crate::image::OCI_MANIFEST)])
            .await?;
    let code = if resp.status == 200 { String::new() } else { resp.oci_code() };
    Ok((resp.status, resp.digest(), code))
}

/// Polls until `node` serves `key/name:tag` with `digest`.
pub async fn wait_served(
    node: &Node,
    key: &str,
    name: &str,
    tag: &str,
    digest: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let last = std::sync::Mutex::new(String::new());
    let r = poll(timeout, "the node to serve the manifest", || {
        let last = &last;
        async move {
            match get_manifest(node, key, name, tag).await {
                Ok(got) if got.0 == 200 && got.1 == digest => Some(()),
                Ok(got) => {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{got:?}");
                    None
                }
                Err(e) => {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{e:#}");
                    None
                }
            }
        }
    })
    .await;
    let last = last.lock().unwrap_or_else(|e| e.into_inner()).clone();
    r.with_context(|| {
        format!("node {} /v2/{key}/{name}/manifests/{tag}: last answer {last}\n{}", node.id(), node.log_tail(20))
    })
}
