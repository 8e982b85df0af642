//! The harness itself works: a real registry takes a pushed random image, and the fake upstream
//! speaks token auth, redirects and faults. None of these tests need the proxy.

use std::time::Duration;

use anyhow::ensure;
use wharf_tests::fake::RedirectMode;
use wharf_tests::http::{get, get_outcome, raw_request};
use wharf_tests::{AuthMode, FakeUpstream, Fault, Registry, TestImage, skopeo_inspect};

#[test]
fn registry_takes_a_pushed_random_image() -> anyhow::Result<()> {
    let registry = Registry::start()?;
    let image = TestImage::random("v1", &[300_000, 200_000, 100_000])?;
    image.push(&registry.host(), "harness/img")?;

    let inspected = skopeo_inspect(&format!("docker://{}/harness/img:v1", registry.host()))?;
    assert_eq!(inspected["Digest"], image.digest());
    let layers: Vec<&str> = inspected["Layers"].as_array().expect("Layers").iter().filter_map(|l| l.as_str()).collect();
    let expected: Vec<&str> = image.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, expected);

    // The access log counts blob GETs.
    registry.sync_log()?;
    let before = registry.blob_gets();
    let layer = &image.layers[1];
    let resp = raw_request(registry.addr(), "GET", &format!("/v2/harness/img/blobs/{}", layer.digest), &[])?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, layer.data);
    registry.sync_log()?;
    assert_eq!(registry.blob_gets(), before + 1);
    assert_eq!(registry.count("GET", &layer.digest), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_upstream_speaks_token_auth() -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(AuthMode::Bearer {
        credentials: Some(("bot".into(), "s3cret".into())),
        expires_in: Some(300),
    })
    .await?;
    let digest = fake.put_manifest("org/img", Some("v1"), "application/json", "{}");

    let ping = get(&format!("{}/v2/", fake.url()), &[]).await?;
    assert_eq!(ping.status, 401);
    let challenge = ping.header("www-authenticate").expect("challenge");
    assert!(challenge.starts_with(&format!("Bearer realm=\"{}/token\"", fake.url())));

    let denied = get(&format!("{}/token?service=fake&scope=repository:org/img:pull", fake.url()), &[]).await?;
    assert_eq!(denied.status, 401);
    let tok = get(
        &format!("{}/token?service=fake&scope=repository:org/img:pull", fake.url()),
        &[("authorization", "Basic Ym90OnMzY3JldA==")],
    )
    .await?;
    assert_eq!(tok.status, 200, "{}", tok.text());
    let token = tok.json()?["token"].as_str().expect("token").to_string();
    let auth = format!("Bearer {token}");

    let m = get(&format!("{}/v2/org/img/manifests/v1", fake.url()), &[("authorization", &auth)]).await?;
    assert_eq!(m.status, 200);
    assert_eq!(m.header("docker-content-digest"), Some(digest.as_str()));
    // A token for org/img does not open another repository.
    let other = get(&format!("{}/v2/org/other/manifests/v1", fake.url()), &[("authorization", &auth)]).await?;
    assert_eq!(other.status, 401);
    fake.revoke_tokens();
    let revoked = get(&format!("{}/v2/org/img/manifests/v1", fake.url()), &[("authorization", &auth)]).await?;
    assert_eq!(revoked.status, 401);
    assert_eq!(fake.token_requests().len(), 2);
    assert_eq!(fake.token_requests()[1].basic_auth(), Some(("bot".into(), "s3cret".into())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_upstream_redirects_and_injects_faults() -> anyhow::Result<()> {
    let fake = FakeUpstream::start().await?;
    let blob = fake.add_random_blob(100_000);
    let url = format!("{}/v2/x/y/blobs/{}", fake.url(), blob.digest);

    let ok = get(&url, &[]).await?;
    assert_eq!((ok.status, ok.digest()), (200, blob.digest.clone()));

    let range = get(&url, &[("range", "bytes=10-19")]).await?;
    assert_eq!(range.status, 206);
    assert_eq!(range.body, &blob.data[10..20]);

    fake.set_redirect(RedirectMode::OtherHost);
    let r = get(&url, &[]).await?;
    assert_eq!(r.status, 307);
    let location = r.header("location").expect("location").to_string();
    assert!(location.starts_with(&format!("http://{}/", fake.redirect_addr())));
    let followed = get(&location, &[]).await?;
    assert_eq!(followed.digest(), blob.digest);
    let leaked = get(&location, &[("authorization", "Bearer x")]).await?;
    assert_eq!(leaked.status, 400);
    assert_eq!(fake.redirect_requests().len(), 2);
    fake.set_redirect(RedirectMode::None);

    for fault in [Fault::ResetMidBody, Fault::ShortBody] {
        fake.clear_faults();
        fake.set_fault(&blob.digest, fault.clone());
        let out = get_outcome(&url, &[]).await;
        ensure!(out.error.is_some(), "{fault:?}: {}", out.describe());
    }
    fake.clear_faults();
    fake.set_fault(&blob.digest, Fault::WrongBytes);
    let wrong = get(&url, &[]).await?;
    assert_eq!(wrong.body.len(), blob.size());
    assert_ne!(wrong.digest(), blob.digest);

    fake.clear_faults();
    fake.set_fault(&blob.digest, Fault::Status { status: 429, retry_after: Some("1".into()) });
    let limited = get(&url, &[]).await?;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("1"));

    // Pause: the body stops after 1000 bytes until released.
    fake.clear_faults();
    fake.set_fault(&blob.digest, Fault::Pause { after: 1000 });
    let mut resp = wharf_tests::http::client().get(&url).send().await?;
    let first = resp.chunk().await?.expect("first chunk");
    assert_eq!(first.len(), 1000);
    let stalled = tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await;
    assert!(stalled.is_err(), "body went on before release");
    let rec = fake.requests_matching("GET", &blob.digest);
    assert!(!rec.last().expect("recorded").is_completed());
    fake.release();
    let mut rest = first.to_vec();
    while let Some(c) = resp.chunk().await? {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, blob.data);
    Ok(())
}
