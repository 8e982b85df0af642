//! The cost of metrics and tracing (issue "Cache lifecycle and observability", Benchmark): warm
//! manifest-by-tag and 1 MiB blob GETs/s through three nodes in one run: metrics off and no span
//! export; metrics on; metrics on and spans exported to a live OTLP collector. Goal: tracing
//! (`--sample 0.1`: a tenth of requests traced) >= 0.9x of the same node without it.
//!
//! Rounds interleave the three nodes (off, on, metrics only, off, ...); each figure is the median of
//! the per-round ratios, so a noisy machine still gives a ratio that holds.
//!
//! `cargo build --release --bins && cargo bench -p wharf-tests --bench overhead [-- --secs 3
//! --rounds 5 --dead-collector --recording-collector --sample 0.1]` (needs `wrk`).

use std::process::Command;
use std::time::Duration;

use wharf_tests::image::OCI_MANIFEST;
use wharf_tests::otlp::Collector;
use wharf_tests::proxy::{ProxyOptions, repo_config};
use wharf_tests::{FakeUpstream, Proxy};

fn wrk(url: &str, accept: &str, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{secs}s"), "-H", &format!("Accept: {accept}"), url])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(!text.contains("Non-2xx"), "wrk saw errors: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("no Requests/sec in wrk output: {text}"))
}

/// CPU seconds (user + system, every thread) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name (in parentheses, which may hold spaces) come fields 3 onwards:
    // utime is field 14, stime 15, in USER_HZ (100 on Linux) ticks.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow::anyhow!("odd /proc stat: {stat}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    anyhow::ensure!(f.len() > 12, "odd /proc stat: {stat}");
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / 100.0)
}

/// One wrk run against a node.
struct Round {
    gets_per_s: f64,
    /// The node's CPU microseconds per GET.
    node_cpu_us: f64,
    /// The share of a core this process (the collector, the nodes' log readers) used meanwhile.
    bench_share: f64,
}

fn round(node: &Proxy, url: &str, accept: &str, secs: u64) -> anyhow::Result<Round> {
    let pid = node.pid().ok_or_else(|| anyhow::anyhow!("the node has exited"))?;
    let (node0, me0) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    let gets_per_s = wrk(url, accept, secs)?;
    let (node1, me1) = (cpu_seconds(pid)?, cpu_seconds(std::process::id())?);
    Ok(Round {
        gets_per_s,
        node_cpu_us: (node1 - node0) * 1e6 / (gets_per_s * secs as f64),
        bench_share: (me1 - me0) / secs as f64,
    })
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 }
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async {
        let fake = FakeUpstream::start().await?;
        let blob = fake.add_random_blob(1024 * 1024);
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob.digest, "size": blob.size()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob.digest, "size": blob.size()}],
        });
        fake.put_manifest("org/img", Some("v1"), OCI_MANIFEST, manifest.to_string().into_bytes());
        // The collector decodes every export and counts its spans; `--recording-collector` also
        // keeps each one as a map of strings, as the tests' collector does (more work on these
        // two cores than a collector's receiver does, and memory that grows with every span).
        let collector = match std::env::args().any(|a| a == "--recording-collector") {
            true => Collector::start().await?,
            false => Collector::start_counting().await?,
        };
        let config = repo_config("lab", &fake.url(), "generic", "1h");
        let plain = Proxy::spawn_with(ProxyOptions::new(&config, &["--log-level", "info", "--no-metrics"]))?;
        // `--dead-collector`: export to a closed port (spans dropped), to tell span creation from export.
        let dead = std::env::args().any(|a| a == "--dead-collector");
        let endpoint = if dead { "http://127.0.0.1:1".to_owned() } else { collector.endpoint() };
        // `--sample RATIO`: the observed node samples traces (OTEL_TRACES_SAMPLER=parentbased_traceidratio).
        let mut observed_opts = ProxyOptions::new(&config, &["--log-level", "info", "--otlp-endpoint", &endpoint]);
        if let Some(ratio) = std::env::args().skip_while(|a| a != "--sample").nth(1) {
            observed_opts.env.push(("OTEL_TRACES_SAMPLER".into(), "parentbased_traceidratio".into()));
            observed_opts.env.push(("OTEL_TRACES_SAMPLER_ARG".into(), ratio));
        }
        let observed = Proxy::spawn_with(observed_opts)?;
        let metrics_only = Proxy::spawn_with(ProxyOptions::new(&config, &["--log-level", "info"]))?;
        let arg = |name: &str| std::env::args().skip_while(|a| a != name).nth(1);
        let secs = arg("--secs").and_then(|v| v.parse().ok()).unwrap_or(3u64);
        let rounds = arg("--rounds").and_then(|v| v.parse().ok()).unwrap_or(5usize).max(1);
        println!("Wharf: metrics + tracing overhead (wrk -t2 -c16 -d{secs}s, {rounds} interleaved rounds, medians)");
        for (what, path, accept) in [
            ("manifest by tag", "lab/org/img/manifests/v1", OCI_MANIFEST),
            ("1 MiB blob", &*format!("lab/org/img/blobs/{}", blob.digest), "*/*"),
        ] {
            let (mut off, mut on, mut m) = (Vec::new(), Vec::new(), Vec::new());
            for p in [&plain, &observed, &metrics_only] {
                let r = wharf_tests::http::get(&p.v2(path), &[("accept", accept)]).await?;
                anyhow::ensure!(r.status == 200, "warming {path}: {}", r.status);
            }
            for _ in 0..rounds {
                off.push(round(&plain, &plain.v2(path), accept, secs)?);
                on.push(round(&observed, &observed.v2(path), accept, secs)?);
                m.push(round(&metrics_only, &metrics_only.v2(path), accept, secs)?);
            }
            let col = |xs: &[Round], f: fn(&Round) -> f64| -> Vec<f64> { xs.iter().map(f).collect() };
            let ratio = |xs: &[f64], to: &[f64]| median(xs.iter().zip(to).map(|(x, o)| x / o).collect());
            let rps = |r: &Round| r.gets_per_s;
            let (off_rps, on_rps, m_rps) = (col(&off, rps), col(&on, rps), col(&m, rps));
            println!(
                "  {what:<16} off {:>7.0}  metrics {:>7.0}  metrics+tracing {:>7.0} GETs/s   tracing {:.2}x of the \
                 same without it (goal >= 0.90x)   metrics {:.2}x of off   both {:.2}x of off",
                median(off_rps.clone()),
                median(m_rps.clone()),
                median(on_rps.clone()),
                ratio(&on_rps, &m_rps),
                ratio(&m_rps, &off_rps),
                ratio(&on_rps, &off_rps)
            );
            // The node's own cost, whatever else runs on these cores: CPU per GET.
            let (on_cpu, m_cpu) = (col(&on, |r| r.node_cpu_us), col(&m, |r| r.node_cpu_us));
            println!(
                "  {:<16} node CPU per GET: metrics {:.1} us  metrics+tracing {:.1} us ({:.2}x)   this process \
                 (collector, log readers): {:.0}% of a core in tracing rounds, {:.0}% in metrics rounds",
                "",
                median(m_cpu.clone()),
                median(on_cpu.clone()),
                ratio(&on_cpu, &m_cpu),
                100.0 * median(col(&on, |r| r.bench_share)),
                100.0 * median(col(&m, |r| r.bench_share)),
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let metrics = wharf_tests::http::get(&format!("http://{}/metrics", observed.addr()), &[]).await?;
        let scrape = wharf_tests::prom::Scrape::parse(&metrics.text())?;
        println!(
            "  observed node: {} requests, {} spans received by the collector, {} dropped",
            scrape.sum("wharf_requests_total"),
            collector.received(),
            scrape.sum("wharf_spans_dropped_total"),
        );
        Ok(())
    })
}
