//! skopeo (a real client) copies a multi-layer image through the node from a real distribution
//! registry, by tag and by digest; a second copy is served from the cache alone.

use wharf_tests::proxy::repo_config;
use wharf_tests::{Proxy, Registry, TestImage, skopeo_copy_to_dir, verify_dir_copy};

const LAYERS: [usize; 3] = [300_000, 200_000, 250_000];

fn setup(name: &str) -> anyhow::Result<(Registry, TestImage, Proxy)> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &LAYERS)?;
    image.push(&registry.host(), name)?;
    let proxy = Proxy::spawn(&repo_config("lab", &registry.url(), "generic", "5m"), &[])?;
    Ok((registry, image, proxy))
}

/// GETs of each blob of `image` in the registry's log so far (pushing and inspecting read some).
fn blob_get_counts(registry: &Registry, image: &TestImage) -> anyhow::Result<Vec<usize>> {
    registry.sync_log()?;
    Ok(image.blobs().map(|b| registry.count("GET", &format!("/blobs/{}", b.digest))).collect())
}

/// Each blob of `image` was fetched from the registry exactly once since `before`.
fn assert_each_blob_fetched_once(registry: &Registry, image: &TestImage, before: &[usize]) -> anyhow::Result<()> {
    registry.sync_log()?;
    for (blob, before) in image.blobs().zip(before) {
        assert_eq!(
            registry.count("GET", &format!("/blobs/{}", blob.digest)) - before,
            1,
            "upstream GETs of {}; registry access log:\n{:#?}",
            blob.digest,
            registry.requests()
        );
    }
    Ok(())
}

#[test]
fn skopeo_copies_by_tag_and_a_second_copy_makes_no_upstream_blob_request() -> anyhow::Result<()> {
    let (registry, image, proxy) = setup("team/app")?;
    let src = format!("docker://{}/lab/team/app:v1", proxy.host());

    let before = blob_get_counts(&registry, &image)?;
    let first = tempfile::tempdir()?;
    skopeo_copy_to_dir(&src, first.path())?;
    verify_dir_copy(first.path(), &image)?;
    assert_each_blob_fetched_once(&registry, &image, &before)?;
    for blob in image.blobs() {
        assert!(
            proxy.cached_blob(&blob.digest).is_some(),
            "{} is not in {}/blobs",
            blob.digest,
            proxy.cache_dir().display()
        );
    }
    let blob_gets = registry.blob_gets();

    let second = tempfile::tempdir()?;
    skopeo_copy_to_dir(&src, second.path())?;
    verify_dir_copy(second.path(), &image)?;
    registry.sync_log()?;
    assert_eq!(registry.blob_gets(), blob_gets, "the second copy fetched blobs upstream:\n{:#?}", registry.requests());
    Ok(())
}

#[test]
fn skopeo_copies_by_digest_and_a_second_copy_asks_upstream_nothing() -> anyhow::Result<()> {
    let (registry, image, proxy) = setup("team/by-digest")?;
    let src = format!("docker://{}/lab/team/by-digest@{}", proxy.host(), image.digest());

    let before = blob_get_counts(&registry, &image)?;
    let first = tempfile::tempdir()?;
    skopeo_copy_to_dir(&src, first.path())?;
    verify_dir_copy(first.path(), &image)?;
    assert_each_blob_fetched_once(&registry, &image, &before)?;
    let upstream_requests = registry.requests().iter().filter(|r| r.uri.contains("/team/by-digest/")).count();

    let second = tempfile::tempdir()?;
    skopeo_copy_to_dir(&src, second.path())?;
    verify_dir_copy(second.path(), &image)?;
    registry.sync_log()?;
    // Content by digest is immutable: neither the manifest nor a blob is asked for again.
    let after = registry.requests().iter().filter(|r| r.uri.contains("/team/by-digest/")).count();
    assert_eq!(after, upstream_requests, "the second copy by digest reached the upstream:\n{:#?}", registry.requests());
    Ok(())
}

#[test]
fn skopeo_inspect_works_through_the_node() -> anyhow::Result<()> {
    let (_registry, image, proxy) = setup("team/inspect")?;
    let v = wharf_tests::skopeo_inspect(&format!("docker://{}/lab/team/inspect:v1", proxy.host()))?;
    assert_eq!(v["Digest"], image.digest());
    Ok(())
}
