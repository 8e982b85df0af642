//! The checked-in OpenAPI document matches the running gateway: it is what `/api/openapi.json`
//! serves, and every call of a scenario that walks each operation answers a status the document
//! lists for that operation, with a body of the documented schema.

use serde_json::{Value, json};
use wharf_tests::control::{ControlPlane, etag_revision, rest, rest_json};
use wharf_tests::http::Resp;

const DOC: &str = include_str!("../../control-plane/openapi.json");

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.trim_start_matches('#');
            resolve(doc, doc.pointer(ptr).unwrap_or_else(|| panic!("dangling $ref {r}")))
        }
        None => v,
    }
}

/// Checks `value` against a (small subset of) JSON schema: types, required, properties,
/// additionalProperties: false, array items.
fn check_schema(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    let ty = schema.get("type").and_then(Value::as_str);
    let ok = match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("boolean") => value.is_boolean(),
        Some("number") => value.is_number(),
        _ => true,
    };
    if !ok {
        return Err(format!("{at}: expected {ty:?}, got {value}"));
    }
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if value.get(r).is_none() {
                return Err(format!("{at}: required property {r:?} missing in {value}"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (schema.get("properties").and_then(Value::as_object), value.as_object()) {
        for (k, v) in obj {
            match props.get(k) {
                Some(s) => check_schema(doc, s, v, &format!("{at}.{k}"))?,
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: undocumented property {k:?}"));
                }
                None => {}
            }
        }
        // Every documented response property the server leaves out must be optional.
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check_schema(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// `resp` is one of the responses documented for `method path`, with a matching body.
fn conforms(doc: &Value, method: &str, path: &str, resp: &Resp, seen: &mut Vec<(String, String, u16)>) {
    let op = doc["paths"][path].get(method).unwrap_or_else(|| panic!("{method} {path} is not documented"));
    let code = resp.status.to_string();
    let documented = op["responses"]
        .get(&code)
        .unwrap_or_else(|| panic!("{method} {path} answered {code}, not documented: {}", resp.text()));
    let documented = resolve(doc, documented);
    let ct = resp.header("content-type").unwrap_or("").split(';').next().unwrap_or("").trim().to_owned();
    if let Some(content) = documented.get("content").and_then(Value::as_object) {
        let media = content
            .get(&ct)
            .unwrap_or_else(|| panic!("{method} {path} {code}: content-type {ct:?} not documented ({content:?})"));
        if ct.ends_with("json") {
            let body: Value = serde_json::from_slice(&resp.body).expect("JSON body");
            if let Err(e) = check_schema(doc, &media["schema"], &body, "body") {
                panic!("{method} {path} {code}: {e}");
            }
        }
    } else {
        assert!(resp.body.is_empty(), "{method} {path} {code}: documented without a body, got {}", resp.text());
    }
    if let Some(headers) = documented.get("headers").and_then(Value::as_object) {
        for h in headers.keys() {
            assert!(resp.header(h).is_some(), "{method} {path} {code}: documented header {h} missing");
        }
    }
    seen.push((method.to_owned(), path.to_owned(), resp.status));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_openapi_document_matches_the_gateway() -> anyhow::Result<()> {
    let doc: Value = serde_json::from_str(DOC)?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let cp = ControlPlane::embedded()?;
    let url = |p: &str| format!("{}{p}", cp.url());
    let served = rest("GET", &url("/api/openapi.json"), &[], None).await?;
    assert_eq!(served.json()?, doc, "/api/openapi.json differs from control-plane/openapi.json");

    let mut seen = Vec::new();
    let mut check = |m: &str, p: &str, r: &Resp| conforms(&doc, m, p, r, &mut seen);
    let one = "/api/repos/{key}";
    let repo = json!({"key": "oa", "kind": "ghcr", "username": "u", "password": "p"});
    check("get", "/api/openapi.json", &served);
    check("get", "/api/repos", &rest("GET", &url("/api/repos"), &[], None).await?);
    let created = rest_json("POST", &url("/api/repos"), &[], &repo).await?;
    check("post", "/api/repos", &created);
    let etag = format!("\"{}\"", etag_revision(&created)?);
    check("post", "/api/repos", &rest_json("POST", &url("/api/repos"), &[], &repo).await?);
    check("post", "/api/repos", &rest_json("POST", &url("/api/repos"), &[], &json!({"key": "Bad"})).await?);
    check("post", "/api/repos", &rest("POST", &url("/api/repos"), &[], Some(&vec![b' '; 2 << 20])).await?);
    check("get", "/api/repos", &rest("GET", &url("/api/repos"), &[], None).await?);
    check("get", one, &rest("GET", &url("/api/repos/oa"), &[], None).await?);
    check("get", one, &rest("GET", &url("/api/repos/none"), &[], None).await?);
    check("get", one, &rest("GET", &url("/api/repos/Bad!"), &[], None).await?);
    let body = json!({"kind": "quay"});
    check("put", one, &rest_json("PUT", &url("/api/repos/oa"), &[], &body).await?);
    check("put", one, &rest_json("PUT", &url("/api/repos/oa"), &[("if-match", "\"1\"")], &body).await?);
    check("put", one, &rest_json("PUT", &url("/api/repos/oa"), &[("if-match", &etag)], &json!({"x": 1})).await?);
    let put = rest_json("PUT", &url("/api/repos/oa"), &[("if-match", &etag)], &body).await?;
    check("put", one, &put);
    let etag = format!("\"{}\"", etag_revision(&put)?);
    check("patch", one, &rest_json("PATCH", &url("/api/repos/oa"), &[], &json!({"tag_ttl": "1m"})).await?);
    check("patch", one, &rest_json("PATCH", &url("/api/repos/oa"), &[("if-match", "\"1\"")], &json!({})).await?);
    let patched = rest_json("PATCH", &url("/api/repos/oa"), &[("if-match", &etag)], &json!({"tag_ttl": "1m"})).await?;
    check("patch", one, &patched);
    check("put", one, &rest_json("PUT", &url("/api/repos/none"), &[("if-match", "*")], &body).await?);
    check("delete", one, &rest("DELETE", &url("/api/repos/oa"), &[("if-match", "\"1\"")], None).await?);
    check("delete", one, &rest("DELETE", &url("/api/repos/oa"), &[], None).await?);
    check("delete", one, &rest("DELETE", &url("/api/repos/oa"), &[], None).await?);
    check("get", "/api/nodes", &rest("GET", &url("/api/nodes"), &[], None).await?);
    let anonymous = [("authorization", "")];
    check("get", "/api/repos", &rest("GET", &url("/api/repos"), &anonymous, None).await?);
    let tokens = url("/api/tokens");
    let created = rest_json("POST", &tokens, &[], &json!({"role": "reader", "expires_in": "1h"})).await?;
    check("post", "/api/tokens", &created);
    let reader = format!("Bearer {}", created.json()?["token"].as_str().unwrap_or_default());
    let as_reader = [("authorization", reader.as_str())];
    check("post", "/api/tokens", &rest_json("POST", &tokens, &as_reader, &json!({"role": "admin"})).await?);
    check("post", "/api/tokens", &rest_json("POST", &tokens, &anonymous, &json!({"role": "admin"})).await?);
    check("post", "/api/tokens", &rest_json("POST", &tokens, &[], &json!({"role": "root"})).await?);
    check("post", "/api/tokens", &rest("POST", &tokens, &[], Some(&vec![b' '; 2 << 20])).await?);
    check("get", "/api/tokens", &rest("GET", &tokens, &as_reader, None).await?);
    check("get", "/api/tokens", &rest("GET", &tokens, &anonymous, None).await?);
    // No node is connected here: a verification has nobody to ask (the 202 is in cache_verify.rs).
    let verify = url("/api/nodes/verify");
    let v = "/api/nodes/verify";
    check("post", v, &rest_json("POST", &verify, &[], &json!({})).await?);
    check("post", v, &rest_json("POST", &verify, &[], &json!({"nodes": ["n1"]})).await?);
    check("post", v, &rest_json("POST", &verify, &[], &json!({"rate_bytes_per_sec": -1})).await?);
    check("post", v, &rest_json("POST", &verify, &as_reader, &json!({})).await?);
    check("post", v, &rest("POST", &verify, &[], Some(&vec![b' '; 2 << 20])).await?);
    let id = created.json()?["id"].as_str().unwrap_or_default().to_owned();
    let one_token = "/api/tokens/{id}";
    check("delete", one_token, &rest("DELETE", &url(&format!("/api/tokens/{id}")), &as_reader, None).await?);
    check("delete", one_token, &rest("DELETE", &url("/api/tokens/xyz"), &[], None).await?);
    check("delete", one_token, &rest("DELETE", &url(&format!("/api/tokens/{id}")), &[], None).await?);
    check("delete", one_token, &rest("DELETE", &url(&format!("/api/tokens/{id}")), &[], None).await?);
    check("get", "/healthz", &rest("GET", &url("/healthz"), &[], None).await?);
    check("get", "/readyz", &rest("GET", &url("/readyz"), &[], None).await?);

    // Every documented operation was exercised.
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for m in ops.as_object().expect("operations").keys().filter(|k| *k != "parameters") {
            assert!(seen.iter().any(|(sm, sp, _)| sm == m && sp == path), "{m} {path} is documented but not exercised");
        }
    }
    // And an undocumented path is a problem-JSON 404, not a silent success.
    let nope = rest("GET", &url("/api/nope"), &[], None).await?;
    assert_eq!(nope.status, 404);
    Ok(())
}
