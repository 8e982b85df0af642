//! `regctl cache warm` against two managed nodes and a real distribution registry upstream: the
//! index is resolved to the platform's manifest, every blob goes through every node, and afterwards
//! both nodes serve the image without asking the upstream. A node that fails is reported while the
//! others go on.

use std::time::Duration;

use serde_json::{Value, json};
use wharf_tests::control::{ControlPlane, Node, free_port, list_nodes, poll};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::regctl::{Regctl, expect_aligned};
use wharf_tests::{Registry, TestImage, http, sha256_digest};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes an index of `images` (with their platforms) as `name:tag`; returns its digest.
async fn push_index(
    registry: &Registry,
    name: &str,
    tag: &str,
    images: &[(&TestImage, &str)],
) -> anyhow::Result<String> {
    let manifests: Vec<Value> = images
        .iter()
        .map(|(img, arch)| {
            json!({
                "mediaType": OCI_MANIFEST,
                "digest": img.digest(),
                "size": img.manifest.size(),
                "platform": { "os": "linux", "architecture": arch },
            })
        })
        .collect();
    let index = serde_json::to_vec(&json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }))?;
    let url = format!("{}/v2/{name}/manifests/{tag}", registry.url());
    let resp = http::client().put(&url).header("content-type", OCI_INDEX).body(index.clone()).send().await?;
    anyhow::ensure!(resp.status().as_u16() == 201, "PUT {url}: {} {}", resp.status(), resp.text().await?);
    Ok(sha256_digest(&index))
}

/// Upstream requests other than the log-sync markers.
fn upstream_requests(registry: &Registry) -> anyhow::Result<Vec<String>> {
    registry.sync_log()?;
    Ok(registry
        .requests()
        .into_iter()
        .filter(|r| !r.uri.contains("marker="))
        .map(|r| format!("{} {}", r.method, r.uri))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_cache_warm_two_nodes_then_both_serve_without_upstream() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let amd = TestImage::random("amd64", &[200_000, 30_000])?;
    let arm = TestImage::random("arm64", &[700_000, 20_000, 1_000])?;
    amd.push(&registry.host(), "team/multi")?;
    arm.push(&registry.host(), "team/multi")?;
    let index_digest = push_index(&registry, "team/multi", "v2", &[(&amd, "amd64"), (&arm, "arm64")]).await?;

    let cp = ControlPlane::embedded()?;
    let rc = Regctl::new(&cp.url());
    let added =
        rc.run(&["repo", "add", "lab", "--upstream", &registry.url(), "--tag-ttl", "10m", "-o", "json"]).await?;
    let rev = added.expect_code(0, "repo add")?.json()?["revision"].as_i64().unwrap_or(0);
    let n1 = Node::spawn("n1", &[cp.url()])?;
    let n2 = Node::spawn("n2", &[cp.url()])?;
    n1.wait_applied(rev, Duration::from_secs(30))?;
    n2.wait_applied(rev, Duration::from_secs(30))?;
    poll(Duration::from_secs(30), "both nodes in the node list", || {
        let url = cp.url();
        async move { (list_nodes(&url).await.ok()?.len() == 2).then_some(()) }
    })
    .await?;

    // (skopeo inspect, after the push, reads the config blob.)
    registry.sync_log()?;
    let gets_before: Vec<usize> = arm.blobs().map(|b| registry.count("GET", &format!("/blobs/{}", b.digest))).collect();
    let out = rc.run(&["cache", "warm", "lab/team/multi:v2", "--platform", "linux/arm64"]).await?;
    out.expect_code(0, "cache warm")?;
    expect_aligned(&out.stdout)?;
    let rows: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(rows.len(), 3, "a header and one row per node:\n{}", out.stdout);
    assert!(rows[0].starts_with("NODE") && rows[0].contains("BYTES") && rows[0].contains("TIME"), "{}", out.stdout);
    for (row, id) in rows[1..].iter().zip(["n1", "n2"]) {
        assert!(row.starts_with(id) && row.contains("   ok   ") && row.contains("4/4"), "{}", out.stdout);
    }
    // Not a terminal: plain progress lines on stderr, one per blob and node.
    for b in arm.blobs() {
        for id in ["n1", "n2"] {
            assert!(
                out.stderr.contains(&format!("{id}: {} ", b.digest)),
                "no line for {id} {}:\n{}",
                b.digest,
                out.stderr
            );
        }
    }
    registry.sync_log()?;
    for b in amd.layers.iter() {
        assert_eq!(registry.count("GET", &b.digest), 0, "an amd64 layer was pulled for linux/arm64");
    }
    for (b, before) in arm.blobs().zip(gets_before) {
        let n = registry.count("GET", &format!("/blobs/{}", b.digest)) - before;
        // Peer fetch: the blob's owner fetched it, the other node streamed it from the owner.
        assert_eq!(n, 1, "{}: one upstream fetch for both nodes", b.digest);
    }

    // Both nodes now serve the image with no upstream request at all.
    let before = upstream_requests(&registry)?;
    for node in [&n1, &n2] {
        let idx = http::get(&node.v2("lab/team/multi/manifests/v2"), &[("accept", OCI_INDEX)]).await?;
        assert_eq!((idx.status, idx.digest()), (200, index_digest.clone()), "{}: index", node.id());
        let m = http::get(&node.v2(&format!("lab/team/multi/manifests/{}", arm.digest())), &[("accept", OCI_MANIFEST)])
            .await?;
        assert_eq!((m.status, sha256_digest(&m.body)), (200, arm.digest().to_owned()), "{}: manifest", node.id());
        for b in arm.blobs() {
            let r = http::get(&node.v2(&format!("lab/team/multi/blobs/{}", b.digest)), &[]).await?;
            assert_eq!((r.status, sha256_digest(&r.body)), (200, b.digest.clone()), "{}: blob", node.id());
        }
    }
    let after = upstream_requests(&registry)?;
    assert_eq!(after[before.len()..], [] as [String; 0], "serving the warmed image reached the upstream");

    // By digest, through one good node and one that does not answer: reported, the other goes on.
    let dead = format!("127.0.0.1:{}", free_port()?);
    let image = format!("lab/team/multi@{}", amd.digest());
    let out = rc.run(&["cache", "warm", &image, "--node", &n1.host(), "--node", &dead, "-o", "json"]).await?;
    out.expect_code(1, "one node down")?;
    let report = out.json()?;
    assert_eq!(report["digest"], amd.digest());
    assert_eq!(report["blobs"], 3);
    let total: usize = amd.blobs().map(|b| b.size()).sum();
    assert_eq!(report["bytes"], total);
    let nodes = report["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 2, "{report}");
    assert_eq!(
        (nodes[0]["node"].as_str(), nodes[0]["ok"].as_bool()),
        (Some(n1.host().as_str()), Some(true)),
        "{report}"
    );
    assert_eq!(nodes[0]["bytes"], total);
    assert!(nodes[0]["seconds"].is_f64(), "{report}");
    assert_eq!(nodes[1]["ok"], false);
    assert!(nodes[1]["error"].as_str().is_some_and(|e| e.contains(&dead)), "{report}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert_eq!(last, format!("regctl: error: cache warm failed on 1 of 2 node(s): {dead}"), "{}", out.stderr);
    for b in amd.blobs() {
        let r = http::get(&n1.v2(&format!("lab/team/multi/blobs/{}", b.digest)), &[]).await?;
        assert_eq!(sha256_digest(&r.body), b.digest);
    }

    // What cannot be resolved says why.
    rc.run(&["cache", "warm", "lab/team/multi:nope"]).await?.expect_error("MANIFEST_UNKNOWN", "unknown tag")?;
    rc.run(&["cache", "warm", "lab/team/multi:v2", "--platform", "linux/s390x"])
        .await?
        .expect_error("no manifest for linux/s390x (it has: linux/amd64, linux/arm64)", "platform not in the index")?;
    rc.run(&["cache", "warm", "nokey/team/multi:v2"]).await?.expect_error("cannot resolve", "unknown repoKey")?;
    Ok(())
}
