"""Load test of `vitlab serve` on loopback: N concurrent clients send a fixed number of prediction requests, once
with micro-batching and once without (``--max-batch 1``), each against a fresh server process.

Reported per setting: requests answered by status class (the pass condition is zero 5xx), p50 / p99 latency,
throughput (requests/s over the whole run), the mean batch the model saw (from /v1/model), and the server's
resident memory (VmRSS) before the load and after it. The traffic is bounded by the request count and a time
limit, and goes only to 127.0.0.1.

    python benchmarks/serve_load.py --checkpoint runs/.../checkpoints/best     # 32 clients, 2000 requests
    python benchmarks/serve_load.py --model vit_small_patch16_224             # random weights, a 224 model
    python benchmarks/serve_load.py --quick                                   # a tiny model, 8 clients, 80 requests

``--bad-fraction 0.1`` makes every tenth request a bad upload (not an image, truncated, a decompression bomb), to
show those are 4xx and do not slow down or grow the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_checkpoint(model_name: str, folder: Path, tiny: bool) -> Path:
    import vitlab

    overrides = {"depth": 2, "embed_dim": 32, "num_heads": 2} if tiny else {}
    model = vitlab.create_model(model_name, num_classes=10, **overrides)
    return vitlab.save_pretrained(model, folder / model_name, class_names=[f"class {i}" for i in range(10)])


def payloads(input_size: list[int], count: int, bad_fraction: float) -> list[bytes]:
    """Good PNGs at the model's size (a few different ones), and bad uploads mixed in at ``bad_fraction``."""
    import numpy as np

    rng = np.random.default_rng(0)
    c, h, w = input_size
    good = []
    for _ in range(8):
        pixels = rng.integers(0, 256, (h, w, 3) if c == 3 else (h, w), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        good.append(buf.getvalue())
    bomb = bytearray(good[0])  # the same PNG, its header now declaring 60000 x 60000 pixels
    ihdr = bytearray(bomb[12:29])
    ihdr[4:12] = struct.pack(">II", 60_000, 60_000)
    bomb[12:29] = ihdr
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    bad = [b"not an image at all", good[0][: len(good[0]) // 2], bytes(bomb)]
    every = round(1 / bad_fraction) if bad_fraction > 0 else 0
    return [bad[i % len(bad)] if every and i % every == every - 1 else good[i % len(good)] for i in range(count)]


async def load(url: str, bodies: list[bytes], clients: int, time_limit: float) -> tuple[list[float], list[int], float]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    latencies, statuses = [], []
    deadline = time.monotonic() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            body = queue.get_nowait()
            t = time.perf_counter()
            try:
                r = await http.post(url + "/v1/predict", files={"file": ("x.png", body, "image/png")})
                statuses.append(r.status_code)
            except httpx.HTTPError:
                statuses.append(0)  # no answer at all: counted with the failures
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return latencies, statuses, wall


def run_setting(checkpoint: Path, args: argparse.Namespace, max_batch: int) -> dict:
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "vitlab", "serve", str(checkpoint), "--host", HOST, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--runtime", args.runtime]
    env = {k: v for k, v in os.environ.items() if k != "VITLAB_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.3)
        info = httpx.get(url + "/v1/model").json()
        bodies = payloads(info["input_size"], args.requests, args.bad_fraction)
        asyncio.run(load(url, bodies[: min(len(bodies), 2 * args.clients)], args.clients, 60))  # warm-up
        calls0 = httpx.get(url + "/v1/model").json()["batching"]
        rss_before = rss_mib(proc.pid)
        latencies, statuses, wall = asyncio.run(load(url, bodies, args.clients, args.time_limit))
        rss_after = rss_mib(proc.pid)
        calls1 = httpx.get(url + "/v1/model").json()["batching"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    model_calls = calls1["calls"] - calls0["calls"]
    lat_ms = sorted(1000 * t for t in latencies)
    return {
        "max_batch": max_batch,
        "requests": len(statuses),
        "2xx": sum(200 <= s < 300 for s in statuses),
        "4xx": sum(400 <= s < 500 for s in statuses),
        "5xx": sum(s >= 500 for s in statuses),
        "no_answer": sum(s == 0 for s in statuses),
        "p50_ms": statistics.median(lat_ms),
        "p99_ms": lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))],
        "requests_per_s": len(statuses) / wall,
        "mean_batch": (calls1["inputs"] - calls0["inputs"]) / max(model_calls, 1),
        "rss_before_mib": rss_before,
        "rss_after_mib": rss_after,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a vitlab checkpoint (default: --model with random weights)")
    p.add_argument("--model", default="vit_tiny_patch4_28", help="registered model for a random-weight checkpoint")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--max-batch", type=int, default=16, help="the micro-batching setting (compared with 1)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--bad-fraction", type=float, default=0.0)
    p.add_argument("--time-limit", type=float, default=600, help="stop sending after this many seconds")
    p.add_argument("--quick", action="store_true", help="a tiny model, 8 clients, 80 requests")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.clients, args.requests, args.time_limit = 8, 80, 120
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(args.model, Path(tmp), args.quick)
        if args.runtime == "onnx" and not checkpoint.suffix == ".onnx" and not (checkpoint / "model.onnx").exists():
            from vitlab.export import export_onnx

            export_onnx(checkpoint)
        rows = [run_setting(checkpoint, args, b) for b in (args.max_batch, 1)]
    print(f"{checkpoint.name} ({args.runtime}), {args.clients} clients, {args.requests} requests, loopback")
    print(
        "| micro-batching | 2xx | 4xx | 5xx | p50 (ms) | p99 (ms) | requests/s | mean batch | RSS before -> after MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        label = f"max batch {r['max_batch']}, {args.max_wait_ms:g} ms" if r["max_batch"] > 1 else "off (max batch 1)"
        print(
            f"| {label} | {r['2xx']} | {r['4xx']} | {r['5xx'] + r['no_answer']} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['requests_per_s']:.1f} | {r['mean_batch']:.2f} | "
            f"{r['rss_before_mib']:.0f} -> {r['rss_after_mib']:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")
    if any(r["5xx"] or r["no_answer"] for r in rows):
        raise SystemExit("FAIL: some requests got a 5xx or no answer")


if __name__ == "__main__":
    main()
