//! `auth = "passthrough"` repos: the client's own credentials go upstream, and cached content of
//! such a repo reaches a client only after the upstream accepted that client for that repository.
//! A fake upstream with a private repository and two users: alice may pull it, bob may not.

use std::time::Duration;

use base64::Engine as _;
use wharf_tests::checks::is_node_challenge;
use wharf_tests::fake::{Fault, FaultRule, RedirectMode};
use wharf_tests::http::{Resp, get, head};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::otlp::Collector;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage, random_name, wait_until_async};

const PRIVATE: &str = "team/secret";

fn config(upstream: &str) -> String {
    format!("{}auth = \"passthrough\"\n", repo_config("pt", upstream, "generic", "5m"))
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

struct Users {
    alice: String,
    alice_pw: String,
    bob: String,
    bob_pw: String,
}

/// alice and bob on `fake`; `PRIVATE` holds `image`, pullable by alice only.
fn users(fake: &FakeUpstream, image: &TestImage) -> Users {
    let (alice_pw, bob_pw) = (random_name("alice-pw-"), random_name("bob-pw-"));
    fake.add_user("alice", &alice_pw);
    fake.add_user("bob", &bob_pw);
    fake.put_image(PRIVATE, image);
    fake.make_private(PRIVATE, &["alice"]);
    Users { alice: basic("alice", &alice_pw), alice_pw, bob: basic("bob", &bob_pw), bob_pw }
}

fn auth(a: Option<&str>) -> Vec<(&str, &str)> {
    a.map(|a| vec![("authorization", a)]).unwrap_or_default()
}

/// Pulls `name:tag` (manifest by tag, by digest, every blob) through `proxy` as `a`, checking bodies.
async fn pull(proxy: &Proxy, name: &str, image: &TestImage, a: Option<&str>) -> anyhow::Result<()> {
    let mut h = auth(a);
    h.push(("accept", OCI_MANIFEST));
    for reference in [image.tag.as_str(), image.digest()] {
        let m = get(&proxy.v2(&format!("pt/{name}/manifests/{reference}")), &h).await?;
        assert_eq!(m.status, 200, "manifest {name}:{reference}: {}", m.text());
        assert_eq!(m.body, image.manifest.data, "manifest body");
    }
    for blob in image.blobs() {
        let b = get(&proxy.v2(&format!("pt/{name}/blobs/{}", blob.digest)), &auth(a)).await?;
        assert_eq!(b.status, 200, "blob {}: {}", blob.digest, b.text());
        assert_eq!(b.digest(), blob.digest, "blob body");
    }
    Ok(())
}

/// A refusal: 401 (with the Basic challenge), 403, 404, or with the upstream down 502/503/504;
/// and none of `image`'s bytes.
fn assert_refused(r: &Resp, image: &TestImage, what: &str) {
    assert!(matches!(r.status, 401 | 403 | 404 | 502..=504), "{what}: {} {}", r.status, r.text());
    if r.status == 401 {
        assert!(is_node_challenge(r.header("www-authenticate")), "{what}: {:?}", r.header("www-authenticate"));
    }
    let leaked = std::iter::once(&image.manifest).chain(image.blobs()).any(|b| !b.data.is_empty() && r.body == b.data);
    assert!(!leaked, "{what}: content leaked");
}

/// Every way to ask for `image` in `PRIVATE` (and its blobs under another name), as `a`: all refused.
async fn assert_all_refused(proxy: &Proxy, image: &TestImage, a: Option<&str>, who: &str) -> anyhow::Result<()> {
    let mut h = auth(a);
    h.push(("accept", OCI_MANIFEST));
    for reference in [image.tag.as_str(), image.digest()] {
        let url = proxy.v2(&format!("pt/{PRIVATE}/manifests/{reference}"));
        assert_refused(&get(&url, &h).await?, image, &format!("{who}: GET manifest {reference}"));
        assert_refused(&head(&url, &h).await?, image, &format!("{who}: HEAD manifest {reference}"));
    }
    for blob in image.blobs() {
        for name in [PRIVATE, "library/other"] {
            let url = proxy.v2(&format!("pt/{name}/blobs/{}", blob.digest));
            assert_refused(&get(&url, &auth(a)).await?, image, &format!("{who}: GET {name} blob {}", blob.digest));
            assert_refused(&head(&url, &auth(a)).await?, image, &format!("{who}: HEAD {name} blob"));
        }
        let ranged = [auth(a), vec![("range", "bytes=0-9")]].concat();
        let url = proxy.v2(&format!("pt/{PRIVATE}/blobs/{}", blob.digest));
        assert_refused(&get(&url, &ranged).await?, image, &format!("{who}: ranged GET blob"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_content_reaches_only_clients_the_upstream_accepted() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let mut fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[60_000, 20_000])?;
    let u = users(&fake, &image);
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
        ..ProxyOptions::new(&config(&fake.url()), &["--otlp-endpoint", &collector.endpoint(), "--retries", "0"])
    })?;

    // Nothing cached yet: the anonymous client is asked for credentials.
    let r = get(&proxy.v2(&format!("pt/{PRIVATE}/manifests/v1")), &[]).await?;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(is_node_challenge(r.header("www-authenticate")), "{:?}", r.header("www-authenticate"));
    assert_eq!(r.oci_code(), "UNAUTHORIZED");

    // alice's pull fills the cache, with her own credentials at the token endpoint.
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    assert!(proxy.cached_manifest(image.digest()).is_some());
    for b in image.blobs() {
        assert!(proxy.cached_blob(&b.digest).is_some(), "blob {} not cached", b.digest);
    }
    let token_users: Vec<_> = fake.token_requests().iter().filter_map(|r| r.basic_auth()).map(|(u, _)| u).collect();
    assert!(token_users.iter().all(|u| u == "alice") && !token_users.is_empty(), "{token_users:?}");

    // bob (a valid user without access), a wrong password and an anonymous client: refused, by tag,
    // by digest, by HEAD, by range, and under another repository name.
    assert_all_refused(&proxy, &image, Some(&u.bob), "bob").await?;
    assert_all_refused(&proxy, &image, Some(&basic("alice", "not-her-password")), "wrong password").await?;
    assert_all_refused(&proxy, &image, None, "anonymous").await?;

    // The upstream goes away: still refused (fail closed), while alice's recent acceptance serves her.
    fake.stop().await;
    assert_all_refused(&proxy, &image, Some(&u.bob), "bob, upstream down").await?;
    assert_all_refused(&proxy, &image, None, "anonymous, upstream down").await?;
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    let cached = proxy.wait_request_log(Duration::from_secs(5), |f| f["authz"] == "cached" && f["status"] == 200)?;
    assert_eq!(cached["repo_key"], "pt");

    // alice's and bob's credentials, and the tokens the upstream gave them: nowhere in the logs,
    // the spans or the cache dir.
    let spans = collector
        .wait_for(Duration::from_secs(15), "the pulls' spans", |s| {
            s.iter().any(|s| s.name == "wharf.request") && s.iter().any(|s| s.name == "upstream.fetch")
        })
        .await?;
    let tokens: Vec<String> = fake
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").and_then(|a| a.strip_prefix("Bearer ")).map(str::to_owned))
        .collect();
    assert!(!tokens.is_empty());
    let mut secrets = vec![u.alice_pw.clone(), u.bob_pw.clone()];
    for h in [&u.alice, &u.bob] {
        secrets.push(h.trim_start_matches("Basic ").to_owned());
    }
    secrets.extend(tokens);
    let text = format!(
        "{}\n{}",
        proxy.all_output(),
        spans.iter().flat_map(|s| s.attributes.values()).cloned().collect::<Vec<_>>().join("\n")
    );
    let files = wharf_tests::files_under(proxy.cache_dir());
    assert!(!files.is_empty());
    for secret in &secrets {
        assert!(!text.contains(secret.as_str()), "secret {secret:?} leaked into a log line or span");
        for f in &files {
            let bytes = std::fs::read(f)?;
            let found = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!found, "secret {secret:?} written to {}", f.display());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_are_cached_per_client_for_the_ttl() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[30_000])?;
    let u = users(&fake, &image);
    let proxy = Proxy::spawn(&config(&fake.url()), &["--passthrough-auth-ttl", "2s"])?;
    let heads = || fake.count("HEAD", &format!("/v2/{PRIVATE}/"));

    // The pull's own upstream answers are alice's acceptance: her hits ask nothing more.
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    assert_eq!(heads(), 0, "{}", fake.describe_requests());
    for _ in 0..3 {
        pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    }
    assert_eq!(heads(), 0, "cached decision: {}", fake.describe_requests());

    // Past the TTL: one HEAD, then the decision serves the rest of the repository.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let layer = &image.layers[0];
    let url = proxy.v2(&format!("pt/{PRIVATE}/blobs/{}", layer.digest));
    assert_eq!(get(&url, &[("authorization", &u.alice)]).await?.status, 200);
    assert_eq!(heads(), 1, "{}", fake.describe_requests());
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    assert_eq!(heads(), 1, "{}", fake.describe_requests());
    let line = proxy.wait_request_log(Duration::from_secs(5), |f| f["authz"] == "upstream" && f["cache"] == "hit")?;
    assert_eq!(line["status"], 200);

    // Refusals are not cached: bob is asked about every time, and alice's decision is not his.
    for n in 1..=2 {
        let before = heads();
        assert_refused(&get(&url, &[("authorization", &u.bob)]).await?, &image, "bob");
        assert!(heads() > before, "bob's attempt {n} was not checked upstream");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_tokens_are_forwarded_as_they_are() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[20_000])?;
    let u = users(&fake, &image);
    let proxy = Proxy::spawn(&config(&fake.url()), &[])?;

    // alice's own upstream token, from the upstream's token endpoint.
    let token_url = format!("{}/token?service=fake&scope=repository:{PRIVATE}:pull", fake.url());
    let t = get(&token_url, &[("authorization", &u.alice)]).await?;
    assert_eq!(t.status, 200, "{}", t.text());
    let token = t.json()?["token"].as_str().unwrap_or_default().to_owned();
    let issued = fake.tokens_issued();

    let bearer = format!("Bearer {token}");
    pull(&proxy, PRIVATE, &image, Some(&bearer)).await?;
    assert_eq!(fake.tokens_issued(), issued, "the node exchanged a token the client had already");
    let sent: Vec<_> = fake.requests_matching("GET", &format!("/v2/{PRIVATE}/")).into_iter().collect();
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|r| r.header("authorization") == Some(bearer.as_str())), "{}", fake.describe_requests());

    // Another Bearer is another client: refused, cache or not.
    assert_all_refused(&proxy, &image, Some("Bearer not-a-token"), "unknown bearer").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_public_content_is_served_without_a_challenge() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let private = TestImage::random("v1", &[10_000])?;
    let u = users(&fake, &private);
    let public = TestImage::random("1.0", &[10_000])?;
    fake.put_image("library/tool", &public);
    let proxy = Proxy::spawn(&config(&fake.url()), &[])?;

    for _ in 0..2 {
        pull(&proxy, "library/tool", &public, None).await?;
    }
    let lines = proxy.request_logs();
    assert!(lines.iter().all(|l| l["status"] == 200), "{lines:?}");
    let r = get(&proxy.v2("pt/library/tool/manifests/1.0"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.header("www-authenticate"), None);
    // A logged-in client gets public content too (its own token, with the public scope).
    pull(&proxy, "library/tool", &public, Some(&u.bob)).await?;
    // The ping challenges a client that sent nothing (so that docker, skopeo and podman send their
    // login for this node); skopeo's anonymous answer and upstream logins pass.
    let r = get(&proxy.v2(""), &[]).await?;
    assert_eq!(r.status, 401);
    assert!(is_node_challenge(r.header("www-authenticate")));
    let empty = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(":"));
    assert_eq!(get(&proxy.v2(""), &[("authorization", &empty)]).await?.status, 200);
    assert_eq!(get(&proxy.v2(""), &[("authorization", &u.alice)]).await?.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_upstreams_get_the_clients_credentials_straight() -> anyhow::Result<()> {
    // As ECR: Basic on every request, no token service.
    let fake =
        FakeUpstream::start_with(AuthMode::Basic { username: "admin".into(), password: random_name("x") }).await?;
    let image = TestImage::random("v1", &[20_000])?;
    let u = users(&fake, &image);
    let proxy = Proxy::spawn(&config(&fake.url()), &[])?;

    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    let content = fake.requests_matching("GET", &format!("/v2/{PRIVATE}/"));
    let users: Vec<_> = content.iter().filter_map(|r| r.basic_auth()).collect();
    assert!(!users.is_empty() && users.iter().all(|(n, p)| n == "alice" && *p == u.alice_pw), "{users:?}");
    assert!(fake.token_requests().is_empty());

    let r =
        get(&proxy.v2(&format!("pt/{PRIVATE}/blobs/{}", image.layers[0].digest)), &[("authorization", &u.bob)]).await?;
    assert_eq!(r.status, 403, "bob is known upstream but denied: {}", r.text());
    assert_eq!(r.oci_code(), "DENIED");
    assert_all_refused(&proxy, &image, Some(&u.bob), "bob").await?;
    assert_all_refused(&proxy, &image, None, "anonymous").await?;
    let r = get(&proxy.v2(&format!("pt/{PRIVATE}/manifests/v1")), &[]).await?;
    assert_eq!(r.status, 401);
    assert!(is_node_challenge(r.header("www-authenticate")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_joining_another_clients_fetch_is_authorized_first() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[2_000_000])?;
    let u = users(&fake, &image);
    let layer = image.layers[0].clone();
    fake.add_fault(FaultRule {
        pattern: layer.digest.clone(),
        methods: Some(vec![axum::http::Method::GET]),
        fault: Fault::Pause { after: 500_000 },
        times: Some(1),
    });
    let proxy = Proxy::spawn(&config(&fake.url()), &[])?;
    let url = proxy.v2(&format!("pt/{PRIVATE}/blobs/{}", layer.digest));

    // alice's fetch starts and stalls half-way.
    let alice = {
        let (url, a) = (url.clone(), u.alice.clone());
        tokio::spawn(async move { get(&url, &[("authorization", &a)]).await })
    };
    wait_until_async(Duration::from_secs(10), "alice's fetch to start", || {
        fake.requests_matching("GET", &layer.digest)
            .iter()
            .any(|r| r.sent.load(std::sync::atomic::Ordering::SeqCst) > 0)
            .then_some(())
    })
    .await?;

    // bob and an anonymous client join it: each is refused before a byte, as a coalesced waiter.
    for (who, a) in [("bob", Some(u.bob.as_str())), ("anonymous", None)] {
        let r = tokio::time::timeout(Duration::from_secs(10), get(&url, &auth(a))).await??;
        assert_refused(&r, &image, who);
        assert!(r.body.len() < 1000, "{who} got {} bytes", r.body.len());
    }
    let coalesced =
        proxy.wait_request_log(Duration::from_secs(5), |f| f["cache"] == "coalesced" && f["status"] == 401)?;
    assert_eq!(coalesced["authz"], "refused");

    fake.release();
    let r = tokio::time::timeout(Duration::from_secs(30), alice).await???;
    assert_eq!(r.status, 200);
    assert_eq!(r.digest(), layer.digest);
    let fetches = fake.requests_matching("GET", &layer.digest);
    let with_body = fetches.iter().filter(|r| r.sent.load(std::sync::atomic::Ordering::SeqCst) > 0).count();
    assert_eq!(with_body, 1, "one fetch: {}", fake.describe_requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_redirect_is_its_yes_and_is_not_followed_for_a_head() -> anyhow::Result<()> {
    // Blobs live behind signed URLs (S3-like) that refuse HEAD: the registry's 307 is the answer.
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    fake.set_redirect(RedirectMode::OtherHost);
    fake.set_redirect_heads(true);
    let image = TestImage::random("v1", &[30_000])?;
    let u = users(&fake, &image);
    // Every hit asks the upstream.
    let proxy = Proxy::spawn(&config(&fake.url()), &["--passthrough-auth-ttl", "0s"])?;

    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    let heads = fake.count("HEAD", &format!("/v2/{PRIVATE}/blobs/"));
    assert!(heads >= image.blobs().count(), "every blob hit asked: {}", fake.describe_requests());
    let followed: Vec<_> =
        fake.redirect_requests().into_iter().filter(|r| r.method == axum::http::Method::HEAD).collect();
    assert!(followed.is_empty(), "a HEAD followed the redirect: {followed:?}");
    // Under another name, the registry's redirect links the blob there too (a static-style check).
    let layer = &image.layers[0];
    let r = get(&proxy.v2(&format!("pt/library/other/blobs/{}", layer.digest)), &[("authorization", &u.alice)]).await?;
    assert_eq!(r.status, 404, "the blob is not in library/other upstream: {}", r.text());

    assert_all_refused(&proxy, &image, Some(&u.bob), "bob").await?;
    assert_all_refused(&proxy, &image, None, "anonymous").await?;
    Ok(())
}

/// A real client: skopeo with `--src-creds` through the passthrough repo (its login reaches the
/// node because the ping challenges it): alice copies the private image, bob is refused, and an
/// anonymous skopeo still copies public content.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_sends_each_users_login_through_the_node() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let private = TestImage::random("v1", &[10_000, 20_000])?;
    let u = users(&fake, &private);
    let public = TestImage::random("1.0", &[10_000])?;
    fake.put_image("library/tool", &public);
    let proxy = Proxy::spawn(&config(&fake.url()), &[])?;
    let copy = |name: &str, tag: &str, creds: Option<String>| {
        let src = format!("docker://{}/pt/{name}:{tag}", proxy.host());
        tokio::task::spawn_blocking(move || wharf_tests::skopeo_try_copy(&src, creds.as_deref()))
    };
    let (ok, err) = copy(PRIVATE, "v1", Some(format!("alice:{}", u.alice_pw))).await??;
    assert!(ok, "alice's skopeo copy failed:\n{err}");
    let (ok, _) = copy(PRIVATE, "v1", Some(format!("bob:{}", u.bob_pw))).await??;
    assert!(!ok, "bob copied alice's private image");
    let (ok, _) = copy(PRIVATE, "v1", None).await??;
    assert!(!ok, "an anonymous skopeo copied the private image");
    let (ok, err) = copy("library/tool", "1.0", None).await??;
    assert!(ok, "anonymous skopeo on public content:\n{err}");
    assert!(!proxy.all_output().contains(&u.alice_pw), "alice's password is in the node's output");
    Ok(())
}

/// An upstream that answers HEAD with 405 where the gate asks: the gate asks with a GET instead,
/// so alice's cached hits are served and bob is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gate_head_refused_with_405_is_asked_again_as_a_get() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[20_000])?;
    let u = users(&fake, &image);
    fake.add_fault(FaultRule {
        pattern: format!("/v2/{PRIVATE}/"),
        methods: Some(vec![axum::http::Method::HEAD]),
        fault: Fault::Status { status: 405, retry_after: None },
        times: None,
    });
    // Every hit asks the upstream (no decision is kept).
    let proxy = Proxy::spawn(&config(&fake.url()), &["--passthrough-auth-ttl", "0s", "--retries", "0"])?;
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    let gets_before = fake.count("GET", &format!("/v2/{PRIVATE}/manifests/{}", image.digest()));
    pull(&proxy, PRIVATE, &image, Some(&u.alice)).await?;
    assert!(
        fake.count("GET", &format!("/v2/{PRIVATE}/manifests/{}", image.digest())) > gets_before,
        "the gate did not ask again with a GET: {}",
        fake.describe_requests()
    );
    assert_all_refused(&proxy, &image, Some(&u.bob), "bob").await?;
    Ok(())
}
