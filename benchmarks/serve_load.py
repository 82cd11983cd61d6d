"""Load test of ``modulora serve``: concurrent chat requests over loopback, batched or not.

    python benchmarks/serve_load.py                    # a tiny random run, trained in a temp dir
    python benchmarks/serve_load.py --run runs/demo    # a trained run
    python benchmarks/serve_load.py --concurrency 8 --requests 64 --duration 30 --no-compare

The server runs in this process (a background thread, 127.0.0.1, a free port). Requests
are greedy chat completions cycling over the run's tasks (and, for a token-routed run,
its own name), sent by ``--concurrency`` clients until ``--requests`` are done or
``--duration`` seconds have passed. Prints requests/s, p50/p95 latency, completion
tokens/s, errors and the server's batch sizes, then the same load with ``--max-batch 1``
(no batching) and the ratio. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from modulora.generate import LoadedRun, load_run
from modulora.serve import build_app, running

WORDS = ["abc", "hgfe", "bad", "cafe", "dd", "gheb", "fade", "ace"]


def tiny_run(folder: Path, method: str) -> Path:
    """Train a tiny random run the way tests/test_serve.py does (tests/tiny.py helpers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import model_dir, write_run

    from modulora.cli import main

    model = model_dir(folder / "tiny-llama")
    train = {"lr": 1e-2, "max_steps": 2, "max_length": 40}
    config = write_run(folder, method, model, tasks=("reverse", "upper", "copy"), train=train)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if main(["train", str(config)]) != 0:
            raise SystemExit("training the tiny run failed")
    return folder / "run"


def bodies(loaded: LoadedRun, n: int, max_tokens: int) -> list[dict]:
    names = loaded.model_names
    return [
        {
            "model": names[i % len(names)],
            "messages": [{"role": "user", "content": f"{names[i % len(names)]}: {WORDS[i % 8]}"}],
            "max_tokens": max_tokens,
        }
        for i in range(n)
    ]


async def load(url: str, requests: list[dict], concurrency: int, duration: float) -> dict:
    """Send ``requests`` from ``concurrency`` clients, stopping early at ``duration``."""
    latencies, tokens, errors, queue = [], 0, [], list(reversed(requests))
    start = time.perf_counter()
    deadline = start + duration

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue and time.perf_counter() < deadline:
            body = queue.pop()
            sent = time.perf_counter()
            try:
                r = await http.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - sent)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"done": len(latencies), "errors": errors, "wall": wall, "tokens": tokens,
            "latencies": sorted(latencies)}  # fmt: skip


def measure(loaded: LoadedRun, args, max_batch: int) -> dict:
    app = build_app(loaded, max_batch=max_batch, batch_window_ms=args.batch_window_ms)
    requests = bodies(loaded, args.requests, args.max_tokens)
    with running(app) as url:
        httpx.post(f"{url}/v1/chat/completions", json=requests[0], timeout=120)  # warm-up
        before = app.state.stats.snapshot()
        result = asyncio.run(load(url, requests, args.concurrency, args.duration))
        after = app.state.stats.snapshot()
    batches = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    result["mean_batch"] = served / batches if batches else 0.0
    result["batches"] = batches
    old = before["batch_sizes"]
    sizes = {k: n - old.get(k, 0) for k, n in after["batch_sizes"].items()}
    result["sizes"] = {k: n for k, n in sizes.items() if n}
    return result


def report(label: str, r: dict) -> str:
    lat = r["latencies"] or [float("nan")]
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    return (
        f"{label:<14} {r['done']:>4} ok {len(r['errors']):>3} errors  "
        f"{r['done'] / r['wall']:7.2f} req/s  p50 {statistics.median(lat) * 1000:7.1f} ms  "
        f"p95 {p95 * 1000:7.1f} ms  {r['tokens'] / r['wall']:8.1f} tok/s  "
        f"{r['batches']:>4} batches, mean size {r['mean_batch']:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a trained run folder (default: a tiny random run)")
    parser.add_argument("--method", default="cgc-lora", help="method of the tiny run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds, at most")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batch-window-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-compare", action="store_true", help="skip the --max-batch 1 run")
    args = parser.parse_args()
    if not (1 <= args.concurrency <= 256 and 1 <= args.requests <= 10_000):
        parser.error("--concurrency must be 1..256 and --requests 1..10000")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        run_dir = args.run or tiny_run(Path(tmp), args.method)
        loaded = load_run(run_dir)
        print(
            f"run {loaded.root.name} ({loaded.run.method}, tasks {loaded.tasks}); "
            f"{args.requests} requests x {args.max_tokens} tokens, concurrency "
            f"{args.concurrency}, window {args.batch_window_ms} ms, "
            f"torch threads {torch.get_num_threads()}"
        )
        batched = measure(loaded, args, args.max_batch)
        print(report(f"max_batch={args.max_batch}", batched))
        print(f"{'':<14} batch sizes (size: count) {batched['sizes']}")
        errors = batched["errors"]
        if not args.no_compare:
            single = measure(loaded, args, 1)
            print(report("max_batch=1", single))
            errors += single["errors"]
            ratio = (batched["done"] / batched["wall"]) / (single["done"] / single["wall"])
            print(f"batching: {ratio:.2f}x the requests/s of max_batch=1")
    for error in errors[:5]:
        print("error:", error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
