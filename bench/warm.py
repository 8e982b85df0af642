#!/usr/bin/env python3
"""Warm hits like for like: Wharf against nginx proxy_cache and against the static-file ceiling
(nginx sendfile of the same bytes), with request logs on as services run them, and off.

Every server writes one access-log line per request to a file in the "logs on" row: Wharf at its
default logging (info, text, stdout redirected to a file), nginx with `access_log` on (its default
buffering). The "logs off" row: Wharf at `--log-level warn`, nginx `access_log off`. Per round, for
each row and each request (the 1 MiB blob; the manifest by tag, and for the static server a file
of that manifest's size): Wharf, nginx proxy_cache, static, interleaved; each figure is the median
of the per-round ratios, so a noisy machine still gives a ratio that holds.

    python3 bench/warm.py [--rounds 5] [--duration 3] [--wharf-bin target/release/wharf-proxy]
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

ROWS = ("logs on", "logs off")
SERVERS = ("wharf", "nginx proxy_cache", "static sendfile")
REQUESTS = ("1 MiB blob", "manifest by tag")


def start_wharf(ctx: B.Context, binary: Path, upstream_port: int, name: str, level: str) -> tuple[int, int]:
    d, cfg, port, log_path = B.warm_wharf_dir(ctx, name, upstream_port)
    p = ctx.procs.start(name, [str(binary), "--config", str(cfg), "--cache-dir", str(d / "cache"),
                               "--listen", f"127.0.0.1:{port}", "--log-level", level], log_path, cwd=d)
    B.wait_ready(name, port, p, log_path)
    return port, p.pid


def profile(pid: int, port: int, path: str, hdrs: dict, duration: int, conns: int, out: Path) -> str:
    """`perf record` of process `pid` while wrk runs one more round against it; the top entries of
    the report (self time, by symbol) as text, the recording itself at `out`."""
    rec = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(out)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        w = B.run_wrk(port, path, duration, [f"{k}: {v}" for k, v in hdrs.items()], conns=conns)
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=60)
    rep = subprocess.run(["perf", "report", "-i", str(out), "--no-children", "--stdio", "-g", "none",
                          "--percent-limit", "1.5", "--sort", "dso,symbol"],
                         capture_output=True, text=True, timeout=300)
    top = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return f"{w['rps']:,.0f} GETs/s while recording\n" + "\n".join(top[:25])


def start_nginx(ctx: B.Context, upstream_port: int, blob_file: Path, manifest_size: int) -> dict:
    d = ctx.tmp / "nginx"
    d.mkdir()
    for sub in ("cache", "client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "static"):
        (d / sub).mkdir()
    # The static server's files: the blob's very bytes, and a file of the manifest's size.
    shutil.copyfile(blob_file, d / "static" / "blob")
    (d / "static" / "manifest").write_bytes(b"{" + b" " * (manifest_size - 2) + b"}")
    ports = {k: B.free_port() for k in ("CACHE_LOG_PORT", "CACHE_NOLOG_PORT", "STATIC_LOG_PORT", "STATIC_NOLOG_PORT")}
    user_line = ""
    if os.geteuid() == 0:
        user_line = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    shutil.copyfile(B.TEMPLATES / "nginx-proxy-locations.conf", d / "proxy-locations.conf")
    cfg = B.render("nginx-warm.conf", d / "nginx.conf", PREFIX=d, UPSTREAM_PORT=upstream_port,
                   USER_LINE=user_line, **ports)
    log_path = d / "nginx.out"
    p = ctx.procs.start("nginx", ["/usr/sbin/nginx", "-c", str(cfg), "-p", str(d)], log_path, cwd=d)
    B.wait_ready("nginx", ports["STATIC_LOG_PORT"], p, log_path, ready=(200, 403, 404))
    return ports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--wharf-bin", type=Path, default=B.REPO_ROOT / "target" / "release" / "wharf-proxy")
    ap.add_argument("--out", type=Path, default=B.BENCH_DIR / "out")
    ap.add_argument("--baseline-bin", type=Path,
                    help="another wharf-proxy build, run beside the first in every round: a column of its own "
                         "and the ratio wharf / baseline")
    ap.add_argument("--profile", action="store_true",
                    help="after the rounds, record Wharf (logs on) with perf during one more run per request "
                         "and print the report's top entries")
    args = ap.parse_args()
    bargs = B.parse_args(["--only", "wharf", "--big-mb", "2", "--duration", str(args.duration)])
    with B.image_upstream("wharf-warm-bench-", bargs, 1 * B.MiB, 64 * 1024) as (ctx, up_port):
        tmp, image = ctx.tmp, ctx.image
        started = {"logs on": start_wharf(ctx, args.wharf_bin, up_port, "wharf-logs", "info"),
                   "logs off": start_wharf(ctx, args.wharf_bin, up_port, "wharf-quiet", "warn")}
        wharf = {row: port for row, (port, _) in started.items()}
        servers = SERVERS
        if args.baseline_bin:
            servers = ("wharf", "wharf baseline", *SERVERS[1:])
            baseline = {"logs on": start_wharf(ctx, args.baseline_bin, up_port, "baseline-logs", "info")[0],
                        "logs off": start_wharf(ctx, args.baseline_bin, up_port, "baseline-quiet", "warn")[0]}
        accept = {"Accept": B.MANIFEST_ACCEPT}
        s, _, manifest = B.http_get(wharf["logs on"], f"/v2/{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}/manifests/{B.IMAGE_TAG}", accept)
        if s != 200:
            raise B.BenchError(f"manifest by tag answered {s}")
        blob_file = tmp / "layout" / "blobs" / "sha256" / image["big_digest"].removeprefix("sha256:")
        nginx = start_nginx(ctx, up_port, blob_file, len(manifest))
        blob = image["big_digest"]
        # (port, path, headers) per row, server and request.
        targets = {}
        for row in ROWS:
            cache_port = nginx["CACHE_LOG_PORT" if row == "logs on" else "CACHE_NOLOG_PORT"]
            static_port = nginx["STATIC_LOG_PORT" if row == "logs on" else "STATIC_NOLOG_PORT"]
            wb, nb = f"/v2/{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}", f"/v2/{B.IMAGE_NAME}"
            of_wharf = lambda port: {"1 MiB blob": (port, f"{wb}/blobs/{blob}", {}),  # noqa: E731
                                     "manifest by tag": (port, f"{wb}/manifests/{B.IMAGE_TAG}", accept)}
            targets[row] = {
                "wharf": of_wharf(wharf[row]),
                **({"wharf baseline": of_wharf(baseline[row])} if args.baseline_bin else {}),
                "nginx proxy_cache": {"1 MiB blob": (cache_port, f"{nb}/blobs/{blob}", {}),
                                      "manifest by tag": (cache_port, f"{nb}/manifests/{B.IMAGE_TAG}", accept)},
                "static sendfile": {"1 MiB blob": (static_port, "/blob", {}),
                                    "manifest by tag": (static_port, "/manifest", {})},
            }
        # Warm every cache (twice: the second is a hit everywhere) and check the bytes.
        for row in ROWS:
            for server in servers:
                for req in REQUESTS:
                    port, path, hdrs = targets[row][server][req]
                    for _ in range(2):
                        s, _, body = B.http_get(port, path, hdrs)
                        if s != 200:
                            raise B.BenchError(f"{server} {path} answered {s}")
                    if req == "1 MiB blob" and len(body) != image["big_size"]:
                        raise B.BenchError(f"{server} {path}: {len(body)} bytes")
        rps = {row: {srv: {req: [] for req in REQUESTS} for srv in servers} for row in ROWS}
        for r in range(args.rounds):
            for row in ROWS:
                for req in REQUESTS:
                    for server in servers:
                        port, path, hdrs = targets[row][server][req]
                        w = B.run_wrk(port, path, args.duration, [f"{k}: {v}" for k, v in hdrs.items()],
                                      conns=args.connections)
                        if w["errors"]:
                            raise B.BenchError(f"wrk saw errors on {server} {path}: {w}")
                        rps[row][server][req].append(w["rps"])
                    got = {s: rps[row][s][req][-1] for s in servers}
                    B.log(f"round {r} {row} {req}: " + ", ".join(f"{s} {v:,.0f}/s" for s, v in got.items()))
        ratio = lambda row, req, other: statistics.median(  # noqa: E731
            a / b for a, b in zip(rps[row]["wharf"][req], rps[row][other][req]))
        lines = [f"| warm GETs/s, wrk -t2 -c{args.connections}, median of {args.rounds} interleaved rounds | "
                 "wharf | nginx proxy_cache | static sendfile | wharf / proxy_cache | wharf / static |",
                 "|---|---|---|---|---|---|"]
        if args.baseline_bin:
            lines[0] += " wharf baseline | wharf / baseline |"
            lines[1] += "---|---|"
        for row in ROWS:
            for req in REQUESTS:
                med = {s: statistics.median(rps[row][s][req]) for s in servers}
                line = (f"| {req}, {row} | {med['wharf']:,.0f} | {med['nginx proxy_cache']:,.0f} | "
                        f"{med['static sendfile']:,.0f} | {ratio(row, req, 'nginx proxy_cache'):.2f}x | "
                        f"{ratio(row, req, 'static sendfile'):.2f}x |")
                if args.baseline_bin:
                    line += f" {med['wharf baseline']:,.0f} | {ratio(row, req, 'wharf baseline'):.2f}x |"
                lines.append(line)
        print("\n".join(lines))
        args.out.mkdir(parents=True, exist_ok=True)
        if args.profile:
            for req in REQUESTS:
                port, path, hdrs = targets["logs on"]["wharf"][req]
                data = args.out / f"perf-{req.replace(' ', '-')}-{time.strftime('%Y%m%dT%H%M%S')}.data"
                top = profile(started["logs on"][1], port, path, hdrs, args.duration, args.connections, data)
                print(f"\nperf, wharf, {req}, logs on ({data}):\n{top}")
        out = args.out / f"warm-{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(json.dumps({"rps": rps, "table": lines}, indent=2))
        B.log(f"results: {out}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
