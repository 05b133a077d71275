"""Latency of a normal `nitrofusion app` request, alone and while N API clients load the server.

    python scripts/app_load.py --model RUN --clients 20 --requests 20 --out app_load.json [-- APP ARGS]

Trains nothing: RUN is an existing model (e.g. `nitrofusion distill --preset tiny --out /tmp/apprun`). Serves it with
`nitrofusion app --model RUN` in its own process on a free port (arguments after `--` go to that command, e.g.
`-- --device cuda --dtype fp16`), then times a probe client's normal requests (the prompt, 1 step, a new seed each;
from the call to the downloaded image, through gradio_client on /generate):
1. unloaded: the probe alone, after --warmup untimed requests;
2. loaded: --clients more clients each keep one request in flight (the same prompt, other seeds) from before the
   probe's first timed request until its last.
Prints median and p90 of both, with the server's own drawing time and the throughput under load, and writes them as
JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from itertools import count
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from the clients or the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, port: int, app_args: list[str], log: Path, timeout: float) -> subprocess.Popen:
    """`nitrofusion app` in its own process (its own interpreter, as served), once its page answers."""
    cmd = [sys.executable, "-m", "nitrofusion", "app", "--model", model, "--port", str(port), *app_args]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            last = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
            sys.exit(f"app_load: the app stopped before serving: {last}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit(f"app_load: the app did not serve within {timeout:.0f} s; its log: {log}")


def draw_ms(info: str) -> float:
    """The server's own time for the image, from its latency line ("...: 1 step(s), seed 3, 41 ms")."""
    return float(re.search(r"(\d+) ms$", info).group(1))


def summary(latencies: list[float], draws: list[float]) -> dict:
    deciles = statistics.quantiles(latencies, n=10, method="inclusive")
    return {"requests": len(latencies), "median_ms": round(1000 * statistics.median(latencies), 1),
            "p90_ms": round(1000 * deciles[-1], 1), "draw_median_ms": round(statistics.median(draws), 1)}


def probe(client, prompt: str, n: int, seeds: count) -> dict:
    """n normal requests one after another: end-to-end seconds and the server's drawing ms of each."""
    latencies, draws = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        _, info = client.predict(prompt, 1, next(seeds), api_name="/generate")
        latencies.append(time.perf_counter() - t0)
        draws.append(draw_ms(info))
    return summary(latencies, draws)


class Load:
    """N clients, each with one request in flight until stopped; counts images and refusals (queue full, ...)."""

    def __init__(self, url: str, clients: int, prompt: str, seeds: count) -> None:
        self.url, self.prompt, self.seeds = url, prompt, seeds
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.images, self.errors = 0, []
        # every client has had one answer: the queue is loaded when the probe starts
        self.first = threading.Barrier(clients + 1, timeout=600)
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        from gradio_client import Client

        try:
            client = Client(self.url, verbose=False)
            self.request(client)
        finally:
            self.first.wait()
        while not self.stop.is_set():
            self.request(client)

    def request(self, client) -> None:
        try:
            client.predict(self.prompt, 1, next(self.seeds), api_name="/generate")
            with self.lock:
                self.images += 1
        except Exception as e:  # a refusal (queue full, ...) is part of the result, not a crash of the load
            with self.lock:
                self.errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        self.first.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


def measure(url: str, args: argparse.Namespace) -> dict:
    from gradio_client import Client

    seeds, client = count(), Client(url, verbose=False)
    probe(client, args.prompt, args.warmup, seeds)  # compile / caches / first-call costs, not timed
    unloaded = probe(client, args.prompt, args.requests, seeds)
    with Load(url, args.clients, args.prompt, seeds) as load:
        t0, images0 = time.perf_counter(), load.images
        loaded = probe(client, args.prompt, args.requests, seeds)
        seconds, images = time.perf_counter() - t0, load.images - images0 + args.requests
    errors = sorted(set(load.errors))
    return {"unloaded": unloaded, "loaded": loaded,
            "load": {"clients": args.clients, "images_per_s": round(images / seconds, 2),
                     "refused": len(load.errors), "refusals": errors[:5]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a run folder or anything `nitrofusion app --model` takes")
    p.add_argument("--clients", type=int, default=20, help="clients loading the server (default 20)")
    p.add_argument("--requests", type=int, default=20, help="timed probe requests, unloaded and loaded (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed probe requests first (default 3)")
    p.add_argument("--prompt", default="a photo of a sneaker")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the app to load and serve")
    p.add_argument("--out", help="write the results here as JSON")
    args, app_args = p.parse_known_args()
    app_args = [a for a in app_args if a != "--"]
    if args.clients < 1 or args.requests < 2 or args.warmup < 0:
        p.error("--clients must be >= 1, --requests >= 2 (for a p90) and --warmup >= 0")
    port, busy = free_port(), os.getloadavg()[0]  # other work on the machine changes every number here
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(args.model, port, app_args, Path(tmp) / "app.log", args.start_timeout)
        try:
            result = measure(f"http://127.0.0.1:{port}/", args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {"command": " ".join(["python", *sys.argv]), "model": args.model, "app_args": app_args,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
              "load_average_before": round(busy, 2), **result}
    for name in ("unloaded", "loaded"):
        r = result[name]
        print(f"{name:>8}: median {r['median_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms per request "
              f"({r['requests']} requests; the server drew each in {r['draw_median_ms']:.0f} ms, median)")
    load = result["load"]
    print(f"    load: {load['clients']} clients, {load['images_per_s']:.1f} images/s served, {load['refused']} refused"
          + (f" ({'; '.join(load['refusals'])})" if load["refusals"] else ""))
    print(f"machine: {result['machine']}, load average {busy:.1f} before the run")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
