#!/usr/bin/env python3
"""Peer fetch: three wharf-proxy nodes on one control plane, cold caches, one upstream behind a
throttling relay (200 MB/s by default, as upstream bandwidth matters in production).

Two clusters run side by side on the same upstream: one with peer fetch (the default) and one whose
control plane runs with --no-peer-fetch (each node fetches from upstream itself: what a cluster did
before). Each round pushes a new random image (so every cache is cold) and measures, cluster A
then cluster B:

- upstream bytes / image size after each of the three nodes pulled the image once (goal 1.00;
  without peer fetch 3.00);
- the wall time of a 20-client herd on a cold big blob spread over the three nodes of the peer
  cluster, against the same herd on one node;
- the time to first byte of a peer hit (a node asks the owner, which has the blob) against a local
  hit of the same blob on the same node.

Figures are medians of the per-round ratios.

    python3 bench/cluster.py [--rounds 5] [--big-mb 100] [--upstream-mbps 200] [--no-build]
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

NODE_IDS = ("n1", "n2", "n3")


def owner(ids, digest: str) -> str:
    """The node that owns `digest` (rendezvous hashing, as data-plane/src/peers.rs)."""
    hexd = digest.split(":", 1)[1]
    weight = lambda i: int(hashlib.sha256(f"{i}\0{hexd}".encode()).hexdigest()[:16], 16)  # noqa: E731
    return max(sorted(ids), key=weight)


class Cluster:
    """A wharf-control on its embedded store and three nodes following it."""

    def __init__(self, ctx: B.Context, name: str, upstream_port: int, peer_fetch: bool) -> None:
        self.name = name
        d = ctx.tmp / f"cluster-{name}"
        d.mkdir()
        self.cp_port = B.free_port()
        cp_log = d / "control.log"
        argv = [str(B.REPO_ROOT / "target" / "release" / "wharf-control"), "--data-dir", str(d / "data"),
                "--listen", f"127.0.0.1:{self.cp_port}", "--bootstrap-token-file", str(d / "admin.token"),
                "--bootstrap-node-token-file", str(d / "node.token"), "--log-format", "json"]
        if not peer_fetch:
            argv.append("--no-peer-fetch")
        cp = ctx.procs.start(f"wharf-control[{name}]", argv, cp_log, cwd=d)
        wait_http(self.cp_port, "/healthz", cp, cp_log)
        admin = (d / "admin.token").read_text().strip()
        body = json.dumps({"key": B.WHARF_REPO_KEY, "kind": "generic",
                           "upstream": f"http://127.0.0.1:{upstream_port}", "tag_ttl": "1s"}).encode()
        status, body = request(self.cp_port, "POST", "/api/repos", body,
                               {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
        if status != 201:
            raise B.BenchError(f"creating the repo answered {status}: {body[:300]!r}")
        self.ports = {}
        for node in NODE_IDS:
            port = B.free_port()
            nd = d / node
            nd.mkdir()
            log_path = nd / "node.log"
            p = ctx.procs.start(f"wharf-proxy[{name}/{node}]", [
                str(B.REPO_ROOT / "target" / "release" / "wharf-proxy"), "--control-plane",
                f"http://127.0.0.1:{self.cp_port}", "--control-plane-token-file", str(d / "node.token"),
                "--node-id", node, "--cache-dir", str(nd / "cache"), "--listen", f"127.0.0.1:{port}",
                "--log-format", "json"], log_path, cwd=nd)
            B.wait_ready(f"wharf-proxy[{name}/{node}]", port, p, log_path)
            self.ports[node] = port
        want = 3 if peer_fetch else 0
        deadline = time.monotonic() + 30
        while any(members(p) != want for p in self.ports.values()):
            if time.monotonic() > deadline:
                raise B.BenchError(f"{name}: the nodes do not see {want} members")
            time.sleep(0.1)

    def path(self, digest: str, kind: str = "blobs") -> str:
        return f"/v2/{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}/{kind}/{digest}"


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def wait_http(port: int, path: str, proc, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise B.BenchError(f"exited before it was ready:\n{B.tail(log_path)}")
        try:
            if request(port, "GET", path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise B.BenchError(f"not ready on {port}:\n{B.tail(log_path)}")


def members(port: int) -> int:
    try:
        _, body = request(port, "GET", "/metrics")
    except OSError:
        return -1
    for line in body.decode().splitlines():
        if line.startswith("wharf_peer_members "):
            return int(float(line.split()[1]))
    return 0


def pull_all(c: Cluster, image: dict) -> int:
    """Each node pulls the image once, one after the other, checking every digest; returns the
    image's blob bytes (config and layers)."""
    for node, port in c.ports.items():
        status, body = request(port, "GET", c.path(image["manifest_digest"], "manifests"),
                               headers={"Accept": B.MANIFEST_ACCEPT})
        if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != image["manifest_digest"]:
            raise B.BenchError(f"{c.name}/{node}: manifest {status}")
        manifest = json.loads(body)
        blobs = [manifest["config"]] + manifest["layers"]
        for d in blobs:
            B.check_blob(port, f"/v2/{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}", d["digest"], d["size"])
    return sum(d["size"] for d in blobs)


def herd_spread(ports: list[int], path: str, n: int, size: int, digest: str) -> float:
    """n clients at once, client i on ports[i % len(ports)]; returns the wall time."""
    import threading
    results: list[float | None] = [None] * n
    barrier = threading.Barrier(n + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", ports[i % len(ports)], timeout=300)
        conn.connect()
        barrier.wait(timeout=60)
        conn.request("GET", path)
        r = conn.getresponse()
        h = hashlib.sha256()
        got = 0
        while chunk := r.read(1 << 20):
            h.update(chunk)
            got += len(chunk)
        conn.close()
        if r.status == 200 and got == size and "sha256:" + h.hexdigest() == digest:
            results[i] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise B.BenchError(f"herd on {ports}: {sum(r is None for r in results)} bodies wrong or cut")
    return max(results) - t0


def ttfb(port: int, path: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    t0 = time.perf_counter()
    conn.request("GET", path)
    r = conn.getresponse()
    r.read(1)
    first = time.perf_counter() - t0
    r.read()
    conn.close()
    if r.status != 200:
        raise B.BenchError(f"GET {path} on {port}: {r.status}")
    return first


def new_image(ctx: B.Context, up_port: int, r: int, big: int, small: int) -> dict:
    image = B.build_oci_layout(ctx.tmp / f"layout-{r}", big, small)
    B.push_layout(ctx.tmp / f"layout-{r}", up_port)
    return image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--big-mb", type=int, default=100)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--upstream-mbps", type=float, default=200.0)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=Path, default=B.BENCH_DIR / "out")
    args = ap.parse_args()
    if not args.no_build:
        for binary in ("wharf-proxy", "wharf-control"):
            B.log(f"cargo build --release --bin {binary}")
            if B.subprocess.run(["cargo", "build", "--release", "--bin", binary], cwd=B.REPO_ROOT).returncode:
                raise B.BenchError(f"cargo build --release --bin {binary} failed")
    bargs = B.parse_args(["--only", "wharf", "--big-mb", str(args.big_mb),
                          "--upstream-mbps", str(args.upstream_mbps)])
    big, small = args.big_mb * B.MiB, 1 * B.MiB
    with B.image_upstream("wharf-cluster-bench-", bargs, 2 * B.MiB, 64 * 1024) as (ctx, up_port):
        log_path = ctx.tmp / "upstream-u" / "upstream.log"
        registry = next(p for name, p, _ in ctx.procs.procs if name == "upstream[u]")
        upstream = B.UpstreamLog(log_path, registry)
        relay, relay_port = B.start_relay(ctx, "u", up_port)
        upstream.relay = relay
        peer = Cluster(ctx, "peer", relay_port, peer_fetch=True)
        alone = Cluster(ctx, "no-peer", relay_port, peer_fetch=False)
        rows: dict[str, list[float]] = {k: [] for k in (
            "bytes_peer", "bytes_no_peer", "herd_spread_s", "herd_one_s", "herd_ratio",
            "ttfb_peer_ms", "ttfb_local_ms", "ttfb_ratio")}
        for r in range(args.rounds):
            # Upstream bytes per image size, each node pulling once: with peer fetch, then without.
            for c, key in ((peer, "bytes_peer"), (alone, "bytes_no_peer")):
                image = new_image(ctx, up_port, 100 * r + len(key), big, small)
                start = upstream.offset()
                size = pull_all(c, image)
                upstream.wait_idle()
                used = upstream.usage(start)
                blob_bytes = used["by_kind"].get("GET blob", {}).get("bytes", 0)
                rows[key].append(blob_bytes / size)
                B.log(f"round {r} {c.name}: upstream blob bytes {blob_bytes / size:.2f}x the image")
            # The herd: spread over the peer cluster, then on one node (of the other cluster).
            image = new_image(ctx, up_port, 100 * r + 50, big, small)
            p = peer.path(image["big_digest"])
            spread = herd_spread(list(peer.ports.values()), p, args.clients, image["big_size"], image["big_digest"])
            image = new_image(ctx, up_port, 100 * r + 51, big, small)
            one = herd_spread([alone.ports["n1"]], alone.path(image["big_digest"]), args.clients,
                              image["big_size"], image["big_digest"])
            rows["herd_spread_s"].append(spread)
            rows["herd_one_s"].append(one)
            rows["herd_ratio"].append(spread / one)
            # A peer hit against a local hit: the small blob cached on its owner only.
            image = new_image(ctx, up_port, 100 * r + 52, 2 * B.MiB, small)
            d = image["small_digest"]
            o = owner(NODE_IDS, d)
            other = next(n for n in NODE_IDS if n != o)
            ttfb(peer.ports[o], peer.path(d))
            via_peer = ttfb(peer.ports[other], peer.path(d))
            local = statistics.median(ttfb(peer.ports[other], peer.path(d)) for _ in range(5))
            rows["ttfb_peer_ms"].append(via_peer * 1000)
            rows["ttfb_local_ms"].append(local * 1000)
            rows["ttfb_ratio"].append(via_peer / local)
            B.log(f"round {r}: herd spread {spread:.2f}s, one node {one:.2f}s; ttfb peer {via_peer * 1000:.2f} ms, "
                  f"local {local * 1000:.2f} ms")
        med = {k: statistics.median(v) for k, v in rows.items()}
        lines = [
            f"three nodes, cold caches, upstream throttled to {args.upstream_mbps:g} MB/s, {args.rounds} rounds, "
            f"big blob {args.big_mb} MiB, herd of {args.clients}",
            "",
            "| | with peer fetch | without (--no-peer-fetch) | goal |",
            "|---|---|---|---|",
            f"| upstream blob bytes / image size, each node pulled once | {med['bytes_peer']:.2f} | "
            f"{med['bytes_no_peer']:.2f} | 1.00 |",
            "",
            "| | spread over 3 nodes (peer fetch) | on one node | ratio (median of rounds) |",
            "|---|---|---|---|",
            f"| herd wall time, s | {med['herd_spread_s']:.2f} | {med['herd_one_s']:.2f} | {med['herd_ratio']:.2f}x |",
            "",
            "| | peer hit | local hit | ratio (median of rounds) |",
            "|---|---|---|---|",
            f"| time to first byte, ms | {med['ttfb_peer_ms']:.2f} | {med['ttfb_local_ms']:.2f} | {med['ttfb_ratio']:.2f}x |",
        ]
        print("\n".join(lines))
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"cluster-{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(json.dumps({"rounds": rows, "medians": med}, indent=2))
        B.log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
