//! Credential provider `azure`: an in-process fake Entra checks a service principal's secret or
//! its federated assertion (AKS workload identity), a fake IMDS wants `Metadata: true`, and the
//! fake ACR exchanges only the access tokens Entra issued (`/oauth2/exchange`) for refresh tokens
//! that its token endpoint takes by the refresh-token grant (POST). The node reaches them through
//! the settings Azure's libraries honour (`AZURE_AUTHORITY_HOST`, `AZURE_POD_IDENTITY_AUTHORITY_HOST`).

use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use wharf_tests::fake::ACR_REFRESH_TOKEN_USER;
use wharf_tests::http::{self, get};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage};

const TENANT: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";

struct Entra {
    secret: String,
    assertion: String,
    registry: Arc<FakeUpstream>,
    issued: Mutex<Vec<String>>,
}

impl Entra {
    fn issue(&self, expires_in: serde_json::Value) -> Response {
        let token = format!("eyJ.entra-{}", wharf_tests::random_name(""));
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).push(token.clone());
        self.registry.accept_for_exchange(&token);
        let body = serde_json::json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"});
        ([("content-type", "application/json")], body.to_string()).into_response()
    }

    fn issued(&self) -> usize {
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`: client credentials, by secret or federated assertion.
async fn token(State(e): State<Arc<Entra>>, Path(tenant): Path<String>, body: String) -> Response {
    let f: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let get = |k: &str| f.get(k).map(String::as_str);
    let proof = match (get("client_secret"), get("client_assertion_type"), get("client_assertion")) {
        (Some(s), None, None) => s == e.secret,
        (None, Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer"), Some(a)) => a == e.assertion,
        _ => false,
    };
    let ok = tenant == TENANT
        && get("grant_type") == Some("client_credentials")
        && get("client_id") == Some(CLIENT)
        && get("scope") == Some("https://management.azure.com/.default");
    if !(ok && proof) {
        let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        return (StatusCode::UNAUTHORIZED, [("content-type", "application/json")], body).into_response();
    }
    e.issue(3599.into())
}

/// IMDS's managed identity token: only with `Metadata: true`, for ARM.
async fn imds(
    State(e): State<Arc<Entra>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return (StatusCode::BAD_REQUEST, "Required metadata header not specified").into_response();
    }
    if q.get("resource").map(String::as_str) != Some("https://management.azure.com/") {
        return (StatusCode::BAD_REQUEST, "bad resource").into_response();
    }
    // IMDS writes expires_in as a string.
    e.issue("3599".into())
}

async fn start() -> anyhow::Result<(Arc<Entra>, Arc<FakeUpstream>, String)> {
    let registry =
        Arc::new(FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(60) }).await?);
    registry.add_user("someone-else", "x");
    let e = Arc::new(Entra {
        secret: format!("sp-secret-{}", wharf_tests::random_name("")),
        assertion: format!("eyJfederated-{}", wharf_tests::random_name("")),
        registry: registry.clone(),
        issued: Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
        .route("/metadata/identity/oauth2/token", axum::routing::get(imds))
        .with_state(e.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((e, registry, url))
}

fn acr_repo(registry: &FakeUpstream) -> String {
    format!("{}credential_provider = \"azure\"\n", repo_config("acr", &registry.url(), "acr", "5m"))
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_principal_a_federated_token_and_a_managed_identity_each_pull_from_acr() -> anyhow::Result<()> {
    let (entra, registry, url) = start().await?;
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("team/app", &image);
    let dir = tempfile::tempdir()?;
    let federated = dir.path().join("azure-identity-token");
    std::fs::write(&federated, &entra.assertion)?;
    let federated = federated.display().to_string();
    let identities = [
        env(&[
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_CLIENT_SECRET", &entra.secret),
            ("AZURE_AUTHORITY_HOST", &url),
        ]),
        env(&[
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_FEDERATED_TOKEN_FILE", &federated),
            ("AZURE_AUTHORITY_HOST", &url),
        ]),
        env(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", &url)]),
    ];
    for (i, identity) in identities.into_iter().enumerate() {
        let proxy = Proxy::spawn_with(ProxyOptions { env: identity, ..ProxyOptions::new(&acr_repo(&registry), &[]) })?;
        http::pull_image(&proxy.v2("acr/team/app"), &image).await?;
        assert_eq!(
            (entra.issued(), registry.exchanged()),
            (i + 1, i as u64 + 1),
            "identity {i}: one token, one exchange"
        );
        let out = proxy.all_output();
        assert!(!out.contains(&entra.secret) && !out.contains(&entra.assertion) && !out.contains("acr-refresh-"));
    }
    // The refresh token went to the token endpoint by the refresh-token grant.
    let posts: Vec<_> = registry.token_requests().into_iter().filter(|r| r.method == reqwest::Method::POST).collect();
    assert!(!posts.is_empty() && posts.iter().all(|p| p.form_values("grant_type") == vec!["refresh_token".to_owned()]));
    assert!(registry.token_requests().iter().all(|r| r.basic_auth().is_none_or(|(u, _)| u == ACR_REFRESH_TOKEN_USER)));

    // A wrong secret: Entra's refusal, named, as a 502.
    let wrong = env(&[
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_CLIENT_SECRET", "not-the-sp-secret"),
        ("AZURE_AUTHORITY_HOST", &url),
    ]);
    let proxy = Proxy::spawn_with(ProxyOptions { env: wrong, ..ProxyOptions::new(&acr_repo(&registry), &[]) })?;
    let r = get(&proxy.v2("acr/team/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("credential provider azure") && r.text().contains("invalid_client"), "{}", r.text());
    assert!(!r.text().contains("not-the-sp-secret") && !proxy.all_output().contains("not-the-sp-secret"));
    Ok(())
}
