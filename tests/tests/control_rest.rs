//! The control plane's REST gateway (`/api/repos`) against a real `wharf-control` on its embedded
//! store: every bad input answers RFC 9457 problem JSON naming the field at fault and writes nothing;
//! CRUD with ETag/If-Match/Location; two concurrent PUTs with the same If-Match: exactly one wins;
//! the password is write-only.

use serde_json::{Value, json};
use wharf_tests::control::{ControlPlane, etag_revision, expect_problem, repo_json, rest, rest_json};
use wharf_tests::http::Resp;

const UPSTREAM: &str = "http://127.0.0.1:1";

async fn create(cp: &ControlPlane, body: &Value) -> anyhow::Result<Resp> {
    rest_json("POST", &cp.api("/api/repos"), &[], body).await
}

async fn get_repo(cp: &ControlPlane, key: &str) -> anyhow::Result<Resp> {
    rest("GET", &cp.api(&format!("/api/repos/{key}")), &[], None).await
}

/// The keys of `GET /api/repos`, in the order listed.
async fn listed_keys(cp: &ControlPlane) -> anyhow::Result<Vec<String>> {
    let resp = rest("GET", &cp.api("/api/repos"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json()?;
    Ok(v["repos"]
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["key"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rest_bad_input_answers_problem_json_with_the_field() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let url = cp.api("/api/repos");

    // Bodies that are not a repo at all.
    let raw_cases: [(&str, &[u8], &str); 5] = [
        ("truncated JSON", br#"{"key":"a","kind":"#, "body"),
        ("not JSON", b"key=a", "body"),
        ("a JSON array", br#"[{"key":"a"}]"#, "body"),
        ("empty body", b"", "body"),
        ("a JSON string", br#""a""#, "body"),
    ];
    for (what, body, field) in raw_cases {
        let resp = rest("POST", &url, &[("content-type", "application/json")], Some(body)).await?;
        expect_problem(&resp, 400, Some(field)).map_err(|e| e.context(format!("POST {what}")))?;
    }

    // Well-formed JSON with a mistake in one field.
    let long_key = "a".repeat(65);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("unknown field", json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "bogus": 1}), "bogus"),
        (
            "unknown field (camelCase)",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tagTtl": "5m"}),
            "tagTtl",
        ),
        ("key of the wrong type", json!({"key": 5, "kind": "generic", "upstream": UPSTREAM}), "key"),
        (
            "tag_ttl of the wrong type",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": 300}),
            "tag_ttl",
        ),
        (
            "username of the wrong type",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "username": true, "password": "p"}),
            "username",
        ),
        ("upstream of the wrong type", json!({"key": "a", "kind": "generic", "upstream": ["http://x"]}), "upstream"),
        ("missing key", json!({"kind": "generic", "upstream": UPSTREAM}), "key"),
        ("uppercase key", json!({"key": "Lab", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("key with a slash", json!({"key": "a/b", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("key with a double separator", json!({"key": "a..b", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("key starting with a separator", json!({"key": "-ab", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("key ending with a separator", json!({"key": "ab_", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("empty key", json!({"key": "", "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("key of 65 characters", json!({"key": long_key, "kind": "generic", "upstream": UPSTREAM}), "key"),
        ("unknown kind", json!({"key": "a", "kind": "dockerhubx", "upstream": UPSTREAM}), "kind"),
        ("ftp upstream", json!({"key": "a", "kind": "generic", "upstream": "ftp://example.com"}), "upstream"),
        ("file upstream", json!({"key": "a", "kind": "generic", "upstream": "file:///etc/passwd"}), "upstream"),
        (
            "upstream without a scheme",
            json!({"key": "a", "kind": "generic", "upstream": "registry.example.com"}),
            "upstream",
        ),
        ("generic without an upstream", json!({"key": "a", "kind": "generic"}), "upstream"),
        (
            "tag_ttl over 30 days",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "31d"}),
            "tag_ttl",
        ),
        (
            "tag_ttl just over 30 days",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "30d 1s"}),
            "tag_ttl",
        ),
        (
            "tag_ttl not a duration",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "soon"}),
            "tag_ttl",
        ),
        ("negative tag_ttl", json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "-5m"}), "tag_ttl"),
        (
            "username without password",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "username": "u"}),
            "password",
        ),
        (
            "password without username",
            json!({"key": "a", "kind": "generic", "upstream": UPSTREAM, "password": "p"}),
            "username",
        ),
    ];
    for (what, body, field) in &cases {
        let resp = create(&cp, body).await?;
        expect_problem(&resp, 400, Some(field)).map_err(|e| e.context(format!("POST {what}: {body}")))?;
    }
    assert_eq!(listed_keys(&cp).await?, Vec::<String>::new(), "a refused POST wrote something");

    // The boundaries are accepted: a 64-character key, a TTL of exactly 30 days, and of 0.
    let key64 = "b".repeat(64);
    for body in [
        json!({"key": key64, "kind": "generic", "upstream": UPSTREAM}),
        json!({"key": "ttl30d", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "30d"}),
        json!({"key": "ttl0", "kind": "generic", "upstream": UPSTREAM, "tag_ttl": "0s"}),
        json!({"key": "a.b-c_d9", "kind": "generic", "upstream": "https://registry.example.com:5000"}),
    ] {
        let resp = create(&cp, &body).await?;
        assert_eq!(resp.status, 201, "POST {body}: {}", resp.text());
    }

    // Duplicate, missing.
    let resp = create(&cp, &repo_json("lab", UPSTREAM)).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let rev = etag_revision(&resp)?;
    let before = get_repo(&cp, "lab").await?.json()?;
    let resp = create(&cp, &json!({"key": "lab", "kind": "generic", "upstream": "http://other.example"})).await?;
    expect_problem(&resp, 409, Some("key")).map_err(|e| e.context("duplicate POST"))?;
    for (method, headers) in
        [("GET", &[][..]), ("PUT", &[("if-match", "*")][..]), ("PATCH", &[("if-match", "*")][..]), ("DELETE", &[][..])]
    {
        let body = (method == "PUT" || method == "PATCH").then(|| repo_json("missing", UPSTREAM).to_string());
        let resp = rest(method, &cp.api("/api/repos/missing"), headers, body.as_deref().map(str::as_bytes)).await?;
        expect_problem(&resp, 404, None).map_err(|e| e.context(format!("{method} a missing repo")))?;
    }
    let resp = get_repo(&cp, "Not_A_Key").await?;
    assert!(resp.status == 400 || resp.status == 404, "GET an invalid key: {} {}", resp.status, resp.text());
    expect_problem(&resp, resp.status, None)?;

    // If-Match: required on PUT and PATCH, a stale one is 412, a malformed one 400.
    let lab = cp.api("/api/repos/lab");
    let put_body = json!({"kind": "generic", "upstream": "http://changed.example"});
    let patch_body = json!({"upstream": "http://changed.example"});
    let resp = rest_json("PUT", &lab, &[], &put_body).await?;
    expect_problem(&resp, 428, None).map_err(|e| e.context("PUT without If-Match"))?;
    let resp = rest_json("PATCH", &lab, &[], &patch_body).await?;
    expect_problem(&resp, 428, None).map_err(|e| e.context("PATCH without If-Match"))?;
    let stale = format!("\"{}\"", rev - 1);
    let resp = rest_json("PUT", &lab, &[("if-match", &stale)], &put_body).await?;
    expect_problem(&resp, 412, None).map_err(|e| e.context("PUT with a stale If-Match"))?;
    let resp = rest_json("PATCH", &lab, &[("if-match", &stale)], &patch_body).await?;
    expect_problem(&resp, 412, None).map_err(|e| e.context("PATCH with a stale If-Match"))?;
    let resp = rest("DELETE", &lab, &[("if-match", &stale)], None).await?;
    expect_problem(&resp, 412, None).map_err(|e| e.context("DELETE with a stale If-Match"))?;
    let resp = rest_json("PUT", &lab, &[("if-match", "twelve")], &put_body).await?;
    expect_problem(&resp, 400, Some("If-Match")).map_err(|e| e.context("PUT with a malformed If-Match"))?;

    // Bad input on PUT and PATCH (with the right If-Match) is refused the same way.
    let current = format!("\"{rev}\"");
    let resp =
        rest_json("PUT", &lab, &[("if-match", &current)], &json!({"kind": "generic", "upstream": "ftp://x"})).await?;
    expect_problem(&resp, 400, Some("upstream")).map_err(|e| e.context("PUT with an ftp upstream"))?;
    let resp = rest_json(
        "PUT",
        &lab,
        &[("if-match", &current)],
        &json!({"key": "other", "kind": "generic", "upstream": UPSTREAM}),
    )
    .await?;
    expect_problem(&resp, 400, Some("key")).map_err(|e| e.context("PUT with another key in the body"))?;
    let resp = rest_json(
        "PUT",
        &lab,
        &[("if-match", &current)],
        &json!({"kind": "generic", "upstream": UPSTREAM, "colour": "red"}),
    )
    .await?;
    expect_problem(&resp, 400, Some("colour")).map_err(|e| e.context("PUT with an unknown field"))?;
    let resp = rest_json("PATCH", &lab, &[("if-match", &current)], &json!({"tag_ttl": "45d"})).await?;
    expect_problem(&resp, 400, Some("tag_ttl")).map_err(|e| e.context("PATCH with a TTL out of range"))?;
    let resp = rest_json("PATCH", &lab, &[("if-match", &current)], &json!({"upstream": "gopher://x"})).await?;
    expect_problem(&resp, 400, Some("upstream")).map_err(|e| e.context("PATCH with a gopher upstream"))?;
    let resp = rest_json("PATCH", &lab, &[("if-match", &current)], &json!({"username": "u"})).await?;
    expect_problem(&resp, 400, Some("password")).map_err(|e| e.context("PATCH a username without a password"))?;
    let resp = rest_json("PATCH", &lab, &[("if-match", &current)], &json!({"nope": 1})).await?;
    expect_problem(&resp, 400, Some("nope")).map_err(|e| e.context("PATCH with an unknown field"))?;
    let resp = rest(
        "PATCH",
        &lab,
        &[("if-match", &current), ("content-type", "application/merge-patch+json")],
        Some(b"{oops"),
    )
    .await?;
    expect_problem(&resp, 400, Some("body")).map_err(|e| e.context("PATCH with invalid JSON"))?;

    // Bodies over 1 MiB: 413, whatever the method.
    let big = format!(
        "{{\"key\":\"big\",\"kind\":\"generic\",\"upstream\":\"{UPSTREAM}\",\"username\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    let resp = rest("POST", &url, &[("content-type", "application/json")], Some(big.as_bytes())).await?;
    expect_problem(&resp, 413, None).map_err(|e| e.context("POST over 1 MiB"))?;
    let resp = rest("PUT", &lab, &[("content-type", "application/json"), ("if-match", &current)], Some(big.as_bytes()))
        .await?;
    expect_problem(&resp, 413, None).map_err(|e| e.context("PUT over 1 MiB"))?;

    // Nothing of the above was written.
    let after = get_repo(&cp, "lab").await?;
    assert_eq!(after.status, 200, "{}", after.text());
    assert_eq!(after.json()?, before, "a refused write changed the repo");
    assert_eq!(etag_revision(&after)?, rev);
    let keys = listed_keys(&cp).await?;
    assert!(!keys.iter().any(|k| k == "big" || k == "other" || k == "a"), "refused writes created repos: {keys:?}");

    // An unknown endpoint is a problem too.
    let resp = rest("GET", &cp.api("/api/nope"), &[], None).await?;
    expect_problem(&resp, 404, None).map_err(|e| e.context("GET /api/nope"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rest_crud_with_etags_and_location() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let resp = rest("GET", &cp.api("/healthz"), &[], None).await?;
    assert_eq!(resp.status, 200, "/healthz: {}", resp.text());
    let resp = rest("GET", &cp.api("/readyz"), &[], None).await?;
    assert_eq!(resp.status, 200, "/readyz: {}", resp.text());

    // Create.
    let resp =
        create(&cp, &json!({"key": "lab", "kind": "generic", "upstream": "http://one.example", "tag_ttl": "5m"}))
            .await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert_eq!(resp.header("location"), Some("/api/repos/lab"));
    let rev1 = etag_revision(&resp)?;
    let created = resp.json()?;
    assert_eq!(created["key"], "lab");
    assert_eq!(created["kind"], "generic");
    assert_eq!(created["upstream"], "http://one.example");
    assert_eq!(created["tag_ttl"], "5m");
    assert_eq!(created["password_set"], false);
    assert_eq!(created["revision"].as_i64(), Some(rev1), "revision and ETag differ: {created}");
    assert!(created.get("password").is_none(), "{created}");
    for f in ["created_at", "updated_at"] {
        let t = created[f].as_str().unwrap_or_default();
        assert!(t.len() >= 20 && t.ends_with('Z') && t.contains('T'), "{f} is not RFC 3339: {created}");
    }

    // Read it back through Location, and in the list.
    let resp = rest("GET", &cp.api("/api/repos/lab"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(etag_revision(&resp)?, rev1);
    assert_eq!(resp.json()?, created, "GET differs from what POST returned");
    let resp = create(&cp, &repo_json("alpha", "http://alpha.example")).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let resp = rest("GET", &cp.api("/api/repos"), &[], None).await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let list = resp.json()?;
    let keys: Vec<&str> =
        list["repos"].as_array().map(|a| a.iter().filter_map(|r| r["key"].as_str()).collect()).unwrap_or_default();
    assert_eq!(keys, ["alpha", "lab"], "list not sorted by key: {list}");
    assert!(list["revision"].as_i64().unwrap_or(0) > rev1, "list revision: {list}");
    assert_eq!(list["repos"][1], created);

    // Full replace with If-Match.
    let resp = rest_json(
        "PUT",
        &cp.api("/api/repos/lab"),
        &[("if-match", &format!("\"{rev1}\""))],
        &json!({"key": "lab", "kind": "generic", "upstream": "http://two.example", "tag_ttl": "1h"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let rev2 = etag_revision(&resp)?;
    assert!(rev2 > rev1, "PUT did not advance the revision: {rev1} -> {rev2}");
    let put = resp.json()?;
    assert_eq!(put["upstream"], "http://two.example");
    assert_eq!(put["tag_ttl"], "1h");
    assert_eq!(put["created_at"], created["created_at"], "PUT changed created_at");
    assert!(put["updated_at"].as_str() >= created["updated_at"].as_str());
    assert_eq!(put["revision"].as_i64(), Some(rev2));
    assert_eq!(get_repo(&cp, "lab").await?.json()?, put);

    // A weak ETag as If-Match works as well, and so does `*`.
    let resp = rest_json(
        "PUT",
        &cp.api("/api/repos/lab"),
        &[("if-match", &format!("W/\"{rev2}\""))],
        &json!({"kind": "generic", "upstream": "http://three.example", "tag_ttl": "1h"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let resp = rest_json(
        "PUT",
        &cp.api("/api/repos/lab"),
        &[("if-match", "*")],
        &json!({"kind": "generic", "upstream": "http://four.example", "tag_ttl": "1h"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let rev4 = etag_revision(&resp)?;

    // JSON merge patch: only what the patch names changes.
    let resp = rest(
        "PATCH",
        &cp.api("/api/repos/lab"),
        &[("if-match", &format!("\"{rev4}\"")), ("content-type", "application/merge-patch+json")],
        Some(br#"{"tag_ttl":"10m"}"#),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let rev5 = etag_revision(&resp)?;
    assert!(rev5 > rev4);
    let patched = resp.json()?;
    assert_eq!(patched["tag_ttl"], "10m");
    assert_eq!(patched["upstream"], "http://four.example", "PATCH touched a field it did not name");
    assert_eq!(patched["kind"], "generic");
    // A patch that removes the upstream of a generic repo is refused (generic needs one).
    let resp = rest_json(
        "PATCH",
        &cp.api("/api/repos/lab"),
        &[("if-match", &format!("\"{rev5}\""))],
        &json!({"upstream": null}),
    )
    .await?;
    expect_problem(&resp, 400, Some("upstream"))?;

    // Delete with a matching If-Match, and without one.
    let resp = rest("DELETE", &cp.api("/api/repos/lab"), &[("if-match", &format!("\"{rev5}\""))], None).await?;
    assert_eq!(resp.status, 204, "{}", resp.text());
    assert!(resp.body.is_empty(), "204 with a body: {}", resp.text());
    expect_problem(&get_repo(&cp, "lab").await?, 404, None)?;
    let resp = rest("DELETE", &cp.api("/api/repos/alpha"), &[], None).await?;
    assert_eq!(resp.status, 204, "{}", resp.text());
    assert_eq!(listed_keys(&cp).await?, Vec::<String>::new());
    // A deleted key can be created again.
    let resp = create(&cp, &repo_json("lab", "http://five.example")).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    assert!(etag_revision(&resp)? > rev5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rest_password_is_write_only() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    let secret = wharf_tests::random_name("s3cret-");
    let secret2 = wharf_tests::random_name("other-s3cret-");
    let mut bodies: Vec<(String, Resp)> = Vec::new();

    let resp = create(
        &cp,
        &json!({"key": "priv", "kind": "generic", "upstream": UPSTREAM, "username": "robot", "password": secret}),
    )
    .await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let v = resp.json()?;
    assert_eq!(v["password_set"], true, "{v}");
    assert_eq!(v["username"], "robot", "{v}");
    let mut rev = etag_revision(&resp)?;
    bodies.push(("POST".into(), resp));

    let resp = get_repo(&cp, "priv").await?;
    assert_eq!(resp.json()?["password_set"], true);
    bodies.push(("GET".into(), resp));
    bodies.push(("GET list".into(), rest("GET", &cp.api("/api/repos"), &[], None).await?));

    // PUT without a password keeps the stored one.
    let resp = rest_json(
        "PUT",
        &cp.api("/api/repos/priv"),
        &[("if-match", &format!("\"{rev}\""))],
        &json!({"kind": "generic", "upstream": "http://kept.example", "username": "robot"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()?["password_set"], true, "PUT without a password dropped it: {}", resp.text());
    rev = etag_revision(&resp)?;
    bodies.push(("PUT keeping".into(), resp));

    // PATCH a new password, then PATCH something else (the password stays set).
    let resp = rest_json(
        "PATCH",
        &cp.api("/api/repos/priv"),
        &[("if-match", &format!("\"{rev}\""))],
        &json!({"password": secret2}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()?["password_set"], true);
    rev = etag_revision(&resp)?;
    bodies.push(("PATCH password".into(), resp));
    let resp = rest_json(
        "PATCH",
        &cp.api("/api/repos/priv"),
        &[("if-match", &format!("\"{rev}\""))],
        &json!({"tag_ttl": "2m"}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()?["password_set"], true, "PATCH of the TTL dropped the password: {}", resp.text());
    rev = etag_revision(&resp)?;
    bodies.push(("PATCH ttl".into(), resp));

    // A failed write does not echo the password either.
    let resp =
        rest_json("PATCH", &cp.api("/api/repos/priv"), &[("if-match", "\"1\"")], &json!({"password": secret})).await?;
    expect_problem(&resp, 412, None)?;
    bodies.push(("PATCH stale".into(), resp));
    let resp = create(
        &cp,
        &json!({"key": "priv", "kind": "generic", "upstream": UPSTREAM, "username": "robot", "password": secret}),
    )
    .await?;
    expect_problem(&resp, 409, None)?;
    bodies.push(("POST duplicate".into(), resp));
    let resp = create(
        &cp,
        &json!({"key": "BAD", "kind": "generic", "upstream": UPSTREAM, "username": "robot", "password": secret}),
    )
    .await?;
    expect_problem(&resp, 400, Some("key"))?;
    bodies.push(("POST bad key".into(), resp));

    // Clearing: merge patch nulls remove both.
    let resp = rest_json(
        "PATCH",
        &cp.api("/api/repos/priv"),
        &[("if-match", &format!("\"{rev}\""))],
        &json!({"username": null, "password": null}),
    )
    .await?;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let v = resp.json()?;
    assert_eq!(v["password_set"], false, "{v}");
    assert!(v.get("username").is_none_or(Value::is_null), "{v}");
    bodies.push(("PATCH clear".into(), resp));

    for (what, resp) in &bodies {
        let text = resp.text();
        assert!(!text.contains(&secret) && !text.contains(&secret2), "{what} returned the password: {text}");
        if let Ok(v) = resp.json() {
            let objects: Vec<&Value> = match v.get("repos").and_then(Value::as_array) {
                Some(a) => a.iter().collect(),
                None => vec![&v],
            };
            for o in objects {
                assert!(o.get("password").is_none(), "{what} has a \"password\" field: {text}");
            }
        }
    }
    let logs = cp.all_output();
    assert!(!logs.contains(&secret) && !logs.contains(&secret2), "the control plane logged the password");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_rest_concurrent_puts_with_the_same_if_match_one_wins() -> anyhow::Result<()> {
    let cp = ControlPlane::embedded()?;
    // Two concurrent creates of one key: one 201, one 409.
    for round in 0..5 {
        let key = format!("dup{round}");
        let (a, b) = (repo_json(&key, "http://a.example"), repo_json(&key, "http://b.example"));
        let (ra, rb) = tokio::join!(create(&cp, &a), create(&cp, &b));
        let (ra, rb) = (ra?, rb?);
        let mut statuses = [ra.status, rb.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}: {} / {}", ra.text(), rb.text());
    }
    let resp = create(&cp, &repo_json("race", "http://start.example")).await?;
    assert_eq!(resp.status, 201, "{}", resp.text());
    let url = cp.api("/api/repos/race");
    for round in 0..10 {
        let resp = rest("GET", &url, &[], None).await?;
        let etag = resp.header("etag").unwrap_or_default().to_string();
        let a = json!({"kind": "generic", "upstream": format!("http://a{round}.example")});
        let b = json!({"kind": "generic", "upstream": format!("http://b{round}.example")});
        let headers = [("if-match", etag.as_str())];
        let (ra, rb) = tokio::join!(rest_json("PUT", &url, &headers, &a), rest_json("PUT", &url, &headers, &b));
        let (ra, rb) = (ra?, rb?);
        let mut statuses = [ra.status, rb.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 412], "round {round}: {} / {}", ra.text(), rb.text());
        let (winner, loser, body) = if ra.status == 200 { (&ra, &rb, &a) } else { (&rb, &ra, &b) };
        expect_problem(loser, 412, None)?;
        let now = rest("GET", &url, &[], None).await?;
        assert_eq!(now.json()?["upstream"], body["upstream"], "round {round}: the loser's write is visible");
        assert_eq!(now.header("etag"), winner.header("etag"), "round {round}: another write happened");
    }
    Ok(())
}
