//! The peer endpoint through the node's router: only another node's peer token for this node opens
//! it; a passthrough repo's content never goes to a peer; a peer token opens no client pull.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use wharf_core::{Access, AuthMode, Digest, Repo, RepoKind};

use crate::config::{Config, Snapshot};
use crate::node_token::{self, generate_key};
use crate::peers::Peers;
use crate::state::AppState;
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamOptions};

fn repo(key: &str, auth: AuthMode, access: Access) -> Repo {
    Repo::new(key.parse().unwrap(), RepoKind::Generic, Some("http://127.0.0.1:1"), Repo::DEFAULT_TAG_TTL, None)
        .unwrap()
        .with_access(auth, access)
        .unwrap()
}

#[tokio::test]
async fn the_peer_endpoint_opens_only_to_a_peer_token_for_this_node() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let opts = UpstreamOptions { retries: 0, connect_timeout: Duration::from_secs(2), ..UpstreamOptions::default() };
    let upstream = Arc::new(Upstream::new(opts).unwrap());
    // A cluster key old enough to seal with.
    let key = generate_key(SystemTime::now() - Duration::from_secs(3600));
    let mut snapshot = Snapshot::new([
        repo("open", AuthMode::Static, Access::Public),
        repo("private", AuthMode::Static, Access::Token),
        repo("pass", AuthMode::Passthrough, Access::Public),
    ]);
    snapshot.keys = vec![key.clone()];
    let mut state = AppState::new(Arc::new(Config::new(snapshot)), store, upstream);
    state.tokens = Arc::new(node_token::NodeTokens::ephemeral("node-1"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(crate::server::run(listener, state.clone(), stop.clone().cancelled_owned()));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: String, auth: Option<String>| {
        let mut r = http.get(format!("http://{addr}{path}"));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };

    // Another node's side: peer tokens sealed with the cluster's key.
    let other = node_token::NodeTokens::ephemeral("node-2");
    let peers = Peers::off();
    let for_me = format!("Bearer {}", peers.token(&other, std::slice::from_ref(&key), "node-1"));
    let for_someone_else = format!("Bearer {}", Peers::off().token(&other, std::slice::from_ref(&key), "node-3"));
    let outsider = node_token::NodeTokens::ephemeral("node-9");
    let foreign_key = generate_key(SystemTime::now() - Duration::from_secs(3600));
    let foreign = format!("Bearer {}", Peers::off().token(&outsider, &[foreign_key], "node-1"));
    let digest = Digest::of(b"a blob");
    let blob = |key: &str| format!("/_wharf/peer/{key}/team/app/blobs/{digest}");

    assert_eq!(get(blob("open"), None).await, 401, "no token");
    assert_eq!(get(blob("open"), Some(for_someone_else.clone())).await, 401, "a token for another node");
    assert_eq!(get(blob("open"), Some(foreign)).await, 401, "a token of another cluster");
    // A client's registry token (from this node's token endpoint) is no peer token.
    let issued = http
        .get(format!("http://{addr}/v2/token?scope=repository:open/team/app:pull"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let issued: serde_json::Value = serde_json::from_str(&issued).unwrap();
    let client_token = format!("Bearer {}", issued["token"].as_str().unwrap());
    assert_eq!(get(blob("open"), Some(client_token)).await, 401, "a client's token");
    assert_eq!(get(blob("pass"), Some(for_me.clone())).await, 403, "passthrough content never goes to a peer");
    assert_eq!(
        get("/_wharf/peer/open/team/app/manifests/latest".into(), Some(for_me.clone())).await,
        404,
        "blobs only"
    );
    // Past the gate: the blob is fetched from this node's upstream (nothing listens there: 502).
    assert_eq!(get(blob("open"), Some(for_me.clone())).await, 502);
    assert_eq!(get(blob("private"), Some(for_me.clone())).await, 502, "the asking node authorized its client");
    let manifest = format!("/_wharf/peer/open/team/app/manifests/{digest}");
    assert_eq!(get(manifest, Some(for_me.clone())).await, 502, "manifests by digest too");
    // A peer token opens no client pull of an `access = "token"` repo.
    assert_eq!(get(format!("/v2/private/team/app/blobs/{digest}"), Some(for_me)).await, 401);
    stop.cancel();
}
