#!/usr/bin/env python3
"""What one warm hit costs Wharf, in instructions (valgrind callgrind): repeatable on a shared,
noisy machine where requests per second are not, and attributed to functions, inclusive.

Starts a local registry upstream with the bench image; per build and request kind (the manifest by
tag, the 1 MiB blob), one Wharf (request logs on, at its default level, to a file) under callgrind
with instrumentation off; warms the cache, turns instrumentation on for `--requests` GETs over one
keep-alive connection, off again, and stops Wharf, which writes the dump. Prints instructions per request and the functions with the most
inclusive instructions; several `--wharf-bin` compare builds in one run (per-request ratios).

    python3 bench/hitcost.py [--requests 2000] [--wharf-bin A --wharf-bin B] [--top 30]
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402

KINDS = ("manifest by tag", "1 MiB blob")


def run_requests(port: int, path: str, headers: dict, n: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        for _ in range(n):
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise B.BenchError(f"GET {path} answered {r.status}")
    finally:
        conn.close()


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def measure(ctx: B.Context, binary: Path, label: str, kind: str, up_port: int, requests: int, top: int,
            out_dir: Path, extra: list[str], env: dict) -> dict:
    """One Wharf under callgrind for one request kind: the dump it writes when it exits holds
    exactly the `requests` measured (instrumentation is on only while they run)."""
    d, cfg, port, log_path = B.warm_wharf_dir(ctx, f"wharf-{label}-{kind.replace(' ', '-')}", up_port)
    dump = d / "callgrind.out"
    p = ctx.procs.start(f"wharf[{label}]", [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={dump}",
        str(binary), "--config", str(cfg), "--cache-dir", str(d / "cache"),
        "--listen", f"127.0.0.1:{port}", *extra], log_path, cwd=d, env={**os.environ, **env})
    B.wait_ready(f"wharf[{label}]", port, p, log_path, timeout=180)
    base = f"/v2/{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}"
    path, hdrs = {"manifest by tag": (f"{base}/manifests/{B.IMAGE_TAG}", {"Accept": B.MANIFEST_ACCEPT}),
                  "1 MiB blob": (f"{base}/blobs/{ctx.image['big_digest']}", {})}[kind]
    run_requests(port, path, hdrs, 20)  # warm: the first is a miss
    callgrind_control("-i", "on", str(p.pid))
    run_requests(port, path, hdrs, requests)
    callgrind_control("-i", "off", str(p.pid))
    ctx.procs.stop(p, grace=120)
    if not dump.exists():
        raise B.BenchError(f"wharf[{label}] left no callgrind dump; log:\n{B.tail(log_path)}")
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dump)],
                         capture_output=True, text=True, timeout=600).stdout
    total = re.search(r"^\s*([\d,]+)\s+\(100\.0%\)\s+PROGRAM TOTALS", ann, re.M)
    if not total:
        raise B.BenchError(f"unexpected callgrind_annotate output:\n{ann[:2000]}")
    ir = int(total.group(1).replace(",", ""))
    lines = [ln for ln in ann.splitlines() if re.match(r"^\s*[\d,]+ \(\s*[\d.]+%\)", ln)]
    kept = out_dir / f"callgrind-{label}-{kind.replace(' ', '-')}-{time.strftime('%Y%m%dT%H%M%S')}.out"
    shutil.copyfile(dump, kept)
    return {"per_request": ir / requests, "top": lines[:top], "dump": str(kept)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--wharf-bin", type=Path, action="append")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--wharf-arg", action="append", default=[],
                    help="an argument for every Wharf started (--wharf-arg=--no-metrics)")
    ap.add_argument("--wharf-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for every Wharf started (OTEL_TRACES_SAMPLER_ARG=0.1)")
    ap.add_argument("--out", type=Path, default=B.BENCH_DIR / "out", help="where the dumps are kept")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(kv.split("=", 1) for kv in args.wharf_env)
    bins = args.wharf_bin or [B.REPO_ROOT / "target" / "release" / "wharf-proxy"]
    bargs = B.parse_args(["--only", "wharf", "--big-mb", "2"])
    with B.image_upstream("wharf-hitcost-", bargs, 1 * B.MiB, 64 * 1024) as (ctx, up_port):
        results = {}
        for i, binary in enumerate(bins):
            results[i] = {}
            for kind in KINDS:
                results[i][kind] = r = measure(ctx, binary, str(i), kind, up_port, args.requests, args.top,
                                               args.out, args.wharf_arg, env)
                print(f"\n{binary}: {kind}: {r['per_request']:,.0f} instructions per request ({r['dump']})")
                print("\n".join(r["top"]))
        if len(bins) > 1:
            print()
            for kind in KINDS:
                a = results[0][kind]["per_request"]
                for i in range(1, len(bins)):
                    b = results[i][kind]["per_request"]
                    print(f"{kind}: {bins[i]} / {bins[0]}: {b / a:.3f}x instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
