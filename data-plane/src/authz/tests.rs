use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::HeaderValue;
use wharf_core::token::{format_token, hash_secret};
use wharf_core::{Access, AuthMode, Digest, Grant, Repo, RepoKind, RepoPattern, Role};

use super::*;
use crate::config::Config;
use crate::state::AppState;
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamOptions};

const ID: &str = "0123456789abcdef";

fn secret() -> String {
    "s".repeat(43)
}

fn token() -> String {
    format_token(ID, &secret())
}

/// A puller grant for [`token`], limited to `patterns` (none: every repo).
fn grant(patterns: &[&str], expires_at: Option<SystemTime>) -> Grant {
    Grant {
        id: ID.into(),
        secret_sha256: hash_secret(&secret()),
        role: Role::Puller,
        repos: patterns.iter().map(|p| p.parse::<RepoPattern>().unwrap()).collect(),
        expires_at,
    }
}

fn headers(authorization: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
    h
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn repo(key: &str, auth: AuthMode, access: Access) -> Repo {
    Repo::new(key.parse().unwrap(), RepoKind::Generic, Some("http://127.0.0.1:1"), Repo::DEFAULT_TAG_TTL, None)
        .unwrap()
        .with_access(auth, access)
        .unwrap()
}

#[test]
fn puller_tokens_gate_token_repos() {
    let now = SystemTime::now();
    let key: RepoKey = "lab".parse().unwrap();
    let snap = Snapshot::default().with_pullers([grant(&["lab/team/*"], Some(now + Duration::from_secs(60)))]);
    let check = |h: &HeaderMap| check_puller(&snap, &key, "team/app", h, now);

    assert_eq!(check(&headers(&format!("Bearer {}", token()))).unwrap(), ID);
    assert_eq!(check(&headers(&basic("anyone", &token()))).unwrap(), ID, "docker login: the token as password");

    let none = check(&HeaderMap::new()).unwrap_err();
    assert_eq!(
        (none.status, none.code, none.challenge),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED", Some(Challenge::Credentials))
    );
    let not_wharf = check(&headers(&basic("user", "upstream-password"))).unwrap_err();
    assert_eq!(not_wharf.status, StatusCode::UNAUTHORIZED);

    let wrong_secret = format_token(ID, &"t".repeat(43));
    let unknown_id = format_token("fedcba9876543210", &secret());
    for t in [wrong_secret, unknown_id] {
        let e = check(&headers(&format!("Bearer {t}"))).unwrap_err();
        assert_eq!((e.status, e.challenge), (StatusCode::UNAUTHORIZED, Some(Challenge::Credentials)), "{t}");
        assert!(!e.message.contains(&secret()) && !e.message.contains(&"t".repeat(43)));
    }
    let expired =
        check_puller(&snap, &key, "team/app", &headers(&format!("Bearer {}", token())), now + Duration::from_secs(61));
    assert_eq!(expired.unwrap_err().status, StatusCode::UNAUTHORIZED);

    let denied = check_puller(&snap, &key, "other/app", &headers(&format!("Bearer {}", token())), now).unwrap_err();
    assert_eq!((denied.status, denied.code, denied.challenge), (StatusCode::FORBIDDEN, "DENIED", None));

    // Revoked: gone from the next snapshot.
    let next = Snapshot::default();
    let revoked = check_puller(&next, &key, "team/app", &headers(&format!("Bearer {}", token())), now).unwrap_err();
    assert_eq!(revoked.status, StatusCode::UNAUTHORIZED);
}

#[test]
fn ping_checks_only_wharf_tokens() {
    let now = SystemTime::now();
    let tokens = NodeTokens::ephemeral("n");
    let ping = |snap: &Snapshot, h: &HeaderMap, now| super::ping(&tokens, snap, h, now);
    let snap = Snapshot::default().with_pullers([grant(&[], None)]);
    // Public repos only: open to anyone.
    assert!(ping(&snap, &HeaderMap::new(), now).is_ok());
    // A repo that needs credentials: a client that sent none is challenged, so that docker, skopeo
    // and podman send their login; skopeo's empty answer (":") passes, as anonymous.
    for (auth, access) in [(AuthMode::Static, Access::Token), (AuthMode::Passthrough, Access::Public)] {
        let guarded = Snapshot::new([repo("private", auth, access)]);
        let e = ping(&guarded, &HeaderMap::new(), now).unwrap_err();
        assert_eq!((e.status, e.challenge), (StatusCode::UNAUTHORIZED, Some(Challenge::Credentials)));
        assert!(ping(&guarded, &headers(&basic("", "")), now).is_ok());
        assert!(ping(&guarded, &headers(&basic("user", "upstream-password")), now).is_ok());
    }
    assert!(ping(&snap, &headers(&basic("user", "upstream-password")), now).is_ok());
    assert!(ping(&snap, &headers("Bearer some-upstream-token"), now).is_ok());
    assert!(ping(&snap, &headers(&format!("Bearer {}", token())), now).is_ok());
    assert!(ping(&snap, &headers(&basic("u", &token())), now).is_ok());
    let bad = ping(&Snapshot::default(), &headers(&format!("Bearer {}", token())), now).unwrap_err();
    assert_eq!((bad.status, bad.challenge), (StatusCode::UNAUTHORIZED, Some(Challenge::Credentials)));
}

/// The whole gate through the node's router: a real store, the real upstream client (towards a
/// port nothing listens on: a request that passes the gate ends in 502), a snapshot with pullers.
#[tokio::test]
async fn token_repos_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let opts = UpstreamOptions { retries: 0, connect_timeout: Duration::from_secs(2), ..UpstreamOptions::default() };
    let upstream = Arc::new(Upstream::new(opts).unwrap());
    let snapshot = Snapshot::new([
        repo("private", AuthMode::Static, Access::Token),
        repo("open", AuthMode::Static, Access::Public),
    ])
    .with_pullers([grant(&["private/team"], None)]);
    let state = AppState::new(Arc::new(Config::new(snapshot)), store, upstream);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(crate::server::run(listener, state, stop.clone().cancelled_owned()));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str, auth: Option<String>| {
        let mut r = http.get(format!("http://{addr}{path}"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move { r.send().await.unwrap() }
    };
    let bearer = Some(format!("Bearer {}", token()));
    let digest = Digest::of(b"x");

    for path in [
        "/v2/private/team/app/manifests/v1".to_owned(),
        format!("/v2/private/team/app/blobs/{digest}"),
        "/v2/private/team/app/tags/list".to_owned(),
        format!("/v2/private/team/app/referrers/{digest}"),
    ] {
        let r = get(&path, None).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with(&format!("Bearer realm=\"http://{addr}/v2/token\",service=\"wharf\""))
        );
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{body}");

        // Past the gate: the upstream (nothing listening) is asked.
        let r = get(&path, bearer.clone()).await;
        assert_eq!(r.status(), 502, "{path}");
        let r = get(&path, Some(basic("whoever", &token()))).await;
        assert_eq!(r.status(), 502, "{path}");
    }
    let r = get("/v2/private/other/manifests/v1", bearer.clone()).await;
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    let r =
        get("/v2/private/team/app/manifests/v1", Some(format!("Bearer {}", format_token(ID, &"x".repeat(40))))).await;
    assert_eq!(r.status(), 401);

    // A public repo ignores tokens. The ping challenges a client without credentials (this node
    // serves a token repo), and checks a Wharf token sent to it.
    assert_eq!(get("/v2/open/team/app/manifests/v1", None).await.status(), 502);
    let r = get("/v2/", None).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with(&format!("Bearer realm=\"http://{addr}/v2/token\",service=\"wharf\""))
    );
    assert_eq!(get("/v2/", bearer.clone()).await.status(), 200);
    let r = get("/v2/", Some(format!("Bearer {}", format_token("fedcba9876543210", &secret())))).await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with(&format!("Bearer realm=\"http://{addr}/v2/token\",service=\"wharf\""))
    );

    stop.cancel();
    server.await.unwrap().unwrap();
}
