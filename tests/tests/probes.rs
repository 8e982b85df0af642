//! What deployments lean on: a node's `/healthz` (the process answers) and `/readyz` (a
//! configuration is in force), `regctl probe` (the image's HEALTHCHECK) reading them, SIGHUP
//! leaving both binaries running (`systemctl reload`), and a node token the control plane makes
//! from a file (`--bootstrap-node-token-file`) that a node then follows the control plane with.

use std::time::Duration;

use wharf_tests::control::{ControlOptions, ControlPlane, Node, free_port, poll};
use wharf_tests::http::get;
use wharf_tests::proxy::repo_config;
use wharf_tests::regctl::Regctl;
use wharf_tests::{Proxy, ProxyOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_say_when_a_node_serves_and_sighup_stops_nothing() -> anyhow::Result<()> {
    // A standalone node is ready at once.
    let mut proxy =
        Proxy::spawn_with(ProxyOptions::new(&repo_config("lab", "http://127.0.0.1:9", "generic", "5m"), &[]))?;
    let r = get(&format!("{}/healthz", proxy.url()), &[]).await?;
    assert_eq!((r.status, r.text()), (200, "ok\n".to_owned()));
    assert_eq!(get(&format!("{}/readyz", proxy.url()), &[]).await?.status, 200);
    let rc = Regctl::new("http://127.0.0.1:9");
    rc.run(&["probe", &format!("{}/readyz", proxy.url())]).await?.expect_code(0, "probe a ready node")?;
    // Without a URL: the node on the port of $WHARF_LISTEN.
    let listen = format!("0.0.0.0:{}", proxy.addr().port());
    Regctl::new("http://127.0.0.1:9")
        .with_env("WHARF_LISTEN", &listen)
        .run(&["probe"])
        .await?
        .expect_code(0, "probe $WHARF_LISTEN")?;

    // SIGHUP (systemctl reload) is logged, and the node goes on serving.
    let pid = proxy.pid().unwrap_or_default().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status()?.success());
    poll(Duration::from_secs(10), "the SIGHUP log line", || {
        let logged = proxy.log_tail(20).contains("SIGHUP");
        async move { logged.then_some(()) }
    })
    .await?;
    assert!(proxy.is_running(), "SIGHUP stopped the node");
    assert_eq!(get(&format!("{}/healthz", proxy.url()), &[]).await?.status, 200);

    // A managed node with no control plane and no stored snapshot is alive, not ready.
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let node = Node::spawn("alone", &[nowhere])?;
    let base = format!("http://{}", node.addr());
    assert_eq!(get(&format!("{base}/healthz"), &[]).await?.status, 200);
    let r = get(&format!("{base}/readyz"), &[]).await?;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("waiting for a configuration"), "{}", r.text());
    let out = rc.run(&["probe", &format!("{base}/readyz")]).await?;
    out.expect_error("503 Service Unavailable waiting for a configuration", "probe a node that is not ready")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_node_token_lets_a_node_follow_and_sighup_keeps_the_control_plane() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node_token = dir.path().join("node.token");
    let cp = ControlPlane::spawn(ControlOptions {
        args: vec!["--bootstrap-node-token-file".into(), node_token.display().to_string()],
        ..Default::default()
    })?;
    // The file did not exist: the control plane wrote one, of role node.
    let token = std::fs::read_to_string(&node_token)?;
    assert!(token.starts_with("wharf_"), "{token:?}");
    let rc = Regctl::new(&cp.url());
    let listed = rc.run(&["token", "list", "-o", "json"]).await?.expect_code(0, "token list")?.json()?;
    let id = token.trim().split('_').nth(1).unwrap_or_default();
    let entry = listed["tokens"].as_array().and_then(|t| t.iter().find(|t| t["id"] == id)).cloned().unwrap_or_default();
    assert_eq!(
        (entry["role"].as_str(), entry["description"].as_str()),
        (Some("node"), Some("bootstrap node")),
        "{listed}"
    );

    let node_arg = node_token.display().to_string();
    let node = Node::spawn_with("n1", &[cp.url()], None, &["--control-plane-token-file", &node_arg])?;
    let ready = format!("http://{}/readyz", node.addr());
    poll(Duration::from_secs(30), "the node ready with the bootstrap node token", || {
        let ready = ready.clone();
        async move { (get(&ready, &[]).await.ok()?.status == 200).then_some(()) }
    })
    .await?;

    let pid = cp.pid().unwrap_or_default().to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status()?.success());
    poll(Duration::from_secs(10), "the control plane's SIGHUP log line", || {
        let logged = cp.log_tail(20).contains("SIGHUP");
        async move { logged.then_some(()) }
    })
    .await?;
    let r = get(&format!("{}/readyz", cp.url()), &[]).await?;
    assert_eq!(r.status, 200, "the control plane after SIGHUP: {}", r.text());
    Ok(())
}

/// A node that cannot start (here: its cache dir cannot be made) exits at once, saying why, instead
/// of waiting for a signal while answering nothing.
#[test]
fn a_node_that_cannot_open_its_cache_exits_at_once_with_the_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory")?;
    std::fs::write(dir.path().join("wharf.toml"), repo_config("lab", "http://127.0.0.1:9", "generic", "5m"))?;
    let mut child = std::process::Command::new(wharf_tests::proxy::proxy_bin()?)
        .arg("--config")
        .arg(dir.path().join("wharf.toml"))
        .arg("--cache-dir")
        .arg(file.join("cache"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let exited =
        wharf_tests::wait_until(Duration::from_secs(20), "wharf-proxy to exit", || child.try_wait().ok().flatten());
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = exited?;
    let out = child.wait_with_output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!status.success(), "{said}");
    assert!(said.contains("cache dir") && said.contains("a-file"), "{said}");
    Ok(())
}
