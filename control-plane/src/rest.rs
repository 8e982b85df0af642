//! The REST gateway (`/api/repos`, `/api/nodes`): the same `Repos` as gRPC, in JSON, with ETags
//! carrying revisions, `If-Match` for compare-and-swap and RFC 9457 problem details for errors.

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::nodes::NodeInfo;
use crate::repos::{RepoRecord, RepoSpec, spec_of};
use crate::state::ApiState;
use crate::tokens::{TokenRecord, TokenSpec};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/api/repos", get(list_repos).post(create_repo))
        .route("/api/repos/{key}", get(get_repo).put(put_repo).patch(patch_repo).delete(delete_repo))
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/verify", axum::routing::post(verify_nodes))
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/api/openapi.json", get(openapi))
}

/// The gateway's OpenAPI 3 document (checked in; a test compares it with the running server).
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A repo as the REST API shows it (the password is write-only).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct RepoView {
    pub key: String,
    pub kind: String,
    pub upstream: String,
    pub tag_ttl: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    pub password_set: bool,
    pub created_at: String,
    pub updated_at: String,
    pub revision: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_ttl: Option<String>,
    pub auth: String,
    pub access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_tls_verify: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_of: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl From<&RepoRecord> for RepoView {
    fn from(r: &RepoRecord) -> Self {
        RepoView {
            key: r.repo.key.to_string(),
            kind: r.repo.kind.to_string(),
            upstream: r.repo.upstream.clone(),
            tag_ttl: humantime::format_duration(r.repo.tag_ttl).to_string(),
            username: r.repo.credentials.as_ref().map(|c| c.username.clone()),
            password_set: r.repo.credentials.is_some(),
            created_at: rfc3339(r.created_at),
            updated_at: rfc3339(r.updated_at),
            revision: r.revision,
            cache_ttl: r.repo.cache_ttl.map(|d| humantime::format_duration(d).to_string()),
            auth: r.repo.auth.to_string(),
            access: r.repo.access.to_string(),
            ca_bundle: r.repo.tls.ca_bundle.clone(),
            insecure_skip_tls_verify: r.repo.tls.insecure_skip_verify,
            mirror_of: r.repo.mirror_of.clone(),
            credential_provider: r.repo.credential_provider.map(|p| p.to_string()),
            credential_file: r.repo.credential_file.clone(),
        }
    }
}

/// What a client may send for a repo.
#[derive(Deserialize, Serialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RepoInput {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub upstream: Option<String>,
    /// A duration: `"5m"`, `"1h30m"`, `"30s"`.
    #[serde(default)]
    pub tag_ttl: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// A duration (`"7d"`): this repo's content not accessed for this long is evicted.
    #[serde(default)]
    pub cache_ttl: Option<String>,
    /// `static` or `passthrough`.
    #[serde(default)]
    pub auth: Option<String>,
    /// `public` or `token`.
    #[serde(default)]
    pub access: Option<String>,
    /// PEM certificates trusted for this upstream.
    #[serde(default)]
    pub ca_bundle: Option<String>,
    #[serde(default)]
    pub insecure_skip_tls_verify: Option<bool>,
    /// Registry hosts the repo mirrors (`["docker.io"]`); empty or absent: the kind's and the upstream's.
    #[serde(default)]
    pub mirror_of: Option<Vec<String>>,
    /// `aws`, `azure`, `gcp`, `oauth2`: credentials from the node's identity instead of a password.
    #[serde(default)]
    pub credential_provider: Option<String>,
    /// The file on the nodes the provider reads (`gcp`, `oauth2`).
    #[serde(default)]
    pub credential_file: Option<String>,
}

fn parse_duration(field: &str, value: Option<&str>) -> Result<Option<Duration>, ApiError> {
    value
        .map(|t| {
            humantime::parse_duration(t)
                .map_err(|e| ApiError::invalid(field, format!("{t:?} is not a duration like \"5m\" or \"1h\": {e}")))
        })
        .transpose()
}

impl RepoInput {
    fn into_spec(self, key: String) -> Result<RepoSpec, ApiError> {
        Ok(RepoSpec {
            key,
            kind: self.kind,
            upstream: self.upstream,
            tag_ttl: parse_duration("tag_ttl", self.tag_ttl.as_deref())?,
            username: self.username,
            password: self.password,
            cache_ttl: parse_duration("cache_ttl", self.cache_ttl.as_deref())?,
            auth: self.auth,
            access: self.access,
            ca_bundle: self.ca_bundle,
            insecure_skip_tls_verify: self.insecure_skip_tls_verify.unwrap_or(false),
            mirror_of: self.mirror_of.unwrap_or_default(),
            credential_provider: self.credential_provider,
            credential_file: self.credential_file,
        })
    }
}

/// An RFC 9457 problem.
pub struct Problem {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    pub field: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, title, detail: detail.into(), field: None }
    }

    fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self { field: Some(field.into()), ..Self::new(StatusCode::BAD_REQUEST, "Invalid request", detail) }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = json!({
            "type": "about:blank",
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(f) = self.field {
            body["field"] = Value::String(f);
        }
        let mut r = (self.status, body.to_string()).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        r
    }
}

impl From<ApiError> for Problem {
    fn from(e: ApiError) -> Self {
        let detail = e.to_string();
        match e {
            ApiError::Invalid { field, message } => Problem::invalid(field, message),
            ApiError::NotFound { .. } | ApiError::TokenNotFound { .. } | ApiError::NodeNotFound(_) => {
                Problem::new(StatusCode::NOT_FOUND, "Not found", detail)
            }
            ApiError::Unauthenticated(_) => Problem::new(StatusCode::UNAUTHORIZED, "Unauthenticated", detail),
            ApiError::PermissionDenied(_) => Problem::new(StatusCode::FORBIDDEN, "Permission denied", detail),
            ApiError::AlreadyExists { .. } => {
                Problem { field: Some("key".into()), ..Problem::new(StatusCode::CONFLICT, "Already exists", detail) }
            }
            ApiError::Stale { .. } => Problem::new(StatusCode::PRECONDITION_FAILED, "Changed by someone else", detail),
            ApiError::Unavailable(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "Store unavailable", detail),
            ApiError::Internal(_) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", detail),
        }
    }
}

type ApiResult = Result<Response, Problem>;

fn etag(revision: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{revision}\"")).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

fn repo_response(status: StatusCode, r: &RepoRecord) -> Response {
    let mut resp = (status, axum::Json(RepoView::from(r))).into_response();
    resp.headers_mut().insert(header::ETAG, etag(r.revision));
    resp
}

/// The revision in `If-Match` (`"12"`, `W/"12"` or `*`, which means: any).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    if s == "*" {
        return Ok(None);
    }
    // Revisions start at 1: "0" (or a negative one) was never issued.
    s.trim_start_matches("W/").trim_matches('"').parse::<i64>().ok().filter(|r| *r > 0).map(Some).ok_or_else(|| {
        Problem::invalid("If-Match", format!("If-Match {s:?} is not an ETag this API issued (like \"12\")"))
    })
}

fn require_if_match(headers: &HeaderMap) -> Result<Option<i64>, Problem> {
    if !headers.contains_key(header::IF_MATCH) {
        return Err(Problem::new(
            StatusCode::PRECONDITION_REQUIRED,
            "If-Match required",
            "send the ETag of the repo you read as If-Match (or If-Match: * to overwrite whatever is there)",
        ));
    }
    if_match(headers)
}

/// Reads a JSON body of at most `MAX_BODY` bytes into `T`, naming the field at fault.
async fn json_body<T: serde::de::DeserializeOwned>(req: Request) -> Result<T, Problem> {
    let bytes: Bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Body too large",
            format!("request bodies are limited to {MAX_BODY} bytes"),
        )
    })?;
    parse_json(&bytes)
}

/// Parses a JSON object into `T` (serde would also take an array for a struct: refused here).
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Problem::invalid("body", "the body must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        if inner.is_syntax() || inner.is_eof() {
            return Problem::invalid("body", format!("invalid JSON: {msg}"));
        }
        // An unknown field is named in serde's message, not in the path.
        let field = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| if path == "." || path.is_empty() { "body".into() } else { path });
        Problem::invalid(field, msg)
    })
}

async fn list_repos(State(s): State<ApiState>) -> ApiResult {
    let (repos, revision) = s.repos.list().await?;
    let views: Vec<RepoView> = repos.iter().map(RepoView::from).collect();
    Ok(axum::Json(json!({ "repos": views, "revision": revision })).into_response())
}

async fn create_repo(State(s): State<ApiState>, req: Request) -> ApiResult {
    let input: RepoInput = json_body(req).await?;
    let key = input.key.clone().ok_or_else(|| Problem::invalid("key", "key is required"))?;
    let r = s.repos.create(input.into_spec(key)?).await?;
    let mut resp = repo_response(StatusCode::CREATED, &r);
    if let Ok(loc) = HeaderValue::from_str(&format!("/api/repos/{}", r.repo.key)) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(resp)
}

async fn get_repo(State(s): State<ApiState>, Path(key): Path<String>) -> ApiResult {
    Ok(repo_response(StatusCode::OK, &s.repos.get(&key).await?))
}

fn check_key(path_key: &str, body_key: Option<&str>) -> Result<(), Problem> {
    match body_key {
        Some(k) if k != path_key => {
            Err(Problem::invalid("key", format!("key {k:?} in the body differs from {path_key:?} in the path")))
        }
        _ => Ok(()),
    }
}

async fn put_repo(State(s): State<ApiState>, Path(key): Path<String>, headers: HeaderMap, req: Request) -> ApiResult {
    let expected = require_if_match(&headers)?;
    let input: RepoInput = json_body(req).await?;
    check_key(&key, input.key.as_deref())?;
    let r = s.repos.update(input.into_spec(key)?, expected, false).await?;
    Ok(repo_response(StatusCode::OK, &r))
}

/// JSON merge patch (RFC 7386) onto the repo as the client sees it; `"password": null` clears it.
async fn patch_repo(State(s): State<ApiState>, Path(key): Path<String>, headers: HeaderMap, req: Request) -> ApiResult {
    let expected = require_if_match(&headers)?;
    let patch: Value = json_body(req).await?;
    let clear_password = patch.get("password").is_some_and(Value::is_null);
    let current = s.repos.get(&key).await?;
    let spec = spec_of(&current);
    let mut doc = json!({
        "key": spec.key,
        "kind": spec.kind,
        "upstream": spec.upstream,
        "tag_ttl": spec.tag_ttl.map(|d| humantime::format_duration(d).to_string()),
        "username": spec.username,
        "cache_ttl": spec.cache_ttl.map(|d| humantime::format_duration(d).to_string()),
        "auth": spec.auth,
        "access": spec.access,
        "ca_bundle": spec.ca_bundle,
        "insecure_skip_tls_verify": spec.insecure_skip_tls_verify,
        "mirror_of": spec.mirror_of,
        "credential_provider": spec.credential_provider,
        "credential_file": spec.credential_file,
    });
    merge_patch(&mut doc, &patch);
    let input: RepoInput = parse_json(doc.to_string().as_bytes())?;
    check_key(&key, input.key.as_deref())?;
    let expected = expected.or(Some(current.revision));
    let r = s.repos.update(input.into_spec(key)?, expected, clear_password).await?;
    Ok(repo_response(StatusCode::OK, &r))
}

fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    // An object patch applies to an object: anything else is replaced by an empty one first.
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

async fn delete_repo(State(s): State<ApiState>, Path(key): Path<String>, headers: HeaderMap) -> ApiResult {
    let expected = if_match(&headers)?;
    s.repos.delete(&key, expected).await?;
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

async fn list_nodes(State(s): State<ApiState>) -> ApiResult {
    let nodes: Vec<NodeInfo> = s.nodes.list().await?;
    Ok(axum::Json(json!({ "nodes": nodes })).into_response())
}

/// What a client may send to ask nodes to verify their cache.
#[derive(Deserialize, Serialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct VerifyInput {
    /// Node ids; absent or empty: every node in the node list.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Absent or 0: as fast as each node's disk reads.
    #[serde(default)]
    pub rate_bytes_per_sec: u64,
}

async fn verify_nodes(State(s): State<ApiState>, req: Request) -> ApiResult {
    let input: VerifyInput = json_body(req).await?;
    let r = crate::commands::request_verify(&*s.store, &s.nodes, input.nodes, input.rate_bytes_per_sec).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(json!({ "id": r.id, "nodes": r.node_ids }))).into_response())
}

/// A token as the REST API shows it; `token` only in the answer to its creation.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct TokenView {
    pub id: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl TokenView {
    fn new(t: &TokenRecord, token: Option<String>) -> Self {
        TokenView {
            id: t.grant.id.clone(),
            role: t.grant.role.to_string(),
            repos: t.grant.repos.iter().map(|p| p.to_string()).collect(),
            expires_at: t.grant.expires_at.map(rfc3339),
            created_at: rfc3339(t.created_at),
            description: t.description.clone(),
            token,
        }
    }
}

/// What a client may send to create a token.
#[derive(Deserialize, Serialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TokenInput {
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub repos: Vec<String>,
    /// A duration (`"90d"`); absent: never expires.
    #[serde(default)]
    pub expires_in: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

async fn create_token(State(s): State<ApiState>, req: Request) -> ApiResult {
    let input: TokenInput = json_body(req).await?;
    let spec = TokenSpec {
        role: input.role.ok_or_else(|| Problem::invalid("role", "role is required: admin, reader, puller or node"))?,
        repos: input.repos,
        expires_in: parse_duration("expires_in", input.expires_in.as_deref())?,
        description: input.description.unwrap_or_default(),
    };
    let (record, token) = s.tokens.create(spec).await?;
    let mut resp = (StatusCode::CREATED, axum::Json(TokenView::new(&record, Some(token)))).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn list_tokens(State(s): State<ApiState>) -> ApiResult {
    let tokens: Vec<TokenView> = s.tokens.list().await?.iter().map(|t| TokenView::new(t, None)).collect();
    Ok(axum::Json(json!({ "tokens": tokens })).into_response())
}

async fn revoke_token(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    s.tokens.revoke(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_name_the_field() {
        let f = |s: &str| parse_json::<RepoInput>(s.as_bytes()).err().and_then(|p| p.field);
        assert_eq!(f(r#"{"key":"a","bogus":1}"#).as_deref(), Some("bogus"));
        assert_eq!(f(r#"{"key":5}"#).as_deref(), Some("key"));
        assert_eq!(f(r#"{"key":"a""#).as_deref(), Some("body"));
        assert_eq!(f("[]").as_deref(), Some("body"));
    }

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": 4}, "e": "x"}));
        assert_eq!(doc, json!({"b": {"c": 4, "d": 3}, "e": "x"}));
        // Found by fuzzing: an object patch onto a non-object keeps none of its nulls.
        let mut doc = json!("s");
        merge_patch(&mut doc, &json!({"a": null, "b": {"c": null}}));
        assert_eq!(doc, json!({"b": {}}));
    }

    #[test]
    fn if_match_values() {
        let mut h = HeaderMap::new();
        assert_eq!(if_match(&h).ok(), Some(None));
        h.insert(header::IF_MATCH, HeaderValue::from_static("\"12\""));
        assert_eq!(if_match(&h).ok(), Some(Some(12)));
        h.insert(header::IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(if_match(&h).ok(), Some(None));
        h.insert(header::IF_MATCH, HeaderValue::from_static("abc"));
        assert!(if_match(&h).is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::repos::validate;

    /// Any JSON value, nested a few levels.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("[a-z_]{0,12}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A repo body with each field either plausible or arbitrary.
    fn repo_body() -> impl Strategy<Value = Value> {
        let field = |plausible: BoxedStrategy<Value>| prop_oneof![3 => plausible, 1 => json_value()];
        let s = |re: &'static str| re.prop_map(Value::String).boxed();
        (
            field(s("[a-z0-9._-]{0,70}")),
            field(s("(dockerhub|ghcr|quay|ecr|gcr|acr|generic|x)")),
            field(s("(https?|ftp)://[a-z0-9.:@/-]{0,30}")),
            field(s("[0-9]{0,6}(s|m|h|d|x)")),
            field(s("(static|passthrough|oauth)")),
            field(s("(public|token|private)")),
            field(s("(-----BEGIN CERTIFICATE-----)?\\PC{0,20}")),
            field(any::<bool>().prop_map(Value::Bool).boxed()),
            field(s("[a-z]{0,5}")),
        )
            .prop_map(|(key, kind, upstream, ttl, auth, access, ca, insecure, user)| {
                json!({
                    "key": key, "kind": kind, "upstream": upstream, "tag_ttl": ttl.clone(), "cache_ttl": ttl,
                    "auth": auth, "access": access, "ca_bundle": ca, "insecure_skip_tls_verify": insecure,
                    "username": user.clone(), "password": user,
                })
            })
    }

    /// A refusal is a 400 naming the field; never a panic or another status.
    fn refused_well(p: &Problem) -> Result<(), TestCaseError> {
        prop_assert_eq!(p.status, StatusCode::BAD_REQUEST);
        prop_assert!(p.field.as_deref().is_some_and(|f| !f.is_empty()), "no field: {}", p.detail);
        Ok(())
    }

    proptest! {
        /// Repo bodies: parsed, converted and validated without panicking; refusals name a field.
        #[test]
        fn repo_bodies(body in prop_oneof![repo_body(), json_value()]) {
            match parse_json::<RepoInput>(body.to_string().as_bytes()) {
                Ok(input) => {
                    let key = input.key.clone().unwrap_or_default();
                    match input.into_spec(key) {
                        Ok(spec) => {
                            if let Err(ApiError::Invalid { field, .. }) = validate(&spec, None) {
                                prop_assert!(!field.is_empty());
                            }
                        }
                        Err(e) => refused_well(&Problem::from(e))?,
                    }
                }
                Err(p) => refused_well(&p)?,
            }
        }

        /// Token bodies likewise.
        #[test]
        fn token_bodies(body in json_value()) {
            if let Err(p) = parse_json::<TokenInput>(body.to_string().as_bytes()) {
                refused_well(&p)?;
            }
        }

        /// Arbitrary bytes are refused as a body, never a panic.
        #[test]
        fn bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Err(p) = parse_json::<RepoInput>(&bytes) {
                refused_well(&p)?;
            }
        }

        /// Merge patches of any shape apply without panicking; `null` removes.
        #[test]
        fn merge_patches(mut doc in json_value(), patch in json_value()) {
            merge_patch(&mut doc, &patch);
            if let (Some(p), Some(d)) = (patch.as_object(), doc.as_object()) {
                for (k, v) in p {
                    prop_assert_eq!(v.is_null(), !d.contains_key(k));
                }
            }
        }
    }
}
