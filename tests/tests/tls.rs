//! TLS on every link, with certificates made at test time (rcgen): the node's registry port (HTTPS,
//! h2 by ALPN, certificate reload without dropping connections, the handshake bounded by the header
//! read timeout, skopeo with a cert dir), the control plane's port (a node following it over
//! https, mTLS refusing a node without a client certificate, regctl with --ca-cert), and upstreams
//! over HTTPS (a repo's CA bundle, none, insecure_skip_tls_verify).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use wharf_tests::control::{ControlOptions, ControlPlane, Node, admin_token};
use wharf_tests::pki::{Leaf, Pki};
use wharf_tests::proxy::repo_config;
use wharf_tests::regctl::Regctl;
use wharf_tests::{FakeUpstream, Proxy, ProxyOptions, TestImage};

const WAIT: Duration = Duration::from_secs(20);
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A reqwest client trusting only `ca_pem` (and presenting `identity` when given).
fn https_client(ca_pem: &str, identity: Option<&Leaf>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?]);
    if let Some(leaf) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{}\n{}", leaf.cert_pem, leaf.key_pem).as_bytes())?);
    }
    Ok(b.build()?)
}

/// A raw TLS connection to `addr` trusting `ca_pem` (HTTP/1.1: no ALPN offered).
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        let c: CertificateDer<'static> = c?;
        roots.add(c)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
}

/// The leaf certificate the server presented.
fn peer_leaf(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream.get_ref().1.peer_certificates()?.first().map(|c| c.clone().into_owned())
}

/// One HTTP/1.1 `GET path` on an open connection; returns the status (the body is read whole, by
/// `Content-Length`, so the connection can carry the next request).
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    conn: &mut S,
    path: &str,
) -> anyhow::Result<u16> {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk)).await??;
        ensure!(n > 0, "connection closed before a response head (got {:?})", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .context("no Content-Length")?
        .parse()?;
    while buf.len() < head_end + length {
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk)).await??;
        ensure!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

/// An upstream on a fake registry, with its image.
async fn fake_with_image() -> anyhow::Result<(FakeUpstream, TestImage)> {
    let fake = FakeUpstream::start().await?;
    let image = TestImage::random("v1", &[2048, 70_000])?;
    fake.put_image("team/app", &image);
    Ok((fake, image))
}

/// Pulls the image's manifest and blobs through `base` (`https://127.0.0.1:<port>/v2/<key>`),
/// checking every digest.
async fn pull(http: &reqwest::Client, base: &str, image: &TestImage) -> anyhow::Result<()> {
    let resp =
        http.get(format!("{base}/team/app/manifests/{}", image.tag)).header("accept", OCI_MANIFEST).send().await?;
    ensure!(resp.status() == 200, "manifest: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    ensure!(wharf_tests::sha256_digest(&resp.bytes().await?) == image.manifest.digest, "manifest digest");
    for blob in image.layers.iter().chain([&image.config]) {
        let resp = http.get(format!("{base}/team/app/blobs/{}", blob.digest)).send().await?;
        ensure!(resp.status() == 200, "blob {}: {}", blob.digest, resp.status());
        ensure!(wharf_tests::sha256_digest(&resp.bytes().await?) == blob.digest, "blob digest {}", blob.digest);
    }
    Ok(())
}

#[tokio::test]
async fn node_serves_https_with_h2_and_reloads_its_certificate_without_dropping_connections() -> anyhow::Result<()> {
    let pki = Pki::new("node")?;
    let first = pki.leaf("node one")?;
    let (cert, key) = pki.write("node", &first)?;
    let (fake, image) = fake_with_image().await?;
    let proxy = Proxy::spawn_with(ProxyOptions::new(
        &repo_config("lab", &fake.url(), "generic", "5m"),
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key), "--tls-reload-interval", "100ms"],
    ))?;
    let base = format!("https://{}/v2/lab", proxy.addr());

    // A pull over HTTPS; reqwest offers h2 and http/1.1 by ALPN: h2 is chosen.
    let http = https_client(&pki.ca_pem, None)?;
    pull(&http, &base, &image).await?;
    let resp = http.get(format!("https://{}/v2/", proxy.addr())).send().await?;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN should pick h2");
    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::builder().no_proxy().timeout(WAIT).build()?;
    assert!(plain.get(format!("http://{}/v2/", proxy.addr())).send().await.is_err(), "plain http on the TLS port");

    // An open connection, made with the first certificate.
    let mut old = tls_connect(proxy.addr(), &pki.ca_pem).await?;
    assert_eq!(peer_leaf(&old).as_ref(), Some(&first.der));
    get_on(&mut old, "/v2/").await?;

    // New files: new handshakes get the new certificate ...
    let second = pki.leaf("node two")?;
    pki.write("node", &second)?;
    let mut seen = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let conn = tls_connect(proxy.addr(), &pki.ca_pem).await?;
        if peer_leaf(&conn).as_ref() == Some(&second.der) {
            seen = Some(conn);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut new = seen.with_context(|| format!("the new certificate was never served\n{}", proxy.log_tail(20)))?;
    ensure!(proxy.stdout().lines().iter().any(|l| l.contains("TLS certificate reloaded")), "no reload log line");
    // ... and the open connection keeps working, on the old one.
    get_on(&mut old, "/v2/").await?;
    get_on(&mut new, "/v2/").await?;
    pull(&http, &base, &image).await?;
    // Those were hits, over TLS: read into buffers, never served from memory maps (rustls reads
    // the bytes in user space, where a truncated mapped file would raise SIGBUS).
    let metrics = http.get(format!("https://{}/metrics", proxy.addr())).send().await?.text().await?;
    let mapped: Vec<&str> = metrics.lines().filter(|l| l.starts_with("wharf_cache_mapped_bytes")).collect();
    ensure!(mapped == ["wharf_cache_mapped_bytes 0"], "blobs mapped for TLS clients: {mapped:?}");

    // A bad file is refused and logged; the current certificate stays.
    let mark = proxy.stdout().len();
    std::fs::write(&cert, "not a certificate\n")?;
    proxy
        .stdout()
        .wait_for(mark, WAIT, |l| l.contains("TLS certificate not reloaded"))
        .with_context(|| format!("no error for a bad certificate file\n{}", proxy.log_tail(20)))?;
    let conn = tls_connect(proxy.addr(), &pki.ca_pem).await?;
    assert_eq!(peer_leaf(&conn).as_ref(), Some(&second.der), "a bad file must not replace the certificate");
    get_on(&mut old, "/v2/").await?;
    Ok(())
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_by_the_header_read_timeout() -> anyhow::Result<()> {
    let pki = Pki::new("slow")?;
    let (cert, key) = pki.write("node", &pki.leaf("node")?)?;
    let proxy = Proxy::spawn_with(ProxyOptions::new(
        &repo_config("lab", "http://127.0.0.1:9", "generic", "5m"),
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key), "--header-read-timeout", "1s"],
    ))?;
    let mut tcp = TcpStream::connect(proxy.addr()).await?;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    // Nothing sent: the node closes the connection once the timeout is over.
    let n =
        tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.context("the node never closed a silent connection")?;
    assert!(matches!(n, Ok(0) | Err(_)), "expected the connection closed, got {n:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early: {:?}", started.elapsed());
    // Other clients were served meanwhile, and still are.
    let http = https_client(&pki.ca_pem, None)?;
    assert_eq!(http.get(format!("https://{}/v2/", proxy.addr())).send().await?.status(), 200);
    Ok(())
}

#[tokio::test]
async fn skopeo_pulls_from_an_https_node_with_a_cert_dir() -> anyhow::Result<()> {
    let pki = Pki::new("skopeo")?;
    let (cert, key) = pki.write("node", &pki.leaf("node")?)?;
    let (fake, image) = fake_with_image().await?;
    let proxy = Proxy::spawn_with(ProxyOptions::new(
        &repo_config("lab", &fake.url(), "generic", "5m"),
        &["--tls-cert", &s(&cert), "--tls-key", &s(&key)],
    ))?;
    let certs = tempfile::tempdir()?;
    std::fs::write(certs.path().join("ca.crt"), &pki.ca_pem)?;
    let dest = tempfile::tempdir()?;
    let out = tokio::process::Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-cert-dir"])
        .arg(certs.path())
        .arg(format!("docker://{}/lab/team/app:{}", proxy.host(), image.tag))
        .arg(format!("dir:{}", dest.path().display()))
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .map_err(|_| anyhow::anyhow!("skopeo timed out\n{}", proxy.log_tail(15)))??;
    ensure!(out.status.success(), "skopeo failed: {}", String::from_utf8_lossy(&out.stderr));
    wharf_tests::verify_dir_copy(dest.path(), &image)?;
    Ok(())
}

/// A TLS front for `backend` (plain HTTP) on 127.0.0.1:0, presenting `leaf`; its address.
async fn tls_front(backend: std::net::SocketAddr, leaf: &Leaf) -> anyhow::Result<std::net::SocketAddr> {
    let key = PrivateKeyDer::try_from(rcgen::KeyPair::from_pem(&leaf.key_pem)?.serialize_der())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut up) = TcpStream::connect(backend).await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn upstream_over_https_needs_the_repos_ca_bundle_or_insecure_skip_verify() -> anyhow::Result<()> {
    let pki = Pki::new("upstream")?;
    let (fake, image) = fake_with_image().await?;
    let front = tls_front(fake.addr(), &pki.leaf("upstream")?).await?;
    let upstream = format!("https://{front}");
    let config = format!(
        "{}ca_bundle_file = \"{}\"\n\n{}\n{}insecure_skip_tls_verify = true\n",
        repo_config("withca", &upstream, "generic", "5m"),
        s(&pki.ca_path()),
        repo_config("noca", &upstream, "generic", "5m"),
        repo_config("insecure", &upstream, "generic", "5m"),
    );
    // Retries on: a certificate failure must not use them.
    let proxy = Proxy::spawn(&config, &["--retries", "2"])?;
    let http = reqwest::Client::builder().no_proxy().timeout(WAIT).build()?;
    let base = |key: &str| format!("http://{}/v2/{key}", proxy.addr());

    // The repo's CA bundle: verified, pulled.
    pull(&http, &base("withca"), &image).await?;

    // No CA bundle: the system roots do not know the test CA; the client is told why.
    let resp = http
        .get(format!("{}/team/app/manifests/{}", base("noca"), image.tag))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("certificate") && body.contains("ca_bundle"), "no clear TLS error: {body}");
    // ... at once: a certificate problem is not retried.
    let retried =
        proxy.stdout().lines().iter().any(|l| l.contains("retrying upstream request") && l.contains("certificate"));
    assert!(!retried, "a certificate failure was retried");

    // No verification: pulled, with a warning logged once for the repo.
    pull(&http, &base("insecure"), &image).await?;
    pull(&http, &base("insecure"), &image).await?;
    let warnings = proxy
        .stdout()
        .lines()
        .iter()
        .filter(|l| l.contains("insecure_skip_tls_verify") && l.contains("\"insecure\"") && l.contains("WARN"))
        .count();
    assert_eq!(warnings, 1, "one warning for the insecure repo\n{}", proxy.log_tail(40));

    // A system without CA certificates (a Debian without ca-certificates): the node still starts,
    // says so, verifies against the built-in roots, and a repo's CA bundle still works.
    let mut opts = ProxyOptions::new(&config, &["--retries", "0"]);
    opts.env =
        vec![("SSL_CERT_FILE".into(), "/nonexistent/ca.pem".into()), ("SSL_CERT_DIR".into(), "/nonexistent".into())];
    let bare = Proxy::spawn_with(opts)?;
    ensure!(bare.stdout().lines().iter().any(|l| l.contains("no CA certificates on this system")), "no warning");
    pull(&http, &format!("http://{}/v2/withca", bare.addr()), &image).await?;
    let resp = http
        .get(format!("http://{}/v2/noca/team/app/manifests/{}", bare.addr(), image.tag))
        .header("accept", OCI_MANIFEST)
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    Ok(())
}

/// A control plane serving TLS with `pki`'s certificate (requiring client certificates with
/// `mtls`), and its https:// URL.
fn tls_control_plane(pki: &Pki, mtls: bool) -> anyhow::Result<(ControlPlane, String)> {
    let (cert, key) = pki.write("control", &pki.leaf("control plane")?)?;
    let mut args = vec!["--tls-cert".to_string(), s(&cert), "--tls-key".into(), s(&key)];
    if mtls {
        args.extend(["--client-ca".to_string(), s(&pki.ca_path())]);
    }
    let cp = ControlPlane::spawn(ControlOptions { args, ..Default::default() })?;
    let url = format!("https://{}", cp.addr());
    Ok((cp, url))
}

async fn create_repo(http: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{url}/api/repos"))
        .bearer_auth(admin_token())
        .header("content-type", "application/json")
        .body(serde_json::json!({ "key": key, "upstream": "http://127.0.0.1:9", "kind": "generic" }).to_string())
        .send()
        .await?;
    ensure!(resp.status() == 201, "create repo: {} {}", resp.status(), resp.text().await.unwrap_or_default());
    Ok(())
}

#[tokio::test]
async fn control_plane_over_tls_nodes_and_regctl_with_the_ca() -> anyhow::Result<()> {
    let pki = Pki::new("control")?;
    let (cp, url) = tls_control_plane(&pki, false)?;
    let http = https_client(&pki.ca_pem, None)?;
    create_repo(&http, &url, "lab").await?;
    assert!(
        reqwest::Client::builder().no_proxy().build()?.get(cp.api("/healthz")).send().await.is_err(),
        "plain http on the TLS port"
    );

    let ca = s(&pki.ca_path());
    let node = Node::spawn_with("tls-node", std::slice::from_ref(&url), None, &["--control-plane-ca", &ca])?;
    node.wait_applied(1, WAIT)?;

    let regctl = Regctl::new(&url);
    let out = regctl.run(&["--ca-cert", &ca, "repo", "list", "-o", "json"]).await?;
    out.expect_code(0, "regctl --ca-cert repo list")?;
    ensure!(out.stdout.contains("\"lab\""), "{}", out.stdout);
    let out = regctl.run(&["--ca-cert", &ca, "node", "list", "-o", "json"]).await?;
    out.expect_code(0, "regctl --ca-cert node list")?;
    ensure!(out.stdout.contains("tls-node"), "{}", out.stdout);
    // Without the CA, the test certificate is not trusted: one clear line.
    let out = regctl.run(&["repo", "list"]).await?;
    out.expect_error("certificate", "regctl without --ca-cert")?;
    ensure!(out.stderr.contains("--ca-cert"), "the error should say what to do: {}", out.stderr);
    Ok(())
}

#[tokio::test]
async fn mtls_control_plane_refuses_a_node_without_a_client_certificate() -> anyhow::Result<()> {
    let pki = Pki::new("mtls")?;
    let (cp, url) = tls_control_plane(&pki, true)?;
    let ca = s(&pki.ca_path());
    let client = pki.leaf("operator")?;
    // REST with a client certificate works; without one the handshake fails.
    create_repo(&https_client(&pki.ca_pem, Some(&client))?, &url, "lab").await?;
    let anonymous = https_client(&pki.ca_pem, None)?;
    assert!(anonymous.get(format!("{url}/healthz")).send().await.is_err(), "no client certificate, yet served");

    // A node without a client certificate is refused, and says so.
    let refused = Node::spawn_with("no-cert", std::slice::from_ref(&url), None, &["--control-plane-ca", &ca])?;
    let line = refused
        .wait_log(0, WAIT, |v| v["fields"]["message"] == "control plane stream ended; trying the next endpoint")?;
    let error = line["fields"]["error"].as_str().unwrap_or_default();
    ensure!(error.contains("--control-plane-cert"), "the node should say what to do: {error}");
    cp.stdout()
        .wait_for(0, WAIT, |l| l.contains("TLS client certificate refused"))
        .context("the control plane did not log the refused client")?;
    ensure!(refused.applied().is_empty(), "a node without a client certificate received the configuration");

    // With one, it follows.
    let (cert, key) = pki.write("node", &pki.leaf("node")?)?;
    let node = Node::spawn_with(
        "with-cert",
        std::slice::from_ref(&url),
        None,
        &["--control-plane-ca", &ca, "--control-plane-cert", &s(&cert), "--control-plane-key", &s(&key)],
    )?;
    node.wait_applied(1, WAIT)?;
    ensure!(refused.applied().is_empty(), "the refused node got a configuration");

    // regctl needs its certificate too.
    let regctl = Regctl::new(&url);
    let (ccert, ckey) = pki.write("operator", &client)?;
    regctl
        .run(&["--ca-cert", &ca, "--cert", &s(&ccert), "--key", &s(&ckey), "repo", "list"])
        .await?
        .expect_code(0, "regctl with a client certificate")?;
    let out = regctl.run(&["--ca-cert", &ca, "repo", "list"]).await?;
    ensure!(out.code == 1, "regctl without a client certificate: {out:?}");
    Ok(())
}

#[tokio::test]
async fn bad_tls_files_stop_the_start_up_with_a_clear_message() -> anyhow::Result<()> {
    let pki = Pki::new("bad")?;
    let (cert, _) = pki.write("node", &pki.leaf("one")?)?;
    let (_, other_key) = pki.write("other", &pki.leaf("two")?)?;
    let config = pki.path("config.toml");
    std::fs::write(&config, repo_config("lab", "http://127.0.0.1:9", "generic", "5m"))?;
    let run = |key: &Path| {
        let mut cmd = tokio::process::Command::new(wharf_tests::proxy::proxy_bin()?);
        cmd.arg("--config").arg(&config).arg("--cache-dir").arg(pki.path("cache"));
        cmd.args(["--listen", "127.0.0.1:0", "--tls-cert", &s(&cert), "--tls-key", &s(key)]);
        cmd.env("RUST_BACKTRACE", "0").kill_on_drop(true);
        anyhow::Ok(cmd.output())
    };
    let out = tokio::time::timeout(WAIT, run(&other_key)?).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a node started with a key that does not match its certificate");
    ensure!(stderr.contains("do not belong together"), "{stderr}");
    let out = tokio::time::timeout(WAIT, run(&pki.path("missing.key"))?).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && stderr.contains("missing.key"), "{stderr}");
    Ok(())
}
