"""Load on `fanformer serve`: N concurrent clients on loopback, batched against sequential.

    python benchmarks/serve_load.py runs/small-q4_0.gguf --clients 1 4 16 --requests 8 --max-tokens 64 --repeat 3

Starts the server twice as a subprocess on a free loopback port, once batching
(`--max-batch 16`, the default) and once serving one sequence at a time (`--max-batch 1`),
and for each N runs N clients, each sending `--requests` streaming completions one after
another (prompt k seeded with k, so both servers are asked the same questions and must
give the same answers). Prints requests/s, aggregate completion tokens/s, p50/p99
latency and p50/p99 time to first token per (server, N), the batched/sequential
tokens/s ratio, and any request that failed or whose text differs between the servers.
Bounded: N x requests per run, and no new request after `--time-limit` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import openai

PROMPTS = ["def ", "import os\n", "class Config:\n    ", "for i in range(", "    return self.", "# Licensed under",
           "if __name__ == '__main__':\n", "with open(path) as f:\n    ", "try:\n    import ", "    def __init__(self, "]
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "fanformer.cli", "serve", model, "--port", str(port), "--device", "cpu",
               "--model-name", MODEL, "--max-batch", str(max_batch)] + (["--threads", str(threads)] if threads else [])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}: {' '.join(command)}")
        try:
            json.loads(urllib.request.urlopen(f"{url}/health", timeout=2).read())
            return process, f"{url}/v1"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start within 120 s")


async def one_request(client: openai.AsyncOpenAI, k: int, max_tokens: int, temperature: float) -> dict:
    start, first, text, tokens = time.perf_counter(), None, [], 0
    stream = await client.completions.create(model=MODEL, prompt=PROMPTS[k % len(PROMPTS)], max_tokens=max_tokens,
                                             temperature=temperature, seed=k, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].text)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"k": k, "latency": end - start, "ttft": (first or end) - start, "tokens": tokens, "text": "".join(text)}


async def run_load(url: str, clients: int, requests: int, max_tokens: int, temperature: float,
                   time_limit: float) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    deadline = time.monotonic() + time_limit
    results, failures = [], []

    async def one_client(c: int) -> None:
        for r in range(requests):
            if time.monotonic() > deadline:
                return
            k = c * requests + r
            try:
                results.append(await one_request(client, k, max_tokens, temperature))
            except Exception as err:  # a lost or refused request is a result of the benchmark
                failures.append(f"request {k}: {type(err).__name__}: {err}")

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return {"wall": wall, "results": results, "failures": failures}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else float("nan")


def summary(run: dict) -> dict:
    results = run["results"]
    latencies, ttfts = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {"requests": len(results), "failed": len(run["failures"]), "wall": run["wall"],
            "req_s": len(results) / run["wall"], "tok_s": sum(r["tokens"] for r in results) / run["wall"],
            "p50": statistics.median(latencies) if latencies else float("nan"), "p99": percentile(latencies, 99),
            "ttft50": statistics.median(ttfts) if ttfts else float("nan"), "ttft99": percentile(ttfts, 99)}


def decode_ceiling(model: str, threads: int | None, batches: list[int], steps: int = 32) -> dict[int, float]:
    """Tokens/s of the backend's decode step alone at each batch size (no HTTP, no sampling,
    best of 3): what batching can gain at most on this machine."""
    import torch

    from fanformer.runtime import load_backend

    backend = load_backend(model, device="cpu", **({"threads": threads} if threads else {}))
    ceiling = {}
    for batch in batches:
        best = float("inf")
        for _ in range(3):
            cache = backend.new_cache(batch)
            ids = torch.randint(3, backend.info.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
            backend.prefill(cache, ids, torch.ones_like(ids), last_only=True)
            start = time.perf_counter()
            for step in range(steps):
                backend.decode(cache, ids[:, -1:], torch.ones((batch, 33 + step), dtype=torch.long))
            best = min(best, time.perf_counter() - start)
        ceiling[batch] = batch * steps / best
    return ceiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="any model form fanformer serve loads (e.g. a q4_0 GGUF file)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after another (default 4)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    parser.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch (default 16)")
    parser.add_argument("--time-limit", type=float, default=300, help="no new request after this many seconds of a "
                        "run (default 300)")
    parser.add_argument("--threads", type=int, help="the server's --threads, for GGUF and ONNX (default: the engine's own)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per (server, N); the row is the one with the most "
                        "tokens/s (default 1)")
    args = parser.parse_args()

    rows, texts = [], {}
    for mode, max_batch in (("batched", args.max_batch), ("sequential", 1)):
        process, url = start_server(args.model, max_batch, args.threads)
        try:
            asyncio.run(run_load(url, 1, 1, args.max_tokens, args.temperature, args.time_limit))  # warm-up: first graphs, caches
            for n in args.clients:
                runs = [asyncio.run(run_load(url, n, args.requests, args.max_tokens, args.temperature, args.time_limit))
                        for _ in range(args.repeat)]
                run = max(runs, key=lambda r: summary(r)["tok_s"])  # a shared machine only ever slows a run down
                rows.append((mode, n, summary(run)))
                for failure in run["failures"]:
                    print(f"{mode} N={n}: {failure}", file=sys.stderr)
                for result in run["results"]:
                    texts.setdefault((n, result["k"]), {})[mode] = result["text"]
                print(f"{mode} N={n}: done in {run['wall']:.1f} s", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"model {os.path.basename(args.model)}, {args.requests} requests per client, {args.max_tokens} tokens each, "
          f"temperature {args.temperature}, streamed, engine threads {args.threads or 'default'}, best of {args.repeat}")
    print("| server | N | requests | failed | requests/s | tokens/s | latency p50 / p99 s | TTFT p50 / p99 s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, n, s in rows:
        print(f"| {mode} | {n} | {s['requests']} | {s['failed']} | {s['req_s']:.2f} | {s['tok_s']:.1f} | "
              f"{s['p50']:.2f} / {s['p99']:.2f} | {s['ttft50']:.3f} / {s['ttft99']:.3f} |")
    by = {(mode, n): s for mode, n, s in rows}
    one = by.get(("batched", 1))
    for n in args.clients:
        if ("batched", n) in by and ("sequential", n) in by and one:
            print(f"N={n}: batched tokens/s = {by[('batched', n)]['tok_s'] / by[('sequential', n)]['tok_s']:.2f}x "
                  f"sequential, {by[('batched', n)]['tok_s'] / one['tok_s']:.2f}x batched N=1")
    ceiling = decode_ceiling(args.model, args.threads, args.clients)
    print("decode step alone (in-process, best of 3): " + ", ".join(
        f"batch {n}: {tok_s:.0f} tokens/s" for n, tok_s in ceiling.items()) +
        f"; batch {max(ceiling)} / batch 1 = {ceiling[max(ceiling)] / ceiling[min(ceiling)]:.2f}x")
    differ = [key for key, pair in texts.items() if len(pair) == 2 and pair["batched"] != pair["sequential"]]
    print(f"texts equal between the two servers: {len(texts) - len(differ)} of {len(texts)} requests")


if __name__ == "__main__":
    main()
