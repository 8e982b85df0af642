#!/usr/bin/env python3
"""What the first read of a cached blob after a restart costs (it is hashed while it streams),
against a warm read of the same blob (trusted), in one run: one 200 MiB blob, a node restarted on
the same cache dir each round, then the first GET and a second GET timed; the figure is the median
of the per-round ratios first / warm. The client hashes both bodies (as a pulling client does).

    python3 bench/first_read.py [--rounds 4] [--mib 200] [--wharf-bin target/release/wharf-proxy]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--wharf-bin", type=Path, default=B.REPO_ROOT / "target" / "release" / "wharf-proxy")
    args = ap.parse_args()
    bargs = B.parse_args(["--only", "wharf", "--big-mb", str(max(args.mib, 2)), "--duration", "1"])
    bargs.wharf_bin = args.wharf_bin
    with B.image_upstream("wharf-first-read-", bargs, args.mib * B.MiB, 1 * B.MiB) as (ctx, up_port):
        tmp, procs, image = ctx.tmp, ctx.procs, ctx.image
        digest = image["big_digest"]

        def timed_get(port: int, path: str) -> float:
            t = time.monotonic()
            status, _, body = B.http_get(port, path, timeout=300)
            dt = time.monotonic() - t
            if status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                raise B.BenchError(f"GET {path}: {status}, or the wrong bytes")
            return dt

        p, port, _, base = B.start_wharf(ctx, up_port)
        path = f"{base}/blobs/{digest}"
        timed_get(port, path)  # cold: fetched and cached
        d = tmp / "wharf"
        ratios, firsts, warms = [], [], []
        for r in range(args.rounds):
            procs.stop(p)
            port = B.free_port()
            log = d / f"round{r}.log"
            p = procs.start("wharf-proxy", [str(args.wharf_bin), "--config", str(d / "wharf.toml"),
                                            "--cache-dir", str(d / "cache"), "--listen", f"127.0.0.1:{port}",
                                            "--log-format", "json", "--log-level", "warn"], log, cwd=d)
            B.wait_ready("wharf-proxy", port, p, log)
            first, warm = timed_get(port, path), timed_get(port, path)
            firsts.append(first)
            warms.append(warm)
            ratios.append(first / warm)
            B.log(f"round {r}: first {first:.3f} s, warm {warm:.3f} s")
        mb = args.mib * B.MiB / 1e6
        print(f"{args.mib} MiB blob: first read after a restart / warm read, median of {args.rounds} rounds: "
              f"{statistics.median(ratios):.2f}x ({mb / statistics.median(firsts):.0f} MB/s vs "
              f"{mb / statistics.median(warms):.0f} MB/s)")
        return 0


if __name__ == "__main__":
    sys.exit(main())
