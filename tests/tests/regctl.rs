//! `regctl` against a real `wharf-control` (embedded store) and managed `wharf-proxy` nodes: repo
//! and node commands in every output format (golden files for the tables), exit codes, the stale
//! revision case, secrets only from stdin/env/file, and bad input: unknown flags, invalid repoKeys,
//! an unreachable server and servers that answer garbage.

use std::time::Duration;

use serde_json::Value;
use wharf_tests::control::{ControlPlane, Node, admin_token, list_nodes, poll, rest_json};
use wharf_tests::regctl::{Regctl, assert_golden, expect_aligned, mask_timestamps, squash_table};

const SECRET: &str = "s3cret-Pa55word";

fn repo<'a>(list: &'a Value, key: &str) -> &'a Value {
    list["repos"].as_array().and_then(|a| a.iter().find(|r| r["key"] == key)).unwrap_or(&Value::Null)
}

/// Trailing numbers (the REVISION column, the `revision:` line) masked.
fn mask_revisions(table: &str) -> String {
    table
        .lines()
        .map(|l| {
            let t = l.trim_end_matches(|c: char| c.is_ascii_digit());
            if t.len() < l.len() { format!("{t}<rev>") } else { l.to_owned() }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_repo_commands_outputs_exit_codes_and_stale_revision() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let rc = Regctl::new(&cp.url());
    let secrets = tempfile::tempdir()?;
    let pw_file = secrets.path().join("pw");
    std::fs::write(&pw_file, format!("{SECRET}\n"))?;
    let pw_path = pw_file.to_string_lossy().into_owned();

    // add: every way a password may come in; none as a flag value.
    let out = rc.run(&["repo", "add", "ghcr", "--kind", "ghcr", "--tag-ttl", "10m"]).await?;
    out.expect_code(0, "repo add ghcr")?;
    assert!(out.stdout.starts_with("repo ghcr added (revision "), "{out:?}");
    let args = ["repo", "add", "corp", "--upstream", "https://registry.corp.example", "--username", "bot"];
    let mut with_stdin = args.to_vec();
    with_stdin.push("--password-stdin");
    rc.run_with_stdin(&with_stdin, Some(format!("{SECRET}\n").as_bytes())).await?.expect_code(0, "add corp")?;
    let rc_env = rc.clone().with_env("LAB_PASSWORD", SECRET);
    let lab =
        ["repo", "add", "lab", "--upstream", "http://127.0.0.1:1", "--username", "u", "--password-env", "LAB_PASSWORD"];
    rc_env.run(&lab).await?.expect_code(0, "add lab (password from env)")?;
    let quay = ["repo", "add", "quay", "--kind", "quay", "--username", "r", "--password-file", &pw_path];
    rc.run(&quay).await?.expect_code(0, "add quay (password from a file)")?;

    // Mistakes: duplicate, a username without a password, a password as a flag value.
    rc.run(&["repo", "add", "ghcr", "--kind", "ghcr"]).await?.expect_error("already exists", "duplicate add")?;
    rc.run(&["repo", "add", "x", "--upstream", "http://a", "--username", "u"])
        .await?
        .expect_code(2, "username only")?;
    rc.run(&["repo", "add", "x", "--upstream", "http://a", "--password", SECRET])
        .await?
        .expect_code(2, "--password")?;
    rc.run(&["repo", "add", "x", "--kind", "ecr"]).await?.expect_error("upstream", "ecr without upstream")?;
    rc.run(&["repo", "add", "x", "--upstream", "http://a", "--username", "u", "--password-env", "NOT_SET_ANYWHERE"])
        .await?
        .expect_error("NOT_SET_ANYWHERE is not set", "unset password env")?;

    // list: table (golden), json, yaml.
    let table = rc.run(&["repo", "list"]).await?;
    table.expect_code(0, "repo list")?;
    expect_aligned(&table.stdout)?;
    assert_golden("regctl_repo_list.txt", &mask_revisions(&table.stdout))?;
    let json = rc.run(&["repo", "list", "-o", "json"]).await?;
    let list = json.expect_code(0, "repo list -o json")?.json()?;
    let keys: Vec<&str> =
        list["repos"].as_array().map(|a| a.iter().filter_map(|r| r["key"].as_str()).collect()).unwrap_or_default();
    assert_eq!(keys, ["corp", "ghcr", "lab", "quay"]);
    assert!(list["revision"].as_i64().unwrap_or(0) > 0, "{list}");
    let ghcr = repo(&list, "ghcr");
    assert_eq!(ghcr["kind"], "ghcr");
    assert_eq!(ghcr["upstream"], "https://ghcr.io");
    assert_eq!(ghcr["tag_ttl"], "10m");
    assert_eq!(ghcr["password_set"], false);
    assert!(ghcr.get("username").is_none(), "{ghcr}");
    let fields: Vec<&str> = ghcr.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(
        fields,
        [
            "access",
            "auth",
            "created_at",
            "key",
            "kind",
            "password_set",
            "revision",
            "tag_ttl",
            "updated_at",
            "upstream"
        ]
    );
    for k in ["corp", "lab", "quay"] {
        assert_eq!(repo(&list, k)["password_set"], true, "{k}: {list}");
    }
    assert_eq!(repo(&list, "corp")["username"], "bot");
    let yaml = rc.run(&["repo", "list", "-o", "yaml"]).await?;
    yaml.expect_code(0, "repo list -o yaml")?;
    assert!(yaml.stdout.starts_with("repos:\n- key: corp\n  kind: generic\n"), "{}", yaml.stdout);
    assert!(yaml.stdout.contains("  password_set: true\n") && yaml.stdout.contains("\nrevision: "), "{}", yaml.stdout);

    // get: fields (golden), json equal to the list's entry.
    let get = rc.run(&["repo", "get", "corp"]).await?;
    get.expect_code(0, "repo get")?;
    assert_golden("regctl_repo_get.txt", &mask_revisions(&mask_timestamps(&get.stdout)))?;
    let one = rc.run(&["repo", "get", "corp", "-o", "json"]).await?.json()?;
    assert_eq!(&one, repo(&list, "corp"));
    rc.run(&["repo", "get", "nope"]).await?.expect_error("repo \"nope\" not found", "get a missing repo")?;

    // update: reads, applies, writes with the revision it read.
    let before = one["revision"].as_i64().unwrap_or(0);
    let out = rc.run(&["repo", "update", "corp", "--tag-ttl", "1m", "-o", "json"]).await?;
    let after = out.expect_code(0, "update")?.json()?;
    assert_eq!(after["tag_ttl"], "1m");
    assert_eq!(after["username"], "bot", "the username is kept: {after}");
    assert_eq!(after["password_set"], true, "the password is kept: {after}");
    assert_eq!(after["upstream"], "https://registry.corp.example");
    assert!(after["revision"].as_i64().unwrap_or(0) > before);

    // A change by someone else since the revision read: reported, nothing written.
    let stale = rc.run(&["repo", "update", "corp", "--tag-ttl", "2m", "--revision", &before.to_string()]).await?;
    stale.expect_error("repo \"corp\" was changed by someone else, re-run", "stale update")?;
    let now = rc.run(&["repo", "get", "corp", "-o", "json"]).await?.json()?;
    assert_eq!(now, after, "a stale update wrote something");

    // Concurrent updates: each one either lands or says it lost, none is silently overwritten.
    let ttls = ["3m", "4m", "5m", "6m", "7m", "8m"];
    let runs = ttls.iter().map(|t| {
        let rc = rc.clone();
        async move { rc.run(&["repo", "update", "corp", "--tag-ttl", t, "-o", "json"]).await }
    });
    let outs = futures_util::future::join_all(runs).await;
    let mut landed = Vec::new();
    for o in outs {
        let o = o?;
        match o.code {
            0 => landed.push(o.json()?),
            _ => {
                o.expect_error("changed by someone else, re-run", "a concurrent update")?;
            }
        }
    }
    assert!(!landed.is_empty(), "no concurrent update landed");
    let revs: std::collections::BTreeSet<i64> = landed.iter().filter_map(|r| r["revision"].as_i64()).collect();
    assert_eq!(revs.len(), landed.len(), "two updates reported the same revision: {landed:?}");
    let last = landed.iter().max_by_key(|r| r["revision"].as_i64()).cloned().unwrap_or_default();
    let now = rc.run(&["repo", "get", "corp", "-o", "json"]).await?.json()?;
    assert_eq!(now["tag_ttl"], last["tag_ttl"], "the stored repo is not the last update that landed");

    // Credentials: new password from stdin, then cleared.
    rc.run_with_stdin(&["repo", "update", "lab", "--password-stdin"], Some(b"other\n"))
        .await?
        .expect_code(0, "new pw")?;
    let cleared = rc.run(&["repo", "update", "lab", "--clear-credentials", "-o", "json"]).await?;
    let cleared = cleared.expect_code(0, "clear credentials")?.json()?;
    assert_eq!(cleared["password_set"], false, "{cleared}");
    assert!(cleared.get("username").is_none(), "{cleared}");
    rc.run(&["repo", "update", "corp"]).await?.expect_code(2, "update without a change")?;
    rc.run(&["repo", "update", "nope", "--tag-ttl", "1m"]).await?.expect_error("not found", "update a missing repo")?;
    rc.run(&["repo", "update", "corp", "--tag-ttl", "40d"]).await?.expect_error("tag_ttl", "ttl out of range")?;

    // Access and credential modes, and the upstream's CA bundle.
    rc.run(&["repo", "add", "sec", "--kind", "ghcr", "--access", "token"]).await?.expect_code(0, "add --access")?;
    let sec = rc.run(&["repo", "get", "sec", "-o", "json"]).await?.json()?;
    assert_eq!((sec["auth"].as_str(), sec["access"].as_str()), (Some("static"), Some("token")), "{sec}");
    rc.run(&["repo", "update", "sec", "--auth", "passthrough"])
        .await?
        .expect_error("passthrough", "passthrough with token access")?;
    rc.run(&["repo", "update", "sec", "--access", "private"]).await?.expect_code(2, "an unknown access")?;
    let missing_ca = secrets.path().join("no-ca.pem");
    rc.run(&["repo", "update", "sec", "--ca-bundle-file", &missing_ca.to_string_lossy()])
        .await?
        .expect_error("reading the CA bundle", "a missing CA bundle")?;
    std::fs::write(&missing_ca, "not a certificate")?;
    rc.run(&["repo", "update", "sec", "--ca-bundle-file", &missing_ca.to_string_lossy()])
        .await?
        .expect_error("CA bundle", "a CA bundle without certificates")?;
    rc.run(&["repo", "update", "sec", "--access", "public", "--auth", "passthrough"])
        .await?
        .expect_code(0, "to passthrough")?;
    rc.run(&["repo", "rm", "sec", "--yes"]).await?.expect_code(0, "rm sec")?;

    // rm: asks on a terminal; without one it needs --yes.
    rc.run(&["repo", "rm", "ghcr"]).await?.expect_code(2, "rm without --yes off a terminal")?;
    let rm = rc.run(&["repo", "rm", "ghcr", "--yes"]).await?;
    rm.expect_code(0, "rm --yes")?;
    assert!(rm.stdout.starts_with("repo ghcr deleted (revision "), "{rm:?}");
    rc.run(&["repo", "get", "ghcr"]).await?.expect_error("not found", "get after rm")?;
    rc.run(&["repo", "rm", "ghcr", "--yes"]).await?.expect_error("not found", "rm twice")?;

    // The token comes from --token-file, else WHARF_TOKEN; a wrong one is refused, saying why.
    let tok = secrets.path().join("token");
    std::fs::write(&tok, format!("{}\n", admin_token()))?;
    let wrong_env = rc.clone().with_env("WHARF_TOKEN", "abc");
    wrong_env.run(&["repo", "list", "--token-file", &tok.to_string_lossy()]).await?.expect_code(0, "--token-file")?;
    wrong_env.run(&["repo", "list"]).await?.expect_error("not a Wharf token", "a wrong WHARF_TOKEN")?;
    let missing = secrets.path().join("missing");
    rc.run(&["repo", "list", "--token-file", &missing.to_string_lossy()])
        .await?
        .expect_error("reading the token", "missing token file")?;

    // The password never shows: not in any output, not in the control plane's log.
    for o in [&table, &json, &yaml, &get] {
        assert!(!o.stdout.contains(SECRET) && !o.stderr.contains(SECRET), "the password leaked: {o:?}");
    }
    assert!(!cp.all_output().contains(SECRET), "the password is in the control plane's log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_node_list_shows_managed_nodes() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let rc = Regctl::new(&cp.url());
    let empty = rc.run(&["node", "list"]).await?;
    empty.expect_code(0, "node list without nodes")?;
    assert_golden("regctl_node_list_empty.txt", &empty.stdout)?;

    let body = serde_json::json!({ "key": "lab", "upstream": "http://127.0.0.1:1" });
    let resp = rest_json("POST", &cp.api("/api/repos"), &[], &body).await?;
    anyhow::ensure!(resp.status == 201, "create: {}", resp.text());
    let n1 = Node::spawn("n1", &[cp.url()])?;
    let n2 = Node::spawn("n2", &[cp.url()])?;
    poll(Duration::from_secs(30), "two nodes with an applied revision", || {
        let url = cp.url();
        async move {
            let nodes = list_nodes(&url).await.ok()?;
            (nodes.len() == 2 && nodes.iter().all(|n| n["applied_revision"].as_i64().unwrap_or(0) > 0)).then_some(())
        }
    })
    .await?;

    let table = rc.run(&["node", "list"]).await?;
    table.expect_code(0, "node list")?;
    expect_aligned(&table.stdout)?;
    assert_golden("regctl_node_list.txt", &squash_table(&table.stdout))?;
    assert!(table.stdout.contains(&n1.host()) && table.stdout.contains(&n2.host()), "{}", table.stdout);

    let json = rc.run(&["node", "list", "-o", "json"]).await?.json()?;
    let nodes = json["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 2, "{json}");
    for (n, node) in nodes.iter().zip([&n1, &n2]) {
        assert_eq!(n["id"], node.id());
        assert_eq!(n["address"], node.host());
        assert!(n["applied_revision"].as_i64().unwrap_or(0) > 0, "{n}");
        assert!(n["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')), "{n}");
        assert!(n["cache_bytes"].is_u64() && n["cache_hits"].is_u64() && n["cache_misses"].is_u64(), "{n}");
        assert!(n.get("hit_ratio").is_some(), "{n}");
    }
    let yaml = rc.run(&["node", "list", "-o", "yaml"]).await?;
    assert!(yaml.expect_code(0, "yaml")?.stdout.starts_with("nodes:\n- id: n1\n"), "{}", yaml.stdout);
    Ok(())
}

/// A TCP server that answers every connection with `reply` and closes it.
async fn garbage_server(reply: &'static [u8]) -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// An HTTP server (HTTP/1 and h2c) that answers 200 "hello" to everything.
async fn hello_server() -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let app = axum::Router::new().fallback(|| async { "hello" });
    tokio::spawn(async move { axum::serve(l, app).await });
    Ok(format!("http://{addr}"))
}

/// A server that accepts connections and never answers.
async fn silent_server() -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    Ok(format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regctl_bad_input_and_bad_servers() -> anyhow::Result<()> {
    let port = wharf_tests::control::free_port()?;
    let dead = format!("http://127.0.0.1:{port}");
    let rc = Regctl::new(&dead);

    // Usage errors: exit 2, before any connection.
    for args in [
        vec!["repo", "list", "--bogus"],
        vec!["frobnicate"],
        vec![],
        vec!["repo", "add", "Bad_Key", "--upstream", "http://a"],
        vec!["repo", "get", "a..b"],
        vec!["repo", "rm", "-x-", "--yes"],
        vec!["repo", "add", "ok", "--kind", "nexus"],
        vec!["repo", "add", "ok", "--tag-ttl", "soon"],
        vec!["repo", "list", "-o", "xml"],
        vec!["cache", "warm", "lab/app"],
        vec!["cache", "warm", "Lab/app:v1"],
        vec!["cache", "warm", "lab/App:v1"],
        vec!["cache", "warm", "lab/app@sha256:1234"],
        vec!["cache", "warm", "lab/app:v1", "--platform", "linux"],
        vec!["cache", "warm", "lab/app:v1", "--parallel", "0"],
        vec!["check-cdn", "not a url"],
        vec!["completion", "powershell"],
    ] {
        let out = rc.run(&args).await?;
        out.expect_code(2, &format!("regctl {args:?}"))?;
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    let bad_key = rc.run(&["repo", "get", "Bad_Key"]).await?;
    assert!(bad_key.stderr.contains("repoKey \"Bad_Key\" is invalid"), "{}", bad_key.stderr);

    // Help and completions.
    for args in [
        vec!["--help"],
        vec!["repo", "--help"],
        vec!["repo", "add", "--help"],
        vec!["repo", "list", "--help"],
        vec!["repo", "get", "--help"],
        vec!["repo", "update", "--help"],
        vec!["repo", "rm", "--help"],
        vec!["node", "--help"],
        vec!["node", "list", "--help"],
        vec!["cache", "--help"],
        vec!["cache", "warm", "--help"],
        vec!["check-cdn", "--help"],
        vec!["completion", "--help"],
    ] {
        let out = rc.run(&args).await?;
        out.expect_code(0, &format!("{args:?}"))?;
        assert!(out.stdout.contains("Examples:"), "{args:?} has no examples:\n{}", out.stdout);
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = rc.run(&["completion", shell]).await?;
        out.expect_code(0, shell)?;
        assert!(out.stdout.contains("regctl") && out.stdout.contains("check-cdn"), "{shell}: {}", out.stdout);
    }

    // Unreachable, garbage, silence: one line each, exit 1.
    let msg = format!("control plane unreachable at {dead}");
    rc.run(&["repo", "list"]).await?.expect_error(&msg, "unreachable")?;
    rc.run(&["node", "list", "-o", "json"]).await?.expect_error(&msg, "unreachable (json)")?;
    rc.run(&["cache", "warm", "lab/app:v1"]).await?.expect_error(&msg, "warm needs the node list")?;
    Regctl::new("localhost:7000")
        .run(&["repo", "list"])
        .await?
        .expect_error("not an http:// or https:// URL", "no scheme")?;

    let garbage = garbage_server(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02garbage").await?;
    let out = Regctl::new(&garbage).run(&["repo", "list"]).await?;
    out.expect_code(1, "garbage server")?;
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains(&garbage), "the message names the server: {}", out.stderr);
    let http1 = garbage_server(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
    let out = Regctl::new(&http1).run(&["repo", "list"]).await?;
    out.expect_code(1, "HTTP/1.1 server")?;
    assert!(out.stderr.lines().count() == 1 && out.stderr.contains(&http1), "{}", out.stderr);
    let hello = hello_server().await?;
    Regctl::new(&hello)
        .run(&["repo", "get", "lab"])
        .await?
        .expect_error("does not answer as a Wharf control plane", "a web server")?;
    let silent = silent_server().await?;
    let out = Regctl::new(&silent).run(&["repo", "list", "--timeout", "1s"]).await?;
    out.expect_code(1, "silent server")?;
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains(&silent) || out.stderr.contains("timed out"), "{}", out.stderr);
    Ok(())
}
