//! Upstream authentication: the registry's `WWW-Authenticate` challenge, remembered per upstream,
//! and bearer tokens cached per (realm, service, scope, identity) until they expire. The identity
//! is the repo's static username, or for passthrough repos the SHA-256 of the client's credentials,
//! so one client's upstream token never serves another client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderValue, StatusCode};
use tracing::Instrument as _;
use wharf_core::{AuthMode, Credentials, Digest, Repo, Secret};

use super::error::{UpstreamError, error_chain, redact};
use super::options::UpstreamOptions;
use super::trace::RoundTrip;
use crate::credentials::ClientCredentials;

/// What an upstream demands, from its `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String> },
    Basic,
}

impl Challenge {
    /// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`. The scope in a
    /// challenge is ignored: Wharf asks for the scope of the repository it pulls.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
        let params = parse_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        if scheme.eq_ignore_ascii_case("bearer") {
            let realm = get("realm").filter(|r| r.starts_with("https://") || r.starts_with("http://"))?;
            Some(Challenge::Bearer { realm, service: get("service").filter(|s| !s.is_empty()) })
        } else if scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else {
            None
        }
    }
}

/// `k=v` and `k="quoted \" value"` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next_if_eq(&'=').is_none() {
            continue;
        }
        // RFC 9110, 11.2: whitespace may surround the `=`.
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect::<String>().trim().to_owned();
        }
        out.push((key.trim().to_owned(), value));
    }
    out
}

/// Whose token a cached token is: one client's upstream token never serves another client.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Identity {
    Anonymous,
    /// The repo's static credentials, by username.
    Static(String),
    /// A passthrough client, by the SHA-256 of its credentials.
    Client(Digest),
}

type TokenKey = (String, Option<String>, String, Identity);

/// What a request presents to the upstream.
pub(super) enum Presenting<'a> {
    Anonymous,
    /// A username and password: sent as Basic to Basic upstreams, to the token endpoint otherwise.
    Basic {
        username: &'a str,
        password: &'a str,
        identity: Identity,
    },
    /// A passthrough client's Bearer token: forwarded as it is.
    Bearer(&'a Secret),
}

impl<'a> Presenting<'a> {
    /// The repo's static credentials, or (passthrough) the client's own.
    /// `provided`: what the repo's credential provider gave (instead of static credentials).
    pub(super) fn of(repo: &'a Repo, client: Option<&'a ClientCredentials>, provided: Option<&'a Credentials>) -> Self {
        match repo.auth {
            AuthMode::Static => match provided.or(repo.credentials.as_ref()) {
                Some(c) => Presenting::Basic {
                    username: &c.username,
                    password: c.password.expose(),
                    identity: Identity::Static(c.username.clone()),
                },
                None => Presenting::Anonymous,
            },
            AuthMode::Passthrough => match client {
                None => Presenting::Anonymous,
                Some(c @ ClientCredentials::Basic { username, password }) => Presenting::Basic {
                    username,
                    password: password.expose(),
                    identity: Identity::Client(c.fingerprint()),
                },
                Some(ClientCredentials::Bearer(t)) => Presenting::Bearer(t),
            },
        }
    }

    fn user_pass(&self) -> Option<(&'a str, &'a str)> {
        match self {
            Presenting::Basic { username, password, .. } => Some((username, password)),
            _ => None,
        }
    }

    /// The repo's own static credentials (not a client's).
    pub(super) fn is_own(&self) -> bool {
        matches!(self, Presenting::Basic { identity: Identity::Static(_), .. })
    }

    fn identity(&self) -> Identity {
        match self {
            Presenting::Basic { identity, .. } => identity.clone(),
            _ => Identity::Anonymous,
        }
    }
}

#[derive(Default)]
struct State {
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<TokenKey, (HeaderValue, Instant)>,
}

/// Challenges by upstream and tokens by scope, shared by all requests of a node.
#[derive(Default)]
pub struct TokenCache {
    state: Mutex<State>,
}

/// Tokens are used until shortly before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// Registries that omit `expires_in` mean 60 s; none is trusted to mean less.
const MIN_TOKEN_LIFETIME: u64 = 60;
/// Past this many cached tokens (passthrough: one per client and repository), expired ones go.
const MAX_TOKENS: usize = 10_000;

impl TokenCache {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `Authorization` to send to `repo`'s upstream, if it is known to want one (a passthrough
    /// client's Bearer token: always).
    pub(super) async fn authorization(
        &self,
        http: &reqwest::Client,
        opts: &UpstreamOptions,
        repo: &Repo,
        who: &Presenting<'_>,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        if let Presenting::Bearer(t) = who {
            return Ok(bearer(t.expose()));
        }
        let challenge = self.state().challenges.get(&repo.upstream).cloned();
        let (realm, service) = match challenge {
            None => return Ok(None),
            Some(Challenge::Basic) => return Ok(who.user_pass().map(|(u, p)| basic(u, p))),
            Some(Challenge::Bearer { realm, service }) => (realm, service),
        };
        let key: TokenKey = (realm.clone(), service.clone(), scope.to_owned(), who.identity());
        if let Some((token, expiry)) = self.state().tokens.get(&key)
            && Instant::now() < *expiry
        {
            return Ok(Some(token.clone()));
        }
        let (token, lifetime) =
            fetch_token(http, opts, repo, who.user_pass(), &realm, service.as_deref(), Some(scope)).await?;
        let expiry = Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN);
        let mut st = self.state();
        if st.tokens.len() >= MAX_TOKENS {
            let now = Instant::now();
            st.tokens.retain(|_, (_, e)| now < *e);
            if st.tokens.len() >= MAX_TOKENS {
                st.tokens.clear();
            }
        }
        st.tokens.insert(key, (token.clone(), expiry));
        Ok(Some(token))
    }

    /// Records a 401's challenge. Returns whether retrying with fresh authorization may succeed.
    pub(super) fn learn(
        &self,
        repo: &Repo,
        who: &Presenting<'_>,
        scope: &str,
        challenge: Option<Challenge>,
        sent: Option<&HeaderValue>,
    ) -> bool {
        let Some(challenge) = challenge else {
            return false;
        };
        let mut st = self.state();
        st.challenges.insert(repo.upstream.clone(), challenge.clone());
        match (challenge, who) {
            // A client's own Bearer token was refused: sending it again would not help.
            (_, Presenting::Bearer(_)) => false,
            // Credentials already sent and refused: retrying would not help.
            (Challenge::Basic, _) => who.user_pass().is_some() && sent.is_none(),
            (Challenge::Bearer { .. }, _) => {
                if let Some(sent) = sent {
                    // The token was refused (expired early, revoked): forget it.
                    st.tokens.retain(|(_, _, s, _), (t, _)| !(s == scope && t == sent));
                }
                true
            }
        }
    }
}

pub(super) fn basic(username: &str, password: &str) -> HeaderValue {
    let raw = format!("{username}:{password}");
    let mut v = HeaderValue::from_str(&format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw)))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The username ACR gives its refresh tokens: such a password is exchanged by the OAuth2
/// refresh-token grant (POST), not by Basic.
pub const ACR_REFRESH_TOKEN_USER: &str = "00000000-0000-0000-0000-000000000000";

/// A token from `realm`; without `scope`, a login check (what `docker login` asks). An ACR refresh
/// token (username [`ACR_REFRESH_TOKEN_USER`]) goes by POST (`grant_type=refresh_token`); an
/// endpoint that refuses the POST (400, 401, 404, 405) is asked again by GET, as for everyone else.
pub(super) async fn fetch_token(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    repo: &Repo,
    credentials: Option<(&str, &str)>,
    realm: &str,
    service: Option<&str>,
    scope: Option<&str>,
) -> Result<(HeaderValue, Duration), UpstreamError> {
    let shown = redact(realm);
    let url = reqwest::Url::parse(realm)
        .map_err(|e| UpstreamError::Protocol { url: shown.clone(), message: e.to_string() })?;
    if let Some((ACR_REFRESH_TOKEN_USER, refresh_token)) = credentials {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token");
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            if let Some(scope) = scope {
                form.append_pair("scope", scope);
            }
            form.append_pair("refresh_token", refresh_token);
            form.finish()
        };
        let post = |headers| {
            http.post(url.clone())
                .headers(headers)
                .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(body.clone())
        };
        match exchange(http, opts, repo, &http::Method::POST, url.as_str(), &shown, post).await {
            Err(UpstreamError::Token { status: 400 | 401 | 404 | 405, .. }) => {}
            other => return other,
        }
    }
    let mut url = url;
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        if let Some(scope) = scope {
            q.append_pair("scope", scope);
        }
        if let Some((username, _)) = credentials {
            q.append_pair("account", username);
        }
    }
    let get = |mut headers: http::HeaderMap| {
        if let Some((username, password)) = credentials {
            headers.insert(http::header::AUTHORIZATION, basic(username, password));
        }
        http.get(url.clone()).headers(headers)
    };
    exchange(http, opts, repo, &http::Method::GET, url.as_str(), &shown, get).await
}

/// One token request (`build` given the trace headers), traced; the token and how long it lives.
async fn exchange(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    repo: &Repo,
    method: &http::Method,
    url: &str,
    shown: &str,
    build: impl FnOnce(http::HeaderMap) -> reqwest::RequestBuilder,
) -> Result<(HeaderValue, Duration), UpstreamError> {
    let shown = shown.to_owned();
    // The round-tripper records the exchange (credentials redacted, the token body never).
    let mut rt = RoundTrip::start(repo.key.as_str(), method, url);
    let mut headers = http::HeaderMap::new();
    wharf_runtime::telemetry::inject(rt.span(), &mut headers);
    let request =
        build(headers).build().map_err(|e| UpstreamError::Protocol { url: shown.clone(), message: error_chain(&e) })?;
    rt.sent(request.headers());
    let sent = http.execute(request);
    let resp = match tokio::time::timeout(opts.first_byte_timeout, sent).instrument(rt.span().clone()).await {
        Err(_) => {
            rt.failed("timeout waiting for the token response");
            return Err(UpstreamError::Timeout { url: shown, phase: "token request" });
        }
        Ok(Err(e)) => {
            let e = UpstreamError::Unreachable { url: shown, message: error_chain(&e) };
            rt.failed(&e.to_string());
            return Err(e);
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    rt.answered(status, resp.headers());
    let body = tokio::time::timeout(opts.idle_timeout, resp.bytes())
        .await
        .map_err(|_| UpstreamError::Timeout { url: shown.clone(), phase: "token body" })?
        .map_err(|e| UpstreamError::Unreachable { url: shown.clone(), message: error_chain(&e) })?;
    rt.add_bytes(body.len() as u64);
    rt.finish();
    if status != StatusCode::OK {
        let message = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(UpstreamError::Token { url: shown, status: status.as_u16(), message });
    }
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| UpstreamError::Protocol { url: shown.clone(), message: format!("token response: {e}") })?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| UpstreamError::Protocol { url: shown.clone(), message: "token response has no token".into() })?;
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| UpstreamError::Protocol { url: shown, message: "token is not a valid header value".into() })?;
    value.set_sensitive(true);
    let lifetime = parsed.expires_in.unwrap_or(MIN_TOKEN_LIFETIME).max(MIN_TOKEN_LIFETIME);
    Ok((value, Duration::from_secs(lifetime)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            Challenge::parse(r#"bearer realm="https://x/token", service=svc"#),
            Some(Challenge::Bearer { realm: "https://x/token".into(), service: Some("svc".into()) })
        );
        assert_eq!(
            Challenge::parse(r#"Bearer realm="https://eu-docker.pkg.dev/v2/token""#),
            Some(Challenge::Bearer { realm: "https://eu-docker.pkg.dev/v2/token".into(), service: None })
        );
        assert_eq!(Challenge::parse(r#"Basic realm="ecr.amazonaws.com""#), Some(Challenge::Basic));
        // Whitespace around `=` (RFC 9110's BWS), found by the near-valid property test.
        assert_eq!(
            Challenge::parse(r#"Bearer realm = "https://x/token""#),
            Some(Challenge::Bearer { realm: "https://x/token".into(), service: None })
        );
        for bad in
            ["", "Bearer", r#"Bearer realm="file:///etc/passwd""#, "Negotiate abc", r#"Bearer realm="unterminated"#]
        {
            assert!(
                !matches!(Challenge::parse(bad), Some(Challenge::Bearer { ref realm, .. }) if !realm.starts_with("http")),
                "{bad}"
            );
        }
        assert_eq!(Challenge::parse(r#"Bearer realm="file:///etc/passwd""#), None);
        assert_eq!(parse_params(r#"a="x\"y", b=2,,c"#), vec![("a".into(), "x\"y".into()), ("b".into(), "2".into())]);
    }
}

#[cfg(test)]
mod fuzz {
    use std::cell::Cell;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    /// A parameter value as registries write it: plain, or quoted with commas, `=`, escaped quotes
    /// and backslashes inside. Returns (as written, what it means).
    fn value() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            "[a-zA-Z0-9._:/-]{1,12}".prop_map(|v| (v.clone(), v)),
            "[a-zA-Z0-9 ,=\\\"._:/-]{0,12}"
                .prop_map(|v| { (format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")), v) }),
        ]
    }

    /// Near-valid challenges (schemes in any case, parameters in any order with odd spacing, quoted
    /// values full of separators, realms of other schemes, unknown parameters) parse to exactly the
    /// realm and service written, and each outcome is reached in a good share of the cases.
    #[test]
    fn near_valid_challenges_parse_to_what_was_written() {
        let strategy = (
            prop_oneof![4 => Just("Bearer"), 1 => Just("bearer"), 1 => Just("BEARER"), 1 => Just("Basic"), 1 => Just("Negotiate")],
            prop_oneof![3 => Just("https://"), 1 => Just("http://"), 1 => Just("file://")],
            "[a-z]{1,8}",
            proptest::option::of(value()),
            proptest::option::of(value()),
            "[ ]{0,2}",
            any::<bool>(),
        );
        let (bearer, with_service, basic, none) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
        let cases = 2_000;
        let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
        runner
            .run(&strategy, |(scheme, realm_scheme, host, service, scope, sp, service_first)| {
                let realm = format!("{realm_scheme}{host}/token");
                let mut params = vec![format!("realm={sp}\"{realm}\"")];
                if let Some((written, _)) = &service {
                    params.push(format!("service={written}"));
                }
                if let Some((written, _)) = &scope {
                    params.push(format!("scope={written}"));
                }
                if service_first {
                    params.reverse();
                }
                let header = format!("{scheme} {}", params.join(&format!(",{sp}")));
                let want = if scheme.eq_ignore_ascii_case("bearer") {
                    realm.starts_with("http").then(|| Challenge::Bearer {
                        realm: realm.clone(),
                        service: service.as_ref().map(|(_, meant)| meant.clone()).filter(|s| !s.is_empty()),
                    })
                } else if scheme.eq_ignore_ascii_case("basic") {
                    Some(Challenge::Basic)
                } else {
                    None
                };
                let got = Challenge::parse(&header);
                prop_assert_eq!(&got, &want, "{}", header);
                match got {
                    Some(Challenge::Bearer { service: Some(_), .. }) => with_service.set(with_service.get() + 1),
                    Some(Challenge::Bearer { service: None, .. }) => bearer.set(bearer.get() + 1),
                    Some(Challenge::Basic) => basic.set(basic.get() + 1),
                    None => none.set(none.get() + 1),
                }
                Ok(())
            })
            .unwrap();
        for (what, n) in [
            ("Bearer", bearer.get()),
            ("Bearer with a service", with_service.get()),
            ("Basic", basic.get()),
            ("refused", none.get()),
        ] {
            assert!(f64::from(n) / f64::from(cases) >= 0.05, "only {n} of {cases} cases reached {what}");
        }
    }

    proptest! {
        /// Any WWW-Authenticate value parses without panicking; a Bearer realm is always http(s).
        #[test]
        fn challenges_never_panic(h in "\\PC{0,200}") {
            if let Some(Challenge::Bearer { realm, .. }) = Challenge::parse(&h) {
                prop_assert!(realm.starts_with("https://") || realm.starts_with("http://"));
            }
        }

        #[test]
        fn quoted_params_round_trip(realm in "[a-z]{1,10}", service in "[a-zA-Z0-9 ,=.]{0,20}") {
            let quoted = service.replace('\\', "\\\\").replace('"', "\\\"");
            let h = format!("Bearer realm=\"https://{realm}/token\",service=\"{quoted}\",scope=\"repository:a:pull\"");
            let want = Challenge::Bearer {
                realm: format!("https://{realm}/token"),
                service: Some(service.clone()).filter(|s| !s.is_empty()),
            };
            prop_assert_eq!(Challenge::parse(&h), Some(want));
        }
    }
}
