//! Real clients use a node as their registry mirror: dockerd with `registry-mirrors` (Docker Hub
//! names at the node's root), containerd (`ctr`) with one `_default` hosts.toml for every registry
//! (`?ns=` on every request). Local distribution registries stand in for docker.io and ghcr.io;
//! nothing can fall back to the internet here, so a pull that succeeds came through the node.

use std::time::{Duration, Instant};

use serde_json::Value;
use wharf_tests::docker::{Dockerd, DockerdOptions, write_hosts_toml};
use wharf_tests::{Proxy, Registry, TestImage};

fn routed(proxy: &Proxy, route: &str, repo_key: &str) -> Vec<Value> {
    proxy.request_logs().into_iter().filter(|l| l["route"] == route && l["repo_key"] == repo_key).collect()
}

#[test]
fn dockerd_registry_mirrors_pull_docker_hub_names_through_the_node() -> anyhow::Result<()> {
    let hub = Registry::start()?;
    let small = TestImage::random_rootfs("1", &[20_000])?;
    small.push(&hub.host(), "library/small")?;
    let app = TestImage::random_rootfs("1", &[15_000])?;
    app.push(&hub.host(), "someuser/app")?;
    let proxy = Proxy::spawn(
        &format!("[[repo]]\nkey = \"dockerhub\"\nkind = \"dockerhub\"\nupstream = \"{}\"\n", hub.url()),
        &[],
    )?;
    let dockerd = Dockerd::start(DockerdOptions { registry_mirrors: vec![proxy.url()], ..Default::default() })?;

    for (reference, image, name) in [("small:1", &small, "library/small"), ("someuser/app:1", &app, "someuser/app")] {
        if let Err(e) = dockerd.pull(reference) {
            panic!("docker pull {reference}: {e}\n{}\nnode:\n{}", dockerd.log_tail(30), proxy.log_tail(30));
        }
        let digests = dockerd.image_digests(reference).map_err(anyhow::Error::msg)?;
        assert!(digests.iter().any(|d| d.ends_with(image.digest())), "{reference}: RepoDigests {digests:?}");
        hub.sync_log()?;
        assert!(hub.count("GET", &format!("/v2/{name}/manifests/")) >= 1, "{reference} never reached the upstream");
    }
    let lines = routed(&proxy, "default", "dockerhub");
    assert!(lines.iter().any(|l| l["name"] == "library/small" && l["kind"] == "blob"), "{lines:#?}");
    assert!(lines.iter().any(|l| l["name"] == "someuser/app"), "{lines:#?}");
    Ok(())
}

#[test]
fn containerd_default_hosts_toml_routes_registries_by_ns() -> anyhow::Result<()> {
    let (hub, gh) = (Registry::start()?, Registry::start()?);
    let small = TestImage::random_rootfs("1", &[20_000])?;
    small.push(&hub.host(), "library/small")?;
    let app = TestImage::random_rootfs("v1", &[25_000])?;
    app.push(&gh.host(), "team/app")?;
    let config = format!(
        "[[repo]]\nkey = \"hub\"\nkind = \"dockerhub\"\nupstream = \"{}\"\n\n[[repo]]\nkey = \"gh\"\nkind = \"ghcr\"\nupstream = \"{}\"\n",
        hub.url(),
        gh.url()
    );
    let proxy = Proxy::spawn(&config, &["--mirror-listen", "127.0.0.1:0"])?;
    let mirror = proxy.mirror_addr()?;
    let dockerd = Dockerd::start(DockerdOptions::default())?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), "_default", &format!("http://{mirror}"), false)?;

    for (reference, image, key) in [("docker.io/library/small:1", &small, "hub"), ("ghcr.io/team/app:v1", &app, "gh")] {
        if let Err(e) = dockerd.ctr_pull(reference, hosts.path()) {
            panic!("ctr pull {reference}: {e}\nnode:\n{}", proxy.log_tail(30));
        }
        assert_eq!(dockerd.ctr_image_digest(reference).map_err(anyhow::Error::msg)?, image.digest(), "{reference}");
        assert!(!routed(&proxy, "ns", key).is_empty(), "{reference} was not routed by ns to {key}");
    }
    // A registry no repo mirrors: the node says 404 at once and containerd gives up on it (its own
    // fallback, the registry itself, is unreachable here).
    let t = Instant::now();
    assert!(dockerd.ctr_pull("quay.example/x/y:1", hosts.path()).is_err());
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    let refused = proxy.request_logs().into_iter().find(|l| l["status"] == 404 && l["path"] == "/v2/x/y/manifests/1");
    assert!(refused.is_some_and(|l| l["error"].as_str().unwrap_or("").contains("mirrors quay.example")));
    Ok(())
}
