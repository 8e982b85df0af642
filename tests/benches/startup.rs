//! Start-up benchmark (issue "Cache lifecycle and observability", Benchmark): time from exec of
//! `wharf-proxy` to its "listening" event and to the first `GET /v2/` answered 200, with a cache
//! dir of 100,000 entries (goal: under 2 s). The index is rebuilt from file metadata only, so blob
//! files are sparse files of small random sizes under valid sha256 names; manifests are real (their
//! bytes match their digest) with tags and `_links` for every entry.
//!
//! `cargo build --release --bins && cargo bench -p wharf-tests --bench startup`
//! (`-- --entries 100000 --runs 5 --cold-runs 3 --dir /path/on/the/disk/to/test --keep`).
//! Cold runs drop the page cache first (`echo 3 > /proc/sys/vm/drop_caches`, root only); they are
//! skipped when that is not allowed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use rand::Rng as _;
use serde_json::Value;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const TIMEOUT: Duration = Duration::from_secs(60);

struct Opts {
    entries: usize,
    runs: usize,
    cold_runs: usize,
    dir: Option<PathBuf>,
    keep: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let val = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let num = |flag: &str, default: usize| val(flag).and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default);
    Opts {
        entries: num("--entries", 100_000),
        runs: num("--runs", 5).max(1),
        cold_runs: num("--cold-runs", 3),
        dir: val("--dir").map(PathBuf::from),
        keep: args.iter().any(|a| a == "--keep"),
    }
}

/// What the cache dir holds.
struct Layout {
    blobs: usize,
    manifests: usize,
    links: usize,
    tags: usize,
    bytes: u64,
    /// (repoKey, name, tag) of one cached manifest, to check the node serves it.
    probe: (String, String, String),
}

const REPOS: [&str; 4] = ["dockerhub", "ghcr", "quay", "lab"];

/// 95% blobs, 5% manifests (each tagged), spread over 4 repoKeys and 50 names each; every entry is
/// linked to one repo and name.
fn build_cache(root: &Path, entries: usize) -> anyhow::Result<Layout> {
    let mut rng = rand::rng();
    let manifests = (entries / 20).max(1);
    let blobs = entries - manifests;
    let mut bytes = 0u64;
    let names: Vec<(String, String)> =
        REPOS.iter().flat_map(|r| (0..50).map(move |i| (r.to_string(), format!("org{}/img{i}", i % 7)))).collect();
    for (repo, name) in &names {
        for sub in ["_links", "_tags"] {
            std::fs::create_dir_all(root.join("repos").join(repo).join(name).join(sub))?;
        }
    }
    for kind in ["blobs", "manifests"] {
        for shard in 0..256 {
            std::fs::create_dir_all(root.join(kind).join("sha256").join(format!("{shard:02x}")))?;
        }
    }
    std::fs::create_dir_all(root.join("staging"))?;
    let link = |i: usize, hex: &str| -> anyhow::Result<()> {
        let (repo, name) = &names[i % names.len()];
        std::fs::File::create(root.join("repos").join(repo).join(name).join("_links").join(hex))?;
        Ok(())
    };
    let mut seed = [0u8; 32];
    rng.fill(&mut seed);
    for i in 0..blobs {
        // A unique valid name: the hash of a counter and a per-run seed.
        let mut input = seed.to_vec();
        input.extend_from_slice(&(i as u64).to_le_bytes());
        let hex = wharf_tests::sha256_hex(&input);
        let size: u64 = rng.random_range(512..=64 * 1024);
        let f = std::fs::File::create(root.join("blobs/sha256").join(&hex[..2]).join(&hex))?;
        f.set_len(size)?;
        bytes += size;
        link(i, &hex)?;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut probe = None;
    for i in 0..manifests {
        let config = wharf_tests::sha256_digest(format!("config {i} {}", hex::encode(seed)).as_bytes());
        let body = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2 },
            "layers": [],
        })
        .to_string();
        let digest = wharf_tests::sha256_digest(body.as_bytes());
        let hex = digest.trim_start_matches("sha256:").to_owned();
        let path = root.join("manifests/sha256").join(&hex[..2]).join(&hex);
        std::fs::write(&path, &body)?;
        std::fs::write(path.with_extension("type"), MANIFEST)?;
        bytes += body.len() as u64;
        link(i, &hex)?;
        let (repo, name) = &names[i % names.len()];
        let tag = format!("v{i}");
        let entry = serde_json::json!({ "digest": digest, "media_type": MANIFEST, "fetched_at": now });
        std::fs::write(root.join("repos").join(repo).join(name).join("_tags").join(&tag), entry.to_string())?;
        probe.get_or_insert_with(|| (repo.clone(), name.clone(), tag));
    }
    Ok(Layout {
        blobs,
        manifests,
        links: blobs + manifests,
        tags: manifests,
        bytes,
        probe: probe.context("no manifest")?,
    })
}

fn config_toml() -> String {
    // Upstreams that cannot answer: every answer must come from the cache.
    REPOS
        .iter()
        .map(|k| {
            format!(
                "[[repo]]\nkey = \"{k}\"\nupstream = \"http://127.0.0.1:1\"\nkind = \"generic\"\ntag_ttl = \"24h\"\n"
            )
        })
        .collect()
}

/// One `GET path` over a fresh connection: the status code, or `None` when nothing answered.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_nodelay(true).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {MANIFEST}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, buf[head_end + 4..].to_vec()))
}

struct Run {
    listening: Duration,
    ready: Duration,
    /// Resident memory once ready.
    rss_kib: u64,
    /// Blobs + manifests of the node's "cache index rebuilt" event.
    entries_logged: Option<u64>,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn fields(v: &Value) -> &Value {
    v.get("fields").unwrap_or(v)
}

/// Starts the node on `cache`, times it to "listening" and to the first `GET /v2/` → 200, checks
/// that it serves `probe` from the cache, stops it.
fn run_once(bin: &Path, work: &Path, cache: &Path, probe: Option<&(String, String, String)>) -> anyhow::Result<Run> {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(work.join("config.toml"))
        .arg("--cache-dir")
        .arg(cache)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json", "--log-level", "info"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WHARF_") {
            cmd.env_remove(k);
        }
    }
    let started = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let result = (|| {
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut entries_logged = None;
        let (addr, listening) = loop {
            let Some(line) = lines.next() else { bail!("wharf-proxy exited before listening") };
            let line = line?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
            let f = fields(&v);
            match f.get("message").and_then(Value::as_str) {
                Some("cache index rebuilt") => {
                    entries_logged = Some(f["blobs"].as_u64().unwrap_or(0) + f["manifests"].as_u64().unwrap_or(0));
                }
                Some("listening") => {
                    let addr: SocketAddr = f["addr"].as_str().context("addr")?.parse()?;
                    break (addr, started.elapsed());
                }
                _ => {}
            }
            if started.elapsed() > TIMEOUT {
                bail!("no \"listening\" within {TIMEOUT:?}");
            }
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let ready = loop {
            if let Some((200, _)) = http_get(addr, "/v2/") {
                break started.elapsed();
            }
            if started.elapsed() > TIMEOUT {
                bail!("GET /v2/ not 200 within {TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Some((repo, name, tag)) = probe {
            let got = http_get(addr, &format!("/v2/{repo}/{name}/manifests/{tag}"));
            anyhow::ensure!(
                matches!(got, Some((200, _))),
                "the cached manifest {repo}/{name}:{tag} was not served from the cache: {:?}",
                got.map(|(s, b)| (s, String::from_utf8_lossy(&b).into_owned()))
            );
        }
        Ok(Run { listening, ready, rss_kib: rss_kib(child.id()), entries_logged })
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Drops the page cache (dentries and inodes too); false when not allowed.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .and_then(|mut f| f.write_all(b"3\n"))
        .is_ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, runs: &[Run]) {
    let stat = |f: &dyn Fn(&Run) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (lmin, lmed, lmax) = stat(&|r| r.listening);
    let (rmin, rmed, rmax) = stat(&|r| r.ready);
    let rss = runs.iter().map(|r| r.rss_kib).max().unwrap_or(0);
    println!(
        "  {name:<34} listening: min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms | GET /v2/ 200: min {:>7.1} ms  median {:>7.1} ms  max {:>7.1} ms | RSS {:>6.1} MiB  (n={})",
        ms(lmin),
        ms(lmed),
        ms(lmax),
        ms(rmin),
        ms(rmed),
        ms(rmax),
        rss as f64 / 1024.0,
        runs.len()
    );
    for (i, r) in runs.iter().enumerate() {
        println!("    run {}: listening {:>7.1} ms, ready {:>7.1} ms", i + 1, ms(r.listening), ms(r.ready));
    }
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; and `cargo test --benches` runs benches in test mode: skip.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return Ok(());
    }
    let o = opts();
    let bin = wharf_tests::proxy::proxy_bin()?;
    let tmp = match &o.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new().prefix("wharf-startup-").tempdir_in(d)?
        }
        None => tempfile::Builder::new().prefix("wharf-startup-").tempdir()?,
    };
    let work = tmp.path().to_path_buf();
    std::fs::write(work.join("config.toml"), config_toml())?;
    println!("wharf-proxy start-up ({}), cache in {}", bin.display(), work.display());

    let empty = work.join("empty-cache");
    let baseline: Vec<Run> = (0..o.runs).map(|_| run_once(&bin, &work, &empty, None)).collect::<anyhow::Result<_>>()?;

    let cache = work.join("cache");
    let t = Instant::now();
    let layout = build_cache(&cache, o.entries)?;
    println!(
        "  built {} entries ({} blobs, {} manifests; {} links, {} tags; {:.1} MiB apparent, sparse) in {:.1} s",
        layout.blobs + layout.manifests,
        layout.blobs,
        layout.manifests,
        layout.links,
        layout.tags,
        layout.bytes as f64 / (1024.0 * 1024.0),
        t.elapsed().as_secs_f64()
    );
    let warm: Vec<Run> =
        (0..o.runs).map(|_| run_once(&bin, &work, &cache, Some(&layout.probe))).collect::<anyhow::Result<_>>()?;
    for r in &warm {
        anyhow::ensure!(
            r.entries_logged == Some((layout.blobs + layout.manifests) as u64),
            "the node indexed {:?} entries, not {}",
            r.entries_logged,
            layout.blobs + layout.manifests
        );
    }
    let mut cold = Vec::new();
    for _ in 0..o.cold_runs {
        if !drop_caches() {
            break;
        }
        cold.push(run_once(&bin, &work, &cache, Some(&layout.probe))?);
    }

    println!();
    report("empty cache", &baseline);
    report(&format!("{} entries, warm page cache", layout.blobs + layout.manifests), &warm);
    if cold.is_empty() {
        if o.cold_runs > 0 {
            println!("  cold page cache: skipped (cannot write /proc/sys/vm/drop_caches)");
        }
    } else {
        report(&format!("{} entries, cold page cache", layout.blobs + layout.manifests), &cold);
    }
    let mut med: Vec<Duration> = warm.iter().map(|r| r.ready).collect();
    med.sort();
    let verdict = if med[med.len() / 2] < Duration::from_secs(2) { "met" } else { "NOT met" };
    println!("  goal (< 2 s to ready, median warm): {verdict}");
    if o.keep {
        let kept = tmp.keep();
        println!("  kept {}", kept.display());
    }
    Ok(())
}
