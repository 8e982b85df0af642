//! Real docker and containerd clients: a private `dockerd` (Debian's `docker.io`, which brings its own
//! containerd and `ctr`), started as `shared/UPSTREAMS.md` ("dockerd as a client") describes, for tests
//! that check Wharf as a registry mirror.
//!
//! Everything lives under one fresh temp dir: data-root, exec-root, pidfile, the API socket, the
//! `daemon.json` written from [`DockerdOptions`], and the CLI's `DOCKER_CONFIG` (the real user's
//! `~/.docker` is never read). No TCP port is bound: `--bridge=none`, no iptables, the API on a unix
//! socket. dockerd runs as root (the tests do).
//!
//! Stopping: dropping a [`Dockerd`] (also while a test panics) sends SIGTERM, waits for dockerd and its
//! containerd to exit, SIGKILLs what is left, unmounts anything still mounted under the temp dir and
//! removes it. A small watchdog process does the same if the test process dies without dropping it
//! (a SIGKILL or a nextest timeout), so no daemon outlives its test.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

use crate::process::ChildGuard;

/// How long dockerd may take to answer `/_ping` (it usually takes well under 3 s).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long dockerd (and its containerd) may take to exit after SIGTERM before they are SIGKILLed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of one `docker` or `ctr` command (pulls included).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// The containerd namespace [`Dockerd::ctr_pull`] pulls into (dockerd's own is [`MOBY_NAMESPACE`]).
pub const CTR_NAMESPACE: &str = "wharf-test";
/// dockerd's containerd namespace: its content store keeps the manifests it pulled.
pub const MOBY_NAMESPACE: &str = "moby";

/// What goes into the private dockerd's `daemon.json`.
#[derive(Clone, Debug, Default)]
pub struct DockerdOptions {
    /// `registry-mirrors`: mirror URLs for Docker Hub images (`http://127.0.0.1:PORT`).
    pub registry_mirrors: Vec<String>,
    /// `insecure-registries`: `host:port` (or CIDR) entries that may be reached over plain http.
    pub insecure_registries: Vec<String>,
    /// The storage driver; `None`: overlay2, and vfs when dockerd cannot start with overlay2.
    pub storage_driver: Option<String>,
}

impl DockerdOptions {
    fn daemon_json(&self) -> serde_json::Value {
        serde_json::json!({
            "registry-mirrors": self.registry_mirrors,
            "insecure-registries": self.insecure_registries,
            // Debug logging: the pull decisions ("Trying to pull ... from ...") are only logged at debug.
            "debug": true,
        })
    }
}

/// A private dockerd with its own containerd. Stopped, unmounted and removed when dropped.
pub struct Dockerd {
    child: ChildGuard,
    watchdog: Option<Child>,
    dir: Option<TempDir>,
    opts: DockerdOptions,
    storage_driver: String,
    startup: Duration,
    docker_bin: PathBuf,
    ctr_bin: PathBuf,
    failed_attempts: Vec<String>,
}

impl Dockerd {
    /// Starts a dockerd with `opts` and waits until its API answers `/_ping` and `docker info`.
    /// Fails with a clear message (never skips) when dockerd is missing or cannot run here.
    pub fn start(opts: DockerdOptions) -> anyhow::Result<Self> {
        let dockerd_bin = find_bin("dockerd", &["/usr/sbin/dockerd", "/usr/bin/dockerd"])
            .context("dockerd is missing: run `scripts/ensure-deps.sh test` (installs Debian's docker.io)")?;
        // The CLI of the same package as the daemon, not whatever `docker` comes first in PATH.
        let docker_bin = find_bin_prefer("docker", &["/usr/bin/docker"])
            .context("the docker CLI is missing: run `scripts/ensure-deps.sh test` (Debian's docker.io)")?;
        let ctr_bin = find_bin_prefer("ctr", &["/usr/bin/ctr"])
            .context("ctr is missing: run `scripts/ensure-deps.sh test` (Debian's docker.io brings containerd)")?;
        let uid = current_uid()?;
        if uid != 0 {
            bail!("dockerd needs root and the tests run as uid {uid}: run them as root");
        }

        let dir = fresh_dir()?;
        std::fs::create_dir_all(dir.path().join("docker-config"))?;
        std::fs::write(dir.path().join("docker-config/config.json"), "{}\n")?;
        write_daemon_json(dir.path(), &opts)?;

        let drivers: Vec<String> = match &opts.storage_driver {
            Some(d) => vec![d.clone()],
            None => vec!["overlay2".into(), "vfs".into()],
        };
        let mut failed_attempts = Vec::new();
        for driver in drivers {
            let t0 = Instant::now();
            match spawn_ready(&dockerd_bin, &docker_bin, dir.path(), &driver) {
                Ok(child) => {
                    let startup = t0.elapsed();
                    let watchdog = spawn_watchdog(&child, dir.path());
                    return Ok(Self {
                        child,
                        watchdog,
                        dir: Some(dir),
                        opts,
                        storage_driver: driver,
                        startup,
                        docker_bin,
                        ctr_bin,
                        failed_attempts,
                    });
                }
                Err(e) => {
                    // Start the next attempt from empty data and exec roots.
                    for p in processes_mentioning(dir.path()) {
                        signal(&p.to_string(), "KILL");
                    }
                    unmount_under(dir.path());
                    let _ = std::fs::remove_dir_all(dir.path().join("root"));
                    let _ = std::fs::remove_dir_all(dir.path().join("exec"));
                    failed_attempts.push(format!("storage driver {driver}: {e:#}"));
                }
            }
        }
        let mut dir = Some(dir);
        remove_dir(&mut dir);
        bail!("dockerd could not start here:\n{}", failed_attempts.join("\n\n"))
    }

    /// The storage driver dockerd runs with (`overlay2`, or `vfs` after overlay2 failed).
    pub fn storage_driver(&self) -> &str {
        &self.storage_driver
    }

    /// How long dockerd took from spawn to answering `docker info` (the successful attempt only).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Why earlier attempts failed (overlay2 before the vfs fallback); empty when the first worked.
    pub fn failed_attempts(&self) -> &[String] {
        &self.failed_attempts
    }

    /// The temp dir everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(TempDir::path).unwrap_or(Path::new("/nonexistent"))
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir().join("docker.sock")
    }

    /// `unix://<socket>`, dockerd's `DOCKER_HOST`.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The exec-root (dockerd's containerd has its socket in `containerd/` below it).
    pub fn exec_root(&self) -> PathBuf {
        self.dir().join("exec")
    }

    /// dockerd's data-root.
    pub fn data_root(&self) -> PathBuf {
        self.dir().join("root")
    }

    /// dockerd's containerd socket.
    pub fn containerd_socket(&self) -> PathBuf {
        self.exec_root().join("containerd/containerd.sock")
    }

    /// The CLI's `DOCKER_CONFIG` dir (its `config.json` holds what `docker login` stored).
    pub fn docker_config_dir(&self) -> PathBuf {
        self.dir().join("docker-config")
    }

    /// The options dockerd was started with (as changed by [`Dockerd::set_registry_mirrors`]).
    pub fn options(&self) -> &DockerdOptions {
        &self.opts
    }

    /// dockerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Every line dockerd (and, through it, its containerd) logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        let mut lines = self.child.stdout.lines();
        lines.extend(self.child.stderr.lines());
        lines
    }

    /// dockerd's log tail, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.child.tail(n)
    }

    /// Runs the docker CLI against this dockerd with `args`. Panics (with dockerd's log tail) only when
    /// the CLI cannot be run or does not finish within [`CLI_TIMEOUT`]; see [`Dockerd::docker_with_timeout`].
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_with_timeout(args, None, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}\n{}", self.log_tail(40)))
    }

    /// Runs the docker CLI with `args`, `stdin` as its input, killing it after `timeout`.
    pub fn docker_with_timeout(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let mut cmd = Command::new(&self.docker_bin);
        clean_env(&mut cmd);
        cmd.env("DOCKER_HOST", self.docker_host()).env("DOCKER_CONFIG", self.docker_config_dir()).args(args);
        run_output(&mut cmd, stdin, timeout)
    }

    /// Runs `ctr -a <containerd socket> <args>` (pass `-n <namespace>` in `args`; dockerd's own
    /// namespace is [`MOBY_NAMESPACE`]). Panics like [`Dockerd::docker`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_timeout(args, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e:#}\n{}", self.log_tail(40)))
    }

    /// Runs `ctr -a <containerd socket> <args>`, killing it after `timeout`.
    pub fn ctr_with_timeout(&self, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let mut cmd = Command::new(&self.ctr_bin);
        clean_env(&mut cmd);
        cmd.arg("-a").arg(self.containerd_socket()).args(args);
        run_output(&mut cmd, None, timeout)
    }

    fn docker_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
        let what = format!("docker {}", args.join(" "));
        checked(&what, self.docker_with_timeout(args, stdin, CLI_TIMEOUT))
    }

    fn ctr_ok(&self, args: &[&str]) -> Result<String, String> {
        let what = format!("ctr {}", args.join(" "));
        checked(&what, self.ctr_with_timeout(args, CLI_TIMEOUT))
    }

    /// `docker pull <image>`; the error carries the CLI's exit status and stderr.
    pub fn pull(&self, image: &str) -> Result<(), String> {
        self.docker_ok(&["pull", image], None).map(drop)
    }

    /// `docker login <host> -u <user> --password-stdin`.
    pub fn login(&self, host: &str, user: &str, password: &str) -> Result<(), String> {
        self.docker_ok(&["login", host, "-u", user, "--password-stdin"], Some(password.as_bytes())).map(drop)
    }

    /// `docker logout <host>`.
    pub fn logout(&self, host: &str) -> Result<(), String> {
        self.docker_ok(&["logout", host], None).map(drop)
    }

    /// `docker rmi <image>`.
    pub fn rmi(&self, image: &str) -> Result<(), String> {
        self.docker_ok(&["rmi", image], None).map(drop)
    }

    /// The pulled image's `RepoDigests` (`<repo>@<manifest digest>`; the index digest for a
    /// multi-platform tag).
    pub fn image_digests(&self, image: &str) -> Result<Vec<String>, String> {
        let out = self.docker_ok(&["image", "inspect", "--format", "{{json .RepoDigests}}", image], None)?;
        serde_json::from_str(out.trim()).map_err(|e| format!("RepoDigests of {image} are not a JSON list ({e}): {out}"))
    }

    /// `docker info` as JSON.
    pub fn info(&self) -> Result<serde_json::Value, String> {
        let out = self.docker_ok(&["info", "--format", "{{json .}}"], None)?;
        serde_json::from_str(out.trim()).map_err(|e| format!("docker info is not JSON ({e}): {out}"))
    }

    /// Removes `digest` from dockerd's content store (namespace `moby`), where it keeps manifests
    /// across registries and after `docker rmi`: without this a re-pull skips the manifest GET.
    pub fn remove_content(&self, digest: &str) -> Result<(), String> {
        self.ctr_ok(&["-n", MOBY_NAMESPACE, "content", "rm", digest]).map(drop)
    }

    /// Removes everything from dockerd's content store, for a cold re-pull of every manifest.
    pub fn remove_all_content(&self) -> Result<(), String> {
        let out = self.ctr_ok(&["-n", MOBY_NAMESPACE, "content", "ls", "-q"])?;
        let digests: Vec<&str> = out.split_whitespace().collect();
        if digests.is_empty() {
            return Ok(());
        }
        let mut args = vec!["-n", MOBY_NAMESPACE, "content", "rm"];
        args.extend(digests);
        self.ctr_ok(&args).map(drop)
    }

    /// Pulls `image_ref` with containerd's own resolver, configured by the hosts dir `hosts_dir` (see
    /// [`write_hosts_toml`]): `ctr -n wharf-test image pull --hosts-dir <dir> <ref>`, unpacked with the
    /// snapshotter matching dockerd's storage driver. The error carries ctr's exit status and output.
    pub fn ctr_pull(&self, image_ref: &str, hosts_dir: &Path) -> Result<(), String> {
        self.ctr_pull_with(image_ref, hosts_dir, &[])
    }

    /// [`Dockerd::ctr_pull`] with extra `ctr image pull` flags (`--plain-http`, `--user u:p`, ...).
    pub fn ctr_pull_with(&self, image_ref: &str, hosts_dir: &Path, extra: &[&str]) -> Result<(), String> {
        let hosts_dir = hosts_dir.to_string_lossy();
        let snapshotter = if self.storage_driver == "overlay2" { "overlayfs" } else { "native" };
        let mut args =
            vec!["-n", CTR_NAMESPACE, "image", "pull", "--hosts-dir", &hosts_dir, "--snapshotter", snapshotter];
        args.extend_from_slice(extra);
        args.push(image_ref);
        self.ctr_ok(&args).map(drop)
    }

    /// The digest containerd recorded for `image_ref` in namespace [`CTR_NAMESPACE`] (`ctr image ls`).
    pub fn ctr_image_digest(&self, image_ref: &str) -> Result<String, String> {
        let out = self.ctr_ok(&["-n", CTR_NAMESPACE, "image", "ls"])?;
        // REF TYPE DIGEST SIZE PLATFORMS LABELS
        out.lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let (r, _ty, digest) = (cols.next()?, cols.next()?, cols.next()?);
                (r == image_ref).then(|| digest.to_string())
            })
            .next()
            .ok_or_else(|| format!("{image_ref} is not in `ctr -n {CTR_NAMESPACE} image ls`:\n{out}"))
    }

    /// `ctr -n wharf-test image rm <ref>`.
    pub fn ctr_rmi(&self, image_ref: &str) -> Result<(), String> {
        self.ctr_ok(&["-n", CTR_NAMESPACE, "image", "rm", image_ref]).map(drop)
    }

    /// Rewrites `registry-mirrors` in `daemon.json`, reloads dockerd (SIGHUP) and waits until
    /// `docker info` shows the new list.
    pub fn set_registry_mirrors(&mut self, mirrors: &[String]) -> anyhow::Result<()> {
        self.opts.registry_mirrors = mirrors.to_vec();
        write_daemon_json(self.dir(), &self.opts)?;
        let pid = self.pid().context("dockerd is not running")?;
        signal(&pid.to_string(), "HUP");
        // dockerd normalises the URLs (a trailing slash is added).
        let want: Vec<String> = mirrors.iter().map(|m| format!("{}/", m.trim_end_matches('/'))).collect();
        let mut last = serde_json::Value::Null;
        let res = crate::wait_until(Duration::from_secs(20), "dockerd to reload registry-mirrors", || {
            let info = self.info().ok()?;
            last = info["RegistryConfig"]["Mirrors"].clone();
            let got: Vec<String> = last
                .as_array()?
                .iter()
                .filter_map(|m| m.as_str().map(|s| s.trim_end_matches('/').to_string() + "/"))
                .collect();
            (got == want).then_some(())
        });
        res.with_context(|| format!("docker info shows mirrors {last}, expected {want:?}\n{}", self.log_tail(30)))
    }

    /// Stops dockerd now (what dropping does): SIGTERM, wait for it and its containerd, SIGKILL what
    /// is left, unmount and remove the temp dir.
    pub fn stop(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            // The watchdog is in its own process group (with its `sleep`): end them both.
            signal(&format!("-{}", w.id()), "KILL");
            let _ = w.wait();
        }
        let Some(dir) = self.dir.as_ref().map(|d| d.path().to_path_buf()) else { return };
        let containerd_pid = std::fs::read_to_string(dir.join("exec/containerd/containerd.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let pid = self.child.id();
        if let Some(pid) = pid
            && self.child.terminate(STOP_TIMEOUT).is_err()
        {
            eprintln!("dockerd (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM: SIGKILL");
        }
        // dockerd stops its containerd before exiting; give a straggler the same deadline.
        if let Some(cpid) = containerd_pid {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while process_alive(cpid, &dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(pid) = pid {
            // dockerd ran as the leader of its own process group.
            signal(&format!("-{pid}"), "KILL");
        }
        self.child.kill();
        // Whatever still runs with our temp dir on its command line is ours (containerd is in a
        // session of its own, not in dockerd's group).
        for p in processes_mentioning(&dir) {
            signal(&p.to_string(), "KILL");
        }
        unmount_under(&dir);
        remove_dir(&mut self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `<dir>/<registry_host>/hosts.toml` with one mirror host, `mirror_url`
/// (`http://127.0.0.1:PORT`, or with a path), allowed to pull and resolve. `registry_host` is the
/// image's registry (`docker.io`, `127.0.0.1:5000`) or `_default` for every registry. With
/// `override_path` containerd uses the URL's path as the `/v2` root instead of appending `/v2`.
/// Without a `server` line containerd falls back to the registry itself when the mirror fails.
/// Returns the file's path.
pub fn write_hosts_toml(
    dir: &Path,
    registry_host: &str,
    mirror_url: &str,
    override_path: bool,
) -> anyhow::Result<PathBuf> {
    if mirror_url.contains(['"', '\\', '\n']) || registry_host.contains(['/', '\\']) {
        bail!("refusing to write a hosts.toml for {registry_host:?} -> {mirror_url:?}");
    }
    let host_dir = dir.join(registry_host);
    std::fs::create_dir_all(&host_dir)?;
    let mut toml = format!("[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    if override_path {
        toml.push_str("  override_path = true\n");
    }
    let path = host_dir.join("hosts.toml");
    std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn write_daemon_json(dir: &Path, opts: &DockerdOptions) -> anyhow::Result<()> {
    // Write and rename, so a SIGHUP never reads half a file.
    let tmp = dir.join("daemon.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&opts.daemon_json())?)?;
    std::fs::rename(&tmp, dir.join("daemon.json"))?;
    Ok(())
}

/// A fresh temp dir whose socket paths stay below the 108-byte limit of a unix socket address.
fn fresh_dir() -> anyhow::Result<TempDir> {
    let longest = "/exec/containerd/containerd-debug.sock";
    let dir = tempfile::Builder::new().prefix("wharf-dockerd-").tempdir()?;
    if dir.path().as_os_str().len() + longest.len() < 100 {
        return Ok(dir);
    }
    Ok(tempfile::Builder::new().prefix("wharf-dockerd-").tempdir_in("/tmp")?)
}

/// Spawns dockerd with `driver` and waits until `docker info` answers and reports that driver.
fn spawn_ready(dockerd: &Path, docker: &Path, dir: &Path, driver: &str) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new(dockerd);
    clean_env(&mut cmd);
    cmd.arg("--data-root")
        .arg(dir.join("root"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        .args(["--storage-driver", driver, "--iptables=false", "--ip6tables=false", "--bridge=none"])
        .arg("--config-file")
        .arg(dir.join("daemon.json"))
        .current_dir(dir)
        // A group of its own: a terminal's Ctrl-C does not reach it, and drop can SIGKILL the group.
        .process_group(0);
    let mut child = ChildGuard::spawn("dockerd", &mut cmd)?;
    let socket = dir.join("docker.sock");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait() {
            // Let the log readers drain what dockerd wrote before it died.
            let drained = Instant::now() + Duration::from_secs(2);
            while !child.stderr.is_closed() && Instant::now() < drained {
                std::thread::sleep(Duration::from_millis(10));
            }
            let lines = child.stderr.lines();
            let last = lines.iter().rev().find(|l| !l.trim().is_empty()).cloned().unwrap_or_default();
            bail!("dockerd exited during start-up ({status}): {last}\n{}", child.tail(25));
        }
        let pinged = ping(&socket);
        if pinged.is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            let last_err = pinged.err().map(|e| format!("{e:#}")).unwrap_or_default();
            let tail = child.tail(25);
            stop_failed(&mut child, dir);
            bail!(
                "dockerd did not answer /_ping on {} within {START_TIMEOUT:?} ({last_err})\n{tail}",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let mut cmd = Command::new(docker);
    clean_env(&mut cmd);
    cmd.env("DOCKER_HOST", format!("unix://{}", socket.display()))
        .env("DOCKER_CONFIG", dir.join("docker-config"))
        .args(["info", "--format", "{{.Driver}}"]);
    let out = run_output(&mut cmd, None, Duration::from_secs(30));
    let out = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => {
            let tail = child.tail(25);
            stop_failed(&mut child, dir);
            bail!("docker info failed ({}): {}\n{tail}", o.status, String::from_utf8_lossy(&o.stderr));
        }
        Err(e) => {
            stop_failed(&mut child, dir);
            return Err(e);
        }
    };
    if out != driver {
        stop_failed(&mut child, dir);
        bail!("dockerd runs storage driver {out:?}, asked for {driver:?}");
    }
    Ok(child)
}

/// Stops a dockerd that failed its start-up (before a [`Dockerd`] owns it).
fn stop_failed(child: &mut ChildGuard, dir: &Path) {
    let pid = child.id();
    let _ = child.terminate(STOP_TIMEOUT);
    if let Some(pid) = pid {
        signal(&format!("-{pid}"), "KILL");
    }
    child.kill();
    for p in processes_mentioning(dir) {
        signal(&p.to_string(), "KILL");
    }
}

/// `GET /_ping` over the unix socket; Ok on `200` with body `OK`.
fn ping(socket: &Path) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    // The socket listens before the API serves: a connection may be accepted and never answered.
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_write_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).context("reading the /_ping answer")?;
    let resp = String::from_utf8_lossy(&resp);
    let status_ok = resp.lines().next().is_some_and(|l| l.split_whitespace().nth(1) == Some("200"));
    if status_ok && resp.trim_end().ends_with("OK") {
        return Ok(());
    }
    bail!("/_ping answered {:?}", resp.lines().next().unwrap_or(""))
}

/// A `sh` process, in a process group of its own so that a kill of the test's group spares it, that
/// waits for the test process to end and then does what [`Dockerd::stop`] does. [`Dockerd::stop`]
/// kills it first; it only acts when the test process dies without dropping the [`Dockerd`].
fn spawn_watchdog(child: &ChildGuard, dir: &Path) -> Option<Child> {
    const SCRIPT: &str = r#"
owner=$1 dpid=$2 dir=$3
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
cpid=$(cat "$dir/exec/containerd/containerd.pid" 2>/dev/null)
kill -TERM "$dpid" 2>/dev/null
n=0
while kill -0 "$dpid" 2>/dev/null && [ "$n" -lt 100 ]; do sleep 0.2; n=$((n+1)); done
kill -KILL -- "-$dpid" 2>/dev/null
[ -n "$cpid" ] && kill -KILL "$cpid" 2>/dev/null
awk -v d="$dir" 'index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
  umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done
rm -rf "$dir"
"#;
    let pid = child.id()?;
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("wharf-dockerd-watchdog")
        .arg(std::process::id().to_string())
        .arg(pid.to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("dockerd watchdog did not start ({e}): dockerd is stopped on drop only");
            None
        }
    }
}

/// `kill -<sig> <target>` (`target` may be `-<pgid>`), ignoring failures (the target may be gone).
fn signal(target: &str, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` runs (not a zombie) with `dir` on its command line.
fn process_alive(pid: u32, dir: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // pid (comm) STATE ...: comm may contain spaces, so look after the last ')'.
    let zombie_or_gone = stat.rsplit_once(')').is_none_or(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    !zombie_or_gone && cmdline_mentions(pid, dir)
}

fn cmdline_mentions(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Live processes (not this one) with `dir` on their command line.
fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && process_alive(pid, dir))
        .collect()
}

/// Unmounts everything mounted under `dir` (dockerd bind-mounts its data-root onto itself), deepest
/// first; lazily when a plain unmount fails.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let quiet = |args: &[&str]| {
            Command::new("umount")
                .args(args)
                .arg(&p)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !quiet(&[]) && !quiet(&["-l"]) {
            eprintln!("could not unmount {p}");
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn remove_dir(dir: &mut Option<TempDir>) {
    if let Some(d) = dir.take() {
        let path = d.path().to_path_buf();
        if let Err(e) = d.close() {
            eprintln!("could not remove {}: {e}", path.display());
        }
    }
}

/// Keeps the environment from steering the daemon or the CLIs: no `DOCKER_*` or `CONTAINERD_*`
/// variables of the caller, no HTTP proxy, no systemd notify socket.
fn clean_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let key = k.to_string_lossy().to_ascii_uppercase();
        if key.starts_with("DOCKER_")
            || key.starts_with("CONTAINERD_")
            || key.ends_with("_PROXY")
            || key == "NOTIFY_SOCKET"
        {
            cmd.env_remove(&k);
        }
    }
}

/// Runs `cmd` with `stdin` as input, captures its output, kills it after `timeout`.
fn run_output(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Output> {
    let desc = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {desc}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let reader = |s: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut s) = s {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
    let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            bail!("{desc} did not finish within {timeout:?}; stderr so far:\n{}", String::from_utf8_lossy(&stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output { status, stdout: out.join().unwrap_or_default(), stderr: err.join().unwrap_or_default() })
}

/// Ok(stdout) when the command ran and succeeded, else a message with its status, stderr and stdout.
fn checked(what: &str, out: anyhow::Result<Output>) -> Result<String, String> {
    let out = out.map_err(|e| format!("{what}: {e:#}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!("{what} failed ({}):\n{}\n{}", out.status, stderr.trim_end(), stdout.trim_end()))
}

/// `name` in PATH, else the first of `fallbacks` that exists.
fn find_bin(name: &str, fallbacks: &[&str]) -> anyhow::Result<PathBuf> {
    let in_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name));
    in_path
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is neither in PATH nor at {fallbacks:?}"))
}

/// The first of `preferred` that exists, else `name` in PATH.
fn find_bin_prefer(name: &str, preferred: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(p) = preferred.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Ok(p);
    }
    find_bin(name, &[])
}

fn current_uid() -> anyhow::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no Uid in /proc/self/status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/tmp/plain"), "/tmp/plain");
        assert_eq!(unescape_mount_path(r"/tmp/x\\"), r"/tmp/x\\");
    }

    #[test]
    fn writes_a_hosts_toml() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = write_hosts_toml(dir.path(), "docker.io", "http://127.0.0.1:5000/v2/hub", true)?;
        assert_eq!(p, dir.path().join("docker.io/hosts.toml"));
        assert_eq!(
            std::fs::read_to_string(&p)?,
            "[host.\"http://127.0.0.1:5000/v2/hub\"]\n  capabilities = [\"pull\", \"resolve\"]\n  override_path = true\n"
        );
        assert!(write_hosts_toml(dir.path(), "_default", "http://x\"y", false).is_err());
        Ok(())
    }
}
