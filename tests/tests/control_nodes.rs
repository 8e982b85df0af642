//! Managed nodes against a real `wharf-control` on its embedded store, with a real distribution
//! registry as the upstream: a repo created through REST is served without a restart, a deleted one
//! answers NAME_UNKNOWN from then on, the node list shows the node and its applied revision; the node
//! keeps serving when the control plane goes away, also after its own restart (from its stored
//! snapshot), and follows later changes once the control plane is back. Also: the embedded store keeps
//! repos across restarts, and `wharf dev` runs a working node.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_proto::v1 as pb;
use wharf_proto::v1::node_service_client::NodeServiceClient;
use wharf_tests::control::{
    ControlOptions, ControlPlane, Node, create_repo, etag_revision, get_manifest, list_nodes, poll, repo_json, rest,
    rest_json, wait_served,
};
use wharf_tests::{Registry, TestImage};

/// How long a change may take to reach a node (propagation is asynchronous, but quick).
const PROPAGATION: Duration = Duration::from_secs(5);

/// Polls until `node` answers 404 NAME_UNKNOWN for `key/name:tag`, then checks that it keeps doing so.
async fn wait_gone(node: &Node, key: &str, name: &str, tag: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    poll(PROPAGATION, &format!("{key} to be gone from node {}", node.id()), || async {
        get_manifest(node, key, name, tag).await.ok().filter(|r| r.0 == 404 && r.2 == "NAME_UNKNOWN").map(|_| ())
    })
    .await?;
    let took = start.elapsed();
    for i in 0..10 {
        let r = get_manifest(node, key, name, tag).await?;
        assert_eq!((r.0, r.2.as_str()), (404, "NAME_UNKNOWN"), "request {i} after the first 404 on {}", node.id());
    }
    Ok(took)
}

/// The node list's entry for `id` once `pred` holds for it.
async fn wait_node_entry(cp_url: &str, id: &str, mut pred: impl FnMut(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + PROPAGATION;
    loop {
        let nodes = list_nodes(cp_url).await?;
        if let Some(n) = nodes.iter().find(|n| n["id"] == id && pred(n)) {
            return Ok(n.clone());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("node {id} not listed as expected within {PROPAGATION:?}: {nodes:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_nodes_follow_changes_and_survive_control_plane_outages() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let v1 = TestImage::random("v1", &[20_000])?;
    v1.push(&registry.host(), "team/app")?;
    let v2 = TestImage::random("v2", &[20_000])?;
    v2.push(&registry.host(), "team/app")?;

    let mut cp = ControlPlane::embedded()?;
    let mut node = Node::spawn("n1", &[cp.url()])?;
    node.wait_applied(1, PROPAGATION)?;
    let r = get_manifest(&node, "lab", "team/app", "v1").await?;
    assert_eq!((r.0, r.2.as_str()), (404, "NAME_UNKNOWN"), "before the repo exists");

    // Created through REST: served without a restart.
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    wait_served(&node, "lab", "team/app", "v1", v1.digest(), PROPAGATION).await?;
    node.wait_applied(rev, PROPAGATION)?;

    // The node list shows the node, where it is, and what it applied.
    let entry = wait_node_entry(&cp.url(), "n1", |n| n["applied_revision"].as_i64() >= Some(rev)).await?;
    assert_eq!(entry["address"], node.host(), "{entry}");
    assert_eq!(entry["control_plane"], cp.addr().to_string(), "{entry}");
    assert!(entry["version"].as_str().is_some_and(|v| !v.is_empty()), "{entry}");
    // gRPC's NodeService says the same.
    let mut grpc = NodeServiceClient::new(wharf_tests::control::grpc(&cp.url()).await?);
    let listed = grpc.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
    let n1 = listed.iter().find(|n| n.id == "n1").ok_or_else(|| anyhow::anyhow!("n1 not in {listed:?}"))?;
    assert!(n1.applied_revision >= rev, "{n1:?}");
    assert_eq!(n1.address, node.host());
    assert!(n1.last_seen.is_some(), "{n1:?}");

    // Deleted: NAME_UNKNOWN from the next request on (after a brief propagation).
    let resp = rest("DELETE", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 204, "{}", resp.text());
    let took = wait_gone(&node, "lab", "team/app", "v1").await?;
    eprintln!("delete reached the node in {took:?}");

    // Created again, then the control plane stops (SIGTERM): the node keeps serving.
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    node.wait_applied(rev, PROPAGATION)?;
    wait_served(&node, "lab", "team/app", "v1", v1.digest(), PROPAGATION).await?;
    let mark = node.log_len();
    cp.terminate(Duration::from_secs(10))?;
    node.wait_log(mark, PROPAGATION, |v| v["fields"]["message"].as_str().is_some_and(|m| m.contains("stream ended")))?;
    let r = get_manifest(&node, "lab", "team/app", "v1").await?;
    assert_eq!((r.0, r.1.as_str()), (200, v1.digest()), "without a control plane: {r:?}\n{}", node.log_tail(20));

    // The node restarts (kill -9, same cache dir) while no control plane runs: it serves its stored
    // snapshot at once, including a tag it never fetched (the upstream comes from the snapshot).
    assert!(node.snapshot_path().exists(), "no {}", node.snapshot_path().display());
    node.restart()?;
    let r = get_manifest(&node, "lab", "team/app", "v2").await?;
    assert_eq!(
        (r.0, r.1.as_str()),
        (200, v2.digest()),
        "right after a restart without a control plane: {r:?}\n{}",
        node.log_tail(20)
    );
    let r = get_manifest(&node, "lab", "team/app", "v1").await?;
    assert_eq!((r.0, r.1.as_str()), (200, v1.digest()), "{r:?}");
    assert!(
        node.logs().iter().any(|v| v["fields"]["message"] == "serving the stored configuration snapshot"),
        "{}",
        node.log_tail(20)
    );

    // The control plane comes back (same data dir, same port): the node reconnects and gets later
    // changes.
    cp.restart()?;
    let rev = create_repo(&cp.url(), &repo_json("lab2", &registry.url())).await?;
    // The node's reconnect backoff grew while the control plane was away (at most ~1.5 s here).
    wait_served(&node, "lab2", "team/app", "v1", v1.digest(), Duration::from_secs(15)).await?;
    node.wait_applied(rev, PROPAGATION)?;
    let entry = wait_node_entry(&cp.url(), "n1", |n| n["applied_revision"].as_i64() >= Some(rev)).await?;
    assert_eq!(entry["address"], node.host(), "{entry}");
    let resp = rest("DELETE", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 204, "{}", resp.text());
    wait_gone(&node, "lab", "team/app", "v1").await?;
    let r = get_manifest(&node, "lab2", "team/app", "v2").await?;
    assert_eq!((r.0, r.1.as_str()), (200, v2.digest()), "the other repo: {r:?}");
    Ok(())
}

/// What `GET /api/repos` says, without the list revision.
async fn repos(cp: &ControlPlane) -> anyhow::Result<Value> {
    let resp = rest("GET", &cp.api("/api/repos"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    Ok(resp.json()?["repos"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_embedded_store_keeps_repos_across_restarts() -> anyhow::Result<()> {
    let mut cp = ControlPlane::embedded()?;
    let url = cp.url();
    for key in ["one", "two", "three"] {
        create_repo(&url, &repo_json(key, &format!("http://{key}.example"))).await?;
    }
    let resp = rest("GET", &cp.api("/api/repos/two"), &[], None).await?;
    let etag = resp.header("etag").unwrap_or_default().to_string();
    let resp = rest_json(
        "PUT",
        &cp.api("/api/repos/two"),
        &[("if-match", &etag)],
        &json!({"kind": "generic", "upstream": "http://two.example", "tag_ttl": "1h", "username": "u", "password": "p"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = rest("DELETE", &cp.api("/api/repos/three"), &[], None).await?;
    assert_eq!(resp.status, 204, "{}", resp.text());
    let before = repos(&cp).await?;
    assert_eq!(before.as_array().map(Vec::len), Some(2), "{before}");
    let last_rev = before.as_array().into_iter().flatten().filter_map(|r| r["revision"].as_i64()).max().unwrap_or(0);

    // A crash (SIGKILL) right after the writes were acknowledged loses none of them.
    cp.kill_9();
    cp.restart()?;
    assert_eq!(repos(&cp).await?, before, "after kill -9 and restart");
    // A clean stop as well; and the revision keeps counting up from where it was.
    cp.terminate(Duration::from_secs(10))?;
    cp.restart()?;
    assert_eq!(repos(&cp).await?, before, "after SIGTERM and restart");
    let resp = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("four", "http://four.example")).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert!(etag_revision(&resp)? > last_rev, "revisions went back after a restart: {}", resp.text());
    // A key deleted before the restart stays deleted, and an old ETag is still stale.
    let resp = rest("GET", &cp.api("/api/repos/three"), &[], None).await?;
    assert_eq!(resp.status, 404, "{}", resp.text());
    let resp =
        rest_json("PUT", &cp.api("/api/repos/two"), &[("if-match", &etag)], &repo_json("two", "http://x.example"))
            .await?;
    assert_eq!(resp.status, 412, "{}", resp.text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_without_a_node_points_dev_users_to_wharf_dev() -> anyhow::Result<()> {
    let out = tokio::process::Command::new(wharf_tests::control::control_bin()?)
        .args(["--dev", "--listen", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "wharf-control --dev started");
    assert!(stderr.contains("`wharf dev`"), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_dev_mode_runs_a_node_with_the_seeded_repos() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[10_000])?;
    image.push(&registry.host(), "team/app")?;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let cp = ControlPlane::spawn(ControlOptions {
        data_dir: Some(dir.path().join("data")),
        dev: true,
        args: vec![
            "--dev-node-listen".into(),
            "127.0.0.1:0".into(),
            "--dev-cache-dir".into(),
            cache.display().to_string(),
        ],
        ..Default::default()
    })?;
    let node_addr = cp.dev_node_addr()?;
    let keys: Vec<String> = repos(&cp)
        .await?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(keys, ["dockerhub", "ghcr", "quay"], "the seeded repos");

    let resp = wharf_tests::http::get(&format!("http://{node_addr}/v2/"), &[]).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let url = format!("http://{node_addr}/v2/lab/team/app/manifests/v1");
    poll(PROPAGATION, "the dev node to serve the new repo", || async {
        let r = wharf_tests::http::get(&url, &[("accept", wharf_tests::image::OCI_MANIFEST)]).await.ok()?;
        (r.status == 200 && r.digest() == image.digest()).then_some(())
    })
    .await
    .map_err(|e| e.context(cp.log_tail(30)))?;
    let nodes = list_nodes(&cp.url()).await?;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["address"], node_addr.to_string(), "{nodes:?}");
    assert!(cache.join("config.snapshot").exists(), "the dev node keeps no snapshot in {}", cache.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_nodes_that_vanish_leave_the_node_list() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let mut a = Node::spawn("vanishing", &[cp.url()])?;
    let b = Node::spawn("staying", &[cp.url()])?;
    for n in [&a, &b] {
        wait_node_entry(&cp.url(), n.id(), |_| true).await?;
    }
    let t = Instant::now();
    a.kill_9();
    // Its stream breaks at once; at the latest its lease (10 s) expires.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let nodes = list_nodes(&cp.url()).await?;
        if !nodes.iter().any(|n| n["id"] == "vanishing") {
            assert!(nodes.iter().any(|n| n["id"] == "staying"), "the other node went too: {nodes:?}");
            break;
        }
        assert!(Instant::now() < deadline, "a killed node is still listed after {:?}: {nodes:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("killed node left the list after {:?}", t.elapsed());
    Ok(())
}

/// A node that restarts with no control plane answering serves its stored snapshot from its very
/// first request: the snapshot is in force before the node reports "listening" (here a large one,
/// 20,000 repos, so that loading it takes a while).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_node_serves_its_stored_snapshot_from_the_first_request() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[10_000])?;
    image.push(&registry.host(), "team/app")?;
    let mut cp = ControlPlane::embedded()?;
    let mut node = Node::spawn("n1", &[cp.url()])?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    node.wait_applied(rev, PROPAGATION)?;
    cp.kill_9();
    node.kill_9();

    // Grow the stored snapshot: the same repo under 20,000 more keys (in the node's own format).
    let path = node.snapshot_path();
    let mut snapshot: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let repos = snapshot["repos"].as_array_mut().ok_or_else(|| anyhow::anyhow!("no repos in the stored snapshot"))?;
    let lab = repos.iter().find(|r| r["key"] == "lab").cloned().ok_or_else(|| anyhow::anyhow!("no lab"))?;
    for i in 0..20_000 {
        let mut r = lab.clone();
        r["key"] = json!(format!("pad{i}"));
        repos.push(r);
    }
    std::fs::write(&path, serde_json::to_vec(&snapshot)?)?;

    node.restart()?;
    let r = get_manifest(&node, "lab", "team/app", "v1").await?;
    assert_eq!((r.0, r.1.as_str()), (200, image.digest()), "first request after the restart: {r:?}");
    let r = get_manifest(&node, "pad19999", "team/app", "v1").await?;
    assert_eq!((r.0, r.1.as_str()), (200, image.digest()), "{r:?}");
    Ok(())
}
