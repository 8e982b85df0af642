//! Facts of the OCI image and distribution specs that the cache and the store share: the manifest
//! types Wharf asks for, the size limit, and what a manifest references.

use serde_json::Value;
use wharf_core::Digest;

/// What Wharf asks for when the client names no type: every manifest type in use.
pub const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// distribution's limit; a larger "manifest" is refused rather than held in memory.
pub const MAX_MANIFEST: usize = 4 * 1024 * 1024;

/// The digests a manifest or index references: config, layers, child manifests, subject, blobs.
pub fn referenced(j: &Value) -> Vec<Digest> {
    let one = |v: &Value| v.get("digest").and_then(Value::as_str).and_then(|d| d.parse::<Digest>().ok());
    let mut out: Vec<Digest> = ["config", "subject"].iter().filter_map(|k| j.get(*k)).filter_map(one).collect();
    for list in ["layers", "manifests", "blobs"] {
        if let Some(items) = j.get(list).and_then(Value::as_array) {
            out.extend(items.iter().filter_map(one));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_of_an_image_and_an_index() {
        let d = |n: u8| Digest::of(&[n]);
        let image = serde_json::json!({
            "config": {"digest": d(1).to_string()},
            "layers": [{"digest": d(2).to_string()}, {"digest": "sha256:bad"}],
            "subject": {"digest": d(3).to_string()},
        });
        assert_eq!(referenced(&image), vec![d(1), d(3), d(2)]);
        let index = serde_json::json!({"manifests": [{"digest": d(4).to_string()}]});
        assert_eq!(referenced(&index), vec![d(4)]);
    }
}
