//! `regctl cache verify`: two control planes on one etcd, a node on each, a real distribution
//! registry upstream. A request made on one control plane reaches the node on the other; each node
//! re-hashes its cache, removes what was changed on disk (a blob on one, a manifest on the other)
//! and reports; regctl prints what each found; the next pull fetches the removed entries again.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use wharf_tests::control::{ControlPlane, Node, create_repo, expect_problem, list_nodes, poll, repo_json, rest_json};
use wharf_tests::etcd::EtcdCluster;
use wharf_tests::regctl::{Regctl, expect_aligned};
use wharf_tests::{Registry, TestImage, http};

fn entry_file(cache: &Path, kind: &str, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join(kind).join("sha256").join(&hex[..2]).join(hex)
}

fn overwrite_middle(path: &Path) -> anyhow::Result<()> {
    let len = std::fs::metadata(path)?.len();
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(len / 2))?;
    f.write_all(b"XXXX")?;
    f.sync_all()?;
    Ok(())
}

fn pass<'a>(report: &'a Value, node: &str) -> anyhow::Result<&'a Value> {
    report["nodes"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["node"] == node))
        .ok_or_else(|| anyhow::anyhow!("no pass of {node} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_cache_verify_through_either_control_plane_removes_what_changed_on_disk() -> anyhow::Result<()> {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await??;
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[300_000, 40_000])?;
    image.push(&registry.host(), "team/app")?;
    let cp1 = ControlPlane::etcd(&etcd.endpoints(), &[])?;
    let cp2 = ControlPlane::etcd(&etcd.endpoints(), &[])?;
    let rev = create_repo(&cp1.url(), &repo_json("lab", &registry.url())).await?;
    let n1 = Node::spawn("n1", &[cp1.url()])?;
    let n2 = Node::spawn("n2", &[cp2.url()])?;
    for n in [&n1, &n2] {
        n.wait_applied(rev, Duration::from_secs(30))?;
    }
    poll(Duration::from_secs(30), "both nodes in the node list", || {
        let url = cp1.url();
        async move { (list_nodes(&url).await.ok()?.len() == 2).then_some(()) }
    })
    .await?;
    http::pull_image(&n1.v2("lab/team/app"), &image).await?;
    http::pull_image(&n2.v2("lab/team/app"), &image).await?;

    // n1: a layer changed on disk; n2: the manifest.
    let layer = &image.layers[0];
    let layer_file = entry_file(n1.cache_dir(), "blobs", &layer.digest);
    let manifest_file = entry_file(n2.cache_dir(), "manifests", image.digest());
    overwrite_middle(&layer_file)?;
    overwrite_middle(&manifest_file)?;

    // Asked on control plane 1; n2 follows control plane 2.
    let rc = Regctl::new(&cp1.url());
    let out = rc.run(&["cache", "verify", "--rate", "0", "--wait", "60s", "-o", "json"]).await?;
    out.expect_code(0, "cache verify")?;
    let report = out.json()?;
    let entries = 1 + image.blobs().count() as u64;
    let p1 = pass(&report, "n1")?;
    assert_eq!(
        (p1["state"].as_str(), p1["checked"].as_u64(), p1["removed"].as_u64()),
        (Some("done"), Some(entries), Some(1)),
        "{report}"
    );
    assert_eq!(p1["removed_entries"], json!([format!("blob {}", layer.digest)]), "{report}");
    let p2 = pass(&report, "n2")?;
    assert_eq!((p2["state"].as_str(), p2["removed"].as_u64()), (Some("done"), Some(1)), "{report}");
    assert_eq!(p2["removed_entries"], json!([format!("manifest {}", image.digest())]), "{report}");
    let cached: u64 = image.blobs().map(|b| b.size() as u64).sum::<u64>() + image.manifest.size() as u64;
    assert_eq!(p1["bytes"].as_u64(), Some(cached), "n1 read its whole cache once: {report}");
    assert!(!layer_file.exists() && !manifest_file.exists(), "the corrupt entries are still on disk");
    assert!(n1.all_output().contains("does not match its digest"), "not logged:\n{}", n1.log_tail(20));

    // The node list (either control plane) shows the pass.
    let nodes = list_nodes(&cp2.url()).await?;
    let listed = nodes.iter().find(|n| n["id"] == "n1").map(|n| n["verify"].clone()).unwrap_or_default();
    assert_eq!(
        (listed["id"].clone(), listed["done"].clone(), listed["removed"].clone()),
        (report["id"].clone(), json!(true), json!(1)),
        "{nodes:?}"
    );

    // The next pulls fetch the removed entries again, and are whole.
    registry.sync_log()?;
    let before = registry.count("GET", &format!("/blobs/{}", layer.digest));
    http::pull_image(&n1.v2("lab/team/app"), &image).await?;
    http::pull_image(&n2.v2("lab/team/app"), &image).await?;
    registry.sync_log()?;
    // From upstream, or (peer fetch) from n2, which still holds it: at most one upstream GET.
    assert!(registry.count("GET", &format!("/blobs/{}", layer.digest)) - before <= 1, "the layer fetched twice");
    assert!(layer_file.exists(), "n1 has not the layer again");

    // One node by address, as a table: nothing left to remove.
    let out = rc.run(&["cache", "verify", "--node", &n2.host(), "--rate", "0"]).await?;
    out.expect_code(0, "cache verify --node")?;
    expect_aligned(&out.stdout)?;
    let rows: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(rows.len(), 2, "a header and n2:\n{}", out.stdout);
    assert!(rows[0].starts_with("NODE") && rows[0].contains("REMOVED"), "{}", out.stdout);
    assert!(
        rows[1].starts_with("n2") && rows[1].contains(" done ") && rows[1].contains(&format!(" {entries} ")),
        "{}",
        out.stdout
    );

    // --no-wait answers with the id; the pass shows in the node list.
    let out = rc.run(&["cache", "verify", "--node", "n1", "--no-wait", "-o", "json"]).await?;
    let id = out.expect_code(0, "--no-wait")?.json()?["id"].as_str().unwrap_or_default().to_owned();
    poll(Duration::from_secs(30), "n1's pass in the node list", || {
        let (url, id) = (cp2.url(), id.clone());
        async move {
            let nodes = list_nodes(&url).await.ok()?;
            let v = &nodes.iter().find(|n| n["id"] == "n1")?["verify"];
            (v["id"] == id.as_str() && v["done"] == true && v["removed"] == 0).then_some(())
        }
    })
    .await?;

    // What cannot be asked says why.
    rc.run(&["cache", "verify", "--node", "nope"])
        .await?
        .expect_error("no node \"nope\" in the node list", "unknown node")?;
    let verify = cp1.api("/api/nodes/verify");
    expect_problem(&rest_json("POST", &verify, &[], &json!({"nodes": ["nope"]})).await?, 404, None)?;
    expect_problem(&rest_json("POST", &verify, &[], &json!({"rate": 5})).await?, 400, Some("rate"))?;
    let reader = rest_json("POST", &cp1.api("/api/tokens"), &[], &json!({"role": "reader"})).await?.json()?;
    let bearer = format!("Bearer {}", reader["token"].as_str().unwrap_or_default());
    expect_problem(&rest_json("POST", &verify, &[("authorization", &bearer)], &json!({})).await?, 403, None)?;
    let ok = rest_json("POST", &verify, &[], &json!({"nodes": ["n2"], "rate_bytes_per_sec": 1_000_000})).await?;
    assert_eq!(ok.status, 202, "{}", ok.text());
    assert_eq!(ok.json()?["nodes"], json!(["n2"]));
    Ok(())
}
