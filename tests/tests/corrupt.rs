//! A cached blob changed on disk (a bad sector, a bad copy, a tampering hand) is never served whole:
//! the first read after the node starts hashes the file while it streams and holds the last chunk
//! back until the digest matched. On a mismatch the response is cut, the file removed, and the next
//! request fetches the blob again. A range of such a file is checked before any byte goes out, and
//! fetched again at once.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use wharf_tests::checks::expect_clean_failure;
use wharf_tests::http::{get, get_outcome};
use wharf_tests::proxy::repo_config;
use wharf_tests::{FakeUpstream, Proxy, ProxyOptions, TestImage};

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Four bytes changed in the middle.
    Overwrite,
    Truncate,
    Extend,
}

fn damage(path: &Path, how: Damage) -> anyhow::Result<()> {
    let len = std::fs::metadata(path)?.len();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    match how {
        Damage::Overwrite => {
            f.seek(SeekFrom::Start(len / 2))?;
            f.write_all(&[0xde, 0xad, 0xbe, 0xef])?;
        }
        Damage::Truncate => f.set_len(len / 2)?,
        Damage::Extend => {
            f.seek(SeekFrom::End(0))?;
            f.write_all(b"trailing garbage")?;
        }
    }
    f.sync_all()?;
    Ok(())
}

fn node(upstream: &str, cache: &Path) -> anyhow::Result<Proxy> {
    Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(cache.to_path_buf()),
        ..ProxyOptions::new(&repo_config("lab", upstream, "generic", "5m"), &[])
    })
}

fn blob_file(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_changed_on_disk_is_cut_removed_and_fetched_again() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[600_000])?;
    fake.put_image("org/img", &image);
    let root = tempfile::tempdir()?;
    let cache = root.path().join("cache");
    let blob = &image.layers[0];
    let path = blob_file(&cache, &blob.digest);
    let fetches = || fake.count("GET", &format!("/blobs/{}", blob.digest));

    for how in [Damage::Overwrite, Damage::Truncate, Damage::Extend] {
        {
            let proxy = node(&fake.url(), &cache)?;
            let r = get(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[]).await?;
            assert_eq!((r.status, r.digest()), (200, blob.digest.clone()), "{how:?}: the first pull");
        }
        assert!(path.exists(), "{how:?}: the blob was not cached");
        damage(&path, how)?;
        // Restarted: the file is read as it is on disk now.
        let proxy = node(&fake.url(), &cache)?;
        let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
        let before = fetches();
        let out = get_outcome(&url, &[]).await;
        expect_clean_failure(&out, blob).map_err(|e| anyhow::anyhow!("{how:?}: {e}\n{}", proxy.log_tail(20)))?;
        assert!(!path.exists(), "{how:?}: the corrupt file is still there");
        let logged = proxy.log_tail(50);
        assert!(logged.contains("does not match its digest"), "{how:?}: not logged:\n{logged}");
        // The next request fetches it again, whole and right; the one after is a plain hit.
        let r = get(&url, &[]).await?;
        assert_eq!((r.status, r.digest()), (200, blob.digest.clone()), "{how:?}: after removal");
        assert_eq!(fetches(), before + 1, "{how:?}: fetched again once");
        let r = get(&url, &[]).await?;
        assert_eq!(r.digest(), blob.digest, "{how:?}: the refetched copy");
        assert_eq!(fetches(), before + 1, "{how:?}: the refetched copy is trusted");
        let metrics = get(&format!("{}/metrics", proxy.url()), &[]).await?.text();
        assert!(metrics.contains("wharf_cache_corrupt_total{kind=\"blob\"} 1"), "{how:?}: not counted:\n{metrics}");
    }

    // A range of a changed file: checked before any byte goes out, and served right at once (the
    // file removed and the blob fetched again).
    drop(node(&fake.url(), &cache)?);
    damage(&path, Damage::Overwrite)?;
    let proxy = node(&fake.url(), &cache)?;
    let url = proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest));
    let r = get(&url, &[("range", "bytes=100-199")]).await?;
    assert_eq!(r.status, 206, "{}", r.text());
    assert_eq!(r.body, blob.data[100..200], "the range came from the changed file");
    let r = get(&url, &[]).await?;
    assert_eq!(r.digest(), blob.digest);
    Ok(())
}

async fn scrape(proxy: &Proxy) -> anyhow::Result<wharf_tests::prom::Scrape> {
    wharf_tests::prom::Scrape::parse(&get(&format!("{}/metrics", proxy.url()), &[]).await?.text())
}

/// The scrubber, on a running node: a blob and a manifest changed on disk are found and removed
/// within its interval, and it reads no faster than `--scrub-rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scrubber_removes_what_changed_on_disk_at_its_rate() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[700_000, 700_000])?;
    fake.put_image("org/img", &image);
    let root = tempfile::tempdir()?;
    let cache = root.path().join("cache");
    let proxy = Proxy::spawn_with(ProxyOptions {
        cache_dir: Some(cache.clone()),
        ..ProxyOptions::new(
            &repo_config("lab", &fake.url(), "generic", "5m"),
            &["--scrub-rate", "1", "--scrub-interval", "300ms"],
        )
    })?;
    let m = get(&proxy.v2("lab/org/img/manifests/v1"), &[("accept", wharf_tests::image::OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    for b in image.blobs() {
        assert_eq!(get(&proxy.v2(&format!("lab/org/img/blobs/{}", b.digest)), &[]).await?.digest(), b.digest);
    }
    let hex = |d: &str| d.trim_start_matches("sha256:").to_owned();
    let manifest_file = cache.join("manifests/sha256").join(&hex(image.digest())[..2]).join(hex(image.digest()));
    let bad_blob = blob_file(&cache, &image.layers[1].digest);
    damage(&bad_blob, Damage::Overwrite)?;
    std::fs::write(&manifest_file, b"{\"schemaVersion\":2,\"changed\":true}")?;

    // Its rate: bytes read over a window, at 1 MB/s, with one read step (1 MiB) of slack.
    let (t0, b0) = (std::time::Instant::now(), scrape(&proxy).await?.sum("wharf_scrub_bytes_total"));
    wharf_tests::wait_until_async(std::time::Duration::from_secs(20), "the scrubber to remove both", || {
        (!bad_blob.exists() && !manifest_file.exists()).then_some(())
    })
    .await?;
    let (t1, b1) = (t0.elapsed().as_secs_f64(), scrape(&proxy).await?.sum("wharf_scrub_bytes_total"));
    assert!(b1 - b0 <= 1e6 * t1 + (1 << 20) as f64, "read {} bytes in {t1:.2} s at --scrub-rate 1", b1 - b0);
    let s = scrape(&proxy).await?;
    assert_eq!(s.get("wharf_cache_corrupt_total", &[("kind", "blob")]), Some(1.0));
    assert_eq!(s.get("wharf_cache_corrupt_total", &[("kind", "manifest")]), Some(1.0));
    assert!(s.sum("wharf_scrub_checked_total") >= 4.0, "{:?}", s.family("wharf_scrub_checked_total"));
    // What it removed comes back whole from upstream.
    let r = get(&proxy.v2(&format!("lab/org/img/blobs/{}", image.layers[1].digest)), &[]).await?;
    assert_eq!(r.digest(), image.layers[1].digest);
    Ok(())
}

/// A manifest changed on disk is a miss after a restart: by tag and by digest, the right manifest
/// comes back (fetched again), never the changed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_changed_on_disk_is_fetched_again() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[1_000])?;
    fake.put_image("org/img", &image);
    let root = tempfile::tempdir()?;
    let cache = root.path().join("cache");
    let accept = [("accept", wharf_tests::image::OCI_MANIFEST)];
    let hex = image.digest().trim_start_matches("sha256:").to_owned();
    let file = cache.join("manifests/sha256").join(&hex[..2]).join(&hex);
    for reference in ["v1", image.digest()] {
        {
            let proxy = node(&fake.url(), &cache)?;
            let r = get(&proxy.v2("lab/org/img/manifests/v1"), &accept).await?;
            assert_eq!(r.body, image.manifest.data);
        }
        std::fs::write(&file, b"{\"schemaVersion\":2,\"changed\":true}")?;
        let proxy = node(&fake.url(), &cache)?;
        let r = get(&proxy.v2(&format!("lab/org/img/manifests/{reference}")), &accept).await?;
        assert_eq!(r.status, 200, "{reference}: {}", r.text());
        assert_eq!(r.body, image.manifest.data, "{reference}: the changed bytes were served");
    }
    Ok(())
}
