//! `/v2/<name>/...` paths (`<name>` is `<repoKey>/<upstream name>`, or an upstream name alone when
//! the node is used as a mirror), parsed from the raw request path: percent-encoded bytes are
//! refused outright (no name, reference or digest contains one legitimately), and every part is
//! checked against the spec's grammar before it touches the disk or the upstream.

use wharf_core::{Digest, NameError, Reference, RepoKey, validate_name};

use crate::cache::Target;
use crate::error::RegistryError;

/// A parsed registry path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryPath {
    /// Everything between `/v2/` and the target, as the client wrote it.
    pub name: String,
    pub target: Target,
}

impl RegistryPath {
    /// The first segment as a repoKey and the rest as the repository's name, when the path has
    /// both and the first segment has a repoKey's form.
    pub fn keyed(&self) -> Option<(RepoKey, &str)> {
        keyed(&self.name)
    }
}

/// `name`'s first segment as a repoKey and the rest, when it has both.
pub fn keyed(name: &str) -> Option<(RepoKey, &str)> {
    let (first, rest) = name.split_once('/')?;
    Some((first.parse().ok()?, rest))
}

/// Parses the part of a path after `/v2/`.
pub fn parse_path(rest: &str) -> Result<RegistryPath, RegistryError> {
    if rest.contains('%') {
        return Err(RegistryError::name_invalid(
            "percent-encoded characters are not allowed in repository names, references or digests",
        ));
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    if n < 3 {
        return Err(not_found_path());
    }
    let (what, last) = (segs[n - 2], segs[n - 1]);
    let target = match what {
        "manifests" => Target::Manifest(
            Reference::parse(last)
                .map_err(|e| unknown_sha512(last, "MANIFEST_UNKNOWN").unwrap_or_else(|| reference_error(e)))?,
        ),
        "blobs" => Target::Blob(parse_digest(last).map_err(|e| unknown_sha512(last, "BLOB_UNKNOWN").unwrap_or(e))?),
        "referrers" => Target::Referrers(parse_digest(last)?),
        "tags" if last == "list" => Target::Tags,
        _ => return Err(not_found_path()),
    };
    let name = segs[..n - 2].join("/");
    validate_name(&name).map_err(|e| RegistryError::name_invalid(e.to_string()))?;
    Ok(RegistryPath { name, target })
}

/// A well-formed sha512 digest is content this node cannot hold (it serves sha256 only): 404, as
/// the spec answers for content a registry does not have, not a 400 for a valid digest.
fn unknown_sha512(s: &str, code: &'static str) -> Option<RegistryError> {
    let hex = s.strip_prefix("sha512:")?;
    (hex.len() == 128 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| RegistryError::not_found(code, "Wharf serves only sha256 content; no sha512 digest is here"))
}

fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    s.parse()
        .map_err(|e: wharf_core::DigestError| RegistryError::digest_invalid(format!("{e} (got {:?})", truncate(s, 80))))
}

fn reference_error(e: NameError) -> RegistryError {
    match e {
        NameError::Digest { .. } => RegistryError::digest_invalid(e.to_string()),
        // The distribution spec (and its conformance suite) answer a tag no manifest can have with
        // 404: no such manifest. The grammar it breaks stays in the message.
        NameError::Tag(_) => RegistryError::not_found("MANIFEST_UNKNOWN", format!("{e}: no manifest has this tag")),
        _ => RegistryError::name_invalid(e.to_string()),
    }
}

pub fn not_found_path() -> RegistryError {
    // 404 with a code of the spec's list (a 4xx body's code must be one): no such endpoint here.
    RegistryError::not_found(
        "UNSUPPORTED",
        "unknown registry path: expected /v2/<repoKey>/<name>/(manifests/<reference>|blobs/<digest>|tags/list|referrers/<digest>), or /v2/<name>/... through a mirror",
    )
}

/// The first `n` characters of `s`, for messages quoting what a client sent.
pub fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

#[cfg(test)]
mod tests;
