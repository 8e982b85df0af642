//! How the node talks to upstreams: Docker Hub's implicit `library/`, token auth (anonymous and with
//! credentials, tokens reused, refreshed after a 401), Basic-auth upstreams, and blob redirects that
//! never carry `Authorization` to another host.

use wharf_tests::fake::{ACR_REFRESH_TOKEN_USER, Listener, RecordedRequest, RedirectMode};
use wharf_tests::http::get;
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage};

/// Pulls `name:tag` (manifest, then every blob) through `proxy` under `repo_key`, checking bodies.
async fn pull(proxy: &Proxy, repo_key: &str, name: &str, image: &TestImage) -> anyhow::Result<()> {
    let m = get(&proxy.v2(&format!("{repo_key}/{name}/manifests/{}", image.tag)), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "manifest {name}:{}: {}", image.tag, m.text());
    assert_eq!(m.body, image.manifest.data, "manifest body");
    assert_eq!(m.header("docker-content-digest"), Some(image.digest()));
    for blob in image.blobs() {
        let b = get(&proxy.v2(&format!("{repo_key}/{name}/blobs/{}", blob.digest)), &[]).await?;
        assert_eq!(b.status, 200, "blob {}: {}", blob.digest, b.text());
        assert_eq!(b.digest(), blob.digest, "blob body");
    }
    Ok(())
}

/// The user a token request authenticated as: Basic, or the OAuth2 password grant's form fields.
fn token_user(r: &RecordedRequest) -> Option<(String, String)> {
    r.basic_auth()
        .or_else(|| r.form_values("username").first().cloned().zip(r.form_values("password").first().cloned()))
}

/// The scopes a token request asked for.
fn token_scopes(r: &RecordedRequest) -> Vec<String> {
    let mut s = r.query_values("scope");
    for f in r.form_values("scope") {
        s.extend(f.split(' ').map(str::to_string));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dockerhub_single_segment_names_get_library_prefix() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let alpine = TestImage::random("3.20", &[20_000])?;
    fake.put_image("library/alpine", &alpine);
    let tool = TestImage::random("1.0", &[20_000])?;
    fake.put_image("someorg/tool", &tool);
    let config = repo_config("hub", &fake.url(), "dockerhub", "5m");
    let proxy = Proxy::spawn(&config, &[])?;

    pull(&proxy, "hub", "alpine", &alpine).await?;
    assert_eq!(fake.count("GET", "/v2/library/alpine/manifests/3.20"), 1);
    assert_eq!(fake.count("GET", &format!("/v2/library/alpine/blobs/{}", alpine.layers[0].digest)), 1);
    // The explicit form reaches the same upstream repository, without a second prefix.
    pull(&proxy, "hub", "library/alpine", &alpine).await?;
    // Multi-segment names are left alone.
    pull(&proxy, "hub", "someorg/tool", &tool).await?;
    assert_eq!(fake.count("GET", "/v2/someorg/tool/manifests/1.0"), 1);
    let wrong: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("library/library") || r.path.contains("library/someorg"))
        .map(|r| r.path.clone())
        .collect();
    assert!(wrong.is_empty(), "wrongly prefixed upstream paths: {wrong:?}");
    let unprefixed = fake.count("GET", "/v2/alpine/");
    assert_eq!(unprefixed, 0, "{}", fake.describe_requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generic_upstreams_get_no_library_prefix() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[10_000])?;
    fake.put_image("alpine", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    pull(&proxy, "lab", "alpine", &image).await?;
    assert_eq!(fake.count("GET", "library/"), 0, "{}", fake.describe_requests());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_token_auth_fetches_one_token_and_reuses_it() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[10_000, 20_000, 30_000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;

    pull(&proxy, "lab", "org/img", &image).await?;
    let tokens = fake.token_requests();
    assert!(!tokens.is_empty(), "no token request");
    for t in &tokens {
        assert_eq!(t.header("authorization"), None, "anonymous token request sent credentials");
        assert!(
            token_scopes(t).iter().any(|s| s == "repository:org/img:pull"),
            "token request without scope repository:org/img:pull: {:?} {:?}",
            t.query,
            String::from_utf8_lossy(&t.body)
        );
    }
    assert_eq!(
        fake.tokens_issued(),
        1,
        "one token must serve the manifest and all 4 blobs:\n{}",
        fake.describe_requests()
    );
    // Every content request carried the bearer token.
    let content: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/v2/org/img/") && r.header("authorization").is_some())
        .collect();
    assert!(content.len() >= 5, "{}", fake.describe_requests());
    assert!(content.iter().all(|r| r.header("authorization").is_some_and(|a| a.starts_with("Bearer "))));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_auth_with_credentials_from_file_and_env() -> anyhow::Result<()> {
    let password = format!("pw-{}", wharf_tests::random_name(""));
    let fake = FakeUpstream::start_with(AuthMode::Bearer {
        credentials: Some(("bot".into(), password.clone())),
        expires_in: Some(300),
    })
    .await?;
    let image = TestImage::random("v1", &[10_000, 20_000])?;
    fake.put_image("org/private", &image);

    let secrets = tempfile::tempdir()?;
    let pw_file = secrets.path().join("password");
    std::fs::write(&pw_file, &password)?;
    let env_var = format!("WHARF_TEST_PW_{}", wharf_tests::random_name("").to_uppercase());
    let base = repo_config("lab", &fake.url(), "generic", "5m");
    let variants = [
        (format!("{base}username = \"bot\"\npassword_file = \"{}\"\n", pw_file.display()), vec![]),
        (
            format!("{base}username = \"bot\"\npassword_env = \"{env_var}\"\n"),
            vec![(env_var.clone(), password.clone())],
        ),
    ];
    for (config, env) in variants {
        let issued_before = fake.tokens_issued();
        let token_requests_before = fake.token_requests().len();
        let proxy = Proxy::spawn_with(ProxyOptions { env, ..ProxyOptions::new(&config, &[]) })?;
        pull(&proxy, "lab", "org/private", &image).await?;
        let tokens = fake.token_requests();
        let new = &tokens[token_requests_before..];
        assert!(
            new.iter().any(|t| token_user(t) == Some(("bot".into(), password.clone()))),
            "no token request authenticated as bot ({config}):\n{}",
            fake.describe_requests()
        );
        assert_eq!(fake.tokens_issued() - issued_before, 1, "one token for the whole pull ({config})");
        let output = proxy.all_output();
        assert!(!output.contains(&password), "the upstream password appears in the proxy's output");
        drop(proxy);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_401_with_a_cached_token_fetches_a_fresh_one() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: Some(300) }).await?;
    let image = TestImage::random("v1", &[10_000, 20_000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;

    let m = get(&proxy.v2("lab/org/img/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(m.status, 200, "{}", m.text());
    assert_eq!(fake.tokens_issued(), 1);

    // The token the node holds becomes invalid upstream (expired early, or revoked).
    fake.revoke_tokens();
    let layer = &image.layers[0];
    let b = get(&proxy.v2(&format!("lab/org/img/blobs/{}", layer.digest)), &[]).await?;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.digest(), layer.digest);
    assert_eq!(
        fake.tokens_issued(),
        2,
        "a 401 on a cached token should fetch exactly one fresh token:\n{}",
        fake.describe_requests()
    );
    // And the fresh one is reused.
    let layer = &image.layers[1];
    let b = get(&proxy.v2(&format!("lab/org/img/blobs/{}", layer.digest)), &[]).await?;
    assert_eq!(b.status, 200);
    assert_eq!(fake.tokens_issued(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_auth_upstream() -> anyhow::Result<()> {
    let password = format!("pw-{}", wharf_tests::random_name(""));
    let fake = FakeUpstream::start_with(AuthMode::Basic { username: "bot".into(), password: password.clone() }).await?;
    let image = TestImage::random("v1", &[10_000])?;
    fake.put_image("org/img", &image);
    let env_var = format!("WHARF_TEST_PW_{}", wharf_tests::random_name("").to_uppercase());
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"{env_var}\"\n",
        repo_config("lab", &fake.url(), "generic", "5m")
    );
    let proxy =
        Proxy::spawn_with(ProxyOptions { env: vec![(env_var, password.clone())], ..ProxyOptions::new(&config, &[]) })?;
    pull(&proxy, "lab", "org/img", &image).await?;
    let authed = fake
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/org/img/") && r.basic_auth() == Some(("bot".into(), password.clone())))
        .count();
    assert!(authed >= 3, "{}", fake.describe_requests());
    assert!(!proxy.all_output().contains(&password), "password in the proxy's output");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_redirect_to_another_host_carries_no_authorization() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer {
        credentials: Some(("bot".into(), "redirect-secret".into())),
        expires_in: Some(300),
    })
    .await?;
    fake.set_redirect(RedirectMode::OtherHost);
    let image = TestImage::random("v1", &[50_000, 60_000])?;
    fake.put_image("org/img", &image);
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"WHARF_TEST_REDIRECT_PW\"\n",
        repo_config("lab", &fake.url(), "generic", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("WHARF_TEST_REDIRECT_PW".into(), "redirect-secret".into())],
        ..ProxyOptions::new(&config, &[])
    })?;
    // The redirect target answers 400 to a request with Authorization (like S3), so a leak would
    // also fail the pull.
    pull(&proxy, "lab", "org/img", &image).await?;

    let redirected = fake.redirect_requests();
    assert_eq!(
        redirected.len(),
        image.blobs().count(),
        "each blob fetched once through the redirect:\n{}",
        fake.describe_requests()
    );
    for r in &redirected {
        assert_eq!(r.listener, Listener::Redirect);
        assert!(
            r.header("authorization").is_none(),
            "Authorization leaked to the redirect host: {:?}",
            r.header("authorization")
        );
        assert_eq!(r.query.as_deref(), Some("X-Amz-Signature=fake"), "signed query kept");
    }
    // There was something to leak: the registry itself got the bearer token.
    assert!(
        fake.requests_matching("GET", "/blobs/")
            .iter()
            .any(|r| r.header("authorization").is_some_and(|a| a.starts_with("Bearer "))),
        "{}",
        fake.describe_requests()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relative_blob_redirect_is_resolved_against_the_registry() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    fake.set_redirect(RedirectMode::Relative);
    let image = TestImage::random("v1", &[30_000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    pull(&proxy, "lab", "org/img", &image).await?;
    assert_eq!(
        fake.count("GET", &format!("/redirected/{}", image.layers[0].digest)),
        1,
        "{}",
        fake.describe_requests()
    );
    Ok(())
}

/// HEAD of a blob not cached, on an upstream that redirects it to an object store whose URL is
/// signed for GET (HEAD there is 403, as S3's): the blob exists, so the answer is 200 with its
/// size (learnt from a one-byte ranged GET), not the object store's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_head_redirected_to_a_get_only_url_is_still_answered() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    fake.set_redirect(RedirectMode::OtherHost);
    fake.set_redirect_heads(true);
    let image = TestImage::random("v1", &[70_000])?;
    fake.put_image("org/img", &image);
    let proxy = Proxy::spawn(&repo_config("lab", &fake.url(), "generic", "5m"), &[])?;
    let blob = &image.layers[0];
    let r = wharf_tests::http::head(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[]).await?;
    assert_eq!(r.status, 200, "{:?}\n{}", r.headers, fake.describe_requests());
    assert_eq!(r.header("content-length"), Some(blob.size().to_string().as_str()));
    assert_eq!(r.header("docker-content-digest"), Some(blob.digest.as_str()));
    // Nothing was fetched whole: the ranged GET asked for one byte.
    let gets = fake.redirect_requests().into_iter().filter(|r| r.method == "GET").collect::<Vec<_>>();
    assert!(gets.iter().all(|r| r.header("range") == Some("bytes=0-0")), "{}", fake.describe_requests());
    // The blob is fetched as usual afterwards.
    let g = wharf_tests::http::get(&proxy.v2(&format!("lab/org/img/blobs/{}", blob.digest)), &[]).await?;
    assert_eq!((g.status, g.digest()), (200, blob.digest.clone()));
    Ok(())
}

/// A repo whose own (static) credentials the upstream refuses: the client gets 403 `DENIED` with
/// the reason, not a 401 that would ask it for credentials it cannot give.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_refusing_the_repos_own_credentials_is_a_403() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Basic { username: "bot".into(), password: "right".into() }).await?;
    let image = TestImage::random("v1", &[1_000])?;
    fake.put_image("org/img", &image);
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"WHARF_TEST_WRONG_PW\"\n",
        repo_config("lab", &fake.url(), "generic", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("WHARF_TEST_WRONG_PW".into(), "wrong".into())],
        ..ProxyOptions::new(&config, &[])
    })?;
    let r = get(&proxy.v2("lab/org/img/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!((r.status, r.oci_code()), (403, "DENIED".to_owned()), "{}", r.text());
    assert_eq!(r.header("www-authenticate"), None);
    assert!(r.text().contains("answered 401"), "{}", r.text());
    Ok(())
}

/// Stale credentials on a public image (GHCR answers them 403): the node asks again anonymously,
/// serves the image, says so in its log (once a minute) and counts it; a private image still gets
/// the refusal, never anonymous content it cannot have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_credentials_on_a_public_image_are_retried_anonymously() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer { credentials: None, expires_in: None }).await?;
    fake.add_user("bot", "current");
    fake.set_refusal_status(403);
    let public = TestImage::random("v1", &[5_000])?;
    fake.put_image("org/public", &public);
    let private = TestImage::random("v1", &[5_000])?;
    fake.put_image("org/secret", &private);
    fake.make_private("org/secret", &["bot"]);
    let config = format!(
        "{}username = \"bot\"\npassword_env = \"WHARF_TEST_STALE_PW\"\n",
        repo_config("gh", &fake.url(), "ghcr", "5m")
    );
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: vec![("WHARF_TEST_STALE_PW".into(), "expired".into())],
        ..ProxyOptions::new(&config, &[])
    })?;
    pull(&proxy, "gh", "org/public", &public).await?;
    let anonymous = fake.token_requests().iter().filter(|t| token_user(t).is_none()).count();
    assert!(anonymous >= 1, "no anonymous token request:\n{}", fake.describe_requests());
    let warned = proxy.all_output().matches("refused the repo's credentials").count();
    assert_eq!(warned, 1, "said once, not per request:\n{}", proxy.all_output());
    assert!(!proxy.all_output().contains("expired\""), "the password is in the log");
    let metrics = get(&format!("http://{}/metrics", proxy.addr()), &[]).await?.text();
    assert!(
        metrics.lines().any(|l| l.starts_with("wharf_upstream_credentials_refused_total{repo_key=\"gh\"}")),
        "{metrics}"
    );
    let r = get(&proxy.v2("gh/org/secret/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!((r.status, r.oci_code()), (403, "DENIED".to_owned()), "{}", r.text());
    assert!(r.text().contains("refused the credentials"), "the refusal is named: {}", r.text());
    Ok(())
}

/// ACR's static form: username 00000000-0000-0000-0000-000000000000 and an ACR refresh token as
/// the password go to the token endpoint as the OAuth2 refresh-token grant (POST); an endpoint
/// without a POST route is asked by GET with Basic instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acr_refresh_tokens_go_by_post_and_fall_back_to_get() -> anyhow::Result<()> {
    let refresh = format!("refresh-{}", wharf_tests::random_name(""));
    for post_route in [true, false] {
        let fake = FakeUpstream::start_with(AuthMode::Bearer {
            credentials: Some((ACR_REFRESH_TOKEN_USER.into(), refresh.clone())),
            expires_in: Some(300),
        })
        .await?;
        if !post_route {
            fake.refuse_token_post();
        }
        let image = TestImage::random("v1", &[5_000])?;
        fake.put_image("team/app", &image);
        let config = format!(
            "{}username = \"{ACR_REFRESH_TOKEN_USER}\"\npassword_env = \"WHARF_TEST_ACR\"\n",
            repo_config("acr", &fake.url(), "acr", "5m")
        );
        let proxy = Proxy::spawn_with(ProxyOptions {
            env: vec![("WHARF_TEST_ACR".into(), refresh.clone())],
            ..ProxyOptions::new(&config, &[])
        })?;
        pull(&proxy, "acr", "team/app", &image).await?;
        let tokens = fake.token_requests();
        let posts: Vec<&RecordedRequest> = tokens.iter().filter(|t| t.method == reqwest::Method::POST).collect();
        assert!(!posts.is_empty(), "no POST to the token endpoint:\n{}", fake.describe_requests());
        for p in &posts {
            assert_eq!(p.form_values("grant_type"), vec!["refresh_token".to_owned()]);
            assert_eq!(p.form_values("refresh_token"), vec![refresh.clone()]);
            assert_eq!(token_scopes(p), vec!["repository:team/app:pull".to_owned()]);
        }
        let gets: Vec<&RecordedRequest> = tokens.iter().filter(|t| t.method == reqwest::Method::GET).collect();
        if post_route {
            assert!(gets.is_empty(), "a GET although the POST worked:\n{}", fake.describe_requests());
        } else {
            assert!(
                gets.iter().any(|g| token_user(g) == Some((ACR_REFRESH_TOKEN_USER.into(), refresh.clone()))),
                "no GET fallback with Basic:\n{}",
                fake.describe_requests()
            );
        }
        assert!(!proxy.all_output().contains(&refresh), "the refresh token is in the node's output");
    }
    Ok(())
}
