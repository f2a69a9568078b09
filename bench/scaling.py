"""Data-parallel scaling: `lanner serve --data-parallel-size N` against N = 1, and the routing policies on a
workload of repeated prefixes.

Each server runs in its own process (`python -m lanner.cli serve` on a free 127.0.0.1 port); this process is the
client (httpx, non-streamed requests). Two workloads:

- throughput: random-token prompts, greedy, eos ignored, a fixed number of output tokens, at a fixed concurrency;
  output tokens/s = completion tokens / wall time, and the requests each replica served (from /health). The
  cores are the same for every N: N = 1 gets --threads = all of them, N replicas get all / N each.
- prefix: P random prefixes of L tokens, each asked R times with a short random suffix, in R waves of P
  concurrent requests (a replica caches a prefix once its prefill is done), under each --dp-routing policy;
  the prefix-cache hit rate (prompt tokens served from cache / looked up, summed over the replicas) and wall time.

One JSON line per result (with the CPU model and flags), a table on stderr.

    python bench/scaling.py [--quick] [--dp 1,2] [--model PATH]
"""
import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

POLICIES = ("prefix", "round_robin", "least_tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, dp: int, routing: str, port: int) -> subprocess.Popen:
    cores = args.cores or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "lanner.cli", "serve", "--model", common.model_path(args.model), "--port", str(port),
           "--dtype", args.dtype, "--kv-cache-memory", str(args.kv_cache_memory), "--max-waiting", "1000000",
           "--data-parallel-size", str(dp), "--dp-routing", routing, "--threads", str(max(1, cores // dp)),
           "--no-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    return common.wait_for_server(proc, port, timeout_s=600)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def complete(client: httpx.AsyncClient, base: str, prompt: list[int], max_tokens: int) -> int:
    r = await client.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                          "ignore_eos": True}, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


async def at_concurrency(base: str, work: list[tuple[list[int], int]], concurrency: int) -> int:
    limit = asyncio.Semaphore(concurrency)

    async def one(client, prompt, n):
        async with limit:
            return await complete(client, base, prompt, n)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        return sum(await asyncio.gather(*(one(client, p, n) for p, n in work)))


def replicas(base: str) -> list[dict]:
    httpx.get(f"{base}/metrics", timeout=60).raise_for_status()       # refreshes every replica's stats
    return httpx.get(f"{base}/health", timeout=60).json().get("replicas", [])


def throughput(args, dp: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, dp, "prefix", port)
    try:
        asyncio.run(at_concurrency(base, common.make_workload(4, (8, 8), (4, 4), seed=-1), 4))    # warm up
        before = replicas(base)
        work = common.make_workload(args.requests, (16, 64), (args.max_tokens, args.max_tokens), seed=0)
        t0 = time.perf_counter()
        tokens = asyncio.run(at_concurrency(base, work, args.concurrency))
        wall = time.perf_counter() - t0
        per_replica = [a["requests"] - b["requests"] for a, b in zip(replicas(base), before)]
    finally:
        stop_server(proc)
    return {"bench": "scaling", "workload": "throughput", "data_parallel_size": dp, "requests": len(work),
            "concurrency": args.concurrency, "output_tokens": tokens, "wall_s": round(wall, 2),
            "output_tok_per_s": round(tokens / wall, 1), "requests_per_replica": per_replica or [len(work)]}


def prefix_workload(args, seed: int) -> list[list[list[int]]]:
    """R waves, each with every prefix once (plus a fresh suffix)."""
    rng = random.Random(seed)
    prefixes = [common.random_prompt(rng, args.prefix_len) for _ in range(args.prefixes)]
    return [[p + common.random_prompt(rng, 16) for p in prefixes] for _ in range(args.repeats)]


def prefix_hits(args, dp: int, routing: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, dp, routing, port)
    try:
        before = replicas(base)
        t0 = time.perf_counter()
        for wave in prefix_workload(args, seed=1):
            asyncio.run(at_concurrency(base, [(p, 4) for p in wave], len(wave)))
        wall = time.perf_counter() - t0
        after = replicas(base)
    finally:
        stop_server(proc)
    hits = sum(a["prefix_hits"] - b["prefix_hits"] for a, b in zip(after, before))
    queries = sum(a["prefix_queries"] - b["prefix_queries"] for a, b in zip(after, before))
    return {"bench": "scaling", "workload": "prefix", "data_parallel_size": dp, "routing": routing,
            "prefixes": args.prefixes, "prefix_len": args.prefix_len, "repeats": args.repeats,
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0, "wall_s": round(wall, 2),
            "requests_per_replica": [a["requests"] - b["requests"] for a, b in zip(after, before)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the default model")
    p.add_argument("--dp", default="1,2", help="data-parallel sizes for the throughput workload")
    p.add_argument("--cores", type=int, default=None, help="torch threads shared out over the replicas (default: all)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB per replica")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefixes", type=int, default=5, help="odd, so round-robin does not pin a prefix to a replica")
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="fewer requests (~2 min)")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    args = p.parse_args()
    if args.quick:
        args.requests, args.concurrency, args.max_tokens, args.repeats = 32, 16, 16, 4
    common.warn_if_busy()
    sizes = [int(n) for n in args.dp.split(",")]
    records = [throughput(args, dp) for dp in sizes]
    records += [prefix_hits(args, max(2, max(sizes)), routing) for routing in POLICIES]
    for record in records:
        common.emit({**record, "model": os.path.basename(common.model_path(args.model)), "dtype": args.dtype,
                     **common.machine_fields()}, args.out)
    print_table(records)


def print_table(records: list[dict]) -> None:
    print(f"{'workload':<11}{'dp':>3} {'routing':<13}{'tok/s':>8}{'hit rate':>10}{'wall s':>8}  per replica",
          file=sys.stderr)
    for r in records:
        print(f"{r['workload']:<11}{r['data_parallel_size']:>3} {r.get('routing', 'prefix'):<13}"
              f"{r.get('output_tok_per_s', ''):>8}{r.get('prefix_cache_hit_rate', ''):>10}{r['wall_s']:>8}  "
              f"{r['requests_per_replica']}", file=sys.stderr)


if __name__ == "__main__":
    main()
