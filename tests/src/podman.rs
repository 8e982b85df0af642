//! podman as a client: `podman pull` with a `registries.conf` of its own, storage (vfs) and run
//! dirs in a temp dir, so nothing of the machine's podman set-up is read or changed. podman runs
//! no daemon: each pull is one process, bounded by a timeout and killed with it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use crate::process::run_with_timeout;

const PULL_TIMEOUT: Duration = Duration::from_secs(120);

/// One podman set-up: a `registries.conf` and the storage it pulls into.
pub struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// `registries.conf` lines: for each `(prefix, mirror location)`, the registry `prefix` is
    /// pulled through the mirror (plain http) and, when that fails, from itself.
    pub fn with_mirrors(mirrors: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut conf = String::from("unqualified-search-registries = []\n");
        for (prefix, location) in mirrors {
            anyhow::ensure!(
                !prefix.contains(['"', '\n']) && !location.contains(['"', '\n']),
                "bad mirror {location:?}"
            );
            conf.push_str(&format!(
                "\n[[registry]]\nprefix = \"{prefix}\"\nlocation = \"{prefix}\"\n[[registry.mirror]]\nlocation = \"{location}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(dir.path().join("registries.conf"), conf).context("writing registries.conf")?;
        std::fs::write(dir.path().join("auth.json"), "{}").context("writing auth.json")?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `podman login` to `host` (into this set-up's own auth file): what a mirror's credentials
    /// come from (podman's `--creds` covers the image's registry, not its mirrors).
    pub fn login(&self, host: &str, user: &str, password: &str) -> Result<(), String> {
        let mut cmd = self.command();
        cmd.args(["login", "--tls-verify=false", "--username", user, "--password", password, host]);
        run(&mut cmd, &format!("podman login {host}"))
    }

    /// `podman pull <reference>`; the error carries podman's output.
    pub fn pull(&self, reference: &str) -> Result<(), String> {
        let mut cmd = self.command();
        cmd.args(["pull", "--quiet", reference]);
        run(&mut cmd, &format!("podman pull {reference}"))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_REGISTRIES_CONF", self.path("registries.conf"))
            // No auth file of the machine's: only what this call passes.
            .env("REGISTRY_AUTH_FILE", self.path("auth.json"))
            .arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    match run_with_timeout(cmd, PULL_TIMEOUT) {
        Ok((status, _, _)) if status.success() => Ok(()),
        Ok((status, out, err)) => Err(format!("{what} failed ({status}):\n{out}\n{err}")),
        Err(e) => Err(format!("{what}: {e:#}")),
    }
}
