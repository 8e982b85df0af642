//! What regctl needs of a node's registry API: the manifest `Accept` list, addresses as URLs, and
//! error bodies as one line.

use serde::Deserialize;

/// Every manifest type in use: what a client asks for to get indexes and images alike.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// distribution's limit on a manifest's size.
pub const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// `host:port` or a URL, as a base URL without a trailing slash.
pub fn base_url(addr: &str) -> String {
    let a = addr.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") { a.to_owned() } else { format!("http://{a}") }
}

#[derive(Deserialize)]
struct OciErrors {
    errors: Vec<OciError>,
}

#[derive(Deserialize)]
struct OciError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `HTTP 404 MANIFEST_UNKNOWN: manifest unknown`, from a status and an error body.
pub fn describe_status(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<OciErrors>(body) {
        Ok(e) if !e.errors.is_empty() => {
            let parts: Vec<String> = e.errors.iter().map(|e| format!("{} {}", e.code, e.message)).collect();
            format!("HTTP {status}: {}", parts.join("; ").trim())
        }
        _ => {
            let text: String = String::from_utf8_lossy(body).split_whitespace().collect::<Vec<_>>().join(" ");
            let text: String = text.chars().take(200).collect();
            if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_urls() {
        assert_eq!(base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base_url("https://n1.example/"), "https://n1.example");
    }

    #[test]
    fn error_bodies_are_one_line() {
        let b = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(describe_status(404, b), "HTTP 404: MANIFEST_UNKNOWN manifest unknown");
        assert_eq!(describe_status(502, b"bad\ngateway"), "HTTP 502: bad gateway");
        assert_eq!(describe_status(500, b""), "HTTP 500");
    }
}
