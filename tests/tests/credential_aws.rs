//! Credential provider `aws`: an in-process fake AWS checks what AWS checks. Its ECR endpoint
//! verifies each GetAuthorizationToken's SigV4 signature with the test secret (a request signed
//! wrong is refused, as AWS refuses it) and gives short-lived tokens; its IMDSv2 wants the session
//! token it handed out; its STS takes only the web identity token of the file. The fake registry
//! takes only the ECR passwords issued. The node reaches them through the settings the AWS SDKs
//! honour (`AWS_ENDPOINT_URL_ECR`, `AWS_ENDPOINT_URL_STS`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use wharf_tests::control::poll;
use wharf_tests::http::{self, get};
use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::proxy::repo_config;
use wharf_tests::{AuthMode, FakeUpstream, Proxy, ProxyOptions, TestImage};

const KEY_ID: &str = "ASIATESTNODEROLE";
const REGION: &str = "eu-west-1";

struct Aws {
    secret: String,
    session_token: String,
    imds_token: String,
    container_token: String,
    web_identity: String,
    registry: Arc<FakeUpstream>,
    /// How long an ECR authorization token lives.
    lifetime: u64,
    issued: Mutex<Vec<String>>,
    refused: Mutex<Vec<String>>,
}

impl Aws {
    fn refuse(&self, status: StatusCode, kind: &str, why: &str) -> Response {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).push(kind.to_owned());
        let body = serde_json::json!({"__type": kind, "message": why});
        (status, [("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
    }

    fn issued(&self) -> usize {
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Unix seconds of `20261202T153000Z`.
fn amz_time(s: &str) -> Option<SystemTime> {
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d, hh, mm, ss) = (n(0..4)?, n(4..6)?, n(6..8)?, n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from the civil date (proleptic Gregorian).
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(UNIX_EPOCH + Duration::from_secs((days * 86_400 + hh * 3600 + mm * 60 + ss) as u64))
}

/// The `Authorization` AWS would expect for this request, signed with the test secret.
fn expected_signature(aws: &Aws, headers: &HeaderMap, body: &str, region: &str, service: &str) -> Option<String> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let time = amz_time(h("x-amz-date")?)?;
    let token = h("x-amz-security-token").map(str::to_owned);
    let identity = aws_credential_types::Credentials::new(KEY_ID, aws.secret.clone(), token, None, "test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .ok()?
        .into();
    let signed = [("host", h("host")?), ("content-type", h("content-type")?), ("x-amz-target", h("x-amz-target")?)];
    let url = format!("http://{}/", h("host")?);
    let signable = SignableRequest::new("POST", url, signed.into_iter(), SignableBody::Bytes(body.as_bytes())).ok()?;
    let (instructions, _) = sign(signable, &params).ok()?.into_parts();
    let (out, _) = instructions.into_parts();
    out.into_iter().find(|x| x.name() == "authorization").map(|x| x.value().to_owned())
}

async fn fake_aws(State(aws): State<Arc<Aws>>, method: Method, uri: Uri, headers: HeaderMap, body: String) -> Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let path = uri.path();
    if path == "/latest/api/token" {
        if method != Method::PUT || h("x-aws-ec2-metadata-token-ttl-seconds").is_empty() {
            return StatusCode::BAD_REQUEST.into_response();
        }
        return aws.imds_token.clone().into_response();
    }
    if let Some(role) = path.strip_prefix("/latest/meta-data/iam/security-credentials/") {
        if h("x-aws-ec2-metadata-token") != aws.imds_token {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        if role.is_empty() {
            return "wharf-node-role\n".into_response();
        }
        let creds = serde_json::json!({"Code": "Success", "AccessKeyId": KEY_ID, "SecretAccessKey": aws.secret,
            "Token": aws.session_token, "Expiration": "2099-01-01T00:00:00Z"});
        return creds.to_string().into_response();
    }
    if path == "/v2/credentials/pod" {
        // The container endpoint (ECS, EKS Pod Identity): only with the token it was given.
        if h("authorization") != aws.container_token {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        let creds = serde_json::json!({"AccessKeyId": KEY_ID, "SecretAccessKey": aws.secret,
            "Token": aws.session_token, "Expiration": "2099-01-01T00:00:00Z"});
        return creds.to_string().into_response();
    }
    let target = h("x-amz-target");
    let public = target == "SpectrumKaiFrontendService.GetAuthorizationToken";
    if public || target == "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken" {
        let (region, service) = if public { ("us-east-1", "ecr-public") } else { (REGION, "ecr") };
        if expected_signature(&aws, &headers, &body, region, service).as_deref() != Some(h("authorization")) {
            return aws.refuse(
                StatusCode::FORBIDDEN,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            );
        }
        if h("x-amz-security-token") != aws.session_token {
            return aws.refuse(StatusCode::FORBIDDEN, "UnrecognizedClientException", "The security token is invalid.");
        }
        let password = format!("ecr-{}", wharf_tests::random_name(""));
        aws.issued.lock().unwrap_or_else(|e| e.into_inner()).push(password.clone());
        aws.registry.add_user("AWS", &password);
        let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let expires_at = now + aws.lifetime as f64;
        // ECR answers a list, one per registry; ECR Public one object.
        let body = if public {
            serde_json::json!({"authorizationData": {"authorizationToken": token, "expiresAt": expires_at}})
        } else {
            serde_json::json!({"authorizationData": [{"authorizationToken": token, "expiresAt": expires_at,
                "proxyEndpoint": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"}]})
        };
        return ([("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response();
    }
    // STS: AssumeRoleWithWebIdentity (no signature: the web identity token is the credential).
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    if form.get("Action").map(String::as_str) == Some("AssumeRoleWithWebIdentity") {
        if form.get("WebIdentityToken") != Some(&aws.web_identity) {
            return aws.refuse(StatusCode::BAD_REQUEST, "InvalidIdentityToken", "The web identity token is not valid.");
        }
        let xml = format!(
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
             <AccessKeyId>{KEY_ID}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
             <SessionToken>{}</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>\
             </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
            aws.secret, aws.session_token
        );
        return ([("content-type", "text/xml")], xml).into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}

async fn start(lifetime: u64) -> anyhow::Result<(Arc<Aws>, Arc<FakeUpstream>, String)> {
    let registry = Arc::new(
        FakeUpstream::start_with(AuthMode::Basic { username: "AWS".into(), password: "none-yet".into() }).await?,
    );
    let aws = Arc::new(Aws {
        secret: format!("secret-{}", wharf_tests::random_name("")),
        session_token: format!("session-{}", wharf_tests::random_name("")),
        imds_token: format!("imds-{}", wharf_tests::random_name("")),
        container_token: format!("pod-{}", wharf_tests::random_name("")),
        web_identity: format!("eyJweb-{}", wharf_tests::random_name("")),
        registry: registry.clone(),
        lifetime,
        issued: Mutex::default(),
        refused: Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new().fallback(fake_aws).with_state(aws.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((aws, registry, url))
}

/// The node's environment: the fake's endpoints, no credentials of the machine's own (`HOME`).
fn env(url: &str, home: &std::path::Path, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL_ECR", url),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", url),
        ("AWS_REGION", REGION),
        ("HOME", &home.display().to_string()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    e.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    e
}

fn ecr_repo(registry: &FakeUpstream) -> String {
    format!("{}credential_provider = \"aws\"\n", repo_config("ecr", &registry.url(), "ecr", "0s"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imdsv2_credentials_sign_ecr_requests_and_tokens_are_refreshed_before_they_expire() -> anyhow::Result<()> {
    let (aws, registry, url) = start(4).await?;
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("team/app", &image);
    let home = tempfile::tempdir()?;
    let proxy = Proxy::spawn_with(ProxyOptions {
        env: env(&url, home.path(), &[]),
        ..ProxyOptions::new(&ecr_repo(&registry), &[])
    })?;
    http::pull_image(&proxy.v2("ecr/team/app"), &image).await?;
    assert_eq!((aws.issued(), aws.refused()), (1, vec![]), "one signed GetAuthorizationToken");
    poll(Duration::from_secs(20), "a refreshed ECR token", || {
        let (proxy, image, aws) = (&proxy, &image, &aws);
        async move {
            http::pull_image(&proxy.v2("ecr/team/app"), image).await.expect("a pull across the token's expiry failed");
            (aws.issued() >= 2).then_some(())
        }
    })
    .await?;
    assert_eq!((aws.issued(), aws.refused()), (2, vec![]), "one refresh");
    let out = proxy.all_output();
    assert!(!out.contains(&aws.secret) && !out.contains(&aws.session_token) && !out.contains(&aws.imds_token));
    assert!(aws.issued.lock().unwrap_or_else(|e| e.into_inner()).iter().all(|p| !out.contains(p.as_str())));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_identity_token_file_works_and_a_wrong_signature_is_a_clear_502() -> anyhow::Result<()> {
    let (aws, registry, url) = start(3600).await?;
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("team/app", &image);
    let home = tempfile::tempdir()?;
    let token_file = home.path().join("token");
    std::fs::write(&token_file, &aws.web_identity)?;
    let web = env(
        &url,
        home.path(),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file.display().to_string()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/wharf"),
            ("AWS_ENDPOINT_URL_STS", &url),
        ],
    );
    let proxy = Proxy::spawn_with(ProxyOptions { env: web, ..ProxyOptions::new(&ecr_repo(&registry), &[]) })?;
    http::pull_image(&proxy.v2("ecr/team/app"), &image).await?;
    assert_eq!((aws.issued(), aws.refused()), (1, vec![]));

    // Keys in the environment come first; with a secret AWS does not know, ECR refuses the
    // signature and the client is told which provider failed and what AWS said.
    let wrong_secret = format!("not-the-secret-{}", wharf_tests::random_name(""));
    let keys = env(
        &url,
        home.path(),
        &[("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", &wrong_secret), ("AWS_SESSION_TOKEN", "s")],
    );
    let wrong = Proxy::spawn_with(ProxyOptions { env: keys, ..ProxyOptions::new(&ecr_repo(&registry), &[]) })?;
    let r = get(&wrong.v2("ecr/team/app/manifests/v1"), &[("accept", OCI_MANIFEST)]).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("credential provider aws") && r.text().contains("InvalidSignatureException"),
        "{}",
        r.text()
    );
    assert_eq!(aws.refused(), vec!["InvalidSignatureException".to_owned()]);
    assert!(!wrong.all_output().contains(&wrong_secret) && !r.text().contains(&wrong_secret));
    let metrics = get(&format!("http://{}/metrics", wrong.addr()), &[]).await?.text();
    assert!(metrics.contains("wharf_credential_provider_errors_total{provider=\"aws\"}"), "{metrics}");
    Ok(())
}

/// The shared credentials file (a named profile), and the container endpoint with its
/// authorization token file (EKS Pod Identity), each signs ECR's request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_file_and_the_container_endpoint_give_the_keys() -> anyhow::Result<()> {
    let (aws, registry, url) = start(3600).await?;
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("team/app", &image);
    let home = tempfile::tempdir()?;
    std::fs::create_dir(home.path().join(".aws"))?;
    std::fs::write(
        home.path().join(".aws/credentials"),
        format!(
            "[default]\naws_access_key_id = AKIANOTTHISONE\naws_secret_access_key = wrong\n\n[wharf]\n\
             aws_access_key_id = {KEY_ID}\naws_secret_access_key = {}\naws_session_token = {}\n",
            aws.secret, aws.session_token
        ),
    )?;
    let profile = Proxy::spawn_with(ProxyOptions {
        env: env(&url, home.path(), &[("AWS_PROFILE", "wharf")]),
        ..ProxyOptions::new(&ecr_repo(&registry), &[])
    })?;
    http::pull_image(&profile.v2("ecr/team/app"), &image).await?;
    assert_eq!((aws.issued(), aws.refused()), (1, vec![]), "the profile's keys signed the request");

    let empty_home = tempfile::tempdir()?;
    let token_file = empty_home.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, format!("{}\n", aws.container_token))?;
    let pod = Proxy::spawn_with(ProxyOptions {
        env: env(
            &url,
            empty_home.path(),
            &[
                ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &format!("{url}/v2/credentials/pod")),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_file.display().to_string()),
            ],
        ),
        ..ProxyOptions::new(&ecr_repo(&registry), &[])
    })?;
    http::pull_image(&pod.v2("ecr/team/app"), &image).await?;
    assert_eq!((aws.issued(), aws.refused()), (2, vec![]), "the container endpoint's keys signed the request");
    for p in [&profile, &pod] {
        let out = p.all_output();
        assert!(!out.contains(&aws.secret) && !out.contains(&aws.container_token));
    }
    Ok(())
}

/// ECR Public (`public.ecr.aws`): its own GetAuthorizationToken in us-east-1 (`ecr-public`,
/// signed for it), the token presented at the registry's token endpoint. The node reaches the
/// registry through an egress proxy (`HTTP_PROXY`, which the node's upstream client honours):
/// here the fake registry, answering for `public.ecr.aws`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecr_public_tokens_come_from_its_own_api() -> anyhow::Result<()> {
    let (aws, registry, url) = start(3600).await?;
    let image = TestImage::random("v1", &[5_000])?;
    registry.put_image("team/app", &image);
    let home = tempfile::tempdir()?;
    let mut e = env(&url, home.path(), &[("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", &aws.secret)]);
    e.retain(|(k, _)| k != "AWS_ENDPOINT_URL_ECR" && k != "AWS_REGION");
    e.extend([
        ("AWS_SESSION_TOKEN".to_owned(), aws.session_token.clone()),
        ("AWS_ENDPOINT_URL_ECR_PUBLIC".to_owned(), url.clone()),
        ("HTTP_PROXY".to_owned(), registry.url()),
        ("NO_PROXY".to_owned(), "127.0.0.1".to_owned()),
    ]);
    let config =
        format!("{}credential_provider = \"aws\"\n", repo_config("ecrpub", "http://public.ecr.aws", "generic", "0s"));
    let proxy = Proxy::spawn_with(ProxyOptions { env: e, ..ProxyOptions::new(&config, &[]) })?;
    http::pull_image(&proxy.v2("ecrpub/team/app"), &image).await?;
    assert_eq!((aws.issued(), aws.refused()), (1, vec![]), "one ECR Public token, signed for ecr-public in us-east-1");
    let hosts: Vec<_> = registry.requests().iter().filter_map(|r| r.header("host").map(str::to_owned)).collect();
    assert!(hosts.iter().any(|h| h == "public.ecr.aws"), "{hosts:?}");
    Ok(())
}
