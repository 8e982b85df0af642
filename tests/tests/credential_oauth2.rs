//! Credential provider `oauth2`: a registry behind a generic OAuth2 server. An in-process fake
//! OAuth2 server checks what one checks (the client's id and secret, by HTTP Basic or in the form;
//! the scope; a JWT-bearer assertion) and gives short-lived access tokens; the fake registry
//! takes only those (as the password of `oauth2accesstoken`). The repo's `credential_file` names
//! the settings file on the node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use wharf_tests::control::poll;
use wharf_tests::http::{self, get};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage};

const CLIENT_ID: &str = "wharf-node";
const SCOPE: &str = "registry:pull";

struct OAuth2 {
    secret: String,
    /// The JWT-bearer assertion it takes now (the file's content rotates).
    assertion: Mutex<String>,
    registry: Arc<FakeUpstream>,
    expires_in: u64,
    issued: Mutex<Vec<String>>,
    /// Each grant asked for, with its assertion when it had one.
    asked: Mutex<Vec<String>>,
}

impl OAuth2 {
    fn refuse(status: StatusCode, error: &str, why: &str) -> Response {
        let body = serde_json::json!({"error": error, "error_description": why});
        (status, [("content-type", "application/json")], body.to_string()).into_response()
    }

    fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `POST /oauth2/token`, checked as an OAuth2 server checks it.
async fn token(State(o): State<Arc<OAuth2>>, headers: HeaderMap, body: String) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);
    let grant = field("grant_type").unwrap_or("");
    match grant {
        "client_credentials" => {
            o.asked.lock().unwrap_or_else(|e| e.into_inner()).push(grant.to_owned());
            // RFC 6749 2.3.1: HTTP Basic of the form-encoded id and secret, or both in the form.
            let basic = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    let (id, secret) = s.split_once(':')?;
                    let dec = |x: &str| {
                        url::form_urlencoded::parse(format!("x={x}").as_bytes()).next().map(|(_, v)| v.into_owned())
                    };
                    Some((dec(id)?, dec(secret)?))
                });
            let client = basic.or_else(|| Some((field("client_id")?.to_owned(), field("client_secret")?.to_owned())));
            if client != Some((CLIENT_ID.to_owned(), o.secret.clone())) {
                return OAuth2::refuse(StatusCode::UNAUTHORIZED, "invalid_client", "Client authentication failed");
            }
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let assertion = field("assertion").unwrap_or("");
            o.asked.lock().unwrap_or_else(|e| e.into_inner()).push(format!("jwt-bearer {assertion}"));
            if assertion != *o.assertion.lock().unwrap_or_else(|e| e.into_inner()) {
                return OAuth2::refuse(StatusCode::BAD_REQUEST, "invalid_grant", "The assertion is not valid");
            }
        }
        other => return OAuth2::refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type", other),
    }
    if field("scope") != Some(SCOPE) {
        return OAuth2::refuse(StatusCode::BAD_REQUEST, "invalid_scope", "scope");
    }
    let mut issued = o.issued.lock().unwrap_or_else(|e| e.into_inner());
    let access = format!("at-{}-{}", issued.len(), wharf_tests::random_name(""));
    issued.push(access.clone());
    o.registry.add_user("oauth2accesstoken", &access);
    let body = serde_json::json!({"access_token": access, "token_type": "Bearer", "expires_in": o.expires_in});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

/// A registry with an image, and the fake OAuth2 server in front of it; its token URL.
async fn start(expires_in: u64) -> anyhow::Result<(Arc<OAuth2>, Arc<FakeUpstream>, TestImage, String)> {
    let registry = Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: None }).await?);
    registry.add_user("someone-else", "x");
    let image = TestImage::random("v1", &[5_000, 6_000])?;
    registry.put_image("team/app", &image);
    let o = Arc::new(OAuth2 {
        secret: format!("cs-{}", wharf_tests::random_name("")),
        assertion: Mutex::new(format!("eyJhbGciOiJSUzI1NiJ9.first-{}.sig", wharf_tests::random_name(""))),
        registry: registry.clone(),
        expires_in,
        issued: Mutex::default(),
        asked: Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/oauth2/token", listener.local_addr()?);
    let app = axum::Router::new().route("/oauth2/token", axum::routing::post(token)).with_state(o.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((o, registry, image, url))
}

fn write_settings(dir: &std::path::Path, settings: serde_json::Value) -> anyhow::Result<String> {
    let path = dir.join("oauth2.json");
    std::fs::write(&path, settings.to_string())?;
    Ok(path.display().to_string())
}

fn oauth2_repo(registry: &FakeUpstream, file: &str) -> String {
    format!(
        "{}credential_provider = \"oauth2\"\ncredential_file = \"{file}\"\n",
        repo_config("corp", &registry.url(), "generic", "0s")
    )
}

/// Client credentials, configured through the control plane (REST, with its checks, and regctl);
/// the token reaches the registry as a password and no secret reaches the API, the snapshot, the
/// node's log or its exported spans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_through_the_control_plane_and_no_secret_leaks() -> anyhow::Result<()> {
    use wharf_tests::control::{ControlPlane, Node, expect_problem, rest, rest_json};
    let (o, registry, image, token_url) = start(3600).await?;
    let dir = tempfile::tempdir()?;
    let file = write_settings(
        dir.path(),
        serde_json::json!({"token_url": token_url, "client_id": CLIENT_ID, "client_secret": o.secret, "scope": SCOPE}),
    )?;
    let cp = ControlPlane::embedded()?;
    let repo = serde_json::json!({"key": "corp", "upstream": registry.url(), "credential_provider": "oauth2",
        "credential_file": file});
    let created = rest_json("POST", &cp.api("/api/repos"), &[], &repo).await?;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()?["credential_file"], file.as_str());
    let up = registry.url();
    for bad in [
        serde_json::json!({"key": "b", "upstream": up, "credential_provider": "oauth2"}),
        serde_json::json!({"key": "c", "upstream": up, "credential_provider": "aws", "credential_file": file}),
        serde_json::json!({"key": "d", "upstream": up, "credential_provider": "oauth2", "credential_file": "oauth2.json"}),
        serde_json::json!({"key": "e", "upstream": up, "credential_file": file}),
    ] {
        expect_problem(&rest_json("POST", &cp.api("/api/repos"), &[], &bad).await?, 400, Some("credential_file"))?;
    }
    let shown = wharf_tests::regctl::Regctl::new(&cp.url()).run(&["repo", "get", "corp"]).await?;
    assert!(
        shown.stdout.lines().any(|l| l.starts_with("credential file:") && l.ends_with(file.as_str())),
        "{}",
        shown.stdout
    );
    let revision = created.json()?["revision"].as_i64().unwrap_or(0);

    let collector = wharf_tests::otlp::Collector::start().await?;
    let otlp = collector.endpoint();
    let node = Node::spawn_with_env(
        "n1",
        &[cp.url()],
        None,
        &["--otlp-endpoint", &otlp],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )?;
    node.wait_applied(revision, Duration::from_secs(30))?;
    http::pull_image(&node.v2("corp/team/app"), &image).await?;
    assert_eq!((o.issued().len(), o.asked()), (1, vec!["client_credentials".to_owned()]));
    let access = o.issued()[0].clone();
    let logins: Vec<_> = registry.token_requests().iter().filter_map(|r| r.basic_auth()).collect();
    assert!(!logins.is_empty() && logins.iter().all(|(u, p)| u == "oauth2accesstoken" && *p == access), "{logins:?}");

    let spans = collector
        .wait_for(Duration::from_secs(15), "the pull's upstream spans", |spans| {
            spans.iter().any(|s| s.name == "upstream.fetch")
        })
        .await?;
    for s in &spans {
        for v in s.attributes.values().chain([&s.name]) {
            assert!(!v.contains(&o.secret) && !v.contains(&access), "a secret in span {s:?}");
        }
    }
    let view = rest("GET", &cp.api("/api/repos/corp"), &[], None).await?.text();
    let snapshot = std::fs::read_to_string(node.snapshot_path())?;
    assert!(snapshot.contains("\"credential_file\""), "{snapshot}");
    for (what, text) in [("the API view", view), ("the snapshot", snapshot), ("the node's output", node.all_output())] {
        assert!(!text.contains(&o.secret) && !text.contains(&access), "a secret in {what}");
    }
    Ok(())
}

/// The JWT-bearer grant: the assertion file is read again at each refresh (a projected token
/// rotates), and pulls across the access token's expiry never fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_bearer_assertion_is_read_again_at_each_refresh() -> anyhow::Result<()> {
    let (o, registry, image, token_url) = start(3).await?;
    let dir = tempfile::tempdir()?;
    let assertion_file = dir.path().join("token.jwt");
    std::fs::write(&assertion_file, format!("{}\n", o.assertion.lock().unwrap_or_else(|e| e.into_inner())))?;
    let file = write_settings(
        dir.path(),
        serde_json::json!({"token_url": token_url, "assertion_file": assertion_file, "scope": SCOPE}),
    )?;
    let proxy = Proxy::spawn_with(ProxyOptions::new(&oauth2_repo(&registry, &file), &[]))?;
    http::pull_image(&proxy.v2("corp/team/app"), &image).await?;
    assert_eq!(o.issued().len(), 1, "{:?}", o.asked());
    // The assertion rotates; the next refresh presents the new one.
    let rotated = format!("eyJhbGciOiJSUzI1NiJ9.second-{}.sig", wharf_tests::random_name(""));
    std::fs::write(&assertion_file, &rotated)?;
    *o.assertion.lock().unwrap_or_else(|e| e.into_inner()) = rotated.clone();
    poll(Duration::from_secs(20), "a refreshed access token", || {
        let (proxy, image, o) = (&proxy, &image, &o);
        async move {
            http::pull_image(&proxy.v2("corp/team/app"), image).await.expect("a pull across the expiry failed");
            (o.issued().len() >= 2).then_some(())
        }
    })
    .await?;
    assert_eq!(o.asked().last(), Some(&format!("jwt-bearer {rotated}")), "{:?}", o.asked());
    assert_eq!(o.issued().len(), o.asked().len(), "no grant refused: {:?}", o.asked());
    Ok(())
}

/// A client the server refuses: a 502 naming the provider and what the server said, no secret;
/// the server is asked again only after a backoff, not once per request; once the settings file
/// is right the node recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_a_clear_502_and_is_asked_again_only_after_a_backoff() -> anyhow::Result<()> {
    let (o, registry, image, token_url) = start(3600).await?;
    let dir = tempfile::tempdir()?;
    let wrong = format!("not-the-secret-{}", wharf_tests::random_name(""));
    let settings = |secret: &str| {
        serde_json::json!({"token_url": token_url, "client_id": CLIENT_ID, "client_secret": secret, "scope": SCOPE,
            "client_auth": "post"})
    };
    let file = write_settings(dir.path(), settings(&wrong))?;
    let proxy = Proxy::spawn_with(ProxyOptions::new(&oauth2_repo(&registry, &file), &[]))?;
    let url = proxy.v2("corp/team/app/manifests/v1");
    for _ in 0..10 {
        let r = get(&url, &[("accept", OCI_MANIFEST)]).await?;
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("credential provider oauth2") && r.text().contains("invalid_client"), "{}", r.text());
        assert!(!r.text().contains(&wrong));
    }
    assert!(o.asked().len() <= 2, "a failing provider is asked once per backoff, not per request: {:?}", o.asked());
    let metrics = get(&format!("http://{}/metrics", proxy.addr()), &[]).await?.text();
    assert!(metrics.contains("wharf_credential_provider_errors_total{provider=\"oauth2\"}"), "{metrics}");

    write_settings(dir.path(), settings(&o.secret))?;
    poll(Duration::from_secs(10), "a pull once the secret is right", || {
        let (proxy, image) = (&proxy, &image);
        async move { http::pull_image(&proxy.v2("corp/team/app"), image).await.ok() }
    })
    .await?;
    let out = proxy.all_output();
    assert!(!out.contains(&wrong) && !out.contains(&o.secret), "a secret in the node's output");
    assert!(o.issued().iter().all(|t| !out.contains(t.as_str())), "a token in the node's output");
    Ok(())
}
