use std::sync::Arc;

use axum::extract::State;
use wharf_core::{Repo, RepoKind};

use crate::config::{Config, Snapshot};
use crate::state::AppState;
use crate::store::Store;
use crate::upstream::{Upstream, UpstreamOptions};

/// A request's future is moved (into axum's box, at each layer above) and its size is what each
/// move copies: whatever may ask the upstream is boxed below it (the upstream client's futures are
/// kilobytes), so the future of a hit, most requests, stays small. At 9 KiB it was a quarter of a
/// manifest hit's instructions, in memcpy. The size is the type's, the same in debug and release.
#[test]
fn a_requests_future_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let upstream = Arc::new(Upstream::new(UpstreamOptions::default()).unwrap());
    let repo =
        Repo::new("lab".parse().unwrap(), RepoKind::Generic, Some("http://127.0.0.1:1"), Repo::DEFAULT_TAG_TTL, None)
            .unwrap();
    let state = AppState::new(Arc::new(Config::new(Snapshot::new([repo]))), store, upstream);
    let req = http::Request::builder()
        .uri("/v2/lab/img/manifests/v1")
        .header("host", "localhost")
        .body(axum::body::Body::empty())
        .unwrap();
    let size = std::mem::size_of_val(&super::handle(State(state), req));
    assert!(size <= 3072, "a request's future is {size} bytes: box what was added on a path that asks the upstream");
}
