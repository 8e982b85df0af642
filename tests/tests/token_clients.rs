//! Real clients against the node's token service (`/v2/token`), on a node that serves a public
//! repo, an `access = "token"` repo and a passthrough repo at once: dockerd pulls the public one
//! without a login, and the others only after `docker login` with what each needs (a puller token;
//! upstream credentials the upstream accepts); skopeo the same with `--src-creds`. The node runs
//! from a stored snapshot (its control planes do not exist), so puller tokens need no control plane
//! here; the upstream is an in-process registry that knows alice and bob. containerd (`ctr`) and
//! podman pull through it as a mirror; oras (oras-py) directly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;

use serde_json::{Value, json};
use wharf_tests::control::{Node, free_port};
use wharf_tests::docker::{Dockerd, DockerdOptions, write_hosts_toml};
use wharf_tests::image::skopeo_try_copy;
use wharf_tests::podman::Podman;
use wharf_tests::process::run_with_timeout;
use wharf_tests::{AuthMode, FakeUpstream, TestImage, random_name, sha256_hex};

struct Setup {
    _fake: FakeUpstream,
    node: Node,
    _cache: tempfile::TempDir,
    public: TestImage,
    private: TestImage,
    secret: TestImage,
    puller: String,
    alice_pw: String,
    bob_pw: String,
}

/// `open/pub/app` (public), `priv/team/app` (token: the puller covers `priv/team`), `pt/team/secret`
/// (passthrough: alice only).
async fn setup() -> anyhow::Result<Setup> {
    // Docker Hub's dialect: a token endpoint that takes the users' Basic credentials.
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let (public, private, secret) = (
        TestImage::random_rootfs("v1", &[12_000])?,
        TestImage::random_rootfs("v1", &[13_000])?,
        TestImage::random_rootfs("v1", &[14_000])?,
    );
    fake.put_image("pub/app", &public);
    fake.put_image("team/app", &private);
    fake.put_image("team/secret", &secret);
    let (alice_pw, bob_pw) = (random_name("alice-"), random_name("bob-"));
    fake.add_user("alice", &alice_pw);
    fake.add_user("bob", &bob_pw);
    fake.make_private("team/secret", &["alice"]);

    let secret_part = format!("{}{}", random_name("s"), "x".repeat(32));
    let id = "00000000000000c1";
    let puller = format!("wharf_{id}_{secret_part}");
    // Each also mirrors a registry host, for containerd's `_default` hosts.toml (`?ns=`).
    let repo = |key: &str, access: &str, auth: &str, mirrors: &str| {
        json!({ "key": key, "kind": "generic", "upstream": fake.url(), "tag_ttl_secs": 300, "access": access,
                "auth": auth, "mirror_of": [mirrors] })
    };
    let snapshot = json!({
        "revision": 3,
        "repos": [
            repo("open", "public", "static", "docker.io"),
            repo("priv", "token", "static", "ghcr.io"),
            repo("pt", "public", "passthrough", "quay.io"),
        ],
        "pullers": [{ "id": id, "secret_sha256": sha256_hex(secret_part.as_bytes()), "repos": ["priv/team"] }],
    });
    let cache = tempfile::tempdir()?;
    std::fs::write(cache.path().join("config.snapshot"), serde_json::to_vec(&snapshot)?)?;
    let dead = format!("http://127.0.0.1:{}", free_port()?);
    let node = Node::spawn_with("tokens", &[dead], Some(cache.path()), &[])?;
    node.wait_log(0, Duration::from_secs(10), |v| {
        v["fields"]["message"] == "serving the stored configuration snapshot"
    })?;
    Ok(Setup { _fake: fake, node, _cache: cache, public, private, secret, puller, alice_pw, bob_pw })
}

/// The node's request lines of `kind`.
fn lines(node: &Node, kind: &str) -> Vec<Value> {
    node.logs().into_iter().filter(|v| v["fields"]["kind"] == kind).collect()
}

#[test]
fn docker_pulls_public_repos_without_a_login_and_the_others_with_theirs() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(setup())?;
    let host = s.node.host();
    let dockerd = Dockerd::start(DockerdOptions::default())?;
    let fail = |what: &str, e: String| -> ! {
        panic!("{what}: {e}\ndockerd:\n{}\nnode:\n{}", dockerd.log_tail(30), s.node.log_tail(30))
    };
    let public = format!("{host}/open/pub/app:v1");
    let private = format!("{host}/priv/team/app:v1");
    let private_digest = format!("{host}/priv/team/app@{}", s.private.digest());
    let secret = format!("{host}/pt/team/secret:v1");
    let secret_digest = format!("{host}/pt/team/secret@{}", s.secret.digest());

    // Anonymous: the public repo, through an anonymous token; nothing else.
    dockerd.pull(&public).unwrap_or_else(|e| fail("anonymous public pull", e));
    let digests = dockerd.image_digests(&public).map_err(anyhow::Error::msg)?;
    assert!(digests.iter().any(|d| d.ends_with(s.public.digest())), "{digests:?}");
    assert!(lines(&s.node, "token").iter().any(|l| l["fields"]["authz"] == "anonymous"), "no anonymous token issued");
    for r in [&private, &private_digest, &secret, &secret_digest] {
        assert!(dockerd.pull(r).is_err(), "anonymous pull of {r} succeeded");
    }

    // A wrong puller token: the login fails.
    let wrong = format!("wharf_00000000000000c1_{}", "y".repeat(40));
    assert!(dockerd.login(&host, "ci", &wrong).is_err(), "docker login with a wrong puller token succeeded");

    // The puller token: the token repo, by tag and by digest.
    dockerd.login(&host, "ci", &s.puller).unwrap_or_else(|e| fail("docker login with the puller token", e));
    dockerd.pull(&private).unwrap_or_else(|e| fail("pull with the puller token", e));
    dockerd.pull(&private_digest).unwrap_or_else(|e| fail("pull by digest with the puller token", e));
    assert!(dockerd.pull(&secret).is_err(), "a puller token is never sent upstream: the passthrough repo refuses");
    dockerd.logout(&host).map_err(anyhow::Error::msg)?;

    // alice's upstream credentials: the passthrough repo (checked upstream, sealed in the token).
    dockerd.login(&host, "alice", &s.alice_pw).unwrap_or_else(|e| fail("docker login as alice", e));
    dockerd.pull(&secret).unwrap_or_else(|e| fail("alice's pull", e));
    assert!(dockerd.pull(&private).is_err(), "alice has no puller token");
    dockerd.logout(&host).map_err(anyhow::Error::msg)?;

    // bob, and alice with a wrong password, with the content cached and the local copies gone.
    dockerd.rmi(&secret).map_err(anyhow::Error::msg)?;
    dockerd.remove_all_content().map_err(anyhow::Error::msg)?;
    // A wrong password: the login itself fails (the upstream is asked, no repository named).
    assert!(dockerd.login(&host, "alice", "wrong-password").is_err(), "docker login with a wrong password succeeded");
    for (user, pw) in [("bob", s.bob_pw.as_str()), ("alice", "wrong-password")] {
        let _ = dockerd.login(&host, user, pw);
        for r in [&secret, &secret_digest] {
            assert!(dockerd.pull(r).is_err(), "{user} pulled {r}");
        }
        let _ = dockerd.logout(&host);
    }
    let bearer = lines(&s.node, "manifest").into_iter().filter(|l| l["fields"]["authz"] == "bearer").count();
    assert!(bearer >= 2, "no manifest was served on a node token");
    Ok(())
}

#[test]
fn skopeo_gets_tokens_anonymously_with_a_puller_token_and_with_upstream_credentials() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(setup())?;
    let host = s.node.host();
    let copy = |path: &str, creds: Option<&str>| skopeo_try_copy(&format!("docker://{host}/{path}:v1"), creds);

    let (ok, err) = copy("open/pub/app", None)?;
    assert!(ok, "anonymous copy of the public repo: {err}\n{}", s.node.log_tail(20));
    assert!(!copy("priv/team/app", None)?.0, "anonymous copy of the token repo");
    let (ok, err) = copy("priv/team/app", Some(&format!("ci:{}", s.puller)))?;
    assert!(ok, "puller token: {err}\n{}", s.node.log_tail(20));
    let (ok, err) = copy("pt/team/secret", Some(&format!("alice:{}", s.alice_pw)))?;
    assert!(ok, "alice: {err}\n{}", s.node.log_tail(20));
    let (ok, err) = copy("pt/team/secret", Some(&format!("bob:{}", s.bob_pw)))?;
    assert!(!ok, "bob copied alice's repo");
    assert!(err.contains("401") || err.to_lowercase().contains("unauthorized"), "{err}");
    assert!(!copy("pt/team/secret", Some("alice:wrong"))?.0, "a wrong password copied");

    let tokens = lines(&s.node, "token");
    for authz in ["anonymous", "token", "upstream", "refused"] {
        assert!(
            tokens.iter().any(|l| l["fields"]["authz"] == authz),
            "no token request with authz={authz}: {tokens:#?}"
        );
    }
    Ok(())
}

/// containerd in mirror mode: one `_default` hosts.toml sends every registry's images to the node
/// with `?ns=`; each 401's realm keeps the `ns`, so the token request resolves its scopes to the
/// repo that mirrors that registry. Public without credentials, the token repo with `--user`, the
/// passthrough repo with alice's upstream login (and not with bob's).
#[test]
fn containerd_mirror_pulls_get_tokens_for_the_registry_they_name() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(setup())?;
    let dockerd = Dockerd::start(DockerdOptions::default())?;
    let hosts = tempfile::tempdir()?;
    write_hosts_toml(hosts.path(), "_default", &format!("http://{}", s.node.host()), false)?;
    let pull = |reference: &str, user: Option<String>| {
        let user = user.map(|u| ["--user".to_owned(), u]);
        let extra: Vec<&str> = user.iter().flatten().map(String::as_str).collect();
        dockerd.ctr_pull_with(reference, hosts.path(), &extra)
    };
    let fail = |what: &str, e: String| -> ! { panic!("{what}: {e}\nnode:\n{}", s.node.log_tail(30)) };

    pull("docker.io/pub/app:v1", None).unwrap_or_else(|e| fail("anonymous public pull", e));
    assert_eq!(dockerd.ctr_image_digest("docker.io/pub/app:v1").map_err(anyhow::Error::msg)?, s.public.digest());
    assert!(pull("ghcr.io/team/app:v1", None).is_err(), "anonymous pull of the token repo");
    pull("ghcr.io/team/app:v1", Some(format!("ci:{}", s.puller))).unwrap_or_else(|e| fail("puller token", e));
    assert_eq!(dockerd.ctr_image_digest("ghcr.io/team/app:v1").map_err(anyhow::Error::msg)?, s.private.digest());
    assert!(pull("quay.io/team/secret:v1", Some(format!("bob:{}", s.bob_pw))).is_err(), "bob pulled alice's repo");
    pull("quay.io/team/secret:v1", Some(format!("alice:{}", s.alice_pw))).unwrap_or_else(|e| fail("alice", e));
    assert_eq!(dockerd.ctr_image_digest("quay.io/team/secret:v1").map_err(anyhow::Error::msg)?, s.secret.digest());

    // The per-registry form with the repoKey in the path (`override_path`): containerd asks a
    // token for the image's name and for the prefixed one; both resolve to the same repo.
    let per_registry = tempfile::tempdir()?;
    write_hosts_toml(per_registry.path(), "ghcr.io", &format!("http://{}/v2/priv", s.node.host()), true)?;
    dockerd.ctr_rmi("ghcr.io/team/app:v1").map_err(anyhow::Error::msg)?;
    let user = format!("ci:{}", s.puller);
    dockerd
        .ctr_pull_with("ghcr.io/team/app:v1", per_registry.path(), &["--user", &user])
        .unwrap_or_else(|e| fail("puller token, override_path", e));
    let keyed = s.node.logs().into_iter().any(|v| {
        v["fields"]["route"] == "key" && v["fields"]["repo_key"] == "priv" && v["fields"]["authz"] == "bearer"
    });
    assert!(keyed, "no keyed pull of priv on a node token");

    let tokens = lines(&s.node, "token");
    assert!(tokens.iter().any(|l| l["fields"]["authz"] == "token"), "{tokens:#?}");
    let served: Vec<Value> = s
        .node
        .logs()
        .into_iter()
        .filter(|v| v["fields"]["route"] == "ns" && v["fields"]["authz"] == "bearer")
        .collect();
    assert!(served.iter().any(|l| l["fields"]["repo_key"] == "priv"), "no ns-routed pull on a node token");
    Ok(())
}

/// podman with a mirror `location` without a path prefix (Docker Hub names at the node's root, the
/// default mirror), and one with the repoKey as prefix; anonymous for the public repo, `podman
/// login <node>` with the puller token for the token repo.
#[test]
fn podman_pulls_through_mirror_locations_with_tokens() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(setup())?;
    let host = s.node.host();
    let podman = Podman::with_mirrors(&[("docker.io", &host), ("ghcr.io", &format!("{host}/priv"))])?;
    let fail = |what: &str, e: String| -> ! { panic!("{what}: {e}\nnode:\n{}", s.node.log_tail(30)) };

    podman.pull("docker.io/pub/app:v1").unwrap_or_else(|e| fail("anonymous, no path prefix", e));
    let routed = s.node.logs().into_iter().any(|v| {
        v["fields"]["route"] == "default" && v["fields"]["repo_key"] == "open" && v["fields"]["status"] == 200
    });
    assert!(routed, "the public pull did not come through the default mirror");
    assert!(podman.pull("ghcr.io/team/app:v1").is_err(), "anonymous pull of the token repo");
    podman.login(&host, "ci", &s.puller).unwrap_or_else(|e| fail("podman login", e));
    podman.pull("ghcr.io/team/app:v1").unwrap_or_else(|e| fail("puller token", e));
    let bearer =
        s.node.logs().into_iter().any(|v| {
            v["fields"]["repo_key"] == "priv" && v["fields"]["authz"] == "bearer" && v["fields"]["status"] == 200
        });
    assert!(bearer, "the token repo was not pulled on a node token");
    Ok(())
}

/// `tests/tools/oras_pull.py` (oras-py, in `target/tools-venv`) pulls `name:v1` from the node:
/// whether it succeeded, and what it said. An error when it did not finish within `timeout`.
fn oras_pull(host: &str, name: &str, login: Option<(&str, &str)>, timeout: Duration) -> anyhow::Result<(bool, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace root")?;
    let python = root.join("target/tools-venv/bin/python");
    anyhow::ensure!(
        python.exists(),
        "{} is missing: `make test` (scripts/ensure-deps.sh test) installs it",
        python.display()
    );
    let mut cmd = Command::new(python);
    cmd.arg(root.join("tests/tools/oras_pull.py")).arg(host).arg(format!("{name}:v1"));
    if let Some((user, password)) = login {
        cmd.env("ORAS_USER", user).env("ORAS_PASSWORD", password);
    }
    let (status, out, err) = run_with_timeout(&mut cmd, timeout)?;
    Ok((status.success(), format!("{out}{err}")))
}

/// oras (oras-py: the oras CLI has no Debian package) against the token service: it gets its
/// tokens from the node's realm like docker does; blobs are checked against their digests.
#[test]
fn oras_gets_tokens_anonymously_with_a_puller_token_and_with_upstream_credentials() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let s = rt.block_on(setup())?;
    let host = s.node.host();
    let long = Duration::from_secs(60);
    let (ok, out) = oras_pull(&host, "open/pub/app", None, long)?;
    assert!(ok, "anonymous public pull: {out}\n{}", s.node.log_tail(20));
    let pulled: Value = serde_json::from_str(out.lines().last().unwrap_or_default())?;
    assert_eq!(pulled["blobs"].as_array().map(Vec::len), Some(s.public.blobs().count()), "{pulled}");
    assert!(!oras_pull(&host, "priv/team/app", None, long)?.0, "anonymous pull of the token repo");
    let (ok, out) = oras_pull(&host, "priv/team/app", Some(("ci", &s.puller)), long)?;
    assert!(ok, "puller token: {out}\n{}", s.node.log_tail(20));
    let (ok, out) = oras_pull(&host, "pt/team/secret", Some(("alice", &s.alice_pw)), long)?;
    assert!(ok, "alice: {out}\n{}", s.node.log_tail(20));
    // bob: the token endpoint refuses him (the upstream did); oras-py then retries with growing
    // sleeps (its own backoff), so it is stopped after a while. Nothing may have reached him.
    let seen = s.node.logs().len();
    let bob = oras_pull(&host, "pt/team/secret", Some(("bob", &s.bob_pw)), Duration::from_secs(10));
    assert!(!matches!(bob, Ok((true, _))), "bob pulled alice's repo");
    let after: Vec<Value> = s.node.logs().into_iter().skip(seen).collect();
    assert!(
        after.iter().any(|l| l["fields"]["kind"] == "token" && l["fields"]["status"] == 401),
        "bob's token was not refused"
    );
    assert!(
        !after.iter().any(|l| l["fields"]["repo_key"] == "pt" && l["fields"]["status"] == 200),
        "content reached bob"
    );
    let tokens = lines(&s.node, "token");
    for authz in ["anonymous", "token", "upstream"] {
        assert!(tokens.iter().any(|l| l["fields"]["authz"] == authz), "no token request with authz={authz}");
    }
    Ok(())
}
