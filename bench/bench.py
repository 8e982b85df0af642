#!/usr/bin/env python3
"""Wharf benchmark: wharf-proxy vs the distribution registry's proxy mode vs nginx proxy_cache.

All three pull the same test image from a real distribution registry (the "upstream") that this
script starts and fills with skopeo. Everything runs on 127.0.0.1 with ports chosen at run time and
data under one temporary directory; every process started here is stopped (its whole process group)
on the way out, whatever happens.

Measurements, per system:
  herd   N clients (default 20) GET the cold big blob (default 200 MiB) at the same instant:
         bytes the upstream sent / blob size, wall time until all finish, time to first byte,
         sha256 of every body, peak RSS of the system's processes during the herd.
  warm   manifest-by-tag GETs/s (wrk), 1 MiB blob GETs/s (wrk), P parallel clients (default 4)
         pulling the big blob over and over (curl -o /dev/null): aggregate GB/s.

With --upstream-mbps N each system reaches its upstream through a throttling TCP relay
(throttle_relay.py) that limits upstream -> system to N MB/s, shared by all its connections.

Python 3.11 standard library only. See bench/README.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import os
import platform
import pwd
import grp
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
TEMPLATES = BENCH_DIR / "templates"
RELAY = BENCH_DIR / "throttle_relay.py"

SYSTEMS = ("wharf", "distribution", "nginx")
LABELS = {"wharf": "wharf", "distribution": "distribution-proxy", "nginx": "nginx"}

IMAGE_NAME = "bench/img"
IMAGE_TAG = "v1"
WHARF_REPO_KEY = "lab"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join([
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])

MiB = 1024 * 1024
NGINX_MANIFEST_VALID = "30s"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

class Procs:
    """Starts processes in their own process group and stops whole groups."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, object]] = []

    def start(self, name: str, argv: list[str], log_path: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        f = open(log_path, "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env, cwd=cwd)
        except BaseException:
            f.close()
            raise
        self.procs.append((name, p, f))
        log(f"started {name} (pid {p.pid}): {' '.join(argv)}")
        return p

    def stop(self, p: subprocess.Popen, grace: float = 10.0) -> None:
        for name, q, f in list(self.procs):
            if q is not p:
                continue
            self._stop_one(name, q, grace)
            f.close()
            self.procs.remove((name, q, f))

    @staticmethod
    def _stop_one(name: str, p: subprocess.Popen, grace: float) -> None:
        pgid = p.pid  # start_new_session: the child leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{name} did not stop within {grace}s after SIGTERM; SIGKILL")
        # Whatever is left in the group (workers, children), and the leader if still alive.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {p.pid}) still not reaped")

    def stop_all(self) -> None:
        for name, p, f in reversed(self.procs):
            try:
                self._stop_one(name, p, 5.0)
            finally:
                f.close()
        self.procs.clear()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def http_get(port: int, path: str, headers: dict | None = None, timeout: float = 30.0,
             method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def wait_ready(name: str, port: int, proc: subprocess.Popen, log_path: Path,
               timeout: float = 60.0, ready: tuple[int, ...] = (200,)) -> float:
    """Polls GET /v2/ until it answers one of `ready` (200; a node serving private repos answers
    401), the process dies, or the deadline passes."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with {proc.returncode} before it was ready; log:\n"
                             f"{tail(log_path)}")
        try:
            status, _, _ = http_get(port, "/v2/", timeout=2.0)
            if status in ready:
                return time.monotonic() - t0
            last = f"HTTP {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise BenchError(f"{name} not ready on 127.0.0.1:{port} after {timeout}s ({last}); log:\n"
                     f"{tail(log_path)}")


def render(template: str, dest: Path, **values: str) -> Path:
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    if "{{" in text:
        raise BenchError(f"unfilled placeholder in {template}: "
                         f"{re.findall(r'{{[A-Z_]+}}', text)}")
    dest.write_text(text)
    return dest


def clean_env() -> dict:
    # distribution reads REGISTRY_* overrides from the environment: none must leak in.
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


# --------------------------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------------------------

def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after the ")" of comm: state ppid pgrp ...
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) > 2 and int(rest[2]) == pgid:
            pids.append(int(entry))
    return pids


def proc_mem_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; (0, 0) when the process is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def proc_io_chars(pid: int) -> int:
    """rchar + wchar from /proc/<pid>/io (bytes moved by read/write calls, sockets included)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith(("rchar:", "wchar:")):
                total += int(line.split()[1])
    except OSError:
        pass
    return total


def proc_cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    rest = stat[stat.rfind(")") + 2:].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


class MemSampler:
    """Samples the summed VmRSS / VmHWM of a process group every `interval` seconds."""

    def __init__(self, pgid: int, interval: float = 0.02) -> None:
        self.pgid = pgid
        self.interval = interval
        self.pids = group_pids(pgid)
        self.peak_rss_kib = 0
        self.peak_hwm_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> tuple[int, int]:
        rss = hwm = 0
        for pid in self.pids:
            r, h = proc_mem_kib(pid)
            rss += r
            hwm += h
        return rss, hwm

    def _run(self) -> None:
        refresh = 0
        while not self._stop.is_set():
            refresh += 1
            if refresh % 25 == 0:  # pick up new workers now and then
                self.pids = group_pids(self.pgid) or self.pids
            rss, hwm = self.snapshot()
            self.peak_rss_kib = max(self.peak_rss_kib, rss)
            self.peak_hwm_kib = max(self.peak_hwm_kib, hwm)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss, hwm = self.snapshot()
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_hwm_kib = max(self.peak_hwm_kib, hwm)


# --------------------------------------------------------------------------------------------
# Upstream request log
# --------------------------------------------------------------------------------------------

class UpstreamLog:
    """Reads the upstream distribution registry's JSON request log from a byte offset."""

    def __init__(self, path: Path, proc: subprocess.Popen) -> None:
        self.path = path
        self.proc = proc
        self.relay: subprocess.Popen | None = None  # set when a throttling relay is in front

    def _activity(self) -> tuple[int, int, int]:
        relay_io = proc_io_chars(self.relay.pid) if self.relay is not None else 0
        return self.offset(), proc_cpu_ticks(self.proc.pid), relay_io

    def offset(self) -> int:
        return self.path.stat().st_size

    def wait_idle(self, quiet: float = 0.5, timeout: float = 120.0) -> None:
        """Waits until the upstream neither logs nor burns CPU for `quiet` seconds.

        A request's line is written when it completes, so a transfer still running shows only as
        CPU use of the upstream process, or (throttled, when the upstream mostly waits) as bytes
        moving through the relay."""
        deadline = time.monotonic() + timeout
        prev = self._activity()
        since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cur = self._activity()
            # a new line, > 10 ms of upstream CPU, or any byte through the relay
            if cur[0] != prev[0] or cur[1] - prev[1] > 1 or cur[2] != prev[2]:
                since = time.monotonic()
            prev = cur
            if time.monotonic() - since >= quiet:
                return
        log(f"warning: upstream log {self.path.name} still busy after {timeout}s")

    def usage(self, start: int, end: int | None = None, big_digest: str = "") -> dict:
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
        requests = 0
        body_bytes = 0
        by_kind: dict[str, dict] = {}
        big_gets = 0
        big_bytes = 0
        for raw in data.splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if "http.response.written" not in rec:
                continue
            method = rec.get("http.request.method", "?")
            uri = rec.get("http.request.uri", "")
            # distribution counts a HEAD's would-be body in "written", but sends none of it.
            written = 0 if method == "HEAD" else int(rec.get("http.response.written", 0))
            kind = ("blob" if "/blobs/" in uri else "manifest" if "/manifests/" in uri
                    else "other")
            key = f"{method} {kind}"
            k = by_kind.setdefault(key, {"requests": 0, "bytes": 0})
            k["requests"] += 1
            k["bytes"] += written
            requests += 1
            body_bytes += written
            if big_digest and uri.endswith(big_digest) and method == "GET":
                big_gets += 1
                big_bytes += written
        return {"requests": requests, "bytes": body_bytes, "by_kind": by_kind,
                "big_blob_gets": big_gets, "big_blob_bytes": big_bytes}


# --------------------------------------------------------------------------------------------
# The test image
# --------------------------------------------------------------------------------------------

def write_random_layer(blobs: Path, size: int) -> tuple[str, int]:
    """A tar layer holding one file of `size` random bytes; returns (digest, blob size)."""
    tmp = blobs / "layer.tmp"
    h = hashlib.sha256()
    ti = tarfile.TarInfo("data.bin")
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    with open(tmp, "wb") as f:
        def put(b: bytes) -> None:
            f.write(b)
            h.update(b)
        put(ti.tobuf(format=tarfile.USTAR_FORMAT))
        left = size
        while left:
            n = min(left, 4 * MiB)
            put(os.urandom(n))
            left -= n
        pad = (-size) % 512
        put(b"\0" * (pad + 1024))  # pad the member, then two zero blocks end the archive
    digest = "sha256:" + h.hexdigest()
    blob_size = tmp.stat().st_size
    tmp.rename(blobs / h.hexdigest())
    return digest, blob_size


def build_oci_layout(layout: Path, big_bytes: int, small_bytes: int) -> dict:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    small_digest, small_size = write_random_layer(blobs, small_bytes)
    big_digest, big_size = write_random_layer(blobs, big_bytes)

    def put_json(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj, separators=(",", ":")).encode()
        hexd = hashlib.sha256(data).hexdigest()
        (blobs / hexd).write_bytes(data)
        return "sha256:" + hexd, len(data)

    config_digest, config_size = put_json({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/data.bin"]},
        "rootfs": {"type": "layers", "diff_ids": [small_digest, big_digest]},
        "history": [{"created_by": "wharf bench (random bytes)"}] * 2,
    })
    layer_type = "application/vnd.oci.image.layer.v1.tar"
    manifest_digest, manifest_size = put_json({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [
            {"mediaType": layer_type, "digest": small_digest, "size": small_size},
            {"mediaType": layer_type, "digest": big_digest, "size": big_size},
        ],
    })
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                       "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": IMAGE_TAG}}],
    }))
    return {"manifest_digest": manifest_digest, "manifest_size": manifest_size,
            "small_digest": small_digest, "small_size": small_size,
            "big_digest": big_digest, "big_size": big_size}


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------

def herd(port: int, path: str, n: int, size: int, digest: str, hash_after: bool,
         timeout: float) -> dict:
    """n clients GET `path` at the same instant; returns timings and per-body verification."""
    barrier = threading.Barrier(n + 1)
    results: list[dict] = [{} for _ in range(n)]
    bufs: list[bytearray | None] = [None] * n
    chunk = 1 * MiB
    t_start = [0.0]

    def client(i: int) -> None:
        res = results[i]
        conn = None
        try:
            buf = bytearray(size + 1) if hash_after else bytearray(chunk)
            mv = memoryview(buf)
            h = hashlib.sha256()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            conn.connect()
            try:
                barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                res["error"] = "barrier broken"
                return
            conn.request("GET", path, headers={"Accept": "*/*"})
            r = conn.getresponse()
            res["status"] = r.status
            res["t_headers"] = time.perf_counter() - t_start[0]
            if r.status != 200:
                res["error"] = f"HTTP {r.status}: {r.read(500)!r}"
                return
            got = 0
            # readinto() on http.client fills the whole slice before it returns, so read in
            # slices: a small first one (time to first byte), then 1 MiB at a time.
            step = 64 * 1024
            while True:
                if hash_after:
                    if got > size:
                        break
                    k = r.readinto(mv[got:got + step])
                else:
                    k = r.readinto(mv[:step])
                step = chunk
                if not k:
                    break
                if got == 0:
                    res["t_first_byte"] = time.perf_counter() - t_start[0]
                if not hash_after:
                    h.update(mv[:k])
                got += k
            res["t_done"] = time.perf_counter() - t_start[0]
            res["bytes"] = got
            if hash_after:
                bufs[i] = buf
            else:
                res["sha256"] = "sha256:" + h.hexdigest()
        except Exception as e:  # noqa: BLE001 - recorded per client
            res["error"] = f"{type(e).__name__}: {e}"
            res["t_done"] = time.perf_counter() - t_start[0] if t_start[0] else None
            try:
                barrier.abort()
            except Exception:  # noqa: BLE001
                pass
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    t_start[0] = time.perf_counter()
    deadline = time.monotonic() + timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t_start[0]
    stuck = sum(1 for t in threads if t.is_alive())

    if hash_after:
        def digest_of(i: int) -> None:
            buf = bufs[i]
            if buf is not None:
                got = results[i]["bytes"]
                results[i]["sha256"] = "sha256:" + hashlib.sha256(memoryview(buf)[:got]).hexdigest()
                bufs[i] = None
        # hashlib releases the GIL on big buffers: hash on every CPU.
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            list(pool.map(digest_of, range(n)))
    ok = sum(1 for r in results
             if r.get("status") == 200 and r.get("bytes") == size and r.get("sha256") == digest
             and "error" not in r)
    done_times = [r["t_done"] for r in results if r.get("t_done") is not None]
    fb = sorted(r["t_first_byte"] for r in results if "t_first_byte" in r)
    errors = sorted({r.get("error") or
                     (f"wrong body: {r.get('bytes')} bytes, {r.get('sha256')}"
                      if r.get("sha256") != digest or r.get("bytes") != size else "")
                     for r in results} - {""})
    return {
        "clients": n,
        "ok": ok,
        "stuck": stuck,
        "wall_s": (max(done_times) if done_times and not stuck else wall),
        "first_byte_min_s": fb[0] if fb else None,
        "first_byte_median_s": fb[len(fb) // 2] if fb else None,
        "first_byte_max_s": fb[-1] if fb else None,
        "done_min_s": min(done_times) if done_times else None,
        "errors": errors[:5],
        "hashing": "after the transfer (bodies kept in memory)" if hash_after
                   else "inline while reading",
    }


WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKERR = re.compile(r"Socket errors:\s+connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(\w+),")


def run_wrk(port: int, path: str, duration: int, headers: list[str], threads: int = 2,
            conns: int = 16) -> dict:
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"http://127.0.0.1:{port}{path}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                       start_new_session=True)
    out = p.stdout + p.stderr
    m = WRK_RPS.search(out)
    if p.returncode != 0 or not m:
        raise BenchError(f"wrk failed ({p.returncode}):\n{out}")
    non2xx = int(WRK_NON2XX.search(out).group(1)) if WRK_NON2XX.search(out) else 0
    se = WRK_SOCKERR.search(out)
    sockerr = sum(int(x) for x in se.groups()) if se else 0
    tot = WRK_TOTAL.search(out)
    lat = {}
    for q in ("50%", "99%"):
        mm = re.search(rf"^\s+{re.escape(q)}\s+(\S+)", out, re.M)
        if mm:
            lat[q] = mm.group(1)
    return {"rps": float(m.group(1)), "non_2xx": non2xx, "socket_errors": sockerr,
            "errors": non2xx + sockerr,
            "requests": int(tot.group(1)) if tot else None, "latency": lat,
            "threads": threads, "connections": conns, "duration_s": duration}


def parallel_pull(port: int, path: str, clients: int, size: int, duration: float) -> dict:
    """`clients` curl loops pull the blob again and again until `duration` has passed."""
    stats = [{"bytes": 0, "pulls": 0, "errors": []} for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    t0 = [0.0]
    ends = [0.0] * clients

    def loop(i: int) -> None:
        barrier.wait()
        while True:
            p = subprocess.run(
                ["curl", "-sS", "-o", "/dev/null", "--max-time", "600",
                 "-w", "%{http_code} %{size_download}", f"http://127.0.0.1:{port}{path}"],
                capture_output=True, text=True)
            parts = p.stdout.split()
            if p.returncode != 0 or len(parts) != 2 or parts[0] != "200" or int(parts[1]) != size:
                stats[i]["errors"].append(f"curl rc={p.returncode} out={p.stdout!r} "
                                          f"err={p.stderr.strip()[:200]!r}")
                ends[i] = time.perf_counter()
                if len(stats[i]["errors"]) >= 3:
                    return
            else:
                stats[i]["bytes"] += size
                stats[i]["pulls"] += 1
                ends[i] = time.perf_counter()
            if ends[i] - t0[0] >= duration:
                return

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    wall = max(ends) - t0[0]
    total = sum(s["bytes"] for s in stats)
    errors = [e for s in stats for e in s["errors"]]
    return {"clients": clients, "pulls": sum(s["pulls"] for s in stats), "bytes": total,
            "wall_s": wall, "gb_per_s": total / wall / 1e9 if wall > 0 else 0.0,
            "errors": errors[:5]}


# --------------------------------------------------------------------------------------------
# Systems under test
# --------------------------------------------------------------------------------------------

class Context:
    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Procs, image: dict,
                 storage: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.procs = procs
        self.image = image
        self.storage = storage


def push_layout(layout: Path, port: int) -> None:
    """Pushes the OCI layout's image to the registry on `port` as IMAGE_NAME:IMAGE_TAG (skopeo)."""
    p = subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-tls-verify=false", "--preserve-digests",
                        f"oci:{layout}:{IMAGE_TAG}",
                        f"docker://127.0.0.1:{port}/{IMAGE_NAME}:{IMAGE_TAG}"],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise BenchError(f"skopeo copy failed: {p.stderr.strip()}")


@contextlib.contextmanager
def image_upstream(prefix: str, args: argparse.Namespace, big_bytes: int, small_bytes: int):
    """For the scripts beside this one: a temp dir, a local registry upstream holding the test image
    (a `big_bytes` and a `small_bytes` layer) and the Procs the caller starts its servers with; all
    stopped and removed afterwards. Yields (ctx, upstream port)."""
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        storage = tmp / "storage"
        storage.mkdir()
        image = build_oci_layout(tmp / "layout", big_bytes, small_bytes)
        ctx = Context(args, tmp, procs, image, storage)
        _, up_port, _ = start_upstream(ctx, "u")
        push_layout(tmp / "layout", up_port)
        yield ctx, up_port
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def warm_wharf_dir(ctx: Context, name: str, upstream_port: int) -> tuple[Path, Path, int, Path]:
    """For the warm-hit scripts: the directory of one Wharf, its config (the bench repo on the
    upstream, tags trusted for an hour), a free port and its log's path."""
    d = ctx.tmp / name
    d.mkdir()
    cfg = d / "wharf.toml"
    cfg.write_text(f'[[repo]]\nkey = "{WHARF_REPO_KEY}"\nupstream = "http://127.0.0.1:{upstream_port}"\n'
                   'kind = "generic"\ntag_ttl = "1h"\n')
    return d, cfg, free_port(), d / "wharf.log"


def start_upstream(ctx: Context, name: str) -> tuple[subprocess.Popen, int, UpstreamLog]:
    d = ctx.tmp / f"upstream-{name}"
    d.mkdir()
    port = free_port()
    cfg = render("upstream.yml", d / "config.yml", STORAGE=ctx.storage, PORT=port)
    log_path = d / "upstream.log"
    p = ctx.procs.start(f"upstream[{name}]", ["/usr/bin/docker-registry", "serve", str(cfg)],
                        log_path, env=clean_env(), cwd=d)
    wait_ready(f"upstream[{name}]", port, p, log_path)
    return p, port, UpstreamLog(log_path, p)


def start_relay(ctx: Context, name: str, upstream_port: int) -> tuple[subprocess.Popen, int]:
    """The throttling relay between a system and its upstream (--upstream-mbps)."""
    d = ctx.tmp / f"upstream-{name}"
    port = free_port()
    log_path = d / "relay.log"
    p = ctx.procs.start(f"relay[{name}]", [
        sys.executable, str(RELAY), "--listen", str(port), "--upstream", str(upstream_port),
        "--mbps", f"{ctx.args.upstream_mbps:g}"], log_path, cwd=d)
    # GET /v2/ through the relay: proves the whole path (it adds one "GET other" upstream line
    # before any measurement starts).
    wait_ready(f"relay[{name}]", port, p, log_path)
    return p, port


def start_wharf(ctx: Context, upstream_port: int) -> tuple[subprocess.Popen, int, Path, str]:
    d = ctx.tmp / "wharf"
    d.mkdir()
    port = free_port()
    cfg = render("wharf.toml", d / "wharf.toml", UPSTREAM_PORT=upstream_port)
    log_path = d / "wharf.log"
    binary = ctx.args.wharf_bin or REPO_ROOT / "target" / "release" / "wharf-proxy"
    p = ctx.procs.start("wharf-proxy", [
        str(binary), "--config", str(cfg), "--cache-dir", str(d / "cache"),
        "--listen", f"127.0.0.1:{port}", "--log-format", "json", "--log-level", "warn",
    ], log_path, cwd=d)
    wait_ready("wharf-proxy", port, p, log_path)
    return p, port, log_path, f"/v2/{WHARF_REPO_KEY}/{IMAGE_NAME}"


def start_distribution(ctx: Context, upstream_port: int) -> tuple[subprocess.Popen, int, Path, str]:
    d = ctx.tmp / "distribution"
    d.mkdir()
    port = free_port()
    cfg = render("distribution-proxy.yml", d / "config.yml", STORAGE=d / "storage", PORT=port,
                 UPSTREAM_PORT=upstream_port)
    log_path = d / "registry.log"
    p = ctx.procs.start("distribution-proxy", ["/usr/bin/docker-registry", "serve", str(cfg)],
                        log_path, env=clean_env(), cwd=d)
    wait_ready("distribution-proxy", port, p, log_path)
    return p, port, log_path, f"/v2/{IMAGE_NAME}"


def start_nginx(ctx: Context, upstream_port: int) -> tuple[subprocess.Popen, int, Path, str]:
    d = ctx.tmp / "nginx"
    d.mkdir()
    for sub in ("cache", "client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp",
                "scgi_temp"):
        (d / sub).mkdir()
    port = free_port()
    user_line = ""
    if os.geteuid() == 0:
        # Workers would otherwise drop to "nobody" and could not write into our 0700 temp dir.
        user_line = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                     f"{grp.getgrgid(os.getegid()).gr_name};")
    cfg = render("nginx.conf", d / "nginx.conf", PREFIX=d, PORT=port,
                 UPSTREAM_PORT=upstream_port, USER_LINE=user_line,
                 MANIFEST_VALID=NGINX_MANIFEST_VALID)
    log_path = d / "nginx.out"
    p = ctx.procs.start("nginx", ["/usr/sbin/nginx", "-c", str(cfg), "-p", str(d)], log_path,
                        cwd=d)
    wait_ready("nginx", port, p, log_path)
    return p, port, d / "error.log", f"/v2/{IMAGE_NAME}"


STARTERS = {"wharf": start_wharf, "distribution": start_distribution, "nginx": start_nginx}


def check_manifest(port: int, base: str, image: dict) -> None:
    status, headers, body = http_get(port, f"{base}/manifests/{IMAGE_TAG}",
                                     headers={"Accept": MANIFEST_ACCEPT})
    if status != 200:
        raise BenchError(f"manifest GET {base}/manifests/{IMAGE_TAG}: HTTP {status} {body[:300]!r}")
    got = "sha256:" + hashlib.sha256(body).hexdigest()
    if got != image["manifest_digest"]:
        raise BenchError(f"manifest body digest {got} != {image['manifest_digest']}")


def check_blob(port: int, base: str, digest: str, size: int) -> None:
    status, _, body = http_get(port, f"{base}/blobs/{digest}", timeout=120)
    if status != 200 or len(body) != size or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        raise BenchError(f"blob GET {digest}: HTTP {status}, {len(body)} bytes, wrong content?")


def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent not idle since boot (from /proc/stat)."""
    vals = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_system(ctx: Context, name: str) -> dict:
    args = ctx.args
    image = ctx.image
    res: dict = {"system": LABELS[name], "loadavg_before": Path("/proc/loadavg").read_text().split()[0]}
    # Other processes' CPU use during this system's run, to flag a busy machine: all CPU time
    # spent minus this script's, its reaped children's (wrk, curl) and the servers'.
    t_phase0, busy0, own0 = time.monotonic(), machine_busy_s(), own_cpu_s()
    up_proc, up_port, up_log = start_upstream(ctx, name)
    relay_proc = None
    try:
        target_port = up_port
        if args.upstream_mbps > 0:
            relay_proc, target_port = start_relay(ctx, name, up_port)
            up_log.relay = relay_proc
            res["upstream_mbps"] = args.upstream_mbps
        proc, port, log_path, base = STARTERS[name](ctx, target_port)
    except BaseException:
        if relay_proc is not None:
            ctx.procs.stop(relay_proc)
        ctx.procs.stop(up_proc)
        raise
    res["log"] = str(log_path)
    try:
        # A real pull reads the manifest first; doing so also lets a cache learn which blobs the
        # repository holds. Not part of any measurement.
        check_manifest(port, base, image)
        up_log.wait_idle()

        # ---- herd ------------------------------------------------------------------------
        size = image["big_size"]
        need = args.clients * (size + 1)
        avail = mem_available()
        hash_after = args.hash == "after" or (args.hash == "auto" and need < avail * 0.5)
        log(f"{name}: herd of {args.clients} on the cold {size / MiB:.0f} MiB blob")
        off = up_log.offset()
        sampler = MemSampler(proc.pid)
        rss_before_kib, _ = sampler.snapshot()
        cpu0 = sum(proc_cpu_ticks(pid) for pid in sampler.pids)
        up_cpu0 = proc_cpu_ticks(up_proc.pid)
        relay_cpu0 = proc_cpu_ticks(relay_proc.pid) if relay_proc else 0
        me0 = os.times()
        with sampler:
            h = herd(port, f"{base}/blobs/{image['big_digest']}", args.clients, size,
                     image["big_digest"], hash_after, timeout=args.client_timeout)
        me1 = os.times()
        cpu1 = sum(proc_cpu_ticks(pid) for pid in sampler.pids)
        tick = os.sysconf("SC_CLK_TCK")
        h["cpu_s"] = (cpu1 - cpu0) / tick
        h["upstream_cpu_s"] = (proc_cpu_ticks(up_proc.pid) - up_cpu0) / tick
        if relay_proc is not None:
            h["relay_cpu_s"] = (proc_cpu_ticks(relay_proc.pid) - relay_cpu0) / tick
        # the clients' CPU, hashing after the transfer included
        h["client_cpu_s"] = (me1.user + me1.system) - (me0.user + me0.system)
        up_log.wait_idle()
        usage = up_log.usage(off, big_digest=image["big_digest"])
        h["upstream"] = usage
        h["upstream_bytes_over_size"] = usage["bytes"] / size
        h["rss_before_mib"] = rss_before_kib / 1024
        h["rss_peak_mib"] = sampler.peak_rss_kib / 1024
        h["vmhwm_mib"] = sampler.peak_hwm_kib / 1024
        h["processes_sampled"] = len(sampler.pids)
        h["rss_samples"] = sampler.samples
        res["herd"] = h
        log(f"{name}: herd {h['ok']}/{h['clients']} ok, wall {h['wall_s']:.2f}s, upstream "
            f"{usage['bytes'] / size:.2f}x blob ({usage['big_blob_gets']} blob GETs), "
            f"peak RSS {h['rss_peak_mib']:.1f} MiB")

        # ---- warm: manifest by tag -------------------------------------------------------
        check_manifest(port, base, image)
        up_log.wait_idle()
        off = up_log.offset()
        log(f"{name}: warm manifest-by-tag GETs/s (wrk, {args.duration}s)")
        w = run_wrk(port, f"{base}/manifests/{IMAGE_TAG}", args.duration,
                    [f"Accept: {MANIFEST_ACCEPT}"])
        up_log.wait_idle()
        w["upstream"] = up_log.usage(off)
        res["manifest"] = w

        # ---- warm: 1 MiB blob ------------------------------------------------------------
        check_blob(port, base, image["small_digest"], image["small_size"])
        up_log.wait_idle()
        off = up_log.offset()
        log(f"{name}: warm 1 MiB blob GETs/s (wrk, {args.duration}s)")
        w = run_wrk(port, f"{base}/blobs/{image['small_digest']}", args.duration, [])
        up_log.wait_idle()
        w["upstream"] = up_log.usage(off)
        res["small_blob"] = w

        # ---- warm: P x big blob ----------------------------------------------------------
        off = up_log.offset()
        log(f"{name}: warm {args.parallel} x {size / MiB:.0f} MiB blob (curl, {args.duration}s)")
        pp = parallel_pull(port, f"{base}/blobs/{image['big_digest']}", args.parallel, size,
                           args.duration)
        up_log.wait_idle()
        pp["upstream"] = up_log.usage(off)
        res["big_blob"] = pp
        _, hwm_end = sampler.snapshot()
        res["vmhwm_end_mib"] = hwm_end / 1024
    finally:
        tick = os.sysconf("SC_CLK_TCK")
        servers = (sum(proc_cpu_ticks(pid) for pid in group_pids(proc.pid))
                   + proc_cpu_ticks(up_proc.pid)
                   + (proc_cpu_ticks(relay_proc.pid) if relay_proc else 0)) / tick
        wall = time.monotonic() - t_phase0
        foreign = (machine_busy_s() - busy0) - (own_cpu_s() - own0) - servers
        res["other_cpu_pct"] = max(0.0, 100.0 * foreign / (wall * (os.cpu_count() or 1)))
        ctx.procs.stop(proc)
        if relay_proc is not None:
            ctx.procs.stop(relay_proc)
        ctx.procs.stop(up_proc)
    if proc.returncode not in (0, -signal.SIGTERM, None):
        res["exit_code"] = proc.returncode
    res["log_problems"] = log_problems(log_path)
    return res


def log_problems(path: Path) -> dict:
    """Counts the warn/error lines (and panics) in a system's own log; keeps the first few."""
    count = 0
    first: list[str] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"count": 0, "first": []}
    for line in lines:
        low = line.lower()
        if "rempositoryremover" in low:  # distribution's proxy mode always says this at start
            continue
        if ("panicked" in low or '"level":"warn' in low or '"level":"error' in low
                or "[warn]" in low or "[error]" in low or "[crit]" in low or "[emerg]" in low
                or " warn " in low or " error " in low):
            count += 1
            if len(first) < 3:
                first.append(line[:300])
    return {"count": count, "first": first}


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def get(results: dict, sysname: str, *keys):
    v = results.get(sysname)
    if not isinstance(v, dict) or "error" in v:
        return None
    for k in keys:
        if not isinstance(v, dict) or k not in v:
            return None
        v = v[k]
    return v


def fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def print_table(title: str, rows: list[tuple], results: dict) -> list[str]:
    header = ("", "wharf", "distribution", "nginx", "wharf/dist", "wharf/nginx", "goal (issue 2)",
              "met")
    lines = [title]
    table = [header]
    for label, path, spec, goal, met in rows:
        vals = [get(results, s, *path) for s in SYSTEMS]
        m = met(vals) if met and vals[0] is not None else None
        no_ratio = label.startswith("other processes")
        table.append((label, *(fmt(v, spec) for v in vals),
                      "-" if no_ratio else ratio(vals[0], vals[1]),
                      "-" if no_ratio else ratio(vals[0], vals[2]), goal,
                      "-" if m is None else ("yes" if m else "NO")))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for j, r in enumerate(table):
        lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 or i >= 6 else c.rjust(widths[i])
                                      for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines


def report(results: dict, args: argparse.Namespace, image: dict) -> str:
    size_mib = image["big_size"] / MiB
    out: list[str] = []
    out.append("")
    throttle = (f", upstream -> system throttled to {args.upstream_mbps:g} MB/s (shared)"
                if args.upstream_mbps > 0 else "")
    out.append(f"Wharf benchmark — {args.clients}-client herd on a cold {size_mib:.0f} MiB blob, "
               f"warm runs of {args.duration}s; all on 127.0.0.1, {os.cpu_count()} CPUs{throttle}")
    out.append("ratios are wharf's figure divided by the other's (>1 = wharf higher)")
    out.append("")

    def herd_ok(r):
        return f"{r['ok']}/{r['clients']}"

    herd_rows = [
        ("upstream bytes / blob size", ("herd", "upstream_bytes_over_size"), ".2f", "1.00",
         lambda v: v[0] <= 1.01),
        ("upstream blob GETs", ("herd", "upstream", "big_blob_gets"), "d", "1", lambda v: v[0] == 1),
        ("wall time, all done (s)", ("herd", "wall_s"), ".2f", "well under nginx (<=0.8x)",
         lambda v: None if v[2] is None else v[0] <= 0.8 * v[2]),
        ("first byte, min (s)", ("herd", "first_byte_min_s"), ".3f", "", None),
        ("first byte, median (s)", ("herd", "first_byte_median_s"), ".3f", "", None),
        ("first byte, max (s)", ("herd", "first_byte_max_s"), ".3f", "", None),
        ("bodies with right sha256", ("herd", "ok"), "d", f"all {args.clients}",
         lambda v: v[0] == args.clients),
        ("CPU used during herd (s)", ("herd", "cpu_s"), ".2f", "", None),
        ("RSS before herd (MiB)", ("herd", "rss_before_mib"), ".1f", "", None),
        ("peak RSS during herd (MiB)", ("herd", "rss_peak_mib"), ".1f", "flat, < 64 MiB",
         lambda v: v[0] < 64),
        ("VmHWM after herd (MiB)", ("herd", "vmhwm_mib"), ".1f", "< 64 MiB", lambda v: v[0] < 64),
    ]
    herd_title = f"HERD: {args.clients} concurrent clients, cold {size_mib:.0f} MiB blob"
    if args.upstream_mbps > 0:
        herd_title += f", upstream throttled to {args.upstream_mbps:g} MB/s"
    out += print_table(herd_title, herd_rows, results)
    out.append("")
    warm_rows = [
        ("manifest by tag (GETs/s)", ("manifest", "rps"), ".0f", ">= 10x distribution",
         lambda v: None if v[1] is None else v[0] >= 10 * v[1]),
        ("  upstream requests meanwhile", ("manifest", "upstream", "requests"), "d", "", None),
        ("  non-2xx + socket errors", ("manifest", "errors"), "d", "0", lambda v: v[0] == 0),
        ("1 MiB blob (GETs/s)", ("small_blob", "rps"), ".0f", ">= nginx",
         lambda v: None if v[2] is None else v[0] >= v[2]),
        ("  upstream requests meanwhile", ("small_blob", "upstream", "requests"), "d", "", None),
        ("  non-2xx + socket errors", ("small_blob", "errors"), "d", "0", lambda v: v[0] == 0),
        (f"{args.parallel} x {size_mib:.0f} MiB blob (GB/s)", ("big_blob", "gb_per_s"), ".2f",
         ">= nginx", lambda v: None if v[2] is None else v[0] >= v[2]),
        ("  pulls completed", ("big_blob", "pulls"), "d", "", None),
        ("  upstream requests meanwhile", ("big_blob", "upstream", "requests"), "d", "", None),
        ("other processes' CPU (% of machine)", ("other_cpu_pct",), ".1f", "~0 (idle machine)",
         None),
    ]
    out += print_table(f"WARM: wrk -t2 -c16 -d{args.duration}s; {args.parallel} curl loops",
                       warm_rows, results)
    for s in SYSTEMS:
        r = results.get(s)
        if isinstance(r, dict) and "error" in r:
            out.append(f"{LABELS[s]}: ERROR " + " | ".join(
                line.strip() for line in r["error"].splitlines() if line.strip())[:600])
        elif isinstance(r, dict):
            for part in ("herd", "big_blob"):
                errs = (r.get(part) or {}).get("errors")
                if errs:
                    out.append(f"{LABELS[s]} {part} errors: {errs}")
            lp = r.get("log_problems") or {}
            if lp.get("count"):
                out.append(f"{LABELS[s]} log: {lp['count']} warn/error lines, e.g. {lp['first'][0]}")
            for part in ("manifest", "small_blob"):
                se = (r.get(part) or {}).get("socket_errors")
                if se:
                    out.append(f"{LABELS[s]} {part}: {se} wrk socket errors")
    busy = [LABELS[x] for x in SYSTEMS if (get(results, x, "other_cpu_pct") or 0) > 5]
    if busy:
        out.append(f"WARNING: other processes used > 5% of the CPUs during the run of "
                   f"{', '.join(busy)}: these figures are disturbed; rerun on an idle machine.")
    out.append("")
    out.append("upstream bytes = sum of http.response.written in the upstream registry's request log "
               "(one upstream instance per system).")
    out.append("RSS = sum over the system's process group (nginx: master + workers), sampled "
               "every 20 ms; VmHWM = kernel's peak since start.")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def build_wharf() -> None:
    log("cargo build --release --bin wharf-proxy (a no-op when up to date)")
    p = subprocess.run(["cargo", "build", "--release", "--bin", "wharf-proxy"], cwd=REPO_ROOT)
    if p.returncode != 0:
        raise BenchError(f"cargo build --release --bin wharf-proxy failed ({p.returncode})")
    if not (REPO_ROOT / "target" / "release" / "wharf-proxy").exists():
        raise BenchError("target/release/wharf-proxy missing after the build")


def tool_versions() -> dict:
    def first_line(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except Exception as e:  # noqa: BLE001
            return f"unavailable: {e}"
    return {
        "docker-registry": first_line(["/usr/bin/docker-registry", "--version"]),
        "nginx": first_line(["/usr/sbin/nginx", "-v"]),
        "skopeo": first_line(["skopeo", "--version"]),
        "wrk": first_line(["wrk", "-v"]),
        "curl": first_line(["curl", "--version"]),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-mb", type=int, default=200, help="size of the big layer in MiB (200)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per warm measurement (5)")
    ap.add_argument("--only", default=",".join(SYSTEMS),
                    help="comma-separated subset of wharf,distribution,nginx (all)")
    ap.add_argument("--clients", type=int, default=20, help="herd size (20)")
    ap.add_argument("--parallel", type=int, default=4, help="parallel big-blob pullers (4)")
    ap.add_argument("--hash", choices=("auto", "after", "inline"), default="auto",
                    help="herd: hash bodies after the transfer from memory (keeps client CPU out "
                         "of the timing; needs clients x size of RAM) or inline; auto picks "
                         "'after' when it fits in half the available memory")
    ap.add_argument("--client-timeout", type=float, default=300.0,
                    help="socket timeout of each herd client, seconds (300)")
    ap.add_argument("--upstream-mbps", type=float, default=0.0, metavar="N",
                    help="put a throttling TCP relay between each system and its upstream that "
                         "limits upstream -> system to N MB/s (10^6 bytes/s), shared by all of "
                         "that system's upstream connections; 0 = direct, unthrottled (0)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--wharf-bin", type=Path, default=None, metavar="PATH",
                    help="run this wharf-proxy binary instead of target/release's (implies --no-build)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, caches)")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "out",
                    help="where the JSON result goes (bench/out)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SYSTEMS]
    if bad or not only:
        ap.error(f"--only takes a subset of {','.join(SYSTEMS)}; got {args.only!r}")
    args.systems = [s for s in SYSTEMS if s in only]
    if args.big_mb < 2 or args.duration < 1 or args.clients < 1 or args.parallel < 1:
        ap.error("--big-mb >= 2, --duration >= 1, --clients >= 1, --parallel >= 1")
    if args.upstream_mbps < 0:
        ap.error("--upstream-mbps >= 0 (0 = unthrottled)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("/usr/bin/docker-registry", "skopeo", "wrk", "curl") + (
            ("/usr/sbin/nginx",) if "nginx" in args.systems else ()):
        if not shutil.which(tool):
            print(f"bench: {tool} not found; `make bench` installs it (scripts/ensure-deps.sh)",
                  file=sys.stderr)
            return 2

    # SIGTERM/SIGHUP become an exception, so the finally below stops everything.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    results: dict = {}
    if "wharf" in args.systems and not args.no_build and args.wharf_bin is None:
        try:
            build_wharf()
        except BenchError as e:
            results["wharf"] = {"error": str(e)}

    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="wharf-bench-"))
    log(f"temp dir {tmp}")
    started = dt.datetime.now(dt.timezone.utc)
    image: dict = {}
    try:
        # ---- the upstream's content ------------------------------------------------------
        storage = tmp / "upstream-storage"
        storage.mkdir()
        layout = tmp / "oci-layout"
        log(f"building an OCI layout: 1 MiB + {args.big_mb} MiB random layers")
        image = build_oci_layout(layout, args.big_mb * MiB, 1 * MiB)
        seed_proc, seed_port, _ = start_upstream(
            Context(args, tmp, procs, image, storage), "seed")
        log("pushing with skopeo")
        push_layout(layout, seed_port)
        check_manifest(seed_port, f"/v2/{IMAGE_NAME}", image)
        procs.stop(seed_proc)
        shutil.rmtree(layout)
        ctx = Context(args, tmp, procs, image, storage)
        log(f"image {IMAGE_NAME}:{IMAGE_TAG} = {image['manifest_digest']}, big layer "
            f"{image['big_digest']} ({image['big_size']} bytes)")

        for name in args.systems:
            if name in results:
                continue
            try:
                results[name] = bench_system(ctx, name)
            except (BenchError, OSError, subprocess.SubprocessError) as e:
                log(f"{name}: FAILED: {e}")
                results[name] = {"system": LABELS[name], "error": str(e)}
            finally:
                for sub in ("wharf/cache", "distribution/storage", "nginx/cache"):
                    shutil.rmtree(tmp / sub, ignore_errors=True)
    finally:
        procs.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    text = report(results, args, image)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "started": started.isoformat(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "image": image,
        "tools": tool_versions(),
        "nginx_manifest_cache_validity": NGINX_MANIFEST_VALID,
        "results": results,
        "table": text,
    }
    path = args.out / f"bench-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    shutil.copyfile(path, args.out / "latest.json")
    print(f"\nresults: {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    failed = [s for s in args.systems if "error" in results.get(s, {"error": 1})]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench: interrupted ({e})", file=sys.stderr)
        sys.exit(130)
