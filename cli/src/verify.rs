//! `regctl cache verify`: asks the nodes, through the control plane, to re-hash every cached blob
//! and manifest once, then follows their reports in the node list until each pass is done.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use wharf_proto::v1 as pb;

use crate::args::{Global, Output, VerifyArgs};
use crate::client::ControlPlane;
use crate::error::CliError;
use crate::output::{self, Table};

/// How often the node list is read while passes run.
const POLL: Duration = Duration::from_millis(500);
/// A node missing from the node list this long has left (its entry's lease is 10 s).
const GONE_AFTER: Duration = Duration::from_secs(15);

/// One node's pass as `-o json|yaml` prints it.
#[derive(Serialize, Debug, Clone, PartialEq)]
struct NodePass {
    node: String,
    address: String,
    /// `done`, `running`, `waiting` (not taken up yet) or `gone` (left the node list).
    state: &'static str,
    checked: u64,
    bytes: u64,
    removed: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    removed_entries: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_secs: Option<f64>,
}

#[derive(Serialize, Debug)]
struct VerifyOutput {
    id: String,
    nodes: Vec<NodePass>,
}

pub async fn run(global: &Global, args: VerifyArgs) -> Result<(), CliError> {
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        return Err(CliError::Usage(format!("--rate {}: a rate in MB/s, 0 or more", args.rate)));
    }
    let cp = ControlPlane::connect(global).await?;
    let listed = crate::node::list(&cp).await?;
    let node_ids = pick(&listed, &args.nodes)?;
    let req = pb::VerifyCacheRequest { node_ids, rate_bytes_per_sec: (args.rate * 1e6) as u64 };
    let accepted = cp.call("", cp.nodes().verify_cache(req)).await?;
    let mut passes: Vec<NodePass> =
        accepted.node_ids.iter().map(|id| pass_of(id, &accepted.id, listed.iter().find(|n| &n.id == id))).collect();
    if args.no_wait {
        let out = VerifyOutput { id: accepted.id.clone(), nodes: passes };
        return output::emit(global.output, &out, || {
            format!("verification {} requested of {} node(s)\n", accepted.id, out.nodes.len())
        });
    }
    let progress = global.output == Output::Table && std::io::stderr().is_terminal();
    let deadline = Instant::now() + args.wait;
    let mut missing_since: Vec<Option<Instant>> = vec![None; passes.len()];
    loop {
        let settled = passes.iter().all(|p| matches!(p.state, "done" | "gone"));
        if settled || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
        // A control plane that fails one read is asked again at the next poll.
        let Ok(nodes) = crate::node::list(&cp).await else { continue };
        for (p, missing) in passes.iter_mut().zip(&mut missing_since) {
            let node = nodes.iter().find(|n| n.id == p.node);
            *missing = match node {
                Some(_) => None,
                None => Some(missing.unwrap_or_else(Instant::now)),
            };
            let mut next = pass_of(&p.node, &accepted.id, node);
            if node.is_none() {
                // Keep what was heard; the node counts as gone once it stayed away.
                next = NodePass { state: p.state, address: p.address.clone(), ..p.clone() };
                if missing.is_some_and(|t| t.elapsed() >= GONE_AFTER) && p.state != "done" {
                    next.state = "gone";
                }
            }
            *p = next;
        }
        if progress {
            let (checked, bytes): (u64, u64) = passes.iter().fold((0, 0), |(c, b), p| (c + p.checked, b + p.bytes));
            let done = passes.iter().filter(|p| p.state == "done").count();
            eprint!("\r{done}/{} nodes done, {checked} entries, {} read ", passes.len(), output::bytes(bytes));
        }
    }
    if progress {
        eprintln!();
    }
    let unfinished: Vec<String> =
        passes.iter().filter(|p| p.state != "done").map(|p| format!("{} ({})", p.node, p.state)).collect();
    let out = VerifyOutput { id: accepted.id, nodes: passes };
    output::emit(global.output, &out, || table(&out.nodes))?;
    if unfinished.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "not finished within --wait {}: {}",
            humantime::format_duration(args.wait),
            unfinished.join(", ")
        )))
    }
}

/// The node ids `wanted` names (ids or addresses); empty: every node (the control plane decides).
fn pick(listed: &[pb::Node], wanted: &[String]) -> Result<Vec<String>, CliError> {
    wanted
        .iter()
        .map(|w| {
            listed.iter().find(|n| &n.id == w || &n.address == w).map(|n| n.id.clone()).ok_or_else(|| {
                CliError::Failed(format!("no node {w:?} in the node list (regctl node list shows the nodes)"))
            })
        })
        .collect()
}

/// Where `node` stands with request `id`.
fn pass_of(id: &str, request: &str, node: Option<&pb::Node>) -> NodePass {
    let status = node.and_then(|n| n.verify.as_ref()).filter(|v| v.id == request);
    let ms = |t: Option<&prost_types::Timestamp>| t.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9);
    NodePass {
        node: id.to_owned(),
        address: node.map(|n| n.address.clone()).unwrap_or_default(),
        state: match status {
            Some(v) if v.done => "done",
            Some(v) if v.started_at.is_some() => "running",
            _ => "waiting",
        },
        checked: status.map_or(0, |v| v.checked),
        bytes: status.map_or(0, |v| v.bytes),
        removed: status.map_or(0, |v| v.removed),
        removed_entries: status.map(|v| v.removed_entries.clone()).unwrap_or_default(),
        duration_secs: status
            .filter(|v| v.done)
            .and_then(|v| Some(ms(v.finished_at.as_ref())? - ms(v.started_at.as_ref())?))
            .map(|d| (d * 1000.0).round() / 1000.0),
    }
}

fn table(passes: &[NodePass]) -> String {
    let mut t = Table::new(&["NODE", "STATE", "CHECKED", "READ", "REMOVED", "TOOK"]);
    for p in passes {
        t.row(vec![
            p.node.clone(),
            p.state.to_owned(),
            p.checked.to_string(),
            output::bytes(p.bytes),
            p.removed.to_string(),
            p.duration_secs.map_or_else(|| "-".into(), |d| format!("{d:.1}s")),
        ]);
    }
    let mut out = t.render();
    for p in passes {
        for e in &p.removed_entries {
            out.push_str(&format!("{}: removed {e} (did not match its digest)\n", p.node));
        }
        if p.removed as usize > p.removed_entries.len() {
            out.push_str(&format!("{}: and {} more\n", p.node, p.removed as usize - p.removed_entries.len()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, verify: Option<pb::VerifyStatus>) -> pb::Node {
        pb::Node { id: id.into(), address: format!("{id}:5000"), verify, ..Default::default() }
    }

    #[test]
    fn a_pass_reads_from_the_node_list() {
        let ts = |s| Some(prost_types::Timestamp { seconds: s, nanos: 0 });
        let done = pb::VerifyStatus {
            id: "r1".into(),
            done: true,
            checked: 3,
            bytes: 2048,
            removed: 1,
            removed_entries: vec!["blob sha256:ab".into()],
            started_at: ts(100),
            finished_at: ts(102),
        };
        let p = pass_of("a", "r1", Some(&node("a", Some(done.clone()))));
        assert_eq!((p.state, p.checked, p.removed, p.duration_secs), ("done", 3, 1, Some(2.0)));
        // A status of an older request is not this one's.
        assert_eq!(pass_of("a", "r2", Some(&node("a", Some(done)))).state, "waiting");
        let running = pb::VerifyStatus { id: "r1".into(), started_at: ts(100), ..Default::default() };
        assert_eq!(pass_of("a", "r1", Some(&node("a", Some(running)))).state, "running");
        let out = table(&[p]);
        assert!(out.contains("a      done    3         2.0 KiB   1         2.0s"), "{out}");
        assert!(out.contains("a: removed blob sha256:ab"), "{out}");
    }

    #[test]
    fn nodes_are_named_by_id_or_address() {
        let listed = [node("a", None), node("b", None)];
        assert_eq!(pick(&listed, &["b:5000".into(), "a".into()]).unwrap(), ["b", "a"]);
        assert!(pick(&listed, &["c".into()]).is_err());
        assert!(pick(&listed, &[]).unwrap().is_empty());
    }
}
