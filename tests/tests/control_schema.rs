//! The REST API and its OpenAPI document agree: schemathesis (a schema-driven fuzzer, installed by
//! `make test` into `target/tools-venv`) sends a bounded number of generated requests to a real
//! control plane and fails on any 5xx, an undocumented status, a response that does not match its
//! schema, or a request the schema forbids that the server accepts.
//!
//! Two of its checks are left out, on purpose:
//! - `positive_data_acceptance`: the schema cannot state the ranges of duration strings (`tag_ttl`
//!   0s to 30d, ...) or rules across fields (a username needs a password, a passthrough repo takes
//!   no static credentials), so a request valid by the schema may rightly get the documented 400.
//! - `missing_required_header`: a PUT or PATCH without `If-Match` answers 428 Precondition Required
//!   (RFC 6585), as documented; the check expects a status from its own list.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use wharf_tests::control::{ControlPlane, admin_token};

fn schemathesis() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("the workspace root")?;
    let venv = root.join("target/tools-venv/bin/schemathesis");
    if venv.exists() {
        return Ok(venv);
    }
    anyhow::bail!("{} is missing: `make test` (scripts/ensure-deps.sh test) installs it", venv.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rest_api_agrees_with_its_openapi_document_under_fuzzing() -> anyhow::Result<()> {
    let bin = schemathesis()?;
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../control-plane/openapi.json");
    let cp = ControlPlane::embedded()?;
    let work = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("run")
        .arg(&doc)
        .args(["--url", &cp.url()])
        .args(["--header", &format!("Authorization: Bearer {}", admin_token())])
        .args(["--max-examples", "30", "--seed", "7", "--no-shrink", "--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance,missing_required_header"])
        .current_dir(work.path())
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let out =
        tokio::time::timeout(Duration::from_secs(240), cmd.output()).await.context("schemathesis ran past 240 s")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found mismatches ({:?}):\n{stdout}\n{}\ncontrol plane:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        cp.log_tail(20)
    );
    assert!(stdout.contains("Tested:"), "schemathesis tested nothing:\n{stdout}");
    Ok(())
}
