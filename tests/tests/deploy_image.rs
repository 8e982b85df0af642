//! The container image (`make image`, deploy/image/): built here by scripts/build-image.sh against
//! a private dockerd, then run as a platform would run it: a read-only root, its non-root user, the
//! cache on its volume. A skopeo pull through the node from a local distribution registry is whole,
//! the image's own HEALTHCHECK turns healthy, the control plane runs from the same image, and
//! `--version` names the commit. Slow (a `--profile dist` build): `make test-deploy` runs it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use wharf_tests::control::free_port;
use wharf_tests::docker::{Dockerd, DockerdOptions};
use wharf_tests::image::{skopeo_copy_to_dir, verify_dir_copy};
use wharf_tests::proxy::repo_config;
use wharf_tests::{Registry, TestImage, random_name, wait_until};

const MAX_IMAGE_BYTES: u64 = 40_000_000;

fn docker(d: &Dockerd, args: &[&str]) -> anyhow::Result<String> {
    let out = d.docker(args);
    ensure!(
        out.status.success(),
        "docker {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
#[ignore = "builds the dist binaries and the image: make test-deploy"]
fn deploy_image_builds_here_and_runs_read_only_as_non_root() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace root")?;
    let dockerd = Dockerd::start(DockerdOptions::default())?;
    let tag = format!("wharf:{}", random_name("test"));
    let out = Command::new(root.join("scripts/build-image.sh"))
        .current_dir(root)
        .env("DOCKER_HOST", dockerd.docker_host())
        .env("IMAGE", &tag)
        .output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "scripts/build-image.sh:\n{said}");
    eprintln!("{}", said.lines().filter(|l| l.starts_with("build-image:")).collect::<Vec<_>>().join("\n"));

    // What the image says about itself.
    let size: u64 = docker(&dockerd, &["image", "inspect", "--format", "{{.Size}}", &tag])?.parse()?;
    eprintln!("image {tag}: {size} bytes");
    ensure!(size < MAX_IMAGE_BYTES, "the image weighs {size} bytes (goal under {MAX_IMAGE_BYTES})");
    let config: serde_json::Value =
        serde_json::from_str(&docker(&dockerd, &["image", "inspect", "--format", "{{json .Config}}", &tag])?)?;
    let commit = String::from_utf8(
        Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(root).output()?.stdout,
    )?;
    let commit = commit.trim();
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(config["Labels"]["org.opencontainers.image.revision"], commit, "{config}");
    assert_eq!(config["Labels"]["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"), "{config}");
    assert!(config["Labels"]["org.opencontainers.image.source"].is_string(), "{config}");
    assert!(config["Healthcheck"]["Test"].to_string().contains("probe"), "{config}");
    for v in ["/var/cache/wharf", "/var/lib/wharf"] {
        assert!(config["Volumes"].get(v).is_some(), "no volume {v}: {config}");
    }
    for bin in ["wharf-proxy", "wharf-control", "regctl"] {
        let v = docker(&dockerd, &["run", "--rm", "--read-only", &tag, bin, "--version"])?;
        assert_eq!(v, format!("{bin} {} (commit {commit})", env!("CARGO_PKG_VERSION")), "{bin} --version");
    }

    // A node from the image, as a platform runs it, in front of a local registry.
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[400_000, 3_000])?;
    image.push(&registry.host(), "team/app")?;
    let cfg = tempfile::tempdir()?;
    std::fs::write(cfg.path().join("wharf.toml"), repo_config("lab", &registry.url(), "generic", "5m"))?;
    let _ = Command::new("chmod").arg("0755").arg(cfg.path()).status();
    let port = free_port()?;
    let name = random_name("wharf-node");
    let mount = format!("{}:/etc/wharf:ro", cfg.path().display());
    let listen = format!("WHARF_LISTEN=127.0.0.1:{port}");
    let started = docker(
        &dockerd,
        &[
            "run",
            "-d",
            "--name",
            &name,
            "--read-only",
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--health-interval",
            "1s",
            "--health-start-period",
            "1s",
            "-v",
            &mount,
            "-e",
            &listen,
            "-e",
            "WHARF_CONFIG=/etc/wharf/wharf.toml",
            &tag,
        ],
    );
    let logs = || dockerd.docker(&["logs", "--tail", "30", &name]);
    let started = started.map_err(|e| anyhow::anyhow!("{e}\n{:?}", logs()))?;
    eprintln!("node container {started}");
    let health = || docker(&dockerd, &["inspect", "--format", "{{.State.Health.Status}}", &name]).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the image's healthcheck to pass", || (health() == "healthy").then_some(()))
        .map_err(|e| anyhow::anyhow!("{e} (status {}): {:?}", health(), logs()))?;
    let user = docker(&dockerd, &["exec", &name, "regctl", "--version"]).map(drop);
    ensure!(user.is_ok(), "exec regctl in the container: {user:?}");

    let dest = tempfile::tempdir()?;
    skopeo_copy_to_dir(&format!("docker://127.0.0.1:{port}/lab/team/app:v1"), dest.path())?;
    verify_dir_copy(dest.path(), &image)?;

    // The control plane from the same image, read-only too, with its probe URL.
    let cport = free_port()?;
    let cname = random_name("wharf-control");
    let clisten = format!("WHARF_CONTROL_LISTEN=127.0.0.1:{cport}");
    let probe = format!("WHARF_PROBE_URL=http://127.0.0.1:{cport}/readyz");
    docker(
        &dockerd,
        &[
            "run",
            "-d",
            "--name",
            &cname,
            "--read-only",
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            "--health-interval",
            "1s",
            "--health-start-period",
            "1s",
            "-e",
            &clisten,
            "-e",
            &probe,
            &tag,
            "wharf-control",
        ],
    )?;
    let chealth = || docker(&dockerd, &["inspect", "--format", "{{.State.Health.Status}}", &cname]).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the control plane's healthcheck", || (chealth() == "healthy").then_some(()))
        .map_err(|e| {
        anyhow::anyhow!("{e} (status {}): {:?}", chealth(), dockerd.docker(&["logs", "--tail", "30", &cname]))
    })?;
    docker(&dockerd, &["rm", "-f", &name, &cname])?;
    Ok(())
}
