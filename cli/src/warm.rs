//! `regctl cache warm`: resolve an image through one node, then pull every blob through every node,
//! streaming each body into a hasher (nothing is buffered whole) and checking it against its digest.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use wharf_core::{Digest, DigestHasher, Reference};

use crate::args::{Global, Output, WarmArgs};
use crate::client::{ControlPlane, error_chain};
use crate::error::CliError;
use crate::image_ref::ImageRef;
use crate::output::{self, Table};
use crate::registry::{MANIFEST_ACCEPT, MAX_MANIFEST, base_url, describe_status};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node to warm.
#[derive(Debug, Clone)]
struct Target {
    id: String,
    url: String,
}

#[derive(Deserialize, Debug, Clone)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Debug, Clone)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize, Debug)]
struct ManifestDoc {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// What warming an image means: these manifests, then these blobs.
#[derive(Debug, Clone)]
struct Plan {
    /// The digest REF resolved to (an index or an image manifest).
    top: Digest,
    /// The image manifest for the platform, when `top` is an index.
    image: Option<Digest>,
    blobs: Vec<Descriptor>,
}

impl Plan {
    fn total(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }
}

#[derive(Serialize, Debug)]
struct NodeResult {
    node: String,
    address: String,
    ok: bool,
    blobs: usize,
    bytes: u64,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, Debug)]
struct Report {
    image: String,
    platform: String,
    digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest: Option<String>,
    blobs: usize,
    bytes: u64,
    nodes: Vec<NodeResult>,
}

pub async fn run(global: &Global, args: WarmArgs) -> Result<(), CliError> {
    let platform = parse_platform(&args.platform)?;
    let targets = targets(global, &args).await?;
    let http = crate::tls::http_client(global)?
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(args.read_timeout)
        .build()
        .map_err(|e| CliError::Failed(format!("building the HTTP client: {}", error_chain(&e))))?;

    // Resolve through the first node that answers.
    let mut tried = Vec::new();
    let mut plan = None;
    for t in &targets {
        match resolve(&http, t, &args.image, &platform).await {
            Ok(p) => {
                plan = Some(p);
                break;
            }
            Err(e) => {
                // A definite answer about the image (unknown, no such platform) ends the search.
                let definite = e.definite;
                tried.push(format!("{}: {}", t.id, e.message));
                if definite {
                    break;
                }
            }
        }
    }
    let Some(plan) = plan else {
        return Err(CliError::Failed(format!("cannot resolve {}: {}", args.image, tried.join("; "))));
    };

    let progress = Progress::new(global.output == Output::Table && std::io::stderr().is_terminal());
    progress.line(&format!(
        "{} -> {}{}: {} blobs, {} through {} node(s)",
        args.image,
        plan.top,
        plan.image.as_ref().map(|d| format!(" ({} {d})", args.platform)).unwrap_or_default(),
        plan.blobs.len(),
        output::bytes(plan.total()),
        targets.len()
    ));
    let plan = Arc::new(plan);
    let jobs = targets.iter().map(|t| {
        let bar = progress.bar(&t.id, plan.total());
        warm_node(&http, t, &args.image, plan.clone(), usize::from(args.parallel), bar, &progress)
    });
    let results: Vec<NodeResult> = futures_util::future::join_all(jobs).await;
    progress.clear();

    let failed: Vec<&str> = results.iter().filter(|r| !r.ok).map(|r| r.node.as_str()).collect();
    let failed_msg = (!failed.is_empty())
        .then(|| format!("cache warm failed on {} of {} node(s): {}", failed.len(), results.len(), failed.join(", ")));
    let report = Report {
        image: args.image.to_string(),
        platform: args.platform.clone(),
        digest: plan.top.to_string(),
        manifest: plan.image.as_ref().map(ToString::to_string),
        blobs: plan.blobs.len(),
        bytes: plan.total(),
        nodes: results,
    };
    output::emit(global.output, &report, || summary(&report))?;
    match failed_msg {
        Some(m) => Err(CliError::Failed(m)),
        None => Ok(()),
    }
}

fn parse_platform(s: &str) -> Result<Platform, CliError> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => {
            Ok(Platform { os: (*os).into(), architecture: (*arch).into(), variant: None })
        }
        [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
            Ok(Platform { os: (*os).into(), architecture: (*arch).into(), variant: Some((*variant).into()) })
        }
        _ => Err(CliError::Usage(format!("--platform {s:?} is not os/arch[/variant] (for example linux/amd64)"))),
    }
}

async fn targets(global: &Global, args: &WarmArgs) -> Result<Vec<Target>, CliError> {
    if !args.nodes.is_empty() {
        return Ok(args.nodes.iter().map(|a| Target { id: a.clone(), url: base_url(a) }).collect());
    }
    let cp = ControlPlane::connect(global).await?;
    let nodes = crate::node::list(&cp).await?;
    if nodes.is_empty() {
        return Err(CliError::Failed(format!(
            "the control plane at {} lists no nodes: start one, or name nodes with --node ADDR",
            cp.url
        )));
    }
    Ok(nodes.into_iter().map(|n| Target { url: base_url(&n.address), id: n.id }).collect())
}

struct ResolveError {
    message: String,
    definite: bool,
}

impl ResolveError {
    fn transient(message: String) -> Self {
        Self { message, definite: false }
    }
    fn definite(message: String) -> Self {
        Self { message, definite: true }
    }
}

fn manifest_url(t: &Target, image: &ImageRef, reference: &str) -> String {
    format!("{}/v2/{}/{}/manifests/{reference}", t.url, image.key, image.name)
}

/// GETs a manifest with the full `Accept` list; checks its bytes against `expect` (a digest
/// reference) and `Docker-Content-Digest`. Returns its digest and bytes.
async fn get_manifest(
    http: &reqwest::Client,
    url: &str,
    expect: Option<&Digest>,
) -> Result<(Digest, Vec<u8>), ResolveError> {
    let resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT)
        .send()
        .await
        .map_err(|e| ResolveError::transient(format!("GET {url}: {}", error_chain(&e))))?;
    let status = resp.status().as_u16();
    let header_digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = Vec::new();
    let mut resp = resp;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                body.extend_from_slice(&c);
                if body.len() > MAX_MANIFEST {
                    return Err(ResolveError::definite(format!(
                        "GET {url}: manifest larger than {MAX_MANIFEST} bytes"
                    )));
                }
            }
            Ok(None) => break,
            Err(e) => return Err(ResolveError::transient(format!("GET {url}: {}", error_chain(&e)))),
        }
    }
    if status != 200 {
        let definite = matches!(status, 400 | 404);
        let message = format!("GET {url}: {}", describe_status(status, &body));
        return Err(ResolveError { message, definite });
    }
    let digest = Digest::of(&body);
    if let Some(e) = expect
        && *e != digest
    {
        return Err(ResolveError::transient(format!("GET {url}: the bytes hash to {digest}, not {e}")));
    }
    if let Some(h) = header_digest
        && h != digest.to_string()
    {
        return Err(ResolveError::transient(format!(
            "GET {url}: Docker-Content-Digest says {h} but the bytes hash to {digest}"
        )));
    }
    Ok((digest, body))
}

async fn resolve(
    http: &reqwest::Client,
    t: &Target,
    image: &ImageRef,
    platform: &Platform,
) -> Result<Plan, ResolveError> {
    let expect = match &image.reference {
        Reference::Digest(d) => Some(d),
        Reference::Tag(_) => None,
    };
    let url = manifest_url(t, image, &image.reference.to_string());
    let (top, body) = get_manifest(http, &url, expect).await?;
    let doc: ManifestDoc =
        serde_json::from_slice(&body).map_err(|e| ResolveError::definite(format!("{url}: not a manifest: {e}")))?;
    let (image_digest, doc) = if let Some(list) = &doc.manifests {
        let d = pick(list, platform).map_err(ResolveError::definite)?;
        let digest: Digest =
            d.digest.parse().map_err(|e| ResolveError::definite(format!("{url}: index entry: {e}")))?;
        let child_url = manifest_url(t, image, &digest.to_string());
        let (_, body) = get_manifest(http, &child_url, Some(&digest)).await?;
        let doc: ManifestDoc = serde_json::from_slice(&body)
            .map_err(|e| ResolveError::definite(format!("{child_url}: not a manifest: {e}")))?;
        (Some(digest), doc)
    } else {
        (None, doc)
    };
    let Some(config) = doc.config else {
        let mt = doc.media_type.unwrap_or_default();
        return Err(ResolveError::definite(format!("{url}: not an image manifest (no config; mediaType {mt:?})")));
    };
    let mut blobs: Vec<Descriptor> = Vec::new();
    for d in std::iter::once(config).chain(doc.layers.unwrap_or_default()) {
        d.digest.parse::<Digest>().map_err(|e| ResolveError::definite(format!("{url}: blob {:?}: {e}", d.digest)))?;
        if !blobs.iter().any(|b| b.digest == d.digest) {
            blobs.push(d);
        }
    }
    Ok(Plan { top, image: image_digest, blobs })
}

/// The index entry for `platform` (a missing variant in the request matches any).
fn pick<'a>(list: &'a [Descriptor], p: &Platform) -> Result<&'a Descriptor, String> {
    let found = list.iter().find(|d| {
        d.platform.as_ref().is_some_and(|q| {
            q.os == p.os
                && q.architecture == p.architecture
                && (p.variant.is_none() || q.variant.as_deref() == p.variant.as_deref())
        })
    });
    found.ok_or_else(|| {
        let have: Vec<String> = list
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .filter(|q| q.os != "unknown")
            .map(|q| match &q.variant {
                Some(v) => format!("{}/{}/{v}", q.os, q.architecture),
                None => format!("{}/{}", q.os, q.architecture),
            })
            .collect();
        let wanted = match &p.variant {
            Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
            None => format!("{}/{}", p.os, p.architecture),
        };
        format!("the index has no manifest for {wanted} (it has: {}); pick one with --platform", have.join(", "))
    })
}

async fn warm_node(
    http: &reqwest::Client,
    t: &Target,
    image: &ImageRef,
    plan: Arc<Plan>,
    parallel: usize,
    bar: ProgressBar,
    progress: &Progress,
) -> NodeResult {
    let start = Instant::now();
    let mut errors: Vec<String> = Vec::new();
    let mut bytes = 0u64;
    let mut done = 0usize;

    // The manifests first, as a client pulls them: the node caches the tag and the digests.
    let expect_top = match &image.reference {
        Reference::Tag(_) => None,
        Reference::Digest(d) => Some(d),
    };
    match get_manifest(http, &manifest_url(t, image, &image.reference.to_string()), expect_top).await {
        Ok((d, _)) if d != plan.top => {
            errors.push(format!("{image} is {d} on this node, not {} (the tag moved?)", plan.top))
        }
        Ok(_) => {}
        Err(e) => errors.push(e.message),
    }
    if let Some(d) = &plan.image
        && let Err(e) = get_manifest(http, &manifest_url(t, image, &d.to_string()), Some(d)).await
    {
        errors.push(e.message);
    }

    if errors.is_empty() {
        let mut stream = futures_util::stream::iter(plan.blobs.iter().cloned())
            .map(|b| {
                let url = format!("{}/v2/{}/{}/blobs/{}", t.url, image.key, image.name, b.digest);
                let bar = bar.clone();
                async move {
                    let t0 = Instant::now();
                    let r = fetch_blob(http, &url, &b, &bar).await;
                    (b, r, t0.elapsed())
                }
            })
            .buffer_unordered(parallel);
        while let Some((b, r, took)) = stream.next().await {
            match r {
                Ok(n) => {
                    bytes += n;
                    done += 1;
                    progress.plain(&format!("{}: {} {} in {}", t.id, b.digest, output::bytes(n), secs(took)));
                }
                Err(e) => {
                    progress.plain(&format!("{}: {} failed: {e}", t.id, b.digest));
                    errors.push(e);
                }
            }
        }
    }
    let took = start.elapsed();
    if errors.is_empty() {
        bar.finish_with_message(format!("done in {}", secs(took)));
        progress.plain(&format!("{}: done, {} in {}", t.id, output::bytes(bytes), secs(took)));
    } else {
        bar.abandon_with_message("failed");
        progress.plain(&format!("{}: failed: {}", t.id, errors[0]));
    }
    let error = match errors.len() {
        0 => None,
        1 => Some(errors.remove(0)),
        n => Some(format!("{} (and {} more)", errors.remove(0), n - 1)),
    };
    NodeResult {
        node: t.id.clone(),
        address: t.url.clone(),
        ok: error.is_none(),
        blobs: done,
        bytes,
        seconds: (took.as_secs_f64() * 1000.0).round() / 1000.0,
        error,
    }
}

/// Streams one blob into a hasher; its length and digest must match the descriptor.
async fn fetch_blob(http: &reqwest::Client, url: &str, b: &Descriptor, bar: &ProgressBar) -> Result<u64, String> {
    let mut resp = http.get(url).send().await.map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.bytes().await.unwrap_or_default();
        return Err(format!("GET {url}: {}", describe_status(status, &body)));
    }
    let mut hasher = DigestHasher::new();
    let mut n = 0u64;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                hasher.update(&c);
                n += c.len() as u64;
                bar.inc(c.len() as u64);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(format!("GET {url}: the body broke off after {n} bytes: {}", error_chain(&e)));
            }
        }
    }
    let got = hasher.finish();
    if got.to_string() != b.digest {
        return Err(format!("GET {url}: the bytes hash to {got}, not {}", b.digest));
    }
    if b.size != 0 && n != b.size {
        return Err(format!("GET {url}: {n} bytes, the manifest says {}", b.size));
    }
    Ok(n)
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn summary(r: &Report) -> String {
    let mut t = Table::new(&["NODE", "ADDRESS", "RESULT", "BLOBS", "BYTES", "TIME", "RATE"]);
    for n in &r.nodes {
        let rate = if n.seconds > 0.0 {
            format!("{}/s", output::bytes((n.bytes as f64 / n.seconds) as u64))
        } else {
            "-".into()
        };
        t.row(vec![
            n.node.clone(),
            n.address.clone(),
            if n.ok { "ok".into() } else { "FAILED".into() },
            format!("{}/{}", n.blobs, r.blobs),
            output::bytes(n.bytes),
            format!("{:.2}s", n.seconds),
            rate,
        ]);
    }
    let mut out = t.render();
    for n in r.nodes.iter().filter(|n| !n.ok) {
        out.push_str(&format!("{}: {}\n", n.node, n.error.as_deref().unwrap_or("failed")));
    }
    out
}

/// Progress bars on a terminal, plain lines on stderr otherwise.
struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    fn new(terminal: bool) -> Self {
        Self { multi: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())) }
    }

    fn bar(&self, node: &str, total: u64) -> ProgressBar {
        let Some(m) = &self.multi else {
            return ProgressBar::hidden();
        };
        let style = ProgressStyle::with_template(
            "{prefix:12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = m.add(ProgressBar::new(total).with_style(style).with_prefix(node.to_owned()));
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// A line on stderr, above the bars on a terminal.
    fn line(&self, s: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(s);
            }
            None => eprintln!("{s}"),
        }
    }

    /// A line only when there are no bars.
    fn plain(&self, s: &str) {
        if self.multi.is_none() {
            eprintln!("{s}");
        }
    }

    fn clear(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 1,
            platform: Some(Platform { os: os.into(), architecture: arch.into(), variant: variant.map(Into::into) }),
        }
    }

    #[test]
    fn picks_the_platform_from_an_index() {
        let list =
            vec![entry("linux", "amd64", None), entry("linux", "arm", Some("v7")), entry("unknown", "unknown", None)];
        let p = parse_platform("linux/arm/v7").expect("valid");
        assert_eq!(pick(&list, &p).expect("found").platform.as_ref().map(|p| p.architecture.as_str()), Some("arm"));
        let err = pick(&list, &parse_platform("linux/s390x").expect("valid")).expect_err("absent");
        assert!(err.contains("linux/amd64, linux/arm/v7"), "{err}");
        assert!(parse_platform("linux").is_err());
        assert!(parse_platform("linux//").is_err());
    }
}
