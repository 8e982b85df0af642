//! Config propagation benchmark (issue "Control plane", Benchmark):
//! - time from a write being acknowledged (REST 201) to every node serving the change: p50/p99
//!   over N changes with 3 nodes, then again with 100 extra Watch streams held by this process;
//! - the control plane's memory with 0, 100 and 1,000 streams, and its CPU while idle.
//!
//! `cargo build --release --bins && cargo bench -p wharf-tests --bench propagation`
//! (`-- --changes 100 --streams 1000 --etcd` to use a real etcd instead of the embedded store).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use wharf_proto::v1 as pb;
use wharf_proto::v1::config_service_client::ConfigServiceClient;
use wharf_tests::control::{ControlPlane, Node, create_repo, list_nodes, repo_json};

struct Opts {
    changes: usize,
    streams: usize,
    etcd: bool,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().collect();
    let num = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    Opts { changes: num("--changes", 100), streams: num("--streams", 1000), etcd: args.iter().any(|a| a == "--etcd") }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "  {name:<44} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms   (n={})",
        pct(&v, 0.5).as_secs_f64() * 1e3,
        pct(&v, 0.99).as_secs_f64() * 1e3,
        v.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        v.len()
    );
}

/// RSS (KiB) and CPU ticks (utime + stime) of a process.
fn proc_stats(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (rss, ticks)
}

/// When every node serves repo `key` (it stops answering NAME_UNKNOWN).
async fn all_serving(http: &reqwest::Client, nodes: &[Node], key: &str) -> anyhow::Result<Instant> {
    let mut last = Instant::now();
    for n in nodes {
        let url = n.v2(&format!("{key}/x/manifests/t"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = http.get(&url).send().await?;
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if !(status == 404 && body.contains("NAME_UNKNOWN")) {
                last = last.max(Instant::now());
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "node {} never served {key}", n.id());
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    Ok(last)
}

/// Holds `n` Watch streams; records when each saw each revision.
struct Streams {
    seen: Arc<Mutex<HashMap<usize, i64>>>,
    notify: Arc<tokio::sync::Notify>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn open_streams(url: &str, from: usize, n: usize, seen: Option<&Streams>) -> anyhow::Result<Streams> {
    let (seen_map, notify) = match seen {
        Some(s) => (s.seen.clone(), s.notify.clone()),
        None => (Arc::default(), Arc::new(tokio::sync::Notify::new())),
    };
    let mut tasks = Vec::with_capacity(n);
    let mut channel = None;
    for i in from..from + n {
        // One connection per 100 streams: HTTP/2 servers cap concurrent streams per connection
        // (hyper: 200), and real nodes each have their own connection anyway.
        if i % 100 == 0 || channel.is_none() {
            channel = Some(tonic::transport::Endpoint::from_shared(url.to_owned())?.connect().await?);
        }
        let mut client = ConfigServiceClient::new(channel.clone().context("channel")?);
        let req = pb::WatchRequest {
            node_id: format!("load-{i}"),
            address: "load".into(),
            version: "bench".into(),
            revision: 0,
            ..Default::default()
        };
        let mut stream = client.watch(req).await.with_context(|| format!("watch {i}"))?.into_inner();
        let (seen_map, notify) = (seen_map.clone(), notify.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(u)) = stream.message().await {
                seen_map.lock().expect("lock").insert(i, u.revision);
                notify.notify_waiters();
            }
        }));
    }
    Ok(Streams { seen: seen_map, notify, _tasks: tasks })
}

async fn all_streams_at(s: &Streams, count: usize, revision: i64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notified = s.notify.notified();
        {
            let seen = s.seen.lock().expect("lock");
            if seen.len() >= count && seen.values().all(|&r| r >= revision) {
                return Ok(Instant::now());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "streams never reached revision {revision}");
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

fn main() -> anyhow::Result<()> {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(o))
}

async fn run(o: Opts) -> anyhow::Result<()> {
    let _etcd;
    let cp = if o.etcd {
        let e = wharf_tests::etcd::EtcdCluster::start(1)?;
        let cp = ControlPlane::etcd(&e.endpoints(), &[])?;
        _etcd = Some(e);
        cp
    } else {
        _etcd = None;
        ControlPlane::embedded()?
    };
    let url = cp.url();
    let pid = cp.pid().context("control plane pid")?;
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::spawn_with(&format!("n{i}"), std::slice::from_ref(&url), None, &["--retries", "0"]))
        .collect::<Result<_, _>>()?;
    wharf_tests::control::poll(Duration::from_secs(20), "3 nodes connected", || async {
        list_nodes(&url).await.ok().filter(|n| n.len() >= 3).map(|_| ())
    })
    .await?;
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(4).build()?;
    println!("Wharf config propagation ({} store), {} changes", if o.etcd { "etcd" } else { "embedded" }, o.changes);

    let mut lat = Vec::with_capacity(o.changes);
    for i in 0..o.changes {
        let key = format!("p{i}");
        create_repo(&url, &repo_json(&key, "http://127.0.0.1:1")).await?;
        let acked = Instant::now();
        lat.push(all_serving(&http, &nodes, &key).await? - acked);
    }
    summary("write acked -> all 3 nodes serve it", lat);

    let (rss0, _) = proc_stats(pid);
    let hundred = open_streams(&url, 0, 100, None).await?;
    all_streams_at(&hundred, 100, 1).await?;
    let (rss100, _) = proc_stats(pid);
    let (mut to_nodes, mut to_streams) = (Vec::new(), Vec::new());
    for i in 0..o.changes {
        let key = format!("q{i}");
        let rev = create_repo(&url, &repo_json(&key, "http://127.0.0.1:1")).await?;
        let acked = Instant::now();
        to_streams.push(all_streams_at(&hundred, 100, rev).await? - acked);
        to_nodes.push(all_serving(&http, &nodes, &key).await? - acked);
    }
    summary("with 100 streams: all 3 nodes serve it", to_nodes);
    summary("with 100 streams: all 100 streams have it", to_streams);

    let rest = open_streams(&url, 100, o.streams.saturating_sub(100), Some(&hundred)).await?;
    all_streams_at(&rest, o.streams, 1).await?;
    let (mut to_all, mut n_after) = (Vec::new(), Vec::new());
    for i in 0..o.changes.min(20) {
        let key = format!("r{i}");
        let rev = create_repo(&url, &repo_json(&key, "http://127.0.0.1:1")).await?;
        let acked = Instant::now();
        to_all.push(all_streams_at(&rest, o.streams, rev).await? - acked);
        n_after.push(all_serving(&http, &nodes, &key).await? - acked);
    }
    summary(&format!("with {} streams: all streams have it", o.streams), to_all);
    summary(&format!("with {} streams: all 3 nodes serve it", o.streams), n_after);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_n, t0) = proc_stats(pid);
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let (_, t1) = proc_stats(pid);
    let hz = 100.0; // USER_HZ on Linux
    println!(
        "  control-plane RSS: {} MiB idle, {} MiB with 100 streams, {} MiB with {} streams",
        rss0 / 1024,
        rss100 / 1024,
        rss_n / 1024,
        o.streams
    );
    println!(
        "  control-plane CPU while idle with {} streams (leases kept alive): {:.2}% of one core over {:?}",
        o.streams + 3,
        (t1 - t0) as f64 / hz / idle.as_secs_f64() * 100.0,
        idle
    );
    Ok(())
}
