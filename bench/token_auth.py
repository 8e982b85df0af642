#!/usr/bin/env python3
"""What checking a node token costs: warm GETs/s with a Bearer token from the node's /v2/token on
every request, against the same GETs with no auth at all, in one wharf-proxy, interleaved rounds.

One node serves two repos over the same upstream and the same cached content: `lab` (public: no
auth is looked at) and `priv` (access = "token": every request opens and checks a node token). The
node runs at its default logging (one request line per request, to a file). Per round: manifest by
tag on lab, then on priv, then the 1 MiB blob on lab, then on priv; the figure is the median of the
per-round ratios priv / lab (goal: >= 0.9). Then the token endpoint's requests/s: anonymous, and
with a puller token as the Basic password.

The node is a managed node whose control plane does not exist: it serves the snapshot stored in its
cache dir (a puller token's hash in it), as a node does through a control-plane outage.

    python3 bench/token_auth.py [--rounds 5] [--duration 3] [--wharf-bin target/release/wharf-proxy]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402


def start_node(ctx: B.Context, binary: Path, upstream_port: int, puller: tuple[str, str]) -> tuple:
    d = ctx.tmp / "node"
    (d / "cache").mkdir(parents=True)
    pid, secret = puller
    repo = lambda key, access: {  # noqa: E731
        "key": key, "kind": "generic", "upstream": f"http://127.0.0.1:{upstream_port}",
        "tag_ttl_secs": 3600, "access": access, "auth": "static"}
    snapshot = {
        "revision": 1,
        "repos": [repo(B.WHARF_REPO_KEY, "public"), repo("priv", "token")],
        "pullers": [{"id": pid, "secret_sha256": hashlib.sha256(secret.encode()).hexdigest(), "repos": []}],
    }
    (d / "cache" / "config.snapshot").write_text(json.dumps(snapshot))
    port = B.free_port()
    log_path = d / "node.log"
    p = ctx.procs.start("wharf-proxy", [
        str(binary), "--control-plane", f"http://127.0.0.1:{B.free_port()}", "--node-id", "bench",
        "--cache-dir", str(d / "cache"), "--listen", f"127.0.0.1:{port}", "--log-format", "json",
    ], log_path, cwd=d)
    # The ping challenges (this node serves a token repo): a 401 is ready.
    B.wait_ready("wharf-proxy", port, p, log_path, ready=(200, 401))
    return p, port, log_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--wharf-bin", type=Path, default=B.REPO_ROOT / "target" / "release" / "wharf-proxy")
    ap.add_argument("--out", type=Path, default=B.BENCH_DIR / "out")
    args = ap.parse_args()
    bargs = B.parse_args(["--only", "wharf", "--big-mb", "2", "--duration", str(args.duration)])
    with B.image_upstream("wharf-token-bench-", bargs, 1 * B.MiB, 64 * 1024) as (ctx, up_port):
        image = ctx.image
        puller = ("00000000000000be", secrets.token_hex(24))
        _, port, log_path = start_node(ctx, args.wharf_bin, up_port, puller)
        basic = "Basic " + base64.b64encode(f"bench:wharf_{puller[0]}_{puller[1]}".encode()).decode()
        scope = f"repository:priv/{B.IMAGE_NAME}:pull"
        status, _, body = B.http_get(port, f"/v2/token?service=bench&scope={scope}", {"Authorization": basic})
        if status != 200:
            raise B.BenchError(f"token endpoint answered {status}: {body[:200]!r}")
        token = json.loads(body)["token"]
        bearer = f"Authorization: Bearer {token}"
        blob = image["big_digest"]
        paths = {}
        for key in (B.WHARF_REPO_KEY, "priv"):
            base = f"/v2/{key}/{B.IMAGE_NAME}"
            hdrs = {} if key == B.WHARF_REPO_KEY else {"Authorization": f"Bearer {token}"}
            for what, path in (("manifest", f"{base}/manifests/{B.IMAGE_TAG}"), ("blob", f"{base}/blobs/{blob}")):
                s, _, _ = B.http_get(port, path, {**hdrs, "Accept": B.MANIFEST_ACCEPT})
                if s != 200:
                    raise B.BenchError(f"{path} answered {s}")
                paths[(key, what)] = path
        # The token must not expire during the run (default TTL 5 min).
        rows = {w: {"none": [], "bearer": [], "ratio": []} for w in ("manifest", "blob")}
        for r in range(args.rounds):
            for what in ("manifest", "blob"):
                accept = [f"Accept: {B.MANIFEST_ACCEPT}"] if what == "manifest" else []
                none = B.run_wrk(port, paths[(B.WHARF_REPO_KEY, what)], args.duration, accept)
                auth = B.run_wrk(port, paths[("priv", what)], args.duration, accept + [bearer])
                for w in (none, auth):
                    if w["errors"]:
                        raise B.BenchError(f"wrk saw errors: {w}")
                rows[what]["none"].append(none["rps"])
                rows[what]["bearer"].append(auth["rps"])
                rows[what]["ratio"].append(auth["rps"] / none["rps"])
                B.log(f"round {r} {what}: none {none['rps']:.0f}/s bearer {auth['rps']:.0f}/s")
        anon = B.run_wrk(port, f"/v2/token?service=bench&scope=repository:{B.WHARF_REPO_KEY}/{B.IMAGE_NAME}:pull",
                         args.duration, [])
        with_puller = B.run_wrk(port, f"/v2/token?service=bench&scope={scope}", args.duration,
                                [f"Authorization: {basic}"])
        lines = ["| warm GETs/s, wrk -t2 -c16 | no auth (median) | Bearer node token (median) | ratio (median of rounds) |",
                 "|---|---|---|---|"]
        for what, label in (("manifest", "manifest by tag"), ("blob", "1 MiB blob")):
            row = rows[what]
            lines.append(f"| {label} | {statistics.median(row['none']):,.0f} | {statistics.median(row['bearer']):,.0f} | "
                         f"{statistics.median(row['ratio']):.2f}x |")
        lines.append("")
        lines.append(f"token endpoint: {anon['rps']:,.0f} req/s anonymous, {with_puller['rps']:,.0f} req/s with a puller token")
        print("\n".join(lines))
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"token-auth-{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(json.dumps({"rounds": rows, "token_anonymous_rps": anon["rps"],
                                   "token_puller_rps": with_puller["rps"]}, indent=2))
        B.log(f"results: {out}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
