"""Serving benchmark: `lanner serve` under Poisson arrivals and at a fixed number of concurrent streams, against
offline `LLM.generate` on the same requests.

The server runs in its own process (`python -m lanner.cli serve` on a free 127.0.0.1 port); this process is the
client (httpx, streaming, one connection per stream). Requests are random-token prompts (token ids, so both
sides see the same prompts), greedy, eos ignored, a fixed seed. Per run: TTFT (send -> first text chunk) and
inter-token latency (gaps between text chunks, pooled over requests) p50/p99, and output tokens/s (tokens from
the usage chunk / wall time from the first send to the last [DONE]). Then offline LLM.generate runs in a fresh
process on the same engine options with max_num_seqs = the concurrency (the same batch ceiling the server has
at that many streams), once before and once after the server runs (a shared machine drifts), and the
concurrency record gets `ratio_vs_offline` against their mean. One JSON line per result.

    python bench/serve.py [--quick] [--rates 0.5,1,2,4] [--concurrency 64] [--threads 1]
"""
import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

WARMUP = ([random.Random(-1).randint(*common.VOCAB_RANGE) for _ in range(8)], 4)


# ---- the server -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: str, args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lanner.cli", "serve", "--model", path, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--attention-backend", args.attention_backend, "--device", args.device,
           "--kv-cache-memory", str(args.kv_cache_memory), "--max-num-seqs", str(args.max_num_seqs),
           "--max-waiting", "1000000", "--no-access-log", "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    return common.wait_for_server(proc, port, timeout_s=300)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


# ---- the client -------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], n_out: int) -> dict:
    body = {"prompt": prompt, "max_tokens": n_out, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert tokens == n_out, f"asked {n_out} tokens, got {tokens}"
    return {"start": t0, "end": time.perf_counter(), "ttft": times[0] - t0 if times else None,
            "itl": list(np.diff(times)), "tokens": tokens}


def new_client(concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 8,
                                                               max_keepalive_connections=concurrency + 8))


async def run_poisson(url: str, work, rate: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    async with new_client(len(work)) as client:
        async def at(delay, prompt, n):
            await asyncio.sleep(delay)
            return await one_request(client, url, prompt, n)
        delays, t = [], 0.0
        for _ in work:
            delays.append(t)
            t += rng.expovariate(rate)
        return await asyncio.gather(*(at(d, p, n) for d, (p, n) in zip(delays, work)))


async def run_concurrent(url: str, work, concurrency: int) -> list[dict]:
    queue = list(reversed(work))
    results = []
    async with new_client(concurrency) as client:
        async def worker():
            while queue:
                prompt, n = queue.pop()
                results.append(await one_request(client, url, prompt, n))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def summarize(results: list[dict]) -> dict:
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    itl = [x for r in results for x in r["itl"]]
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: round(float(np.percentile(xs, q)), 4) if xs else None
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "num_requests": len(results), "output_tokens": tokens, "seconds": round(seconds, 3),
            "output_tok_per_s": round(tokens / seconds, 2), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
            "e2e_p50_s": pct([r["end"] - r["start"] for r in results], 50)}


# ---- offline ----------------------------------------------------------------------------------------
def run_offline(path, dtype, device, options: dict, threads, work) -> dict:
    import torch

    from lanner import LLM, SamplingParams
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model=path, dtype=dtype, device=device, **options)
    llm.generate([WARMUP[0]], SamplingParams(temperature=0, max_tokens=WARMUP[1], ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    common.sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    common.sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "output_tok_per_s": round(tokens / seconds, 2),
            "threads": torch.get_num_threads(), **common.memory_fields(device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads, server and offline alike")
    ap.add_argument("--kv-cache-memory", type=float, default=2.0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--rates", default="0.5,1,2,4", help="Poisson arrival rates, requests/s")
    ap.add_argument("--poisson-requests", type=int, default=32, help="requests per Poisson rate")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=128, help="requests of the concurrency run")
    ap.add_argument("--prompt-range", default="16,64")
    ap.add_argument("--output-range", default="16,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="rates 1,4 of 8 requests; 64 requests at concurrency")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    rates = [1.0, 4.0] if args.quick else [float(r) for r in args.rates.split(",") if r]
    n_poisson = 8 if args.quick else args.poisson_requests
    n_conc = args.concurrency if args.quick else args.num_requests
    prompt_range = tuple(int(x) for x in args.prompt_range.split(","))
    output_range = (8, 16) if args.quick else tuple(int(x) for x in args.output_range.split(","))
    path = common.model_path(args.model)
    work = common.make_workload(n_conc, prompt_range, output_range, args.seed)
    base = {"bench": "serve", "dtype": args.dtype, "device": args.device, "threads": args.threads,
            "prompt_range": list(prompt_range), "output_range": list(output_range)}
    print(f"workload: {n_conc} requests at {args.concurrency} concurrent, Poisson rates {rates} x {n_poisson}; "
          f"prompts {prompt_range}, outputs {output_range}; model {path}", file=sys.stderr)

    options = {"attention_backend": args.attention_backend, "kv_cache_memory": args.kv_cache_memory,
               "max_num_seqs": min(args.max_num_seqs, args.concurrency)}
    records = []

    def offline(when):
        rec = {**base, "mode": "offline", "when": when, "max_num_seqs": options["max_num_seqs"],
               "num_requests": len(work),
               **common.run_isolated(run_offline, path, args.dtype, args.device, options, args.threads, work)}
        records.append(rec)
        common.emit(rec, args.out)
        return rec["output_tok_per_s"]

    offline_rates = [offline("before")]       # offline before and after the server: a shared machine drifts
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(path, args, port)
    try:
        asyncio.run(run_concurrent(url, [WARMUP, WARMUP], 2))
        for i, rate in enumerate(rates):
            sub = common.make_workload(n_poisson, prompt_range, output_range, args.seed + 1 + i)
            rec = {**base, "mode": "poisson", "rate": rate, **summarize(asyncio.run(run_poisson(url, sub, rate, i)))}
            records.append(rec)
            common.emit(rec, args.out)
        conc = {**base, "mode": "concurrency", "concurrency": args.concurrency,
                **summarize(asyncio.run(run_concurrent(url, work, args.concurrency)))}
    finally:
        stop_server(proc)
    offline_rates.append(offline("after"))
    conc["offline_output_tok_per_s"] = round(sum(offline_rates) / 2, 2)
    conc["ratio_vs_offline"] = round(conc["output_tok_per_s"] / conc["offline_output_tok_per_s"], 3)
    records.append(conc)
    common.emit(conc, args.out)
    common.summary_table(records, ["mode", "when", "rate", "concurrency", "num_requests", "output_tokens", "seconds",
                                   "output_tok_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
                                   "ratio_vs_offline"])


if __name__ == "__main__":
    main()
