//! `regctl node list`: the data-plane nodes through `NodeService`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use wharf_proto::v1 as pb;

use crate::args::{Global, NodeCmd};
use crate::client::ControlPlane;
use crate::error::CliError;
use crate::output::{self, Table};

/// A node as `-o json|yaml` prints it.
#[derive(Serialize, Debug)]
pub struct NodeView {
    pub id: String,
    pub address: String,
    pub version: String,
    pub applied_revision: i64,
    pub control_plane: String,
    pub last_seen: String,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// hits / (hits + misses); `None` before any request.
    pub hit_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The node's cache cannot be written (a full disk).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cache_degraded: bool,
    /// Where the other nodes fetch from this one (peer fetch); absent: it takes no part.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub peer_url: String,
    /// The peers this node asked, as its last report says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerView>,
    #[serde(skip)]
    last_seen_secs: i64,
}

/// One peer as a node sees it.
#[derive(Serialize, Debug)]
pub struct PeerView {
    pub id: String,
    /// `ok` or `suspect`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspect_until: Option<String>,
    pub errors: u64,
    pub bytes: u64,
}

impl From<&pb::Node> for NodeView {
    fn from(n: &pb::Node) -> Self {
        let total = n.cache_hits + n.cache_misses;
        NodeView {
            id: n.id.clone(),
            address: n.address.clone(),
            version: n.version.clone(),
            applied_revision: n.applied_revision,
            control_plane: n.control_plane.clone(),
            last_seen: output::timestamp(n.last_seen.as_ref()),
            cache_bytes: n.cache_bytes,
            cache_entries: n.cache_entries,
            cache_hits: n.cache_hits,
            cache_misses: n.cache_misses,
            hit_ratio: (total > 0).then(|| n.cache_hits as f64 / total as f64),
            last_error: (!n.last_error.is_empty()).then(|| n.last_error.clone()),
            cache_degraded: n.cache_degraded,
            peer_url: n.peer_url.clone(),
            peers: n
                .peers
                .iter()
                .map(|p| PeerView {
                    id: p.id.clone(),
                    state: p.state.clone(),
                    suspect_until: p.suspect_until.as_ref().map(|t| output::timestamp(Some(t))),
                    errors: p.errors,
                    bytes: p.bytes,
                })
                .collect(),
            last_seen_secs: n.last_seen.as_ref().map_or(0, |t| t.seconds),
        }
    }
}

#[derive(Serialize)]
struct NodeList {
    nodes: Vec<NodeView>,
}

/// Every node, as the control plane lists it.
pub async fn list(cp: &ControlPlane) -> Result<Vec<pb::Node>, CliError> {
    Ok(cp.call("", cp.nodes().list_nodes(pb::ListNodesRequest {})).await?.nodes)
}

pub async fn run(global: &Global, cmd: NodeCmd) -> Result<(), CliError> {
    match cmd {
        NodeCmd::List => {
            let cp = ControlPlane::connect(global).await?;
            let nodes = list(&cp).await?;
            let view = NodeList { nodes: nodes.iter().map(NodeView::from).collect() };
            output::emit(global.output, &view, || table(&view.nodes, SystemTime::now()))
        }
    }
}

fn ago(now: SystemTime, secs: i64) -> String {
    if secs <= 0 {
        return "never".into();
    }
    let then = UNIX_EPOCH + Duration::from_secs(secs as u64);
    let d = now.duration_since(then).unwrap_or_default().as_secs();
    match d {
        0..120 => format!("{d}s ago"),
        120..7200 => format!("{}m ago", d / 60),
        _ => format!("{}h ago", d / 3600),
    }
}

/// `-` (no peer fetch), `ok`, or the peers the node holds suspect.
fn peer_state(n: &NodeView) -> String {
    if n.peer_url.is_empty() {
        return "-".into();
    }
    let suspect: Vec<&str> = n.peers.iter().filter(|p| p.state == "suspect").map(|p| p.id.as_str()).collect();
    if suspect.is_empty() { "ok".into() } else { format!("suspect: {}", suspect.join(",")) }
}

fn table(nodes: &[NodeView], now: SystemTime) -> String {
    if nodes.is_empty() {
        return "no nodes connected (start wharf-proxy with --control-plane)\n".into();
    }
    let errors = nodes.iter().any(|n| n.last_error.is_some());
    let peering = nodes.iter().any(|n| !n.peer_url.is_empty());
    let mut header = vec!["ID", "ADDRESS", "APPLIED", "CACHE", "ENTRIES", "HIT RATIO", "LAST SEEN"];
    if peering {
        header.push("PEERS");
    }
    if errors {
        header.push("LAST ERROR");
    }
    let mut t = Table::new(&header);
    for n in nodes {
        let mut row = vec![
            n.id.clone(),
            n.address.clone(),
            n.applied_revision.to_string(),
            if n.cache_degraded {
                format!("{} (disk full)", output::bytes(n.cache_bytes))
            } else {
                output::bytes(n.cache_bytes)
            },
            n.cache_entries.to_string(),
            n.hit_ratio.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0)),
            ago(now, n.last_seen_secs),
        ];
        if peering {
            row.push(peer_state(n));
        }
        if errors {
            row.push(n.last_error.clone().unwrap_or_else(|| "-".into()));
        }
        t.row(row);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_says_when_a_disk_is_full() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let n = pb::Node { id: "n1".into(), cache_bytes: 2048, cache_degraded: true, ..Default::default() };
        assert!(table(&[NodeView::from(&n)], now).contains("2.0 KiB (disk full)"));
    }

    #[test]
    fn the_table_shows_ratio_and_age() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let n = pb::Node {
            id: "n1".into(),
            address: "10.0.0.1:5000".into(),
            applied_revision: 7,
            last_seen: Some(prost_types::Timestamp { seconds: 999_990, nanos: 0 }),
            cache_bytes: 2048,
            cache_entries: 3,
            cache_hits: 3,
            cache_misses: 1,
            ..Default::default()
        };
        let out = table(&[NodeView::from(&n)], now);
        assert_eq!(
            out,
            "ID   ADDRESS         APPLIED   CACHE     ENTRIES   HIT RATIO   LAST SEEN\n\
             n1   10.0.0.1:5000   7         2.0 KiB   3         75.0%       10s ago\n"
        );
    }

    #[test]
    fn the_table_shows_suspect_peers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let peer = |id: &str, state: &str| pb::PeerStatus { id: id.into(), state: state.into(), ..Default::default() };
        let n1 = pb::Node {
            id: "n1".into(),
            peer_url: "http://10.0.0.1:5000".into(),
            peers: vec![peer("n2", "ok"), peer("n3", "suspect")],
            ..Default::default()
        };
        let n2 = pb::Node { id: "n2".into(), peer_url: "http://10.0.0.2:5000".into(), ..Default::default() };
        let out = table(&[NodeView::from(&n1), NodeView::from(&n2)], now);
        let rows: Vec<&str> = out.lines().collect();
        assert!(rows[0].ends_with("PEERS"), "{out}");
        assert!(rows[1].ends_with("suspect: n3") && rows[2].ends_with("ok"), "{out}");
    }
}
