//! Credential providers: a repo whose credentials come from the node's Google identity. An
//! in-process fake Google token endpoint checks what Google checks (the assertion's RS256
//! signature against the service account's key, its `iss`, `aud`, `scope` and `exp`), a fake
//! metadata server wants `Metadata-Flavor: Google`, and a fake registry takes only the access
//! tokens they issued (as `oauth2accesstoken`). The node reaches them through the settings Google's
//! own libraries honour: the key file's `token_uri`, `GCE_METADATA_HOST`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use wharf_tests::control::poll;
use wharf_tests::http::{self, get};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage};

const EMAIL: &str = "puller@project.iam.gserviceaccount.com";

/// The fake Google: who may sign, what it issued, what it refused.
struct Google {
    /// The service account's key (PKCS#8 DER): RS256 signatures are deterministic, so an assertion
    /// is checked by signing its input again.
    key: Vec<u8>,
    token_uri: Mutex<String>,
    registry: Arc<FakeUpstream>,
    expires_in: u64,
    issued: Mutex<Vec<String>>,
    refused: Mutex<Vec<String>>,
}

impl Google {
    fn issue(&self) -> Response {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        let token = format!("ya29.fake-{}-{}", issued.len(), wharf_tests::random_name(""));
        issued.push(token.clone());
        // The registry takes the newest access token (an older one has expired).
        self.registry.add_user("oauth2accesstoken", &token);
        let body = serde_json::json!({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"});
        ([("content-type", "application/json")], body.to_string()).into_response()
    }

    fn refuse(&self, why: String) -> Response {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).push(why.clone());
        let body = serde_json::json!({"error": "invalid_grant", "error_description": why});
        (StatusCode::BAD_REQUEST, [("content-type", "application/json")], body.to_string()).into_response()
    }

    fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// `POST /token`: the JWT-bearer grant, checked as Google checks it.
async fn token(State(g): State<Arc<Google>>, body: String) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return g.refuse(format!("grant_type {:?}", form.get("grant_type")));
    }
    let Some(assertion) = form.get("assertion") else { return g.refuse("no assertion".into()) };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts[..] else { return g.refuse("not a JWT".into()) };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let json = |s: &str| b64.decode(s).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let (Some(header), Some(claims)) = (json(header), json(claims)) else { return g.refuse("undecodable".into()) };
    if header["alg"] != "RS256" {
        return g.refuse(format!("alg {}", header["alg"]));
    }
    let key = RsaKeyPair::from_pkcs8(&g.key).expect("the test key");
    let mut expected = vec![0u8; key.public_modulus_len()];
    let input = format!("{}.{}", parts[0], parts[1]);
    key.sign(&RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), input.as_bytes(), &mut expected)
        .expect("signing");
    if b64.decode(signature).ok().as_deref() != Some(&expected[..]) {
        return g.refuse("invalid JWT signature".into());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    let aud = g.token_uri.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if claims["iss"] != EMAIL
        || claims["aud"] != aud.as_str()
        || !claims["scope"]
            .as_str()
            .unwrap_or("")
            .split(' ')
            .any(|s| s == "https://www.googleapis.com/auth/cloud-platform")
        || exp <= now
        || exp.saturating_sub(iat) > 3600
        || iat > now + 60
    {
        return g.refuse(format!("claims {claims}"));
    }
    g.issue()
}

/// The metadata server's token path: only with `Metadata-Flavor: Google`.
async fn metadata(State(g): State<Arc<Google>>, headers: HeaderMap) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (StatusCode::FORBIDDEN, "Missing Metadata-Flavor:Google header").into_response();
    }
    g.issue()
}

/// Starts the fake Google (token endpoint and metadata server) for `registry`; returns it and its address.
async fn start_google(
    key: Vec<u8>,
    registry: Arc<FakeUpstream>,
    expires_in: u64,
) -> anyhow::Result<(Arc<Google>, String)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let g = Arc::new(Google {
        key,
        token_uri: Mutex::new(format!("http://{addr}/token")),
        registry,
        expires_in,
        issued: Mutex::default(),
        refused: Mutex::default(),
    });
    let app = axum::Router::new()
        .route("/token", axum::routing::post(token))
        .route("/computeMetadata/v1/instance/service-accounts/default/token", axum::routing::get(metadata))
        .with_state(g.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((g, addr))
}

/// A service-account key file for `key` (PKCS#8 PEM) whose `token_uri` is `token_uri`.
fn key_file(dir: &std::path::Path, pem: &str, token_uri: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("sa.json");
    let file = serde_json::json!({
        "type": "service_account", "project_id": "project", "private_key_id": "k1", "private_key": pem,
        "client_email": EMAIL, "client_id": "1", "token_uri": token_uri,
    });
    std::fs::write(&path, file.to_string())?;
    Ok(path)
}

fn rsa_key() -> anyhow::Result<rcgen::KeyPair> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?)
}

/// A repo whose credentials come from the node's Google identity; its tag is revalidated on
/// every pull (tag TTL 0s), so every pull asks the registry.
fn gcp_repo(registry: &FakeUpstream) -> String {
    format!("{}credential_provider = \"gcp\"\n", repo_config("ar", &registry.url(), "gcr", "0s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_key_file_gives_tokens_refreshed_before_they_expire() -> anyhow::Result<()> {
    // The registry's own tokens live 1 s, so requests keep going back to its token endpoint with
    // the access token the node holds.
    let registry =
        Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(1) }).await?);
    registry.add_user("someone-else", "x");
    let image = TestImage::random("v1", &[5_000, 7_000])?;
    registry.put_image("project/repo/app", &image);
    let key = rsa_key()?;
    // Access tokens for 4 s: refreshed after about 3.
    let (google, addr) = start_google(key.serialize_der(), registry.clone(), 4).await?;
    let dir = tempfile::tempdir()?;
    let file = key_file(dir.path(), &key.serialize_pem(), &format!("http://{addr}/token"))?;
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("GOOGLE_APPLICATION_CREDENTIALS".into(), file.display().to_string())],
        ..ProxyOptions::new(&gcp_repo(&registry), &[])
    })?;
    http::pull_image(&proxy.v2("ar/project/repo/app"), &image).await?;
    assert_eq!(google.issued().len(), 1, "one access token for the pull; refused: {:?}", google.refused());
    let first = google.issued()[0].clone();
    let logins: Vec<_> = registry.token_requests().iter().filter_map(|r| r.basic_auth()).collect();
    assert!(logins.iter().all(|(u, p)| u == "oauth2accesstoken" && *p == first), "{logins:?}");
    // Pulls go on across the access token's expiry: one refresh, no failed request.
    let mut pulls = 0;
    poll(Duration::from_secs(20), "a refreshed access token", || {
        pulls += 1;
        let (proxy, image, google) = (&proxy, &image, &google);
        async move {
            http::pull_image(&proxy.v2("ar/project/repo/app"), image).await.expect("a pull across the expiry failed");
            (google.issued().len() >= 2).then_some(())
        }
    })
    .await?;
    assert_eq!(google.issued().len(), 2, "one refresh");
    assert!(google.refused().is_empty(), "{:?}", google.refused());
    let out = proxy.all_output();
    for secret in google.issued().iter().map(String::as_str).chain([key.serialize_pem().lines().nth(1).unwrap_or("")]) {
        assert!(!out.contains(secret), "a token or the key is in the node's output");
    }
    println!("{pulls} pulls across the expiry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metadata_server_gives_tokens_and_a_provider_failure_is_a_clear_502() -> anyhow::Result<()> {
    let registry = Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: None }).await?);
    registry.add_user("someone-else", "x");
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("project/repo/app", &image);
    let (google, addr) = start_google(rsa_key()?.serialize_der(), registry.clone(), 3600).await?;
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("GCE_METADATA_HOST".into(), addr.clone())],
        ..ProxyOptions::new(&gcp_repo(&registry), &[])
    })?;
    // 16 pulls at once on a node without a token yet: one token request, the others wait on it.
    let base = proxy.v2("ar/project/repo/app");
    let pulls = (0..16).map(|_| http::pull_image(&base, &image));
    for p in futures_util::future::join_all(pulls).await {
        p?;
    }
    assert_eq!(google.issued().len(), 1, "one refresh however many requests wait");

    // A key the service account does not have: Google refuses the assertion; the client gets a
    // 502 naming the provider and what Google said, and no secret.
    let dir = tempfile::tempdir()?;
    let other = rsa_key()?;
    let file = key_file(dir.path(), &other.serialize_pem(), &format!("http://{addr}/token"))?;
    let wrong = Proxy::spawn_with(ProxyOptions {
        env: vec![("GOOGLE_APPLICATION_CREDENTIALS".into(), file.display().to_string())],
        ..ProxyOptions::new(&gcp_repo(&registry), &[])
    })?;
    let r = get(&wrong.v2("ar/project/repo/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    let text = r.text();
    assert!(text.contains("credential provider gcp") && text.contains("invalid JWT signature"), "{text}");
    assert_eq!(google.refused(), vec!["invalid JWT signature".to_owned()]);
    let metrics = get(&format!("http://{}/metrics", wrong.addr()), &[]).await?.text();
    assert!(metrics.contains("wharf_credential_provider_errors_total{provider=\"gcp\"}"), "{metrics}");

    // A metadata server that is down: the same, promptly.
    let down = Proxy::spawn_with(ProxyOptions {
        env: vec![("GCE_METADATA_HOST".into(), format!("127.0.0.1:{}", wharf_tests::etcd::closed_port()))],
        ..ProxyOptions::new(&gcp_repo(&registry), &[])
    })?;
    let r = get(&down.v2("ar/project/repo/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("credential provider gcp: metadata server"), "{}", r.text());
    for p in [&proxy, &wrong, &down] {
        let out = p.all_output();
        assert!(google.issued().iter().all(|t| !out.contains(t.as_str())), "a token is in a node's output");
    }
    Ok(())
}

/// `credential_provider` like every repo field: REST (and its checks), gRPC, regctl, and the
/// snapshot a managed node pulls with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_is_configured_through_the_control_plane_and_reaches_the_nodes() -> anyhow::Result<()> {
    use wharf_tests::control::{ControlPlane, Node, expect_problem, grpc, rest, rest_json};
    let registry = Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: None }).await?);
    registry.add_user("someone-else", "x");
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("project/repo/app", &image);
    let (google, addr) = start_google(rsa_key()?.serialize_der(), registry.clone(), 3600).await?;
    let cp = ControlPlane::embedded()?;
    let repo =
        serde_json::json!({"key": "ar", "kind": "gcr", "upstream": registry.url(), "credential_provider": "gcp"});
    let created = rest_json("POST", &cp.api("/api/repos"), &[], &repo).await?;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()?["credential_provider"], "gcp");
    for (bad, field) in [
        (
            serde_json::json!({"key": "b", "upstream": registry.url(), "credential_provider": "aws-ish"}),
            "credential_provider",
        ),
        (
            serde_json::json!({"key": "c", "upstream": registry.url(), "credential_provider": "gcp", "username": "u", "password": "p"}),
            "credential_provider",
        ),
        (
            serde_json::json!({"key": "d", "upstream": registry.url(), "credential_provider": "gcp", "auth": "passthrough"}),
            "credential_provider",
        ),
    ] {
        expect_problem(&rest_json("POST", &cp.api("/api/repos"), &[], &bad).await?, 400, Some(field))?;
    }
    let mut repos = wharf_proto::v1::repo_service_client::RepoServiceClient::new(grpc(&cp.url()).await?);
    let got = repos.get_repo(wharf_proto::v1::GetRepoRequest { key: "ar".into() }).await?.into_inner();
    assert_eq!(got.credential_provider, "gcp");
    let shown = wharf_tests::regctl::Regctl::new(&cp.url()).run(&["repo", "get", "ar"]).await?;
    assert!(
        shown.stdout.lines().any(|l| l.starts_with("credential provider:") && l.ends_with("gcp")),
        "{}",
        shown.stdout
    );
    let listed = rest("GET", &cp.api("/api/repos/ar"), &[], None).await?;
    assert!(!listed.text().contains("ya29."), "a token in the API's view");

    let node = Node::spawn_with_env("n1", &[cp.url()], None, &[], &[("GCE_METADATA_HOST", addr.as_str())])?;
    node.wait_applied(got.revision, Duration::from_secs(30))?;
    let m = get(&node.v2("ar/project/repo/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!((m.status, m.body.clone()), (200, image.manifest.data.clone()), "{}", m.text());
    assert_eq!(google.issued().len(), 1);
    let snapshot = std::fs::read_to_string(node.snapshot_path())?;
    assert!(snapshot.contains("\"credential_provider\":\"gcp\""), "{snapshot}");
    assert!(!snapshot.contains("ya29."), "a token in the stored snapshot");
    Ok(())
}

/// Workload identity federation's fake Google: an STS that takes only the subject token the
/// identity provider gave (for the pool's audience), and IAM credentials that impersonate the
/// service account only for STS's federated tokens.
struct Federation {
    subject: String,
    audience: String,
    registry: Arc<FakeUpstream>,
    federated: Mutex<Vec<String>>,
    issued: Mutex<Vec<String>>,
}

impl Federation {
    fn access_token(&self) -> String {
        let token = format!("ya29.impersonated-{}", wharf_tests::random_name(""));
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).push(token.clone());
        self.registry.add_user("oauth2accesstoken", &token);
        token
    }
}

async fn sts(State(f): State<Arc<Federation>>, body: String) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("urn:ietf:params:oauth:grant-type:token-exchange")
        || field("requested_token_type") != Some("urn:ietf:params:oauth:token-type:access_token")
        || field("subject_token_type") != Some("urn:ietf:params:oauth:token-type:jwt")
        || field("audience") != Some(f.audience.as_str())
        || field("subject_token") != Some(f.subject.as_str())
    {
        let body = serde_json::json!({"error": "invalid_grant", "error_description": "The subject token is invalid"});
        return (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    }
    let federated = format!("federated-{}", wharf_tests::random_name(""));
    f.federated.lock().unwrap_or_else(|e| e.into_inner()).push(federated.clone());
    // Without impersonation the federated token is the access token the registry takes.
    f.registry.add_user("oauth2accesstoken", &federated);
    let body = serde_json::json!({"access_token": federated, "issued_token_type":
        "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in": 3600});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

async fn generate_access_token(State(f): State<Arc<Federation>>, headers: HeaderMap, body: String) -> Response {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let known = f.federated.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|t| Some(t.as_str()) == bearer);
    let asked: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if !known || asked["scope"][0] != "https://www.googleapis.com/auth/cloud-platform" {
        return (StatusCode::UNAUTHORIZED, r#"{"error":{"code":401,"status":"UNAUTHENTICATED"}}"#).into_response();
    }
    let expire = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600)).to_string();
    let body = serde_json::json!({"accessToken": f.access_token(), "expireTime": expire});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

async fn identity_provider(State(f): State<Arc<Federation>>, headers: HeaderMap) -> Response {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("True") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    serde_json::json!({"access_token": f.subject}).to_string().into_response()
}

/// External-account files, named by the repo's `credential_file` (no environment): a subject
/// token from a file, exchanged at STS and then for the service account's token by impersonation;
/// and one from a URL answering JSON, the federated token used as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_files_named_by_the_repo_federate_the_node_identity() -> anyhow::Result<()> {
    let registry = Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: None }).await?);
    registry.add_user("someone-else", "x");
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("project/repo/app", &image);
    let audience = "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/aws";
    let f = Arc::new(Federation {
        subject: format!("eyJoidc-{}", wharf_tests::random_name("")),
        audience: audience.into(),
        registry: registry.clone(),
        federated: Mutex::default(),
        issued: Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/v1/token", axum::routing::post(sts))
        .route("/v1/projects/-/serviceAccounts/{sa}", axum::routing::post(generate_access_token))
        .route("/idp/token", axum::routing::get(identity_provider))
        .with_state(f.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let subject_file = dir.path().join("oidc-token");
    std::fs::write(&subject_file, format!("{}\n", f.subject))?;
    let from_file = dir.path().join("federation-file.json");
    std::fs::write(
        &from_file,
        serde_json::json!({"type": "external_account", "audience": audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_url": format!("{base}/v1/token"),
            "service_account_impersonation_url": format!("{base}/v1/projects/-/serviceAccounts/{EMAIL}:generateAccessToken"),
            "credential_source": {"file": subject_file}})
        .to_string(),
    )?;
    let from_url = dir.path().join("federation-url.json");
    std::fs::write(
        &from_url,
        serde_json::json!({"type": "external_account", "audience": audience,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_url": format!("{base}/v1/token"),
            "credential_source": {"url": format!("{base}/idp/token"), "headers": {"Metadata": "True"},
                "format": {"type": "json", "subject_token_field_name": "access_token"}}})
        .to_string(),
    )?;
    let repo = |file: &std::path::Path| format!("{}credential_file = \"{}\"\n", gcp_repo(&registry), file.display());

    let impersonating = Proxy::spawn_with(ProxyOptions::new(&repo(&from_file), &[]))?;
    http::pull_image(&impersonating.v2("ar/project/repo/app"), &image).await?;
    let issued = f.issued.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert_eq!(issued.len(), 1, "one impersonated token");
    let logins: Vec<_> = registry.token_requests().iter().filter_map(|r| r.basic_auth()).collect();
    assert!(logins.iter().all(|(u, p)| u == "oauth2accesstoken" && *p == issued[0]), "{logins:?}");

    let federated = Proxy::spawn_with(ProxyOptions::new(&repo(&from_url), &[]))?;
    http::pull_image(&federated.v2("ar/project/repo/app"), &image).await?;
    assert_eq!(f.federated.lock().unwrap_or_else(|e| e.into_inner()).len(), 2, "one exchange per node");
    assert_eq!(f.issued.lock().unwrap_or_else(|e| e.into_inner()).len(), 1, "no impersonation without its URL");

    // A subject token the pool does not know: a 502 that says what STS said.
    std::fs::write(&subject_file, "eyJnot-the-token")?;
    let refused = Proxy::spawn_with(ProxyOptions::new(&repo(&from_file), &[]))?;
    let r = get(&refused.v2("ar/project/repo/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("credential provider gcp") && r.text().contains("The subject token is invalid"),
        "{}",
        r.text()
    );
    for p in [&impersonating, &federated, &refused] {
        assert!(!p.all_output().contains(&f.subject), "the subject token is in a node's output");
    }
    Ok(())
}
