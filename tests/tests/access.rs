//! `access = "token"` repos on a real node: pulls need a puller token from the node's snapshot,
//! as a Bearer token or as the Basic password (`docker login <node>`). The snapshot is the one a
//! managed node keeps in `<cache-dir>/config.snapshot`, and no control plane runs at all: the gate
//! holds while the control planes are down. (Tokens issued by a control plane and revoked through
//! it are the control plane's suites.)

use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use wharf_tests::checks::is_node_challenge;
use wharf_tests::control::{Node, free_port};
use wharf_tests::http::{Resp, get, head};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::{FakeUpstream, TestImage, random_name, sha256_hex};

/// A puller token: its text and its stored form (id, SHA-256 of the secret, patterns, expiry).
fn puller(id: &str, patterns: &[&str], expires_at_ms: Option<u64>) -> (String, serde_json::Value) {
    let secret = format!("{}{}", random_name("s"), "x".repeat(32));
    let stored = json!({
        "id": id,
        "secret_sha256": sha256_hex(secret.as_bytes()),
        "repos": patterns,
        "expires_at_ms": expires_at_ms,
    });
    (format!("wharf_{id}_{secret}"), stored)
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

async fn pull(node: &Node, key: &str, name: &str, image: &TestImage, authorization: &str) -> anyhow::Result<()> {
    let h = [("authorization", authorization), ("accept", OCI_MANIFEST)];
    let m = get(&node.v2(&format!("{key}/{name}/manifests/{}", image.tag)), &h).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(m.body, image.manifest.data);
    for b in image.blobs() {
        let r = get(&node.v2(&format!("{key}/{name}/blobs/{}", b.digest)), &h[..1]).await?;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.digest(), b.digest);
    }
    Ok(())
}

fn assert_unauthorized(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert!(is_node_challenge(r.header("www-authenticate")), "{what}: {:?}", r.header("www-authenticate"));
    if !r.body.is_empty() {
        assert_eq!(r.oci_code(), "UNAUTHORIZED", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_repos_need_a_matching_puller_token_from_the_snapshot() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[20_000])?;
    fake.put_image("team/app", &image);
    fake.put_image("other/app", &image);
    fake.put_image("pub/app", &image);

    let (token, stored) = puller("00000000000000a1", &["priv/team"], None);
    let (expired, expired_stored) = puller("00000000000000e1", &[], Some(1_000));
    let cache = tempfile::tempdir()?;
    let repo = |key: &str, access: &str| json!({ "key": key, "kind": "generic", "upstream": fake.url(), "tag_ttl_secs": 300, "access": access });
    let snapshot = json!({
        "revision": 7,
        "repos": [repo("priv", "token"), repo("open", "public")],
        "pullers": [stored, expired_stored],
    });
    std::fs::write(cache.path().join("config.snapshot"), serde_json::to_vec(&snapshot)?)?;
    // Control planes that do not exist: the node serves its stored snapshot.
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let node = Node::spawn_with("gate", &[dead], Some(cache.path()), &[])?;
    node.wait_log(0, Duration::from_secs(10), |v| {
        v["fields"]["message"] == "serving the stored configuration snapshot"
    })?;

    // No token: 401 with the challenge docker login answers, on every route.
    let digest = &image.layers[0].digest;
    for path in [
        "priv/team/app/manifests/v1".to_owned(),
        format!("priv/team/app/blobs/{digest}"),
        "priv/team/app/tags/list".to_owned(),
    ] {
        assert_unauthorized(&get(&node.v2(&path), &[]).await?, &path);
        assert_unauthorized(&head(&node.v2(&path), &[]).await?, &path);
    }

    // The token as the Basic password (any username), or as Bearer.
    pull(&node, "priv", "team/app", &image, &basic("ci", &token)).await?;
    pull(&node, "priv", "team/app", &image, &format!("Bearer {token}")).await?;
    let line = node.wait_log(0, Duration::from_secs(5), |v| {
        v["fields"]["message"] == "request" && v["fields"]["authz"] == "token" && v["fields"]["status"] == 200
    })?;
    assert_eq!(line["fields"]["token_id"], "00000000000000a1");

    // Cached now, yet still closed to clients without a token; a wrong one is refused too.
    let blob = node.v2(&format!("priv/team/app/blobs/{digest}"));
    assert_unauthorized(&get(&blob, &[]).await?, "anonymous, cached blob");
    let wrong = format!("wharf_00000000000000a1_{}", "y".repeat(40));
    for bad in [wrong.as_str(), expired.as_str(), "wharf_00000000000000ff_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"] {
        assert_unauthorized(&get(&blob, &[("authorization", &format!("Bearer {bad}"))]).await?, bad);
        assert_unauthorized(&get(&blob, &[("authorization", &basic("u", bad))]).await?, bad);
    }
    assert_unauthorized(&get(&blob, &[("authorization", &basic("u", "some-password"))]).await?, "not a token");

    // A valid token whose patterns do not cover the repository: 403.
    let r = get(&node.v2("priv/other/app/manifests/v1"), &[("authorization", &format!("Bearer {token}"))]).await?;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.oci_code(), "DENIED");

    // Public repos stay open. The ping challenges a client without credentials (so that docker,
    // skopeo and podman send their login), lets skopeo's anonymous answer through, and fails
    // `docker login` with a bad Wharf token.
    assert_eq!(get(&node.v2("open/pub/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?.status, 200);
    assert_unauthorized(&get(&node.v2(""), &[]).await?, "ping without credentials");
    assert_eq!(get(&node.v2(""), &[("authorization", &basic("", ""))]).await?.status, 200);
    assert_eq!(get(&node.v2(""), &[("authorization", &basic("ci", &token))]).await?.status, 200);
    assert_unauthorized(&get(&node.v2(""), &[("authorization", &basic("ci", &expired))]).await?, "ping, expired");

    // The secret never reaches the node's output.
    let secret = token.rsplit('_').next().unwrap_or_default();
    assert!(!node.all_output().contains(secret), "the token's secret leaked into the node's output");
    Ok(())
}
