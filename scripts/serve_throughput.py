"""Calls per second through `divla-eval serve` with 1, 2, 4 ... concurrent clients, batching off and on.

    .venv/bin/python scripts/serve_throughput.py --policy diffusion_policy \
        --checkpoint checkpoints/diffusion_policy-multitask --clients 1 2 4 --calls 40 \
        [--batching 1 4] [--max-wait-ms 5] [--threads 1] [--out results/bench/serve_throughput.md]

For each batching setting a fresh server is started on a free loopback port (a subprocess, as a user
runs it); each client is a process of its own holding one connection (one session, as one evaluation
worker would), which sends `--calls` observations of the policy's cameras at its image size, after two
untimed warm-up calls. calls/s is all clients' calls over the wall time from the first timed call to
the last reply. The table is written with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

COLUMNS = ("max_batch", "clients", "calls_per_s", "p50_ms", "wire_p50_ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str, calls: int, seed: int, start, results) -> None:
    from divla_eval.policy import Observation
    from divla_eval.remote.client import RemotePolicy

    policy = RemotePolicy(url)
    size = int(policy.server.get("image_size") or 84)
    rng = np.random.default_rng(seed)
    images = {c: rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for c in policy.metadata.cameras}
    obs = Observation(images, rng.normal(size=11), "pick up the red cube", "panda")
    policy.reset(obs.instruction, seed)
    for _ in range(2):
        policy.infer(obs)
    start.wait()
    t0 = time.perf_counter()
    latency, overhead = [], []
    for _ in range(calls):
        t = time.perf_counter()
        policy.infer(obs)
        ms = (time.perf_counter() - t) * 1000
        latency.append(ms)
        overhead.append(ms - policy.last_server_timing.get("infer_ms", 0.0))
    results.put((t0, time.perf_counter(), latency, overhead))
    policy.close()


def measure(url: str, clients: int, calls: int) -> dict:
    ctx = mp.get_context("spawn")
    start, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=_client, args=(url, calls, i, start, results)) for i in range(clients)]
    for p in procs:
        p.start()
    start.wait()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    wall = max(s[1] for s in spans) - min(s[0] for s in spans)
    latency = np.concatenate([s[2] for s in spans])
    overhead = np.concatenate([s[3] for s in spans])
    return {
        "calls_per_s": round(clients * calls / wall, 1),
        "p50_ms": round(float(np.median(latency)), 1),
        "wire_p50_ms": round(float(np.median(overhead)), 2),
    }


def serve(args, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "divla_eval.cli", "serve", "--policy", args.policy, "--port", str(port)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    cmd += [
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc, f"ws://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batching", type=int, nargs="+", default=[1, 4], help="--max-batch values to compare")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (appended to when it exists)")
    args = ap.parse_args()
    rows = []
    for max_batch in args.batching:
        proc, url = serve(args, max_batch)
        try:
            for n in args.clients:
                rows.append({"max_batch": max_batch, "clients": n, **measure(url, n, args.calls)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(10)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()[0]
        command = "python scripts/serve_throughput.py " + shlex.join(sys.argv[1:])
        lines = [
            f"# Calls per second through `divla-eval serve`: {args.policy}",
            "",
            f"Made by `{command}` on {os.cpu_count()} CPU cores (load average {load:.2f} at the end; the "
            f"server has {args.threads} torch thread(s); clients share the same cores). "
            f"max_batch 1 is batching off; otherwise up to max_batch requests waiting at most "
            f"{args.max_wait_ms:g} ms are stacked into one forward pass.",
            "",
            "p50 ms: a call as the client sees it; wire p50 ms: that minus the server's own `infer_ms` "
            "(serialisation, loopback, queueing and the batch wait).",
            "",
            "| max_batch | clients | calls/s | p50 ms | wire p50 ms |",
            "|---:|---:|---:|---:|---:|",
            *["| " + " | ".join(str(r[k]) for k in COLUMNS) + " |" for r in rows],
            "",
        ]
        previous = args.out.read_text() + "\n" if args.out.is_file() else ""
        args.out.write_text(previous + "\n".join(lines))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
