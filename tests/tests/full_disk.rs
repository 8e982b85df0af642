//! A node whose cache disk is full is a plain proxy for what does not fit, never a source of 500s;
//! errors never show a path on the node's disk; upstream statuses map to what a client can act on;
//! HTTP/1.1 requests need exactly one `Host`.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use wharf_tests::fake::FaultRule;
use wharf_tests::http::{get, head};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::prom::{Scrape, key};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Fault, Proxy, ProxyOptions, Registry, TestImage};

/// A small tmpfs mounted for the test, unmounted (and its mount point removed) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("wharf-full-disk-").tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes},mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .context("running mount (the test needs root, as make test runs it)")?;
        ensure!(out.status.success(), "mount -t tmpfs failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file that takes all the free space but `leave` bytes.
    fn fill(&self, leave: u64) -> anyhow::Result<PathBuf> {
        let st = rustix_free(self.path())?;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = st.saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
        f.sync_all().ok();
        Ok(filler)
    }
}

/// Free bytes on the filesystem of `path` (`df` in bytes).
fn rustix_free(path: &Path) -> anyhow::Result<u64> {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(path).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).and_then(|l| l.trim().parse().ok()).context("parsing df's output")
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

async fn manifest(proxy: &Proxy, path: &str) -> anyhow::Result<(u16, String, String)> {
    let r = get(&proxy.v2(path), &[("accept", OCI_MANIFEST)]).await?;
    Ok((r.status, r.digest(), r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_serves_manifests_and_tags_uncached_then_caches_again() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let (cached, cold) = (TestImage::random("v1", &[1000])?, TestImage::random("v2", &[1000])?);
    cached.push(&registry.host(), "team/app")?;
    cold.push(&registry.host(), "team/app")?;
    let disk = Tmpfs::mount(8 * 1024 * 1024)?;
    let cache = disk.path().join("cache");
    let proxy = Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(cache.clone()),
        ..ProxyOptions::new(&repo_config("lab", &registry.url(), "generic", "1s"), &[])
    })?;
    let (status, digest, _) = manifest(&proxy, "lab/team/app/manifests/v1").await?;
    assert_eq!((status, digest.as_str()), (200, cached.digest()));
    assert!(proxy.cached_manifest(cached.digest()).is_some());

    let filler = disk.fill(0)?;
    // Not cached yet: by tag and by digest, from upstream, whole, and still not cached.
    for path in ["lab/team/app/manifests/v2".to_owned(), format!("lab/team/app/manifests/{}", cold.digest())] {
        let (status, digest, body) = manifest(&proxy, &path).await?;
        assert_eq!((status, digest.as_str()), (200, cold.digest()), "{path}: {body}");
    }
    assert!(proxy.cached_manifest(cold.digest()).is_none(), "cached on a full disk?");
    // Cached, its tag past its TTL: revalidated upstream, served although the tag file cannot be
    // written.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, digest, body) = manifest(&proxy, "lab/team/app/manifests/v1").await?;
    assert_eq!((status, digest.as_str()), (200, cached.digest()), "{body}");
    // Blobs of the cold image: served uncached.
    for blob in cold.blobs() {
        let r = get(&proxy.v2(&format!("lab/team/app/blobs/{}", blob.digest)), &[]).await?;
        assert_eq!((r.status, wharf_tests::sha256_digest(&r.body)), (200, blob.digest.clone()));
    }
    let lines = proxy.request_logs();
    assert!(lines.iter().any(|l| l["cache"] == "bypass" && l["kind"] == "manifest"), "{lines:#?}");
    assert!(lines.iter().all(|l| l["status"] != 500), "a 500 on a full disk: {lines:#?}");
    proxy.wait_log_line(Duration::from_secs(5), "cache writes fail")?;
    let warned = proxy.logs().iter().filter(|v| v.to_string().contains("cache writes fail")).count();
    assert_eq!(warned, 1, "one warning per episode");
    let scrape = Scrape::parse(&get(&format!("{}/metrics", proxy.url()), &[]).await?.text())?;
    assert!(
        scrape
            .samples
            .get(&key("wharf_cache_write_failures_total", &[("kind", "manifest")]))
            .is_some_and(|v| *v >= 2.0)
    );

    // Room again: cached from the next pull on.
    std::fs::remove_file(filler)?;
    let (status, _, _) = manifest(&proxy, "lab/team/app/manifests/v2").await?;
    assert_eq!(status, 200);
    assert!(proxy.cached_manifest(cold.digest()).is_some(), "not cached once there was room");
    proxy.wait_request_log(Duration::from_secs(5), |l| l["cache"] == "miss" && l["kind"] == "manifest")?;
    proxy.wait_log_line(Duration::from_secs(5), "cache writes succeed again")?;
    // No response ever named the cache's path.
    let cache_path = cache.display().to_string();
    assert!(proxy.request_logs().iter().all(|l| !l["error"].as_str().unwrap_or("").contains(&cache_path)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_statuses_map_to_what_a_client_can_act_on() -> anyhow::Result<()> {
    // distribution answers 405 to a HEAD of tags/list: the client gets 405, not 502.
    let registry = Registry::start()?;
    TestImage::random("v1", &[1000])?.push(&registry.host(), "team/app")?;
    let proxy = Proxy::spawn(&repo_config("lab", &registry.url(), "generic", "5m"), &[])?;
    let r = head(&proxy.v2("lab/team/app/tags/list"), &[]).await?;
    assert_eq!(r.status, 405);
    assert_eq!(get(&proxy.v2("lab/team/app/tags/list"), &[]).await?.status, 200);

    let fake = FakeUpstream::start().await?;
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &["--retries", "0"])?;
    for (upstream, client) in [(400, 400), (403, 403), (409, 409), (410, 410), (501, 405), (500, 502), (503, 502)] {
        let blob = fake.add_random_blob(1000);
        fake.add_fault(FaultRule {
            pattern: blob.digest.clone(),
            methods: None,
            fault: Fault::Status { status: upstream, retry_after: None },
            times: None,
        });
        let r = get(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[]).await?;
        assert_eq!(r.status, client, "upstream {upstream}: {}", r.text());
        let detail = r.json()?["errors"][0]["detail"].clone();
        assert!(detail.get("upstream_url").is_some(), "upstream {upstream}: no upstream detail: {}", r.text());
    }
    Ok(())
}

/// One raw HTTP/1.1 exchange with `head` as the request head; the response's status.
fn raw_status(addr: std::net::SocketAddr, head: &str) -> anyhow::Result<u16> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(head.as_bytes())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("no status in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_requests_need_exactly_one_host() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let proxy = Proxy::spawn(&repo_config("lab", &registry.url(), "generic", "5m"), &[])?;
    let addr = proxy.addr();
    let path = "/v2/lab/team/app/manifests/v1";
    assert_eq!(raw_status(addr, &format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n"))?, 400, "no Host");
    let two = format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n");
    assert_eq!(raw_status(addr, &two)?, 400, "two Hosts");
    assert_eq!(raw_status(addr, "GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n")?, 400, "no Host on the ping");
    assert_eq!(raw_status(addr, "GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")?, 400, "no Host elsewhere");
    assert_eq!(raw_status(addr, &format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))?, 200);
    // HTTP/1.0 needs none.
    assert_eq!(raw_status(addr, "GET /v2/ HTTP/1.0\r\n\r\n")?, 200);
    Ok(())
}

/// Eight cold pulls at once into 4 MB of free space: the fetches reserve what they need, so the
/// ones that do not fit are served uncached from the start and none is cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_into_little_room_are_all_whole() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blobs: Vec<_> = (0..8).map(|_| fake.add_random_blob(1024 * 1024)).collect();
    let later = fake.add_random_blob(1024 * 1024);
    let disk = Tmpfs::mount(32 * 1024 * 1024)?;
    let proxy = Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(disk.path().join("cache")),
        ..ProxyOptions::new(&repo_config("lab", &fake.url(), "generic", "5m"), &[])
    })?;
    let filler = disk.fill(4 * 1024 * 1024)?;
    let urls: Vec<String> = blobs.iter().map(|b| proxy.v2(&format!("lab/org/img/blobs/{}", b.digest))).collect();
    let pulls = urls.iter().map(|u| get(u, &[]));
    for (blob, r) in blobs.iter().zip(futures_util::future::join_all(pulls).await) {
        let r = r?;
        assert_eq!((r.status, wharf_tests::sha256_digest(&r.body)), (200, blob.digest.clone()));
    }
    let lines = proxy.request_logs();
    assert!(lines.iter().all(|l| l["complete"] == true), "a response cut short: {lines:#?}");
    let cached = blobs.iter().filter(|b| proxy.cached_blob(&b.digest).is_some()).count();
    assert!((1..8).contains(&cached), "{cached} of 8 cached into 4 MB");
    assert!(lines.iter().any(|l| l["cache"] == "bypass"), "{lines:#?}");
    // Room again: the next blob cached ends the episode (no manifest needed for that).
    std::fs::remove_file(filler)?;
    let r = get(&proxy.v2(&format!("lab/org/img/blobs/{}", later.digest)), &[]).await?;
    assert_eq!((r.status, wharf_tests::sha256_digest(&r.body)), (200, later.digest.clone()));
    wharf_tests::wait_until_async(Duration::from_secs(5), "the end of the episode in the log", || {
        proxy.logs().iter().any(|v| v.to_string().contains("cache writes succeed again")).then_some(())
    })
    .await?;
    Ok(())
}

/// The disk fills (by something else) in the middle of a fetch: its clients' responses go on from
/// upstream where each client is, whole, and nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filling_mid_fetch_cuts_no_response() -> anyhow::Result<()> {
    const SIZE: usize = 4 * 1024 * 1024;
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(SIZE);
    fake.add_fault(FaultRule {
        pattern: blob.digest.clone(),
        methods: Some(vec![axum::http::Method::GET]),
        fault: Fault::Pause { after: SIZE / 4 },
        times: Some(1),
    });
    let disk = Tmpfs::mount(32 * 1024 * 1024)?;
    let proxy = Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(disk.path().join("cache")),
        ..ProxyOptions::new(&repo_config("lab", &fake.url(), "generic", "5m"), &[])
    })?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, &[]).await })
        })
        .collect();
    // The fetch wrote its first quarter and waits: now the disk fills.
    let staging = disk.path().join("cache/staging");
    wharf_tests::wait_until_async(Duration::from_secs(10), "the fetch's first quarter on disk", || {
        let size: u64 =
            wharf_tests::files_under(&staging).iter().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum();
        (size >= (SIZE / 4) as u64).then_some(())
    })
    .await?;
    disk.fill(0)?;
    fake.release();
    for c in clients {
        let r = c.await??;
        assert_eq!((r.status, wharf_tests::sha256_digest(&r.body)), (200, blob.digest.clone()));
    }
    assert!(proxy.request_logs().iter().all(|l| l["complete"] == true), "{:#?}", proxy.request_logs());
    assert!(proxy.cached_blob(&blob.digest).is_none());
    Ok(())
}

/// The node list says which node's disk is full (from the node's report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_list_shows_a_full_disk() -> anyhow::Result<()> {
    use wharf_tests::control::{ControlPlane, Node, create_repo, list_nodes, poll, repo_json};
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[1000])?;
    image.push(&registry.host(), "team/app")?;
    let disk = Tmpfs::mount(8 * 1024 * 1024)?;
    let cp = ControlPlane::embedded()?;
    let node = Node::spawn_with("full", &[cp.url()], Some(&disk.path().join("cache")), &[])?;
    create_repo(&cp.url(), &repo_json("lab", &registry.url())).await?;
    disk.fill(0)?;
    let url = node.v2("lab/team/app/manifests/v1");
    poll(Duration::from_secs(10), "the node to serve the repo", || async {
        let r = get(&url, &[("accept", OCI_MANIFEST)]).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await?;
    // Reports go every 10 s.
    poll(Duration::from_secs(25), "the node list to show the full disk", || async {
        let nodes = list_nodes(&cp.url()).await.ok()?;
        nodes.iter().any(|n| n["id"] == "full" && n["cache_degraded"] == true).then_some(())
    })
    .await?;
    Ok(())
}
