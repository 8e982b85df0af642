//! The control plane on a protected etcd (the store holds upstream credentials and token hashes):
//! with authentication on, `--etcd-user` with `--etcd-password-file` works and a wrong password
//! stops the start-up with a message saying so; over TLS with client certificates
//! (`--etcd-ca`, `--etcd-cert`, `--etcd-key`), and without a client certificate the store is
//! unavailable (503), never open.

use etcd_client::{Client, Permission};
use serde_json::json;
use std::time::Duration;

use wharf_tests::control::{ControlOptions, ControlPlane, control_bin, free_port, poll, rest, rest_json};
use wharf_tests::etcd::{ETCD_BIN, EtcdCluster};
use wharf_tests::pki::Pki;
use wharf_tests::process::ChildGuard;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_uses_an_etcd_user() -> anyhow::Result<()> {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await??;
    // root (etcd needs it to turn authentication on), and a user limited to Wharf's prefix.
    let mut admin = Client::connect(etcd.endpoints(), None).await?;
    admin.user_add("root", "root-pw", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.role_add("wharf").await?;
    admin.role_grant_permission("wharf", Permission::read_write("/wharf/").with_prefix()).await?;
    admin.user_add("wharf", "wharf-pw", None).await?;
    admin.user_grant_role("wharf", "wharf").await?;
    admin.auth_enable().await?;

    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good");
    std::fs::write(&good, "wharf-pw\n")?;
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope\n")?;
    let args = |file: &std::path::Path| ControlOptions {
        etcd: etcd.endpoints(),
        args: vec!["--etcd-user".into(), "wharf".into(), "--etcd-password-file".into(), file.display().to_string()],
        ..Default::default()
    };

    let cp = ControlPlane::spawn(args(&good))?;
    let r =
        rest_json("POST", &cp.api("/api/repos"), &[], &json!({"key": "lab", "upstream": "http://127.0.0.1:1"})).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = rest("GET", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(r.status, 200, "{}", r.text());
    // Anonymous etcd clients see nothing.
    let mut anonymous = Client::connect(etcd.endpoints(), None).await?;
    assert!(anonymous.get("/wharf/repos/lab", None).await.is_err(), "etcd served Wharf's keys without a user");

    // A wrong password: the start-up fails at once, saying why (and not what the password was).
    let mut cmd = tokio::process::Command::new(control_bin()?);
    cmd.args(["--listen", "127.0.0.1:0", "--etcd", &etcd.endpoint(), "--etcd-user", "wharf"])
        .arg("--etcd-password-file")
        .arg(&bad)
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a wrong etcd password");
    assert!(stderr.contains("authentication failed"), "a wrong etcd password: {stderr}");
    assert!(!stderr.contains("nope") && !String::from_utf8_lossy(&out.stdout).contains("nope"), "the password leaked");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_talks_to_etcd_over_mutual_tls() -> anyhow::Result<()> {
    let pki = Pki::new("etcd")?;
    let (server_cert, server_key) = pki.write("etcd", &pki.leaf("etcd")?)?;
    let (client_cert, client_key) = pki.write("wharf", &pki.leaf("wharf-control")?)?;
    let (client, peer, metrics) = (free_port()?, free_port()?, free_port()?);
    let data = tempfile::tempdir()?;
    let p = |p: &std::path::Path| p.display().to_string();
    let mut cmd = std::process::Command::new(ETCD_BIN);
    cmd.args(["--name", "m0", "--data-dir", &p(data.path())])
        .args(["--listen-client-urls", &format!("https://127.0.0.1:{client}")])
        .args(["--advertise-client-urls", &format!("https://127.0.0.1:{client}")])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("m0=http://127.0.0.1:{peer}")])
        // Health over plain HTTP on its own port, so the test can poll it without a certificate.
        .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics}")])
        .args(["--cert-file", &p(&server_cert), "--key-file", &p(&server_key)])
        .args(["--trusted-ca-file", &p(&pki.ca_path()), "--client-cert-auth"])
        .args(["--logger=zap", "--log-outputs=stderr"]);
    let _etcd = ChildGuard::spawn("etcd-tls", &mut cmd)?;
    let health = format!("http://127.0.0.1:{metrics}/health");
    poll(Duration::from_secs(20), "etcd over TLS to be healthy", || async {
        let r = wharf_tests::http::get(&health, &[]).await.ok()?;
        (r.status == 200 && r.text().contains("true")).then_some(())
    })
    .await?;
    let endpoint = format!("https://127.0.0.1:{client}");

    let with_cert = ControlOptions {
        etcd: vec![endpoint.clone()],
        args: ["--etcd-ca", &p(&pki.ca_path()), "--etcd-cert", &p(&client_cert), "--etcd-key", &p(&client_key)]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let cp = ControlPlane::spawn(with_cert)?;
    let r =
        rest_json("POST", &cp.api("/api/repos"), &[], &json!({"key": "lab", "upstream": "http://127.0.0.1:1"})).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(rest("GET", &cp.api("/api/repos/lab"), &[], None).await?.status, 200);

    // Trusting etcd but without a client certificate: etcd refuses, the API says the store is down.
    let without_cert = ControlOptions {
        etcd: vec![endpoint],
        args: ["--etcd-ca", &p(&pki.ca_path()), "--store-timeout", "2s"].map(String::from).to_vec(),
        ..Default::default()
    };
    let refused = ControlPlane::spawn(without_cert)?;
    let r = rest("GET", &refused.api("/api/repos"), &[], None).await?;
    assert_eq!(r.status, 503, "{}", r.text());
    Ok(())
}
