//! Graceful shutdown of a managed node during a herd: SIGTERM takes the node out of the node list
//! at once while its clients keep receiving; every client gets the whole blob; the node then exits
//! by itself and, restarted, serves the blob from its cache with nothing left in staging. A second
//! signal exits at once: the cut clients know it (short bodies), and no partial blob is ever served
//! after the restart.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use wharf_tests::control::{ControlPlane, Node, create_repo, list_nodes, poll, repo_json};
use wharf_tests::http::client;
use wharf_tests::{FakeUpstream, Fault};

const CLIENTS: usize = 8;
const SIZE: usize = 4 * 1024 * 1024;

/// `CLIENTS` GETs of `url`, each with its first chunk read: the herd is in flight.
async fn herd(url: &str) -> anyhow::Result<Vec<(reqwest::Response, Vec<u8>)>> {
    let mut started = Vec::new();
    for _ in 0..CLIENTS {
        let mut resp = client().get(url).send().await?;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        let first = resp.chunk().await?.map(|c| c.to_vec()).unwrap_or_default();
        started.push((resp, first));
    }
    Ok(started)
}

/// Reads the rest of each body: the bytes, or where it broke off.
async fn finish(started: Vec<(reqwest::Response, Vec<u8>)>) -> Vec<Result<Vec<u8>, (usize, String)>> {
    join_all(started.into_iter().map(|(mut resp, mut body)| async move {
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => return Ok(body),
                Err(e) => return Err((body.len(), e.to_string())),
            }
        }
    }))
    .await
}

async fn node_listed(cp: &ControlPlane, id: &str) -> anyhow::Result<bool> {
    Ok(list_nodes(&cp.url()).await?.iter().any(|n| n["id"] == id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_a_herd_finishes_every_client_and_leaves_the_node_list_at_once() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(SIZE);
    fake.set_fault(&blob.digest, Fault::Pause { after: SIZE / 4 });
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &fake.url())).await?;
    let mut node = Node::spawn_with("n1", &[cp.url()], None, &["--shutdown-grace", "20s", "--idle-timeout", "30s"])?;
    node.wait_applied(rev, Duration::from_secs(10))?;
    poll(Duration::from_secs(5), "the node in the node list", || async {
        node_listed(&cp, "n1").await.ok()?.then_some(())
    })
    .await?;
    let url = node.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let started = herd(&url).await?;

    node.signal("TERM")?;
    let t = Instant::now();
    poll(Duration::from_secs(3), "the node to leave the node list", || async {
        (!node_listed(&cp, "n1").await.ok()?).then_some(())
    })
    .await?;
    let left = t.elapsed();
    eprintln!("left the node list {left:?} after SIGTERM");
    assert!(node.is_running(), "the node exited with {CLIENTS} responses in flight");

    fake.release();
    for (i, r) in finish(started).await.into_iter().enumerate() {
        let body = r.map_err(|(n, e)| anyhow::anyhow!("client {i} cut after {n} bytes: {e}"))?;
        assert_eq!(wharf_tests::sha256_digest(&body), blob.digest, "client {i}");
    }
    assert_eq!(fake.count("GET", &blob.digest), 1, "the herd made one upstream fetch");
    let status = node.wait_exit(Duration::from_secs(15))?;
    assert!(status.success(), "exit status {status}");

    // Restarted on the same cache: nothing in staging, the blob served from the cache.
    node.restart()?;
    assert!(node.staging_files().is_empty(), "{:?}", node.staging_files());
    let body = client().get(node.v2(&format!("lab/org/img/blobs/{}", blob.digest))).send().await?.bytes().await?;
    assert_eq!(wharf_tests::sha256_digest(&body), blob.digest);
    assert_eq!(fake.count("GET", &blob.digest), 1, "the restarted node fetched a cached blob again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_exits_at_once_and_no_partial_blob_survives() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(SIZE);
    fake.set_fault(&blob.digest, Fault::Pause { after: SIZE / 4 });
    let cp = ControlPlane::embedded()?;
    let rev = create_repo(&cp.url(), &repo_json("lab", &fake.url())).await?;
    let mut node = Node::spawn_with("n1", &[cp.url()], None, &["--shutdown-grace", "60s", "--idle-timeout", "60s"])?;
    node.wait_applied(rev, Duration::from_secs(10))?;
    let started = herd(&node.v2(&format!("lab/org/img/blobs/{}", blob.digest))).await?;

    node.signal("TERM")?;
    node.signal("INT")?;
    let status = node.wait_exit(Duration::from_secs(5))?;
    eprintln!("exit status after two signals: {status}");
    // Every client was cut short, and can tell: an error, never a clean end of a short body.
    for (i, r) in finish(started).await.into_iter().enumerate() {
        match r {
            Ok(body) => anyhow::bail!("client {i} got a clean end after {} of {SIZE} bytes", body.len()),
            Err((n, _)) => assert!(n < SIZE, "client {i}"),
        }
    }

    fake.release();
    node.restart()?;
    assert!(node.staging_files().is_empty(), "{:?}", node.staging_files());
    let body = client().get(node.v2(&format!("lab/org/img/blobs/{}", blob.digest))).send().await?.bytes().await?;
    assert_eq!(wharf_tests::sha256_digest(&body), blob.digest, "a partial blob was served after the restart");
    assert_eq!(fake.count("GET", &blob.digest), 2, "fetched again after the cut");
    Ok(())
}
