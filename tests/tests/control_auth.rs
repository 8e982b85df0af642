//! Tokens and the management API's access control, against a real `wharf-control` (embedded
//! store) and real managed nodes: tokens issued with `regctl token create` (shown once, stored as a
//! hash), each role on REST and gRPC (no token: 401 / UNAUTHENTICATED; too little: 403 /
//! PERMISSION_DENIED, with a message saying what is needed), a revoked token refused at once, a
//! node without a node token refused the configuration (it carries upstream credentials), and
//! `--insecure-no-auth` letting everything through, loudly; puller tokens opening `access = "token"`
//! repos on every node (Bearer or Basic password) until revoked.

use std::time::Duration;

use serde_json::json;
use tonic::Code;
use wharf_proto::v1 as pb;
use wharf_proto::v1::config_service_client::ConfigServiceClient;
use wharf_proto::v1::repo_service_client::RepoServiceClient;
use wharf_proto::v1::token_service_client::TokenServiceClient;
use wharf_tests::control::{
    ControlOptions, ControlPlane, Node, admin_token, create_repo, expect_problem, grpc_as, poll, repo_json, rest,
    rest_json, write_token_file,
};
use wharf_tests::http::Resp;
use wharf_tests::process::{fields, message};
use wharf_tests::regctl::Regctl;
use wharf_tests::{Registry, TestImage};

const UPSTREAM: &str = "http://127.0.0.1:1";

/// How long a change may take to reach a node.
const PROPAGATION: Duration = Duration::from_secs(5);
/// What the README promises for a revoked token to be refused by every node.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

/// `regctl token create ...`: the token printed on stdout.
async fn create_token(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let out = Regctl::new(&cp.url()).run(&all).await?;
    out.expect_code(0, "token create")?;
    let token = out.stdout.trim().to_owned();
    anyhow::ensure!(token.starts_with("wharf_"), "token create printed {out:?}");
    anyhow::ensure!(out.stderr.contains("shown once"), "no warning that the token is shown once: {out:?}");
    Ok(token)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_roles_on_rest_and_grpc_and_revocation() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let repos = cp.api("/api/repos");
    let reader = create_token(&cp, &["--role", "reader", "--description", "dashboards"]).await?;
    let puller = create_token(&cp, &["--role", "puller", "--repos", "ghcr/acme/*,quay", "--expires", "90d"]).await?;
    let node = create_token(&cp, &["--role", "node"]).await?;

    // No token, a malformed one, an unknown one: 401 with a challenge and a message.
    for auth in
        ["", "Bearer nope", "Basic YWRtaW46YWRtaW4=", &bearer(&format!("wharf_0123456789abcdef_{}", "0".repeat(64)))]
    {
        let r = rest("GET", &repos, &[("authorization", auth)], None).await?;
        let p = expect_problem(&r, 401, None)?;
        assert!(r.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")), "{auth:?}: {r:?}");
        assert!(p["detail"].as_str().is_some_and(|d| d.contains("token")), "{auth:?}: {p}");
    }
    // Health, readiness, metrics and the API description stay open.
    for path in ["/healthz", "/readyz", "/metrics", "/api/openapi.json"] {
        let r = rest("GET", &cp.api(path), &[("authorization", "")], None).await?;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }

    // reader: reads, but no writes.
    let reader_auth = bearer(&reader);
    let as_reader = [("authorization", reader_auth.as_str())];
    assert_eq!(rest("GET", &repos, &as_reader, None).await?.status, 200);
    assert_eq!(rest("GET", &cp.api("/api/nodes"), &as_reader, None).await?.status, 200);
    assert_eq!(rest("GET", &cp.api("/api/tokens"), &as_reader, None).await?.status, 200);
    let r = rest_json("POST", &repos, &as_reader, &repo_json("a", UPSTREAM)).await?;
    let p = expect_problem(&r, 403, None)?;
    assert!(p["detail"].as_str().is_some_and(|d| d.contains("admin")), "{p}");
    let r = rest_json("POST", &cp.api("/api/tokens"), &as_reader, &json!({"role": "admin"})).await?;
    expect_problem(&r, 403, None)?;
    // puller and node tokens are not for the management API.
    for t in [&puller, &node] {
        let r = rest("GET", &repos, &[("authorization", &bearer(t))], None).await?;
        expect_problem(&r, 403, None)?;
    }

    // The same over gRPC.
    let mut g = RepoServiceClient::new(grpc_as(&cp.url(), None).await?);
    let s = g.list_repos(pb::ListReposRequest {}).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let mut g = RepoServiceClient::new(grpc_as(&cp.url(), Some(&reader)).await?);
    g.list_repos(pb::ListReposRequest {}).await?;
    let create = pb::CreateRepoRequest {
        repo: Some(pb::Repo {
            key: "a".into(),
            kind: "generic".into(),
            upstream: UPSTREAM.into(),
            ..Default::default()
        }),
    };
    let s = g.create_repo(create.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut t = TokenServiceClient::new(grpc_as(&cp.url(), Some(&reader)).await?);
    let s = t.create_token(pb::CreateTokenRequest { role: "admin".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let mut c = ConfigServiceClient::new(grpc_as(&cp.url(), Some(&reader)).await?);
    let s = c.watch(pb::WatchRequest { node_id: "sneaky".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "a reader must not get the node configuration: {s:?}");
    // admin (the bootstrap token) may do everything.
    let mut g = RepoServiceClient::new(wharf_tests::control::grpc(&cp.url()).await?);
    g.create_repo(create).await?;

    // Bad token requests name the field.
    let tokens = cp.api("/api/tokens");
    for (body, field) in [
        (json!({}), "role"),
        (json!({"role": "root"}), "role"),
        (json!({"role": "admin", "repos": ["ghcr"]}), "repos"),
        (json!({"role": "puller", "repos": ["Bad Pattern"]}), "repos"),
        (json!({"role": "puller", "expires_in": "soon"}), "expires_in"),
        (json!({"role": "puller", "expires_in": "1s"}), "expires_in"),
        (json!({"role": "puller", "bogus": 1}), "bogus"),
    ] {
        let r = rest_json("POST", &tokens, &[], &body).await?;
        expect_problem(&r, 400, Some(field))?;
    }
    let r = rest_json("POST", &tokens, &[], &json!({"role": "reader", "description": "rest"})).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let created = r.json()?;
    assert!(created["token"].as_str().is_some_and(|t| t.starts_with("wharf_")), "{created}");

    // The list shows ids and roles, never a secret; the store holds hashes only.
    let list = Regctl::new(&cp.url()).run(&["token", "list", "-o", "json"]).await?;
    list.expect_code(0, "token list")?;
    let listed = list.json()?;
    assert_eq!(listed["tokens"].as_array().map(Vec::len), Some(5), "bootstrap, 3 by regctl, 1 by REST: {listed}");
    for secret in [&reader, &puller, &node] {
        let tail = secret.rsplit('_').next().unwrap_or_default();
        assert!(!list.stdout.contains(tail), "token list shows a secret");
        let stored = std::fs::read_dir(cp.data_dir())?
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .any(|bytes| bytes.windows(tail.len()).any(|w| w == tail.as_bytes()));
        assert!(!stored, "the store holds a token secret");
    }
    let table = Regctl::new(&cp.url()).run(&["token", "list"]).await?;
    assert!(table.stdout.contains("ghcr/acme/*,quay") && table.stdout.contains("dashboards"), "{}", table.stdout);

    // Revoked: refused at once (the replica follows its store), and revoking twice says so.
    let reader_id = reader.split('_').nth(1).unwrap_or_default().to_owned();
    Regctl::new(&cp.url()).run(&["token", "revoke", &reader_id]).await?.expect_code(0, "revoke")?;
    poll(Duration::from_secs(5), "the revoked token to be refused", || async {
        let r = rest("GET", &repos, &as_reader, None).await.ok()?;
        (r.status == 401).then_some(())
    })
    .await?;
    Regctl::new(&cp.url()).run(&["token", "revoke", &reader_id]).await?.expect_error("not found", "revoke twice")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_nodes_need_a_node_token() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let node_token = create_token(&cp, &["--role", "node"]).await?;
    let puller = create_token(&cp, &["--role", "puller"]).await?;
    let dir = tempfile::tempdir()?;
    let endpoints = [cp.url()];

    // A node with a puller token (or none) is refused and says how to fix it.
    let wrong = write_token_file(dir.path(), "puller.token", &puller)?;
    let refused =
        Node::spawn_with("refused", &endpoints, None, &["--control-plane-token-file", &wrong.to_string_lossy()])?;
    let error = |v: &serde_json::Value| fields(v)["error"].as_str().unwrap_or_default().to_owned();
    let event = refused.wait_log(0, Duration::from_secs(10), |v| error(v).contains("watch refused"))?;
    assert!(error(&event).contains("node token"), "{event}");
    assert!(refused.applied().is_empty(), "a refused node applied a configuration");

    // With a node token: the configuration arrives.
    let good = write_token_file(dir.path(), "node.token", &node_token)?;
    let node = Node::spawn_with("good", &endpoints, None, &["--control-plane-token-file", &good.to_string_lossy()])?;
    node.wait_applied(1, Duration::from_secs(10))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_insecure_no_auth_is_open_and_loud() -> anyhow::Result<()> {
    let cp = ControlPlane::spawn(ControlOptions { args: vec!["--insecure-no-auth".into()], ..Default::default() })?;
    let r = rest_json("POST", &cp.api("/api/repos"), &[("authorization", "")], &repo_json("a", UPSTREAM)).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    let warned =
        cp.logs().iter().any(|v| v["level"] == "WARN" && message(v).is_some_and(|m| m.contains("--insecure-no-auth")));
    assert!(warned, "no warning about --insecure-no-auth:\n{}", cp.log_tail(20));
    Ok(())
}

/// GET `<key>/<name>/manifests/<tag>` from `node` with `authorization` (empty: none): the status.
async fn manifest_status(node: &Node, key: &str, name: &str, tag: &str, authorization: &str) -> anyhow::Result<Resp> {
    let mut h = vec![("accept", wharf_tests::image::OCI_MANIFEST)];
    if !authorization.is_empty() {
        h.push(("authorization", authorization));
    }
    wharf_tests::http::get(&node.v2(&format!("{key}/{name}/manifests/{tag}")), &h).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_puller_tokens_open_token_repos_on_every_node_until_revoked() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[10_000])?;
    image.push(&registry.host(), "team/app")?;
    let cp = ControlPlane::embedded()?;
    let nodes = [Node::spawn("a", &[cp.url()])?, Node::spawn("b", &[cp.url()])?];
    let mut repo = repo_json("priv", &registry.url());
    repo["access"] = json!("token");
    let rev = create_repo(&cp.url(), &repo).await?;
    let created = |body: serde_json::Value| {
        let url = cp.api("/api/tokens");
        async move {
            let r = rest_json("POST", &url, &[], &body).await?;
            anyhow::ensure!(r.status == 201, "{}", r.text());
            r.json()
        }
    };
    let team = created(json!({"role": "puller", "repos": ["priv/team/*"]})).await?;
    let other = created(json!({"role": "puller", "repos": ["priv/other"]})).await?;
    let (team_token, other_token) =
        (team["token"].as_str().unwrap_or_default(), other["token"].as_str().unwrap_or_default());
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("ci:{team_token}"))
    );
    for node in &nodes {
        node.wait_applied(rev, PROPAGATION)?;
        poll(PROPAGATION, "the puller token to reach the node", || async {
            let r = manifest_status(node, "priv", "team/app", "v1", &bearer(team_token)).await.ok()?;
            (r.status == 200).then_some(())
        })
        .await?;
        // As the Basic password too (docker login <node> with any username).
        let r = manifest_status(node, "priv", "team/app", "v1", &basic).await?;
        assert_eq!(r.status, 200, "Basic on {}: {}", node.id(), r.text());
        assert_eq!(r.digest(), image.digest());
        // Without a token: the Bearer challenge, so clients get a token from the node.
        let r = manifest_status(node, "priv", "team/app", "v1", "").await?;
        assert_eq!(r.status, 401, "anonymous on {}: {}", node.id(), r.text());
        assert!(wharf_tests::checks::is_node_challenge(r.header("www-authenticate")), "{:?}", r.headers);
        // A token for other repos: 403.
        let r = manifest_status(node, "priv", "team/app", "v1", &bearer(other_token)).await?;
        assert_eq!(r.status, 403, "another repo's token on {}: {}", node.id(), r.text());
        // The management API does not take puller tokens, nor nodes admin-only calls.
        let r = rest("GET", &cp.api("/api/repos"), &[("authorization", &bearer(team_token))], None).await?;
        assert_eq!(r.status, 403);
    }

    // A token from one node's token endpoint opens the other (the cluster's key set, from the
    // control plane), and only for the scope it was issued for.
    let r = wharf_tests::http::get(
        &nodes[0].v2("token?service=a&scope=repository:priv/team/app:pull"),
        &[("authorization", &basic)],
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    let node_token = bearer(r.json()?["token"].as_str().unwrap_or_default());
    for node in &nodes {
        let r = manifest_status(node, "priv", "team/app", "v1", &node_token).await?;
        assert_eq!(r.status, 200, "node a's token on {}: {}", node.id(), r.text());
        let r = manifest_status(node, "priv", "team/other", "v1", &node_token).await?;
        assert_eq!(r.status, 401, "outside its scope on {}: {}", node.id(), r.text());
        assert!(r.header("www-authenticate").is_some_and(|c| c.contains("insufficient_scope")), "{:?}", r.headers);
    }

    // Revoked: every node refuses it once it has the new configuration.
    let id = team["id"].as_str().unwrap_or_default();
    let started = std::time::Instant::now();
    let r = rest("DELETE", &cp.api(&format!("/api/tokens/{id}")), &[], None).await?;
    assert_eq!(r.status, 204, "{}", r.text());
    for node in &nodes {
        poll(PROPAGATION, "the revoked token to be refused", || async {
            let r = manifest_status(node, "priv", "team/app", "v1", &bearer(team_token)).await.ok()?;
            (r.status == 401).then_some(())
        })
        .await?;
    }
    // The README's bound: within a second (it measures tens of milliseconds here).
    let took = started.elapsed();
    eprintln!("revocation reached both nodes in {took:?}");
    assert!(
        took < REVOCATION_BOUND,
        "revocation took {took:?} to reach both nodes (README: within {REVOCATION_BOUND:?})"
    );
    // And it stays refused, on both nodes, with the cache warm; so does every node token issued
    // for it, although it has not expired.
    for node in &nodes {
        let r = manifest_status(node, "priv", "team/app", "v1", &basic).await?;
        assert_eq!(r.status, 401, "revoked token as Basic on {}: {}", node.id(), r.text());
        let r = manifest_status(node, "priv", "team/app", "v1", &node_token).await?;
        assert_eq!(r.status, 401, "a node token of the revoked token on {}: {}", node.id(), r.text());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_a_revoked_bootstrap_token_stays_revoked_across_restarts() -> anyhow::Result<()> {
    let mut cp = ControlPlane::embedded()?;
    let admin = create_token(&cp, &["--role", "admin", "--description", "ops"]).await?;
    let as_admin = bearer(&admin);
    let bootstrap_id = admin_token().split('_').nth(1).unwrap_or_default().to_owned();
    let r =
        rest("DELETE", &cp.api(&format!("/api/tokens/{bootstrap_id}")), &[("authorization", &as_admin)], None).await?;
    assert_eq!(r.status, 204, "{}", r.text());
    // The bootstrap file still holds it: a restart must not bring it back.
    cp.restart()?;
    let repos = cp.api("/api/repos");
    assert_eq!(rest("GET", &repos, &[], None).await?.status, 401, "the revoked bootstrap token works again");
    assert_eq!(rest("GET", &repos, &[("authorization", &as_admin)], None).await?.status, 200);
    let warned = cp.logs().iter().any(|v| message(v).is_some_and(|m| m.contains("was revoked and stays so")));
    assert!(warned, "no warning about the revoked bootstrap token:\n{}", cp.log_tail(20));
    Ok(())
}

/// A real client through an `access = "token"` repo: skopeo with `--src-creds <any user>:<puller
/// token>` copies the image (it sends credentials only because the ping challenged it); without
/// credentials it is refused; anonymous copies from the node's public repos still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_auth_skopeo_pulls_a_token_repo_with_a_puller_token() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[10_000, 20_000])?;
    image.push(&registry.host(), "team/app")?;
    let cp = ControlPlane::embedded()?;
    let node = Node::spawn("a", &[cp.url()])?;
    let mut repo = repo_json("priv", &registry.url());
    repo["access"] = json!("token");
    let rev = create_repo(&cp.url(), &repo).await?;
    let token = create_token(&cp, &["--role", "puller", "--repos", "priv/team/*"]).await?;
    node.wait_applied(rev, PROPAGATION)?;
    let src = format!("docker://{}/priv/team/app:v1", node.host());
    let copy = |creds: Option<String>| {
        let src = src.clone();
        tokio::task::spawn_blocking(move || wharf_tests::skopeo_try_copy(&src, creds.as_deref()))
    };
    // Wait until the node has the token (the snapshot with it may trail the repo's).
    poll(PROPAGATION, "the puller token on the node", || async {
        let r = manifest_status(&node, "priv", "team/app", "v1", &bearer(&token)).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await?;
    let (ok, err) = copy(Some(format!("ci:{token}"))).await??;
    assert!(ok, "skopeo with a puller token was refused:\n{err}\n{}", node.log_tail(10));
    let (ok, err) = copy(None).await??;
    assert!(!ok, "skopeo without credentials copied a token repo");
    assert!(err.contains("401") || err.to_lowercase().contains("unauthorized"), "{err}");
    // The node's public repos stay open to anonymous skopeo, although the ping challenges it.
    let rev = create_repo(&cp.url(), &repo_json("open", &registry.url())).await?;
    node.wait_applied(rev, PROPAGATION)?;
    let out = wharf_tests::skopeo_copy_to_dir(
        &format!("docker://{}/open/team/app:v1", node.host()),
        tempfile::tempdir()?.path(),
    );
    assert!(out.is_ok(), "anonymous skopeo on a public repo: {out:?}");
    Ok(())
}
