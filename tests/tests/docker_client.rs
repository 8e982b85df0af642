//! The real-client harness itself: a private dockerd pulls straight from a real distribution
//! registry, and its containerd (`ctr`) pulls through a hosts dir. No Wharf involved: these prove the
//! clients work here, so that mirror tests built on them fail only for Wharf's reasons. When dockerd
//! cannot run on this machine they fail, with why.

use wharf_tests::docker::{Dockerd, DockerdOptions, write_hosts_toml};
use wharf_tests::{Registry, TestImage};

fn registry_with_image() -> anyhow::Result<(Registry, TestImage)> {
    let registry = Registry::start()?;
    let image = TestImage::random_rootfs("v1", &[10_000])?;
    image.push(&registry.host(), "team/app")?;
    Ok((registry, image))
}

fn start_dockerd(opts: DockerdOptions) -> anyhow::Result<Dockerd> {
    let dockerd = Dockerd::start(opts)?;
    eprintln!(
        "dockerd ready after {:?} with storage driver {}{}",
        dockerd.startup_time(),
        dockerd.storage_driver(),
        if dockerd.failed_attempts().is_empty() {
            String::new()
        } else {
            format!(" (after: {})", dockerd.failed_attempts().join("; "))
        }
    );
    Ok(dockerd)
}

#[test]
fn dockerd_pulls_directly_from_a_local_registry() -> anyhow::Result<()> {
    let (registry, image) = registry_with_image()?;
    let dockerd = start_dockerd(DockerdOptions { insecure_registries: vec![registry.host()], ..Default::default() })?;
    let reference = format!("{}/team/app:v1", registry.host());

    if let Err(e) = dockerd.pull(&reference) {
        panic!("{e}\n{}\n{}", dockerd.log_tail(40), registry.log_tail(20));
    }
    let digests = dockerd.image_digests(&reference).map_err(anyhow::Error::msg)?;
    let want = format!("{}/team/app@{}", registry.host(), image.digest());
    assert!(digests.contains(&want), "RepoDigests {digests:?} lack {want}");
    registry.sync_log()?;
    assert!(
        registry.count("GET", &format!("/v2/team/app/manifests/{}", image.digest())) >= 1,
        "dockerd never fetched the manifest by digest: {:#?}",
        registry.requests()
    );
    Ok(())
}

#[test]
fn containerd_pulls_through_a_hosts_dir_default_entry() -> anyhow::Result<()> {
    let (registry, image) = registry_with_image()?;
    let dockerd = start_dockerd(DockerdOptions::default())?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), "_default", &registry.url(), false)?;

    let reference = format!("{}/team/app:v1", registry.host());
    if let Err(e) = dockerd.ctr_pull(&reference, hosts.path()) {
        panic!("{e}\n{}\n{}", dockerd.log_tail(40), registry.log_tail(20));
    }
    assert_eq!(dockerd.ctr_image_digest(&reference).map_err(anyhow::Error::msg)?, image.digest());

    // ctr reaches a plain-http registry on 127.0.0.1 even without a hosts dir, so the pull above does
    // not show that the hosts dir is read. An image of a registry that does not exist does: only the
    // `_default` mirror entry can serve it, and containerd names the image's registry in `ns`.
    let elsewhere = "registry.wharf-test.invalid/team/app:v1";
    if let Err(e) = dockerd.ctr_pull(elsewhere, hosts.path()) {
        panic!("{e}\n{}\n{}", dockerd.log_tail(40), registry.log_tail(20));
    }
    assert_eq!(dockerd.ctr_image_digest(elsewhere).map_err(anyhow::Error::msg)?, image.digest());
    registry.sync_log()?;
    assert!(
        registry.count("HEAD", "/v2/team/app/manifests/v1?ns=registry.wharf-test.invalid") == 1,
        "containerd did not resolve through the `_default` mirror entry: {:#?}",
        registry.requests()
    );
    Ok(())
}
