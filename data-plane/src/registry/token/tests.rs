//! The token service through the node's router: a real store and upstream client (towards a port
//! nothing listens on: a request past the gate ends in 502), token and public repos, a puller.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use serde_json::Value;
use wharf_core::token::{format_token, hash_secret};
use wharf_core::{Access, AuthMode, Grant, Repo, RepoKind, RepoPattern, Role};

use crate::config::{Config, Snapshot};
use crate::node_token::{self, Claims, NodeTokens};
use crate::state::AppState;
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamOptions};

const ID: &str = "0123456789abcdef";

fn puller_token() -> String {
    format_token(ID, &"s".repeat(43))
}

fn snapshot() -> Snapshot {
    let repo = |key: &str, kind, access| {
        Repo::new(key.parse().unwrap(), kind, Some("http://127.0.0.1:1"), Repo::DEFAULT_TAG_TTL, None)
            .unwrap()
            .with_access(AuthMode::Static, access)
            .unwrap()
    };
    Snapshot::new([
        repo("open", RepoKind::Generic, Access::Public),
        repo("private", RepoKind::Generic, Access::Token),
        repo("hub", RepoKind::Dockerhub, Access::Token),
    ])
    .with_pullers([Grant {
        id: ID.into(),
        secret_sha256: hash_secret(&"s".repeat(43)),
        role: Role::Puller,
        repos: ["private/team", "hub/library"].iter().map(|p| p.parse::<RepoPattern>().unwrap()).collect(),
        expires_at: None,
    }])
}

struct Node {
    addr: std::net::SocketAddr,
    state: AppState,
    http: reqwest::Client,
    stop: tokio_util::sync::CancellationToken,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let opts =
            UpstreamOptions { retries: 0, connect_timeout: Duration::from_secs(2), ..UpstreamOptions::default() };
        let upstream = Arc::new(Upstream::new(opts).unwrap());
        let mut state = AppState::new(Arc::new(Config::new(snapshot())), store, upstream);
        state.tokens = Arc::new(NodeTokens::ephemeral("node-1"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::server::run(listener, state.clone(), stop.clone().cancelled_owned()));
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Node { addr, state, http, stop, _dir: dir }
    }

    async fn get(&self, path: &str, auth: Option<&str>) -> reqwest::Response {
        let mut r = self.http.get(format!("http://{}{path}", self.addr));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send().await.unwrap()
    }

    /// A token for `scopes`, with `auth` sent to the token endpoint.
    async fn token(&self, scopes: &[&str], auth: Option<&str>) -> String {
        let q: Vec<String> = scopes.iter().map(|s| format!("scope=repository:{s}:pull")).collect();
        let r = self.get(&format!("/v2/token?service=node-1&{}", q.join("&")), auth).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "no-store");
        let body: Value = json(r).await;
        assert_eq!(body["token"], body["access_token"]);
        assert_eq!(body["expires_in"], 300);
        format!("Bearer {}", body["token"].as_str().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

async fn json(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()["www-authenticate"].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn anonymous_tokens_open_public_repos_and_nothing_else() {
    let node = Node::start().await;
    let r = node.get("/v2/private/team/app/manifests/v1", None).await;
    assert_eq!(r.status(), 401);
    let realm = format!("http://{}/v2/token", node.addr);
    assert_eq!(
        challenge(&r),
        format!(r#"Bearer realm="{realm}",service="node-1",scope="repository:private/team/app:pull""#)
    );
    let anon = node.token(&["open/a", "private/team/app"], None).await;
    // The public repo passes (to the upstream: 502), the private one is not in the token.
    assert_eq!(node.get("/v2/open/a/manifests/v1", Some(&anon)).await.status(), 502);
    let r = node.get("/v2/private/team/app/manifests/v1", Some(&anon)).await;
    assert_eq!(r.status(), 401);
    assert!(challenge(&r).ends_with(r#"scope="repository:private/team/app:pull",error="insufficient_scope""#));
    let body: Value = json(r).await;
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");
    // The ping takes the anonymous token (docker login checks the ping with it).
    assert_eq!(node.get("/v2/", Some(&anon)).await.status(), 200);
    let r = node.get("/v2/", None).await;
    assert_eq!(
        (r.status(), challenge(&r)),
        (http::StatusCode::UNAUTHORIZED, format!(r#"Bearer realm="{realm}",service="node-1""#))
    );
}

#[tokio::test]
async fn a_puller_token_yields_the_scopes_it_covers() {
    let node = Node::start().await;
    let pt = puller_token();
    for auth in [basic("anyone", &pt), format!("Bearer {pt}")] {
        let t = node.token(&["private/team/app", "private/other/app", "open/x"], Some(&auth)).await;
        assert_eq!(node.get("/v2/private/team/app/manifests/v1", Some(&t)).await.status(), 502);
        assert_eq!(node.get("/v2/open/x/tags/list", Some(&t)).await.status(), 502);
        let r = node.get("/v2/private/other/app/manifests/v1", Some(&t)).await;
        assert_eq!(r.status(), 401, "outside the puller token's patterns: not granted");
        assert!(challenge(&r).contains("insufficient_scope"));
    }
    // docker login: no scope, the puller token as password.
    let login = node.token(&[], Some(&basic("me", &pt))).await;
    assert_eq!(node.get("/v2/", Some(&login)).await.status(), 200);

    // Wrong credentials at the token endpoint: 401 (docker login fails), a Basic challenge.
    for bad in [basic("me", &format_token(ID, &"t".repeat(43))), basic("me", "not-a-wharf-token")] {
        let r = node.get("/v2/token?service=node-1", Some(&bad)).await;
        assert_eq!(r.status(), 401);
        assert_eq!(challenge(&r), r#"Basic realm="node-1""#);
    }

    // Revoked: every token issued for it stops at once.
    node.state.config.replace(Snapshot { pullers: Default::default(), ..snapshot() });
    let r = node.get("/v2/private/team/app/manifests/v1", Some(&login)).await;
    assert_eq!(r.status(), 401);
    assert!(challenge(&r).contains(r#"error="invalid_token""#));
    let body: Value = json(r).await;
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("revoked"), "{body}");
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() {
    let node = Node::start().await;
    let good = node.token(&["private/team/app"], Some(&basic("me", &puller_token()))).await;
    let now = SystemTime::now();
    let claims = |exp: u64| Claims {
        issuer: "node-1".into(),
        puller: None,
        issued_at: node_token::unix(now) - 600,
        expires_at: exp,
        access: vec![("private".into(), "team/app".into())],
        credentials: None,
        peer: None,
    };
    let expired = node.state.tokens.seal(&[], &claims(node_token::unix(now) - 1), now);
    let foreign = NodeTokens::ephemeral("other").seal(&[], &claims(node_token::unix(now) + 300), now);
    let mut flipped = good.clone().into_bytes();
    let at = flipped.len() - 5;
    flipped[at] = if flipped[at] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    for (what, auth, says) in [
        ("expired", format!("Bearer {expired}"), "expired"),
        ("another node's key", format!("Bearer {foreign}"), "does not hold"),
        ("one byte changed", flipped, "forged"),
        ("garbage", "Bearer wharf.garbage".into(), "malformed"),
    ] {
        for path in ["/v2/private/team/app/manifests/v1", "/v2/"] {
            let r = node.get(path, Some(&auth)).await;
            assert_eq!(r.status(), 401, "{what} {path}");
            assert!(challenge(&r).ends_with(r#"error="invalid_token""#), "{what}");
            let body: Value = json(r).await;
            assert!(body["errors"][0]["message"].as_str().unwrap().contains(says), "{what}: {body}");
        }
    }
    // Too many scopes at once.
    let many: Vec<String> = (0..17).map(|i| format!("scope=repository:open/n{i}:pull")).collect();
    let r = node.get(&format!("/v2/token?{}", many.join("&")), None).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn mirror_requests_keep_their_ns_in_the_realm() {
    let node = Node::start().await;
    let r = node.get("/v2/library/alpine/manifests/latest?ns=docker.io", None).await;
    assert_eq!(r.status(), 401);
    let c = challenge(&r);
    let realm = format!("http://{}/v2/token?ns=docker.io", node.addr);
    assert!(c.starts_with(&format!(r#"Bearer realm="{realm}""#)), "{c}");
    assert!(c.contains(r#"scope="repository:library/alpine:pull""#), "{c}");
    // The token request at that realm resolves the unprefixed name the same way (ns) and the
    // prefixed one by its repoKey, as containerd asks both; one name normalises like a pull.
    let q = "scope=repository:library/alpine:pull&scope=repository:hub/alpine:pull";
    let r = node.get(&format!("/v2/token?ns=docker.io&{q}"), Some(&basic("me", &puller_token()))).await;
    let body: Value = json(r).await;
    let t = format!("Bearer {}", body["token"].as_str().unwrap());
    assert_eq!(node.get("/v2/library/alpine/manifests/latest?ns=docker.io", Some(&t)).await.status(), 502);
    assert_eq!(node.get("/v2/hub/alpine/manifests/latest", Some(&t)).await.status(), 502);
    assert_eq!(node.get("/v2/hub/library/busybox/manifests/latest", Some(&t)).await.status(), 401);
    // A Host that is not a host[:port] is refused before it can reach a challenge.
    let r = node.http.get(format!("http://{}/v2/", node.addr)).header("host", "a\"b").send().await.unwrap();
    assert_eq!(r.status(), 400);
}
