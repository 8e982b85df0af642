//! The control plane on etcd: a 3-member etcd cluster, 2 control planes and 3 managed nodes, with a
//! real distribution registry as the upstream. Changes made on either control plane reach every node;
//! the nodes fail over when a control plane dies; writes survive the loss of an etcd member; the nodes
//! keep serving (also across their own restart) with no control plane at all. And: a control plane
//! whose etcd is unreachable answers 503 / UNAVAILABLE within a bounded time, never hangs.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::Code;
use wharf_proto::v1 as pb;
use wharf_proto::v1::repo_service_client::RepoServiceClient;
use wharf_tests::control::{
    ControlPlane, Node, create_repo, expect_problem, get_manifest, list_nodes, poll, repo_json, rest, rest_json,
    wait_served,
};
use wharf_tests::etcd::{EtcdCluster, closed_port};
use wharf_tests::{Registry, TestImage};

/// How long a change may take to reach every node.
const PROPAGATION: Duration = Duration::from_secs(5);
/// How long nodes may take to move to the other control plane (backoff starts at 200 ms).
const FAILOVER: Duration = Duration::from_secs(10);
/// The bound on an API call while the store is unreachable (the control plane's is 1 s here).
const BOUNDED: Duration = Duration::from_secs(10);

async fn start_etcd(n: usize) -> anyhow::Result<EtcdCluster> {
    tokio::task::spawn_blocking(move || EtcdCluster::start(n)).await?
}

/// The index of the member that is etcd's leader (asked through etcd's JSON gateway).
async fn etcd_leader(etcd: &EtcdCluster) -> anyhow::Result<usize> {
    for m in etcd.members() {
        let Ok(resp) = rest("POST", &format!("{}/v3/maintenance/status", m.client_url()), &[], Some(b"{}")).await
        else {
            continue;
        };
        let Ok(v) = resp.json() else { continue };
        let leader = v["leader"].as_str().map(str::to_owned);
        if leader.is_some() && v["header"]["member_id"].as_str().map(str::to_owned) == leader {
            return Ok(etcd.members().iter().position(|x| x.name == m.name).unwrap_or(0));
        }
    }
    anyhow::bail!("no etcd member says it is the leader")
}

/// Every node serves `key/team/app:tag` with `digest`.
async fn all_serve(nodes: &[Node], key: &str, tag: &str, digest: &str, timeout: Duration) -> anyhow::Result<()> {
    for n in nodes {
        wait_served(n, key, "team/app", tag, digest, timeout).await?;
    }
    Ok(())
}

/// Waits until `cp` lists every node in `nodes` as connected to `replica`.
async fn wait_all_on(
    cp: &ControlPlane,
    nodes: &[Node],
    replica: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let listed = list_nodes(&cp.url()).await.unwrap_or_default();
        let ok = nodes.iter().all(|n| listed.iter().any(|e| e["id"] == n.id() && e["control_plane"] == replica));
        if ok {
            return Ok(listed);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not every node on {replica} within {timeout:?}: {listed:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_ha_two_control_planes_three_nodes_on_a_three_member_etcd() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut etcd = start_etcd(3).await?;
    let registry = Registry::start()?;
    let v1 = TestImage::random("v1", &[20_000])?;
    v1.push(&registry.host(), "team/app")?;
    let v2 = TestImage::random("v2", &[20_000])?;
    v2.push(&registry.host(), "team/app")?;

    let mut cp1 = ControlPlane::etcd(&etcd.endpoints(), &["--store-timeout", "2s"])?;
    let mut cp2 = ControlPlane::etcd(&etcd.endpoints(), &["--store-timeout", "2s"])?;
    let endpoints = [cp1.url(), cp2.url()];
    let mut nodes =
        vec![Node::spawn("n1", &endpoints)?, Node::spawn("n2", &endpoints)?, Node::spawn("n3", &endpoints)?];
    eprintln!("etcd, registry, 2 control planes, 3 nodes up after {:?}", started.elapsed());

    // A repo created through REST on control plane 1 is served by all 3 nodes.
    let rev = create_repo(&cp1.url(), &repo_json("lab", &registry.url())).await?;
    all_serve(&nodes, "lab", "v1", v1.digest(), PROPAGATION).await?;
    for n in &nodes {
        n.wait_applied(rev, PROPAGATION)?;
    }
    // Both control planes see the same repos and the same nodes (one store).
    let resp = rest("GET", &cp2.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("etag"), Some(format!("\"{rev}\"").as_str()));
    wait_all_on(&cp2, &nodes, &cp1.addr().to_string(), PROPAGATION).await?;

    // Two concurrent updates with the same If-Match, one through each control plane: one wins.
    let headers = [("if-match", format!("\"{rev}\""))];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = json!({"kind": "generic", "upstream": registry.url(), "tag_ttl": "1m"});
    let b = json!({"kind": "generic", "upstream": registry.url(), "tag_ttl": "2m"});
    let (url1, url2) = (cp1.api("/api/repos/lab"), cp2.api("/api/repos/lab"));
    let (ra, rb) = tokio::join!(rest_json("PUT", &url1, &headers, &a), rest_json("PUT", &url2, &headers, &b));
    let (ra, rb) = (ra?, rb?);
    let mut statuses = [ra.status, rb.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 412], "{} / {}", ra.text(), rb.text());
    let loser = if ra.status == 412 { &ra } else { &rb };
    expect_problem(loser, 412, None)?;

    // Control plane 1 dies: the nodes move to control plane 2, and later changes still arrive.
    let t = Instant::now();
    cp1.kill_9();
    wait_all_on(&cp2, &nodes, &cp2.addr().to_string(), FAILOVER).await?;
    eprintln!("all nodes on control plane 2 {:?} after control plane 1 died", t.elapsed());
    let rev = create_repo(&cp2.url(), &repo_json("lab2", &registry.url())).await?;
    all_serve(&nodes, "lab2", "v1", v1.digest(), PROPAGATION).await?;
    for n in &nodes {
        n.wait_applied(rev, PROPAGATION)?;
    }

    // etcd loses a member (its leader): writes still succeed (retrying 503 while etcd elects a new
    // leader), and reach every node.
    let leader = etcd_leader(&etcd).await?;
    etcd.kill(leader);
    let t = Instant::now();
    let mut refusals = Vec::new();
    let body = repo_json("lab3", &registry.url());
    let rev = loop {
        let resp = rest_json("POST", &cp2.api("/api/repos"), &[], &body).await?;
        match resp.status {
            201 => break wharf_tests::control::etag_revision(&resp)?,
            503 if t.elapsed() < Duration::from_secs(5) => refusals.push(resp.text()),
            // A retried write that had gone through after all.
            409 if !refusals.is_empty() => {
                let got = rest("GET", &cp2.api("/api/repos/lab3"), &[], None).await?;
                break wharf_tests::control::etag_revision(&got)?;
            }
            s => panic!("POST after etcd lost member {leader}: {s} {} (earlier refusals: {refusals:?})", resp.text()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "write after losing the etcd leader took {:?}, {} refused first: {refusals:?}",
        t.elapsed(),
        refusals.len()
    );
    all_serve(&nodes, "lab3", "v1", v1.digest(), PROPAGATION).await?;
    for n in &nodes {
        n.wait_applied(rev, PROPAGATION)?;
    }
    let resp = rest("GET", &cp2.api("/readyz"), &[], None).await?;
    assert_eq!(resp.status, 200, "/readyz with 2 of 3 etcd members: {}", resp.text());

    // Both control planes stopped: the nodes keep serving, also what they never fetched before.
    cp2.terminate(Duration::from_secs(10))?;
    all_serve(&nodes, "lab3", "v2", v2.digest(), Duration::from_secs(2)).await?;
    all_serve(&nodes, "lab", "v1", v1.digest(), Duration::from_secs(2)).await?;

    // A node restarted while no control plane runs serves its stored snapshot at once.
    nodes[2].restart()?;
    for key in ["lab", "lab2", "lab3"] {
        let r = get_manifest(&nodes[2], key, "team/app", "v2").await?;
        assert_eq!((r.0, r.1.as_str()), (200, v2.digest()), "{key} after a restart: {r:?}\n{}", nodes[2].log_tail(20));
    }
    eprintln!("HA test took {:?}", started.elapsed());
    Ok(())
}

/// etcd elects a new leader within about a second here (500 ms election timeout): a write that
/// arrives right after the leader died must not fail for it, the store has its whole timeout (2 s) to
/// get it through. The HA test above tolerates 503 and retries; this one does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_ha_write_right_after_the_etcd_leader_dies_succeeds() -> anyhow::Result<()> {
    let mut etcd = start_etcd(3).await?;
    let cp = ControlPlane::etcd(&etcd.endpoints(), &["--store-timeout", "2s"])?;
    create_repo(&cp.url(), &repo_json("before", "http://one.example")).await?;
    let leader = etcd_leader(&etcd).await?;
    etcd.kill(leader);
    let t = Instant::now();
    let resp = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("after", "http://two.example")).await?;
    assert_eq!(
        resp.status,
        201,
        "first write after etcd member {leader} (the leader) died, {:?}: {}",
        t.elapsed(),
        resp.text()
    );
    let resp = rest("GET", &cp.api("/api/repos/before"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    Ok(())
}

/// Runs `f` and checks that it took less than [`BOUNDED`].
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let t = Instant::now();
    let r = tokio::time::timeout(BOUNDED + Duration::from_secs(5), f).await;
    let took = t.elapsed();
    let r = r.unwrap_or_else(|_| panic!("{what} hung"));
    assert!(took < BOUNDED, "{what} took {took:?}");
    r
}

/// The store-unreachable checks shared by both tests: REST writes and reads 503 problem JSON,
/// `/readyz` 503, gRPC UNAVAILABLE, all within the bound; `/healthz` still 200.
async fn expect_unavailable(cp: &ControlPlane) -> anyhow::Result<()> {
    let resp =
        timed("POST", rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("down", "http://x.example"))).await?;
    expect_problem(&resp, 503, None).map_err(|e| e.context("POST /api/repos"))?;
    let resp = timed(
        "PUT",
        rest_json("PUT", &cp.api("/api/repos/lab"), &[("if-match", "*")], &repo_json("lab", "http://y.example")),
    )
    .await?;
    expect_problem(&resp, 503, None).map_err(|e| e.context("PUT /api/repos/lab"))?;
    let resp = timed("DELETE", rest("DELETE", &cp.api("/api/repos/lab"), &[], None)).await?;
    expect_problem(&resp, 503, None).map_err(|e| e.context("DELETE /api/repos/lab"))?;
    let resp = timed("GET list", rest("GET", &cp.api("/api/repos"), &[], None)).await?;
    expect_problem(&resp, 503, None).map_err(|e| e.context("GET /api/repos"))?;
    let resp = timed("GET nodes", rest("GET", &cp.api("/api/nodes"), &[], None)).await?;
    expect_problem(&resp, 503, None).map_err(|e| e.context("GET /api/nodes"))?;
    let resp = timed("readyz", rest("GET", &cp.api("/readyz"), &[], None)).await?;
    assert_eq!(resp.status, 503, "/readyz: {}", resp.text());
    let resp = timed("healthz", rest("GET", &cp.api("/healthz"), &[], None)).await?;
    assert_eq!(resp.status, 200, "/healthz: {}", resp.text());
    let mut c = RepoServiceClient::new(wharf_tests::control::grpc(&cp.url()).await?);
    let r = timed(
        "gRPC CreateRepo",
        c.create_repo(pb::CreateRepoRequest {
            repo: Some(pb::Repo {
                key: "down".into(),
                kind: "generic".into(),
                upstream: "http://x.example".into(),
                ..Default::default()
            }),
        }),
    )
    .await;
    let s = r.err().map(|s| (s.code(), s.message().to_owned()));
    assert!(matches!(s, Some((Code::Unavailable, _))), "gRPC CreateRepo: {s:?}");
    let r = timed("gRPC ListRepos", c.list_repos(pb::ListReposRequest {})).await;
    let s = r.err().map(|s| s.code());
    assert_eq!(s, Some(Code::Unavailable), "gRPC ListRepos");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_store_unreachable_from_the_start_answers_503() -> anyhow::Result<()> {
    let etcd = format!("http://127.0.0.1:{}", closed_port());
    let cp = ControlPlane::etcd(&[etcd], &["--store-timeout", "1s"])?;
    expect_unavailable(&cp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_store_lost_after_start_answers_503_then_recovers() -> anyhow::Result<()> {
    let mut etcd = start_etcd(1).await?;
    let cp = ControlPlane::etcd(&etcd.endpoints(), &["--store-timeout", "1s"])?;
    create_repo(&cp.url(), &repo_json("lab", "http://one.example")).await?;
    let resp = rest("GET", &cp.api("/readyz"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());

    etcd.kill(0);
    expect_unavailable(&cp).await?;

    // etcd comes back: the same control plane answers again, without a restart.
    let _etcd = tokio::task::spawn_blocking(move || etcd.restart(0).map(|()| etcd)).await??;
    let status = poll(Duration::from_secs(15), "writes to succeed again", || async {
        let r = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("back", "http://two.example")).await.ok()?;
        (r.status == 201).then_some(r.status)
    })
    .await
    .map_err(|e| e.context(cp.log_tail(20)))?;
    assert_eq!(status, 201);
    let resp = rest("GET", &cp.api("/readyz"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    Ok(())
}
