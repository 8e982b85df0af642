//! Peer fetch: nodes of one control plane fetch each blob from upstream once among them. Real
//! processes (a control plane on etcd or on its embedded store, `wharf-proxy` nodes) and a real
//! distribution registry upstream; an in-process fake upstream where a body must pause on demand,
//! and an in-process fake peer (registered through the control plane like a node) that sends
//! wrong bytes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::IntoResponse;
use futures_util::StreamExt as _;
use wharf_proto::v1 as pb;
use wharf_proto::v1::config_service_client::ConfigServiceClient;
use wharf_tests::control::{ControlOptions, ControlPlane, Node, create_repo, grpc, poll, repo_json};
use wharf_tests::etcd::EtcdCluster;
use wharf_tests::fake::{FakeUpstream, Fault, FaultRule};
use wharf_tests::image::{Blob, OCI_MANIFEST};
use wharf_tests::prom::Scrape;
use wharf_tests::{Registry, TestImage, http, sha256_digest};

/// The node that owns `digest` among `ids`.
fn owner_of(ids: &[&str], digest: &str) -> String {
    let d: wharf_core::Digest = digest.parse().expect("a digest");
    wharf_core::rendezvous::owner(ids, |id| id, &d).expect("members").to_string()
}

/// A random blob of `size` bytes that `want` owns among `ids`.
fn blob_owned_by(want: &str, ids: &[&str], size: usize) -> Blob {
    loop {
        let b = Blob::random(size);
        if owner_of(ids, &b.digest) == want {
            return b;
        }
    }
}

async fn scrape(node: &Node) -> anyhow::Result<Scrape> {
    let r = http::get(&format!("http://{}/metrics", node.addr()), &[]).await?;
    Scrape::parse(&r.text())
}

/// Waits until every node's snapshot lists `n` peer-fetch members; returns how long it took.
async fn wait_members(nodes: &[&Node], n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for node in nodes {
        poll(Duration::from_secs(30), &format!("{} to see {n} members", node.id()), || async move {
            let s = scrape(node).await.ok()?;
            (s.get("wharf_peer_members", &[]) == Some(n as f64)).then_some(())
        })
        .await?;
    }
    Ok(started.elapsed())
}

/// Request log lines of `node` with these field values.
fn request_lines(node: &Node, fields: &[(&str, &str)]) -> usize {
    node.logs()
        .iter()
        .filter(|l| {
            let f = wharf_tests::process::fields(l);
            f.get("status").is_some() && fields.iter().all(|(k, v)| f[*k].as_str() == Some(*v))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_etcd_fetch_each_blob_from_upstream_once() -> anyhow::Result<()> {
    let etcd = tokio::task::spawn_blocking(|| EtcdCluster::start(1)).await??;
    let registry = Registry::start()?;
    let ids = ["n1", "n2", "n3"];
    // A 50 MB layer that n1 does not own: a herd on n1 goes through its owner.
    let big = blob_owned_by("n2", &ids, 50_000_000);
    let image = TestImage::from_layers("v1", vec![big, Blob::random(300_000), Blob::random(20_000)])?;
    image.push(&registry.host(), "team/app")?;
    // What the push itself read back (skopeo GETs the config blob).
    registry.sync_log()?;
    let pushed: Vec<usize> = image.blobs().map(|b| registry.count("GET", &format!("/blobs/{}", b.digest))).collect();
    let cp = ControlPlane::etcd(&etcd.endpoints(), &[])?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let nodes = [Node::spawn("n1", &[cp.url()])?, Node::spawn("n2", &[cp.url()])?, Node::spawn("n3", &[cp.url()])?];
    for n in &nodes {
        n.wait_applied(rev, Duration::from_secs(30))?;
    }
    wait_members(&nodes.iter().collect::<Vec<_>>(), 3).await?;

    // 20 clients spread over the three nodes on the cold 50 MB layer.
    let layer = &image.layers[0];
    let client = http::client();
    let gets = (0..20).map(|i| {
        let url = nodes[i % 3].v2(&format!("lab/team/app/blobs/{}", layer.digest));
        let client = client.clone();
        async move { http::get_hashed(&client, &url).await }
    });
    for got in futures_util::future::join_all(gets).await {
        let (status, len, digest) = got?;
        assert_eq!((status, len, digest.as_str()), (200, layer.size() as u64, layer.digest.as_str()));
    }
    registry.sync_log()?;
    let layer_gets = registry.count("GET", &format!("/blobs/{}", layer.digest));
    let pushed_layer = image.blobs().position(|b| b.digest == layer.digest).map_or(0, |i| pushed[i]);
    assert_eq!(layer_gets - pushed_layer, 1, "one upstream GET for the herd");
    assert!(request_lines(&nodes[0], &[("cache", "peer"), ("reference", &layer.digest)]) <= 1);
    assert!(
        request_lines(&nodes[0], &[("cache", "peer")]) + request_lines(&nodes[2], &[("cache", "peer")]) >= 2,
        "n1 and n3 got the layer from its owner n2"
    );
    assert!(request_lines(&nodes[1], &[("route", "peer")]) >= 2, "n2 served its peers:\n{}", nodes[1].log_tail(30));

    // The manifest by digest, through every node: one upstream GET too.
    let by_digest = format!("/manifests/{}", image.digest());
    let before = registry.count("GET", &by_digest);
    for n in &nodes {
        let m = http::get(&n.v2(&format!("lab/team/app{by_digest}")), &[("accept", OCI_MANIFEST)]).await?;
        assert_eq!((m.status, sha256_digest(&m.body)), (200, image.digest().to_owned()), "{}", n.id());
        assert_eq!(m.header("content-type"), Some(OCI_MANIFEST));
    }
    registry.sync_log()?;
    assert_eq!(registry.count("GET", &by_digest) - before, 1, "the manifest by digest from upstream once");

    // Every node pulls the whole image once: each blob came from upstream once in all.
    for n in &nodes {
        http::pull_image(&n.v2("lab/team/app"), &image).await?;
    }
    registry.sync_log()?;
    for (b, pushed) in image.blobs().zip(pushed) {
        let fetched = registry.count("GET", &format!("/blobs/{}", b.digest)) - pushed;
        assert_eq!(fetched, 1, "blob {} from upstream", b.digest);
    }
    let n1 = scrape(&nodes[0]).await?;
    assert!(n1.get("wharf_served_bytes_total", &[("repo_key", "lab"), ("source", "peer")]).unwrap_or(0.0) > 0.0);
    assert!(
        n1.get("wharf_peer_fetched_bytes_total", &[("repo_key", "lab")]).unwrap_or(0.0) >= layer.size() as f64,
        "n1 received the layer from n2"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_nodes_joining_and_leaving_and_ownership_moves() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let mut n1 = Node::spawn("n1", &[cp.url()])?;
    let n2 = Node::spawn("n2", &[cp.url()])?;
    for n in [&n1, &n2] {
        n.wait_applied(rev, Duration::from_secs(30))?;
    }
    wait_members(&[&n1, &n2], 2).await?;
    let mut n3 = Node::spawn("n3", &[cp.url()])?;
    let joined = wait_members(&[&n1, &n2, &n3], 3).await?;
    // A blob n3 owns among three, and n2 among the two left.
    let blob = loop {
        let b = blob_owned_by("n3", &["n1", "n2", "n3"], 100_000);
        if owner_of(&["n1", "n2"], &b.digest) == "n2" {
            break b;
        }
    };
    let image = TestImage::from_layers("v1", vec![blob])?;
    image.push(&registry.host(), "team/app")?;
    let layer = &image.layers[0];
    let url = |n: &Node| n.v2(&format!("lab/team/app/blobs/{}", layer.digest));
    let got = http::get(&url(&n1), &[]).await?;
    assert_eq!((got.status, got.digest()), (200, layer.digest.clone()));
    assert_eq!(request_lines(&n3, &[("route", "peer"), ("reference", &layer.digest)]), 1, "asked of its owner n3");

    // n3 leaves (killed): the others drop it, and the blob's owner is n2 now.
    n3.kill_9();
    let left = wait_members(&[&n1, &n2], 2).await?;
    println!("membership: a join reached every node in {joined:?}, a leave in {left:?}");
    assert!(left < Duration::from_secs(15), "a dead node stays a member for {left:?}");
    std::fs::remove_dir_all(n1.cache_dir().join("blobs"))?;
    n1.restart()?;
    n1.wait_applied(rev, Duration::from_secs(30))?;
    wait_members(&[&n1], 2).await?;
    let got = http::get(&url(&n1), &[]).await?;
    assert_eq!((got.status, got.digest()), (200, layer.digest.clone()));
    assert_eq!(request_lines(&n2, &[("route", "peer"), ("reference", &layer.digest)]), 1, "asked of n2 now");
    registry.sync_log()?;
    assert_eq!(registry.count("GET", &format!("/blobs/{}", layer.digest)), 2, "n3 and n2 each fetched it once");
    Ok(())
}

/// What the fake peer received (the `Authorization` of each request), and how it answers.
#[derive(Clone, Default)]
struct FakePeer {
    seen: Arc<Mutex<Vec<String>>>,
    size: usize,
    /// Never answer (a peer that accepts connections and hangs).
    hang: bool,
}

impl FakePeer {
    fn seen(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Answers every request with `size` bytes that are not the blob asked for.
async fn wrong_bytes(State(peer): State<FakePeer>, req: axum::extract::Request) -> impl IntoResponse {
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    peer.seen().push(auth);
    if peer.hang {
        std::future::pending::<()>().await;
    }
    vec![b'x'; peer.size]
}

/// Starts `peer` and registers it with the control plane at `cp_url` as node `id`, as a node
/// would (a Watch stream with its peer URL); both end with the returned guard.
async fn join_fake_peer(cp_url: &str, id: &str, peer: FakePeer) -> anyhow::Result<Aborting> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new().fallback(wrong_bytes).with_state(peer);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut config = ConfigServiceClient::new(grpc(cp_url).await?);
    let req = pb::WatchRequest {
        node_id: id.into(),
        address: url.clone(),
        peer_url: url,
        generation: 1,
        ..Default::default()
    };
    let mut stream = config.watch(req).await?.into_inner();
    let watch = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    Ok(Aborting(vec![server, watch]))
}

/// Aborts its tasks when dropped (the test's fake peer, when the test ends or fails).
struct Aborting(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Aborting {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_sends_wrong_bytes_is_never_trusted_and_its_token_opens_no_other_node() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let n1 = Node::spawn("n1", &[cp.url()])?;
    n1.wait_applied(rev, Duration::from_secs(30))?;
    let blob = blob_owned_by("evil", &["n1", "evil"], 200_000);
    let image = TestImage::from_layers("v1", vec![blob])?;
    image.push(&registry.host(), "team/app")?;
    let layer = &image.layers[0];

    // The fake peer joins like a node: a Watch stream with its peer URL.
    let fake = FakePeer { size: layer.size(), ..Default::default() };
    let _fake = join_fake_peer(&cp.url(), "evil", fake.clone()).await?;
    wait_members(&[&n1], 2).await?;

    let url = n1.v2(&format!("lab/team/app/blobs/{}", layer.digest));
    let first = http::get_outcome(&url, &[]).await;
    assert!(!first.complete_success(), "a wrong body looked complete: {}", first.describe());
    assert_eq!(fake.seen().len(), 1, "the owner was asked");
    let hex = layer.digest.trim_start_matches("sha256:");
    assert!(!n1.cache_dir().join("blobs/sha256").join(&hex[..2]).join(hex).exists(), "wrong bytes cached");
    let s = scrape(&n1).await?;
    assert_eq!(s.get("wharf_peer_errors_total", &[("peer", "evil"), ("reason", "wrong_bytes")]), Some(1.0));
    // The next pull skips the suspect peer and fetches from upstream.
    let second = http::get(&url, &[]).await?;
    assert_eq!((second.status, second.digest()), (200, layer.digest.clone()));
    assert_eq!(fake.seen().len(), 1, "a suspect peer was asked again");

    // The token n1 sent the fake is for the fake alone: n1's own peer endpoint refuses it, as it
    // refuses no token at all and a client's token.
    let token = fake.seen()[0].clone();
    assert!(token.starts_with("Bearer wharf."), "{token}");
    let peer_path = format!("http://{}/_wharf/peer/lab/team/app/blobs/{}", n1.addr(), layer.digest);
    assert_eq!(http::get(&peer_path, &[("authorization", &token)]).await?.status, 401);
    assert_eq!(http::get(&peer_path, &[]).await?.status, 401);
    let issued = http::get(&format!("http://{}/v2/token?scope=repository:lab/team/app:pull", n1.addr()), &[]).await?;
    let client_token = format!("Bearer {}", issued.json()?["token"].as_str().unwrap_or_default());
    assert_eq!(http::get(&peer_path, &[("authorization", &client_token)]).await?.status, 401);

    // A passthrough repo's blobs are never asked of a peer, even of their owner: the client's
    // credentials stay on the node it asked.
    let mut pass = repo_json("pass", &registry.url());
    pass["auth"] = "passthrough".into();
    let rev = create_repo(&cp.url(), &pass).await?;
    n1.wait_applied(rev, Duration::from_secs(30))?;
    let other = blob_owned_by("evil", &["n1", "evil"], 50_000);
    let image = TestImage::from_layers("v2", vec![other])?;
    image.push(&registry.host(), "team/app")?;
    let got = http::get(&n1.v2(&format!("pass/team/app/blobs/{}", image.layers[0].digest)), &[]).await?;
    assert_eq!((got.status, got.digest()), (200, image.layers[0].digest.clone()));
    assert_eq!(fake.seen().len(), 1, "a passthrough blob was asked of a peer");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_does_not_answer_costs_a_client_no_more_than_the_peer_timeout() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let n1 = Node::spawn_with("n1", &[cp.url()], None, &["--peer-timeout", "1s"])?;
    n1.wait_applied(rev, Duration::from_secs(30))?;
    let fake = FakePeer { hang: true, ..Default::default() };
    let _fake = join_fake_peer(&cp.url(), "stuck", fake.clone()).await?;
    wait_members(&[&n1], 2).await?;
    let blob = blob_owned_by("stuck", &["n1", "stuck"], 100_000);
    let image = TestImage::from_layers("v1", vec![blob])?;
    image.push(&registry.host(), "team/app")?;
    let layer = &image.layers[0];
    let started = Instant::now();
    let got = http::get(&n1.v2(&format!("lab/team/app/blobs/{}", layer.digest)), &[]).await?;
    let took = started.elapsed();
    assert_eq!((got.status, got.digest()), (200, layer.digest.clone()));
    assert_eq!(fake.seen().len(), 1, "the owner was asked");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "took {took:?}");
    let s = scrape(&n1).await?;
    assert_eq!(s.get("wharf_peer_errors_total", &[("peer", "stuck"), ("reason", "timeout")]), Some(1.0));
    // Suspect now: the next miss it owns goes straight upstream.
    let next = blob_owned_by("stuck", &["n1", "stuck"], 10_000);
    let image = TestImage::from_layers("v2", vec![next])?;
    image.push(&registry.host(), "team/app")?;
    let started = Instant::now();
    let got = http::get(&n1.v2(&format!("lab/team/app/blobs/{}", image.layers[0].digest)), &[]).await?;
    assert_eq!(got.status, 200);
    assert!(started.elapsed() < Duration::from_secs(1), "a suspect peer was waited on");
    assert_eq!(fake.seen().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_mid_transfer_leaves_whole_bodies_finished_from_upstream() -> anyhow::Result<()> {
    let upstream = FakeUpstream::start().await?;
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &upstream.url())).await?;
    let n1 = Node::spawn("n1", &[cp.url()])?;
    let mut n2 = Node::spawn("n2", &[cp.url()])?;
    for n in [&n1, &n2] {
        n.wait_applied(rev, Duration::from_secs(30))?;
    }
    wait_members(&[&n1, &n2], 2).await?;
    let blob = blob_owned_by("n2", &["n1", "n2"], 4_000_000);
    upstream.add_blob(blob.data.clone());
    // The owner's upstream GET pauses after 1 MB, once.
    upstream.add_fault(FaultRule {
        pattern: format!("/blobs/{}", blob.digest),
        methods: None,
        fault: Fault::Pause { after: 1_000_000 },
        times: Some(1),
    });
    let url = n1.v2(&format!("lab/team/app/blobs/{}", blob.digest));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { http::get_outcome(&url, &[]).await })
        })
        .collect();
    // n1 is streaming from n2, which is waiting on its upstream.
    poll(Duration::from_secs(30), "n1 to receive bytes from n2", || async {
        let s = scrape(&n1).await.ok()?;
        (s.get("wharf_peer_fetched_bytes_total", &[("repo_key", "lab")])? >= 500_000.0).then_some(())
    })
    .await?;
    n2.kill_9();
    for c in clients {
        let out = c.await?;
        // Whole and right, or an error: never a complete-looking wrong body.
        if out.complete_success() {
            assert_eq!(sha256_digest(&out.body), blob.digest, "{}", out.describe());
        }
        assert!(out.complete_success(), "n1 went on from upstream: {}\n{}", out.describe(), n1.log_tail(20));
    }
    assert!(n1.all_output().contains("going on from upstream"), "{}", n1.log_tail(20));
    let ranged = upstream.requests_matching("GET", &blob.digest);
    assert!(ranged.iter().any(|r| r.header("range").is_some()), "{}", upstream.describe_requests());
    // The next pull is a hit of what n1 verified.
    let again = http::get(&url, &[]).await?;
    assert_eq!((again.status, again.digest()), (200, blob.digest.clone()));
    assert!(request_lines(&n1, &[("cache", "hit"), ("reference", &blob.digest)]) >= 1);
    upstream.release();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_peer_fetch_on_the_control_plane_turns_it_off_for_the_cluster() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let cp = ControlPlane::spawn(ControlOptions { args: vec!["--no-peer-fetch".into()], ..Default::default() })?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    let n1 = Node::spawn("n1", &[cp.url()])?;
    let n2 = Node::spawn("n2", &[cp.url()])?;
    for n in [&n1, &n2] {
        n.wait_applied(rev, Duration::from_secs(30))?;
    }
    wait_members(&[&n1, &n2], 0).await?;
    let image = TestImage::random("v1", &[100_000])?;
    image.push(&registry.host(), "team/app")?;
    registry.sync_log()?;
    let layer = &image.layers[0];
    let before = registry.count("GET", &format!("/blobs/{}", layer.digest));
    for n in [&n1, &n2] {
        let got = http::get(&n.v2(&format!("lab/team/app/blobs/{}", layer.digest)), &[]).await?;
        assert_eq!((got.status, got.digest()), (200, layer.digest.clone()));
        assert_eq!(request_lines(n, &[("route", "peer")]), 0, "{} served a peer", n.id());
    }
    registry.sync_log()?;
    assert_eq!(registry.count("GET", &format!("/blobs/{}", layer.digest)) - before, 2, "each node fetched alone");
    Ok(())
}
