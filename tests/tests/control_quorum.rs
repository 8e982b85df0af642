//! etcd loses its quorum (two of three members down): the control plane's 503 says so (no
//! leader), not only the connect error of a member that is down.

use wharf_tests::control::{ControlPlane, expect_problem, repo_json, rest_json};
use wharf_tests::etcd::EtcdCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_lost_answers_503_saying_etcd_has_no_leader() -> anyhow::Result<()> {
    let mut etcd = EtcdCluster::start(3)?;
    let cp = ControlPlane::etcd(&etcd.endpoints(), &["--store-timeout", "3s"])?;
    let r = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("one", "http://x.example")).await?;
    assert_eq!(r.status, 201, "{}", r.text());
    etcd.kill(0);
    etcd.kill(1);
    let r = rest_json("POST", &cp.api("/api/repos"), &[], &repo_json("two", "http://x.example")).await?;
    let problem = expect_problem(&r, 503, None)?;
    let detail = problem["detail"].as_str().unwrap_or("");
    assert!(detail.contains("no leader") && detail.contains("quorum"), "{detail}");
    Ok(())
}
