//! A small HTTP client for tests: reqwest for ordinary requests, and a raw HTTP/1.1 client for paths
//! that a URL parser would normalise (`..`, `%2e%2e`, `%2f`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context as _, bail};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// How long any single test request may take before the test fails instead of hanging.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Pulls `image` from `base` (`http://<node>/v2/<repoKey>/<name>`) as a client does: its manifest
/// by tag (OCI `Accept`), then every blob; fails unless each answers 200 with the image's bytes.
pub async fn pull_image(base: &str, image: &crate::TestImage) -> anyhow::Result<()> {
    let url = format!("{base}/manifests/{}", image.tag);
    let m = get(&url, &[("accept", crate::image::OCI_MANIFEST)]).await?;
    anyhow::ensure!(
        (m.status, crate::sha256_digest(&m.body)) == (200, image.digest().to_owned()),
        "GET {url}: {} {}",
        m.status,
        m.text()
    );
    for b in image.blobs() {
        let url = format!("{base}/blobs/{}", b.digest);
        let r = get(&url, &[]).await?;
        anyhow::ensure!((r.status, r.digest()) == (200, b.digest.clone()), "GET {url}: {} {}", r.status, r.text());
    }
    Ok(())
}

/// A reqwest client that ignores proxy settings from the environment and follows no redirect.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("building reqwest client")
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    /// A header's value as a string (the first one when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("body is not JSON: {}", self.text()))
    }

    /// The body parsed as an OCI error document `{"errors":[{"code","message",...}]}`: the
    /// (code, message) pairs. Fails when the body is not of that form.
    pub fn oci_errors(&self) -> anyhow::Result<Vec<(String, String)>> {
        let v = self.json()?;
        let Some(errors) = v.get("errors").and_then(|e| e.as_array()) else {
            bail!("no \"errors\" array in {}", self.text());
        };
        if errors.is_empty() {
            bail!("empty \"errors\" array in {}", self.text());
        }
        errors
            .iter()
            .map(|e| {
                let code = e.get("code").and_then(|c| c.as_str());
                let message = e.get("message").and_then(|c| c.as_str());
                match (code, message) {
                    (Some(c), Some(m)) => Ok((c.to_string(), m.to_string())),
                    _ => bail!("OCI error without code/message: {e}"),
                }
            })
            .collect()
    }

    /// The first OCI error code, or a description of why there is none.
    pub fn oci_code(&self) -> String {
        match self.oci_errors() {
            Ok(e) => e[0].0.clone(),
            Err(e) => format!("<no OCI error: {e}>"),
        }
    }

    /// sha256 digest of the body.
    pub fn digest(&self) -> String {
        crate::sha256_digest(&self.body)
    }
}

fn header_map(headers: &[(&str, &str)]) -> anyhow::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(HeaderName::from_bytes(k.as_bytes())?, HeaderValue::from_str(v)?);
    }
    Ok(map)
}

/// Sends `method url` with `headers`; reads the whole body. A body that fails midway is an error.
pub async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let resp = client()
        .request(method.clone(), url)
        .headers(header_map(headers)?)
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.with_context(|| format!("reading the body of {method} {url} (status {status})"))?;
    Ok(Resp { status, headers, body: body.to_vec() })
}

/// `GET url`.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    request("GET", url, headers).await
}

/// `HEAD url`.
pub async fn head(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    request("HEAD", url, headers).await
}

/// What a client saw, also when the body failed midway.
#[derive(Debug)]
pub struct Outcome {
    /// `None` when not even the response head arrived.
    pub status: Option<u16>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The error that ended the exchange, if any.
    pub error: Option<String>,
}

impl Outcome {
    /// Whether the client got a complete 2xx response.
    pub fn complete_success(&self) -> bool {
        self.error.is_none() && self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// A short description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status {:?}, {} body bytes, error {:?}, content-length {:?}",
            self.status,
            self.body.len(),
            self.error,
            self.headers.get("content-length")
        )
    }
}

/// `GET url`, recording whatever arrives, never failing.
pub async fn get_outcome(url: &str, headers: &[(&str, &str)]) -> Outcome {
    let mut out = Outcome { status: None, headers: HeaderMap::new(), body: Vec::new(), error: None };
    let req = match header_map(headers) {
        Ok(h) => client().get(url).headers(h),
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    out.status = Some(resp.status().as_u16());
    out.headers = resp.headers().clone();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => out.body.extend_from_slice(&c),
            Ok(None) => break,
            Err(e) => {
                out.error = Some(format!("{e:?}"));
                break;
            }
        }
    }
    out
}

/// `GET url`, streaming the body into a hash: (status, body length, body digest). Fails when the body
/// fails midway. Keeps nothing of the body in memory.
pub async fn get_hashed(client: &reqwest::Client, url: &str) -> anyhow::Result<(u16, u64, String)> {
    let mut resp = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut len = 0u64;
    while let Some(chunk) = resp.chunk().await.with_context(|| format!("body of GET {url}"))? {
        len += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok((status, len, format!("sha256:{}", hex::encode(hasher.finish()))))
}

/// Sends one raw HTTP/1.1 request with `path` written verbatim on the request line (no
/// normalisation), `Connection: close`, and reads the whole response.
pub fn raw_request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Resp> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("reading the response to {method} {path}"))?;
    parse_response(&raw, method == "HEAD").with_context(|| format!("parsing the response to {method} {path}"))
}

/// [`raw_request`] off the async runtime's threads.
pub async fn raw_request_async(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Resp> {
    let (method, path) = (method.to_string(), path.to_string());
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        raw_request(addr, &method, &path, &h)
    })
    .await?
}

fn parse_response(raw: &[u8], head_only: bool) -> anyhow::Result<Resp> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {:?}", String::from_utf8_lossy(raw));
    };
    let head = std::str::from_utf8(&raw[..end])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.append(HeaderName::from_bytes(k.trim().as_bytes())?, HeaderValue::from_str(v.trim())?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if head_only || status == 304 || status == 204 || (100..200).contains(&status) {
        Vec::new()
    } else if headers.get("transfer-encoding").is_some_and(|v| v.to_str().unwrap_or_default().contains("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.to_str()?.parse()?;
        if rest.len() < len {
            bail!("body has {} bytes, Content-Length says {len}", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp { status, headers, body })
}

fn decode_chunked(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = data.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_str = std::str::from_utf8(&data[..nl])?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized_responses() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_response(raw, false).expect("parse");
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"abcde");
        assert_eq!(r.header("x-a"), Some("b"));
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}";
        let r = parse_response(raw, false).expect("parse");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{}"[..]));
    }
}
