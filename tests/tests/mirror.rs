//! The node as a registry mirror: requests whose path does not start with one of its repoKeys are
//! routed by containerd's `?ns=`, by the `Host` header (`<repoKey>.<domain>`), else to the default
//! mirror (the repo that mirrors docker.io, or `--default-mirror`), as dockerd's `registry-mirrors`
//! needs. Two real distribution registries stand in for docker.io and ghcr.io.

use wharf_tests::http::{get, head};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::{Proxy, Registry, TestImage};

struct Lab {
    hub: Registry,
    gh: Registry,
    small: TestImage,
    app: TestImage,
    namesake: TestImage,
}

/// `hub` mirrors docker.io (its upstream holds `library/small:1` and a user `gh`'s `gh/app:v1`),
/// `gh` mirrors ghcr.io (`team/app:v1`).
fn lab() -> anyhow::Result<Lab> {
    let (hub, gh) = (Registry::start()?, Registry::start()?);
    let small = TestImage::random("1", &[20_000])?;
    small.push(&hub.host(), "library/small")?;
    let namesake = TestImage::random("v1", &[10_000])?;
    namesake.push(&hub.host(), "gh/app")?;
    let app = TestImage::random("v1", &[30_000])?;
    app.push(&gh.host(), "team/app")?;
    Ok(Lab { hub, gh, small, app, namesake })
}

fn config(lab: &Lab, extra: &str) -> String {
    format!(
        "{extra}[[repo]]\nkey = \"hub\"\nkind = \"dockerhub\"\nupstream = \"{}\"\nmirror_of = [\"docker.io\"]\n\n\
         [[repo]]\nkey = \"gh\"\nkind = \"ghcr\"\nupstream = \"{}\"\n",
        lab.hub.url(),
        lab.gh.url()
    )
}

async fn manifest(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<(u16, String, String)> {
    let mut h = vec![("accept", OCI_MANIFEST)];
    h.extend_from_slice(headers);
    let r = get(url, &h).await?;
    let code = if r.status == 200 { String::new() } else { r.oci_code() };
    Ok((r.status, r.digest(), code))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_routes_by_ns_host_and_default() -> anyhow::Result<()> {
    let lab = lab()?;
    let proxy = Proxy::spawn(&config(&lab, ""), &[])?;
    let before = lab.gh.count("GET", "/v2/team/app/manifests/v1");

    // dockerd's registry-mirrors: Docker Hub names at the root, no ns: the default mirror (the
    // repo mirroring docker.io), the library/ rule applied.
    for name in ["library/small", "small"] {
        let (status, digest, code) = manifest(&proxy.v2(&format!("{name}/manifests/1")), &[]).await?;
        assert_eq!((status, digest.as_str(), code.as_str()), (200, lab.small.digest(), ""), "{name}");
    }
    let line = proxy.wait_request_log(std::time::Duration::from_secs(5), |f| f["route"] == "default")?;
    assert_eq!(line["repo_key"], "hub", "{line}");

    // containerd's _default hosts.toml: the upstream path at the root, ?ns= names the registry.
    let (status, digest, _) = manifest(&proxy.v2("team/app/manifests/v1?ns=ghcr.io"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    lab.gh.sync_log()?;
    assert_eq!(lab.gh.count("GET", "/v2/team/app/manifests/v1") - before, 1, "the ghcr.io stand-in was not asked");
    // Blobs too, and a HEAD (containerd resolves with one).
    let blob = lab.app.blobs().next().expect("a layer");
    let r = get(&proxy.v2(&format!("team/app/blobs/{}?ns=ghcr.io", blob.digest)), &[]).await?;
    assert_eq!((r.status, wharf_tests::sha256_digest(&r.body)), (200, blob.digest.clone()));
    let r = head(&proxy.v2("team/app/manifests/v1?ns=ghcr.io"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!((r.status, r.header("docker-content-digest")), (200, Some(lab.app.digest())));
    // The namespace it was routed by comes back in OCI-Namespace (the distribution spec's ns).
    assert_eq!(r.header("oci-namespace"), Some("ghcr.io"));

    // A registry no repo mirrors: 404 at once (containerd then tries its next host); not a
    // registry host at all: 400.
    let (status, _, code) = manifest(&proxy.v2("team/app/manifests/v1?ns=quay.example"), &[]).await?;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    for bad in ["..%2Fetc", "Docker.io", "docker.io:99999", "a..b", "docker.io/x"] {
        let (status, _, code) = manifest(&proxy.v2(&format!("team/app/manifests/v1?ns={bad}")), &[]).await?;
        assert!(status == 400 && code == "NAME_INVALID" || status == 404, "ns={bad}: {status} {code}");
    }

    // A repo reached by its own host name.
    let (status, digest, _) = manifest(&proxy.v2("team/app/manifests/v1"), &[("host", "gh.wharf.example")]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    // An IP or a one-label host names no repo: the default mirror.
    let (status, _, _) = manifest(&proxy.v2("team/app/manifests/v1"), &[("host", "127.0.0.1")]).await?;
    assert_eq!(status, 404, "team/app is not on the docker.io stand-in");

    // The path's own repoKey wins on the main port, also with an ns (containerd's override_path).
    let (status, digest, _) = manifest(&proxy.v2("gh/team/app/manifests/v1?ns=docker.io"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_port_reads_no_repo_key_and_the_main_port_does() -> anyhow::Result<()> {
    let lab = lab()?;
    let proxy = Proxy::spawn(&config(&lab, ""), &["--mirror-listen", "127.0.0.1:0"])?;
    let mirror = proxy.mirror_addr()?;
    // A Docker Hub user named like a repoKey ("gh"): the main port reads the repoKey, the mirror
    // port the Docker Hub name.
    let (status, digest, _) = manifest(&proxy.v2("gh/app/manifests/v1"), &[]).await?;
    assert_eq!(status, 404, "main port: repo gh has no app; got {digest}");
    let (status, digest, _) = manifest(&format!("http://{mirror}/v2/gh/app/manifests/v1"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.namesake.digest()), "mirror port: Docker Hub's gh/app");
    let (status, digest, _) = manifest(&format!("http://{mirror}/v2/team/app/manifests/v1?ns=ghcr.io"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    let r = get(&format!("http://{mirror}/v2/"), &[]).await?;
    assert_eq!(r.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_default_is_configurable_and_its_absence_is_a_clear_404() -> anyhow::Result<()> {
    let lab = lab()?;
    // --default-mirror wins over the repo mirroring docker.io.
    let proxy = Proxy::spawn(&config(&lab, ""), &["--default-mirror", "gh"])?;
    let (status, digest, _) = manifest(&proxy.v2("team/app/manifests/v1"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    drop(proxy);
    // The file's default_mirror, naming a repo of the file.
    let proxy = Proxy::spawn(&config(&lab, "default_mirror = \"gh\"\n\n"), &[])?;
    let (status, digest, _) = manifest(&proxy.v2("team/app/manifests/v1"), &[]).await?;
    assert_eq!((status, digest.as_str()), (200, lab.app.digest()));
    drop(proxy);

    // No repo mirrors docker.io and no default: a name that is no repoKey is a 404 saying so.
    let only_gh = format!("[[repo]]\nkey = \"gh\"\nkind = \"ghcr\"\nupstream = \"{}\"\n", lab.gh.url());
    let proxy = Proxy::spawn(&only_gh, &[])?;
    let r = get(&proxy.v2("library/small/manifests/1"), &[]).await?;
    assert_eq!((r.status, r.oci_code().as_str()), (404, "NAME_UNKNOWN"), "{}", r.text());
    assert!(r.text().contains("no default mirror"), "{}", r.text());
    let r = get(&proxy.v2("nope/x/manifests/1"), &[]).await?;
    assert!(r.text().contains("no repo \\\"nope\\\" is configured"), "{}", r.text());
    Ok(())
}

/// `mirror_of` through the control plane: REST and regctl set it (bad hosts refused, naming the
/// field), the node stream carries it, and a managed node routes `?ns=` by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_of_through_the_control_plane_routes_a_managed_node() -> anyhow::Result<()> {
    use wharf_tests::control::{ControlPlane, Node, expect_problem, poll, rest_json};
    let lab = lab()?;
    let cp = ControlPlane::embedded()?;
    let node = Node::spawn("mirror-node", &[cp.url()])?;
    let body =
        serde_json::json!({"key": "gh", "kind": "ghcr", "upstream": lab.gh.url(), "mirror_of": ["mirror.corp:5000"]});
    let r = rest_json("POST", &cp.api("/api/repos"), &[], &body).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()?["mirror_of"], serde_json::json!(["mirror.corp:5000"]));
    for bad in [serde_json::json!(["../x"]), serde_json::json!(["Docker.io"]), serde_json::json!("docker.io")] {
        let body = serde_json::json!({"key": "bad", "upstream": lab.gh.url(), "mirror_of": bad});
        let r = rest_json("POST", &cp.api("/api/repos"), &[], &body).await?;
        let field = if bad.is_array() { Some("mirror_of") } else { None };
        expect_problem(&r, 400, field)?;
    }
    let url = node.v2("team/app/manifests/v1?ns=mirror.corp:5000");
    poll(std::time::Duration::from_secs(10), "the node to route ns=mirror.corp:5000", || async {
        let (status, digest, _) = manifest(&url, &[]).await.ok()?;
        (status == 200 && digest == lab.app.digest()).then_some(())
    })
    .await?;
    // An explicit list replaces the defaults: ghcr.io is not mirrored by this repo.
    let (status, _, code) = manifest(&node.v2("team/app/manifests/v1?ns=ghcr.io"), &[]).await?;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));

    // regctl: set and clear the list.
    let rc = wharf_tests::regctl::Regctl::new(&cp.url()).with_env("WHARF_TOKEN", wharf_tests::control::admin_token());
    rc.run(&["repo", "update", "gh", "--mirror-of", "ghcr.io,mirror.corp:5000"]).await?.expect_code(0, "update")?;
    let got = rc.run(&["repo", "get", "gh", "-o", "json"]).await?.json()?;
    assert_eq!(got["mirror_of"], serde_json::json!(["ghcr.io", "mirror.corp:5000"]), "{got}");
    rc.run(&["repo", "update", "gh", "--mirror-of", "bad host"]).await?.expect_error("mirror_of", "a bad host")?;
    rc.run(&["repo", "update", "gh", "--default-mirror-of"]).await?.expect_code(0, "back to the defaults")?;
    let got = rc.run(&["repo", "get", "gh", "-o", "json"]).await?.json()?;
    assert!(got.get("mirror_of").is_none(), "{got}");
    Ok(())
}
