//! Test images made of random bytes, as OCI image layouts, pushed with skopeo; and skopeo helpers.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use tempfile::TempDir;

use crate::process::run_with_timeout;
use crate::{random_bytes, sha256_digest};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

const SKOPEO_TIMEOUT: Duration = Duration::from_secs(60);

/// One blob: its digest and bytes.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    /// A blob of `data`, its digest computed.
    pub fn new(data: Vec<u8>) -> Self {
        Self { digest: sha256_digest(&data), data }
    }

    /// A blob of `size` random bytes.
    pub fn random(size: usize) -> Self {
        Self::new(random_bytes(size))
    }

    /// The size in bytes.
    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }
}

/// An OCI image made of random layers, laid out as an OCI image layout in a temp dir.
pub struct TestImage {
    dir: TempDir,
    pub tag: String,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl TestImage {
    /// An image with one random layer per entry of `layer_sizes`, tagged `tag`. The layers are random
    /// bytes, not tar archives: enough for clients that only copy (skopeo, regctl), not for those
    /// that unpack (docker, containerd): see [`TestImage::random_rootfs`].
    pub fn random(tag: &str, layer_sizes: &[usize]) -> anyhow::Result<Self> {
        Self::from_layers(tag, layer_sizes.iter().map(|&n| Blob::random(n)).collect())
    }

    /// An image that docker and containerd can unpack: one layer per entry of `file_sizes`, each an
    /// uncompressed tar archive holding one file of that many random bytes (so a layer is the file
    /// size plus tar headers and padding), tagged `tag`.
    pub fn random_rootfs(tag: &str, file_sizes: &[usize]) -> anyhow::Result<Self> {
        let layers = file_sizes
            .iter()
            .map(|&n| {
                let name = format!("wharf/{}", crate::random_name("f"));
                tar_archive(&[(name.as_str(), random_bytes(n).as_slice())]).map(Blob::new)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::from_layers(tag, layers)
    }

    /// An image of `layers` (uncompressed: each layer's digest is its diff id), tagged `tag`.
    pub fn from_layers(tag: &str, layers: Vec<Blob>) -> anyhow::Result<Self> {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Labels": { "wharf.test.nonce": crate::random_name("n") } },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = Blob::new(serde_json::to_vec(&config)?);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size() },
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": OCI_LAYER_TAR, "digest": l.digest, "size": l.size(),
            })).collect::<Vec<_>>(),
        });
        let manifest = Blob::new(serde_json::to_vec(&manifest)?);

        let dir = tempfile::Builder::new().prefix("wharf-image-").tempdir()?;
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        std::fs::write(dir.path().join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        for b in layers.iter().chain([&config, &manifest]) {
            std::fs::write(blobs.join(b.hex()), &b.data)?;
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": OCI_MANIFEST,
                "digest": manifest.digest,
                "size": manifest.size(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }],
        });
        std::fs::write(dir.path().join("index.json"), serde_json::to_vec(&index)?)?;
        Ok(Self { dir, tag: tag.to_string(), manifest, config, layers })
    }

    /// The OCI layout folder.
    pub fn layout_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The manifest digest.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// Config and layers: every blob the manifest references.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    /// Pushes the image to `registry_host` (`127.0.0.1:PORT`) as `<name>:<tag>` with skopeo, keeping
    /// digests, then checks with `skopeo inspect` that the registry holds the manifest digest.
    pub fn push(&self, registry_host: &str, name: &str) -> anyhow::Result<()> {
        let src = format!("oci:{}:{}", self.dir.path().display(), self.tag);
        let dest = format!("docker://{registry_host}/{name}:{}", self.tag);
        let (status, out, err) = run_with_timeout(
            Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--preserve-digests"])
                .args(["--dest-tls-verify=false", "--retry-times", "0"])
                .arg(&src)
                .arg(&dest),
            SKOPEO_TIMEOUT,
        )?;
        ensure!(status.success(), "skopeo copy {src} {dest} failed ({status}):\n{out}\n{err}");
        let inspected = skopeo_inspect(&format!("docker://{registry_host}/{name}:{}", self.tag))?;
        let digest = inspected["Digest"].as_str().unwrap_or_default();
        ensure!(
            digest == self.manifest.digest,
            "registry holds {digest} for {name}:{}, expected {}",
            self.tag,
            self.manifest.digest
        );
        Ok(())
    }
}

/// An uncompressed ustar archive of regular files (`path`, bytes), mode 0644, owned by root, mtime 0.
pub fn tar_archive(files: &[(&str, &[u8])]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (path, data) in files {
        ensure!(path.len() < 100, "tar path {path} is too long for a plain ustar header");
        let mut h = [0u8; 512];
        let mut put = |at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
        put(0, path.as_bytes());
        put(100, b"0000644\0");
        put(108, b"0000000\0");
        put(116, b"0000000\0");
        put(124, format!("{:011o}\0", data.len()).as_bytes());
        put(136, b"00000000000\0");
        put(148, b"        ");
        put(156, b"0");
        put(257, b"ustar\0");
        put(263, b"00");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    // Two zero blocks end the archive.
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

/// `skopeo inspect --tls-verify=false <reference>` as JSON.
pub fn skopeo_inspect(reference: &str) -> anyhow::Result<serde_json::Value> {
    let (status, out, err) = run_with_timeout(
        Command::new("skopeo").args(["--insecure-policy", "inspect", "--tls-verify=false"]).arg(reference),
        SKOPEO_TIMEOUT,
    )?;
    ensure!(status.success(), "skopeo inspect {reference} failed ({status}):\n{out}\n{err}");
    serde_json::from_str(&out).with_context(|| format!("skopeo inspect output: {out}"))
}

/// `skopeo copy <src> dir:<a temp dir>`, with `--src-creds <creds>` when given: whether it
/// succeeded, and what it printed on stderr (for refusals that are the point of a test).
pub fn skopeo_try_copy(src: &str, creds: Option<&str>) -> anyhow::Result<(bool, String)> {
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--src-tls-verify=false", "--retry-times", "0"]);
    if let Some(c) = creds {
        cmd.arg("--src-creds").arg(c);
    }
    let (status, _, err) = run_with_timeout(cmd.arg(src).arg(format!("dir:{}", dir.path().display())), SKOPEO_TIMEOUT)?;
    Ok((status.success(), err))
}

/// `skopeo copy --src-tls-verify=false <src> dir:<dest>`; returns skopeo's output.
pub fn skopeo_copy_to_dir(src: &str, dest: &Path) -> anyhow::Result<String> {
    let (status, out, err) = run_with_timeout(
        Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
            .args(["--retry-times", "0"])
            .arg(src)
            .arg(format!("dir:{}", dest.display())),
        SKOPEO_TIMEOUT,
    )?;
    if !status.success() {
        bail!("skopeo copy {src} dir:{} failed ({status}):\n{out}\n{err}", dest.display());
    }
    Ok(format!("{out}\n{err}"))
}

/// Checks a skopeo `dir:` copy of `image`: `manifest.json` is the exact manifest, and each blob is a
/// file named by its hex digest whose bytes hash to that digest.
pub fn verify_dir_copy(dir: &Path, image: &TestImage) -> anyhow::Result<()> {
    let manifest = std::fs::read(dir.join("manifest.json")).context("reading manifest.json")?;
    ensure!(
        sha256_digest(&manifest) == image.manifest.digest,
        "manifest.json has digest {}, expected {}",
        sha256_digest(&manifest),
        image.manifest.digest
    );
    for blob in image.blobs() {
        let path = dir.join(blob.hex());
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(sha256_digest(&data) == blob.digest, "{} has digest {}", path.display(), sha256_digest(&data));
        ensure!(data.len() == blob.size(), "{} has the wrong size", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_archive_has_a_valid_ustar_header_and_padding() -> anyhow::Result<()> {
        let tar = tar_archive(&[("wharf/a", b"hello".as_slice())])?;
        assert_eq!(tar.len(), 512 + 512 + 1024);
        assert_eq!(&tar[257..263], b"ustar\0");
        assert_eq!(&tar[124..136], b"00000000005\0");
        let mut header = tar[..512].to_vec();
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(&tar[148..156], format!("{sum:06o}\0 ").as_bytes());
        assert_eq!(&tar[512..517], b"hello");
        assert!(tar[517..].iter().all(|&b| b == 0));
        Ok(())
    }
}
