//! `aws`: ECR's `GetAuthorizationToken` with the node's AWS identity, found by the standard chain:
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`; profile
//! `AWS_PROFILE`, else `default`), a web identity token file (`AWS_WEB_IDENTITY_TOKEN_FILE` and
//! `AWS_ROLE_ARN`: IRSA on EKS) exchanged at STS, the container endpoint
//! (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` on ECS, `AWS_CONTAINER_CREDENTIALS_FULL_URI` with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` for EKS Pod Identity), and IMDSv2 on EC2.
//!
//! The request is signed SigV4 (`aws-sigv4`) for the region and account of the registry's host
//! (`<account>.dkr.ecr.<region>.amazonaws.com`; another host takes `AWS_REGION` and the caller's
//! own account). `public.ecr.aws` is ECR Public: its `GetAuthorizationToken` in us-east-1, whose
//! token lifts the anonymous pull limits. Endpoints follow the settings the SDKs honour:
//! `AWS_ENDPOINT_URL_ECR`, `AWS_ENDPOINT_URL_ECR_PUBLIC`, `AWS_ENDPOINT_URL_STS`,
//! `AWS_ENDPOINT_URL`, `AWS_EC2_METADATA_SERVICE_ENDPOINT`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use base64::Engine as _;
use wharf_core::{Credentials, Secret};

use super::super::options::UpstreamOptions;
use super::http::{env, send_json, send_text, with_form};

/// AWS credentials: an access key, its secret, and a session token for temporary ones.
struct AwsKeys {
    id: String,
    secret: Secret,
    token: Option<Secret>,
}

const ECR_TARGET: &str = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken";
const ECR_PUBLIC_TARGET: &str = "SpectrumKaiFrontendService.GetAuthorizationToken";
/// ECR Public's registry, whose tokens only us-east-1 issues.
const ECR_PUBLIC_HOST: &str = "public.ecr.aws";
const AMZ_JSON: &str = "application/x-amz-json-1.1";
/// IMDS answers at once on EC2 and never elsewhere: a short bound.
const IMDS_TIMEOUT: Duration = Duration::from_secs(2);

/// The API call that gives a registry's token.
struct TokenCall {
    /// The signing name: `ecr` or `ecr-public`.
    service: &'static str,
    target: &'static str,
    region: String,
    endpoint: String,
    body: String,
}

impl TokenCall {
    /// The call for the registry at `host`: ECR Public for `public.ecr.aws`, else ECR for the
    /// host's account and region (another host: `AWS_REGION` and the caller's own account).
    fn for_host(host: &str) -> Result<Self, String> {
        if host.split(':').next() == Some(ECR_PUBLIC_HOST) {
            let region = "us-east-1".to_owned();
            return Ok(Self {
                service: "ecr-public",
                target: ECR_PUBLIC_TARGET,
                endpoint: env("AWS_ENDPOINT_URL_ECR_PUBLIC")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .unwrap_or_else(|| format!("https://api.ecr-public.{region}.amazonaws.com")),
                region,
                body: "{}".into(),
            });
        }
        let (account, region) = match parse_ecr_host(host) {
            Some((a, r)) => (Some(a), r),
            None => {
                let region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")).ok_or_else(|| {
                    format!("{host} is not <account>.dkr.ecr.<region>.amazonaws.com: set AWS_REGION on the node")
                })?;
                (None, region)
            }
        };
        Ok(Self {
            service: "ecr",
            target: ECR_TARGET,
            endpoint: env("AWS_ENDPOINT_URL_ECR")
                .or_else(|| env("AWS_ENDPOINT_URL"))
                .unwrap_or_else(|| format!("https://api.ecr.{region}.amazonaws.com")),
            region,
            body: match &account {
                Some(a) => serde_json::json!({ "registryIds": [a] }).to_string(),
                None => "{}".to_owned(),
            },
        })
    }
}

/// ECR's (or ECR Public's) `AWS:<password>` for the registry at `upstream`, and how long it lives.
pub(super) async fn ecr(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    upstream: &str,
) -> Result<(Credentials, Duration), String> {
    let host = upstream.split_once("://").map_or(upstream, |(_, h)| h);
    let call = TokenCall::for_host(host)?;
    let keys = chain(http, opts, &call.region).await?;
    let url = format!("{}/", call.endpoint.trim_end_matches('/'));
    let authority = reqwest::Url::parse(&url)
        .ok()
        .and_then(|u| Some(format!("{}{}", u.host_str()?, port_suffix(&u))))
        .ok_or_else(|| format!("{} endpoint {url:?} is not a URL", call.service))?;
    let signed = signed_headers(&keys, &call, &url, &authority)?;
    let mut req =
        http.post(&url).header("content-type", AMZ_JSON).header("x-amz-target", call.target).body(call.body.clone());
    for (name, value) in signed {
        req = req.header(name, value);
    }
    let what = format!("{} {url} (GetAuthorizationToken, region {})", call.service, call.region);
    let answer: serde_json::Value = send_json(opts, req, &what).await?;
    // ECR answers a list (one per registry asked for), ECR Public one object.
    let data = match &answer["authorizationData"] {
        serde_json::Value::Array(list) => list.first().unwrap_or(&serde_json::Value::Null),
        one => one,
    };
    let token = data["authorizationToken"].as_str().ok_or_else(|| format!("{what}: no authorizationToken"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| format!("{what}: the token is not base64 of user:password"))?;
    let (username, password) = decoded.split_once(':').ok_or_else(|| format!("{what}: the token has no ':'"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let lifetime = data["expiresAt"]
        .as_f64()
        .map_or(Duration::from_secs(12 * 3600), |at| Duration::from_secs_f64((at - now).max(1.0)));
    Ok((Credentials { username: username.to_owned(), password: Secret::new(password) }, lifetime))
}

/// `<account>.dkr.ecr.<region>.amazonaws.com[.cn]` -> (account, region).
fn parse_ecr_host(host: &str) -> Option<(String, String)> {
    let host = host.split(':').next()?;
    let mut parts = host.split('.');
    let (account, dkr, ecr, region) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (dkr == "dkr" && ecr == "ecr" && account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        .then(|| (account.to_owned(), region.to_owned()))
}

fn port_suffix(u: &reqwest::Url) -> String {
    u.port().map(|p| format!(":{p}")).unwrap_or_default()
}

/// The SigV4 headers (`authorization`, `x-amz-date`, `x-amz-security-token`) for a request.
fn signed_headers(
    keys: &AwsKeys,
    call: &TokenCall,
    url: &str,
    authority: &str,
) -> Result<Vec<(&'static str, String)>, String> {
    let identity = aws_credential_types::Credentials::new(
        keys.id.clone(),
        keys.secret.expose().to_owned(),
        keys.token.as_ref().map(|t| t.expose().to_owned()),
        None,
        "wharf",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&call.region)
        .name(call.service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing: {e}"))?
        .into();
    let headers = [("host", authority), ("content-type", AMZ_JSON), ("x-amz-target", call.target)];
    let signable = SignableRequest::new("POST", url, headers.into_iter(), SignableBody::Bytes(call.body.as_bytes()))
        .map_err(|e| format!("signing: {e}"))?;
    let (instructions, _) = sign(signable, &params).map_err(|e| format!("signing: {e}"))?.into_parts();
    let (headers, _) = instructions.into_parts();
    Ok(headers.into_iter().map(|h| (h.name(), h.value().to_owned())).collect())
}

/// The first source of the standard chain that has credentials.
async fn chain(http: &reqwest::Client, opts: &UpstreamOptions, region: &str) -> Result<AwsKeys, String> {
    if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
        return Ok(AwsKeys { id, secret: Secret::new(secret), token: env("AWS_SESSION_TOKEN").map(Secret::new) });
    }
    if let Some(keys) = shared_file()? {
        return Ok(keys);
    }
    if let (Some(file), Some(role)) = (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN")) {
        return web_identity(http, opts, region, &file, &role).await;
    }
    if let Some(url) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        .or_else(|| env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").map(|u| format!("http://169.254.170.2{u}")))
    {
        let mut req = http.get(&url);
        let token = match env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
            Some(f) => Some(std::fs::read_to_string(&f).map_err(|e| format!("reading {f}: {e}"))?.trim().to_owned()),
            None => env("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        };
        if let Some(t) = token {
            req = req.header("authorization", t);
        }
        let j: serde_json::Value = send_json(opts, req, &format!("container credentials endpoint {url}")).await?;
        return keys_of(&j, "container credentials endpoint");
    }
    imds(http, opts).await
}

/// `AWS_PROFILE` (else `default`) of the shared credentials file, when the file has it.
fn shared_file() -> Result<Option<AwsKeys>, String> {
    let path = match env("AWS_SHARED_CREDENTIALS_FILE") {
        Some(p) => std::path::PathBuf::from(p),
        None => match env("HOME") {
            Some(h) => std::path::Path::new(&h).join(".aws").join("credentials"),
            None => return Ok(None),
        },
    };
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".into());
    let mut section = String::new();
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
        } else if section == profile
            && let Some((k, v)) = line.split_once('=')
        {
            let v = v.trim().to_owned();
            match k.trim() {
                "aws_access_key_id" => id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => {
            Ok(Some(AwsKeys { id, secret: Secret::new(secret), token: token.map(Secret::new) }))
        }
        _ => Ok(None),
    }
}

/// STS `AssumeRoleWithWebIdentity` with the token in `file` (IRSA).
async fn web_identity(
    http: &reqwest::Client,
    opts: &UpstreamOptions,
    region: &str,
    file: &str,
    role: &str,
) -> Result<AwsKeys, String> {
    let token = std::fs::read_to_string(file).map_err(|e| format!("reading {file}: {e}"))?;
    let endpoint = env("AWS_ENDPOINT_URL_STS")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
    let session = env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "wharf".into());
    let form = [
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", role),
        ("RoleSessionName", session.as_str()),
        ("WebIdentityToken", token.trim()),
    ];
    let url = format!("{}/", endpoint.trim_end_matches('/'));
    let req = with_form(http.post(&url), form);
    let what = format!("STS {url} (AssumeRoleWithWebIdentity {role})");
    let xml = send_text(opts, req, &what).await?;
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = xml.find(&open)? + open.len();
        let end = xml[start..].find(&format!("</{name}>"))? + start;
        Some(xml[start..end].trim().to_owned())
    };
    match (tag("AccessKeyId"), tag("SecretAccessKey")) {
        (Some(id), Some(secret)) => {
            Ok(AwsKeys { id, secret: Secret::new(secret), token: tag("SessionToken").map(Secret::new) })
        }
        _ => Err(format!("{what}: the answer has no credentials")),
    }
}

/// IMDSv2: a session token, then the instance role's credentials.
async fn imds(http: &reqwest::Client, opts: &UpstreamOptions) -> Result<AwsKeys, String> {
    let base = env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| "http://169.254.169.254".into());
    let base = base.trim_end_matches('/');
    let opts = UpstreamOptions { first_byte_timeout: IMDS_TIMEOUT.min(opts.first_byte_timeout), ..opts.clone() };
    let none = "no AWS credentials: none in the environment or the shared file, no web identity or container endpoint, and IMDS";
    let session = http.put(format!("{base}/latest/api/token")).header("x-aws-ec2-metadata-token-ttl-seconds", "21600");
    let session = send_text(&opts, session, &format!("{none} {base}")).await?;
    let roles_url = format!("{base}/latest/meta-data/iam/security-credentials/");
    let roles =
        send_text(&opts, http.get(&roles_url).header("x-aws-ec2-metadata-token", session.trim()), "IMDS").await?;
    let role = roles.lines().next().map(str::trim).filter(|r| !r.is_empty()).ok_or("IMDS: the instance has no role")?;
    let req = http.get(format!("{roles_url}{role}")).header("x-aws-ec2-metadata-token", session.trim());
    let j: serde_json::Value = send_json(&opts, req, "IMDS").await?;
    keys_of(&j, "IMDS")
}

fn keys_of(j: &serde_json::Value, what: &str) -> Result<AwsKeys, String> {
    match (j["AccessKeyId"].as_str(), j["SecretAccessKey"].as_str()) {
        (Some(id), Some(secret)) => {
            Ok(AwsKeys { id: id.to_owned(), secret: Secret::new(secret), token: j["Token"].as_str().map(Secret::new) })
        }
        _ => Err(format!("{what}: the answer has no AccessKeyId/SecretAccessKey")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_hosts_name_their_account_and_region() {
        assert_eq!(
            parse_ecr_host("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            Some(("123456789012".into(), "eu-west-1".into()))
        );
        assert_eq!(
            parse_ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn:443").map(|x| x.1),
            Some("cn-north-1".into())
        );
        assert_eq!(parse_ecr_host("public.ecr.aws"), None);
        assert_eq!(parse_ecr_host("12345.dkr.ecr.eu-west-1.amazonaws.com"), None);
    }
}
