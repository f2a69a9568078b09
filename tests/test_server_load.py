"""The server under load and at shutdown: 300 streamed requests at 64 concurrent streams with 10% of the clients
hanging up at random give exactly the offline greedy outputs and leave no running request and no used KV block;
SIGTERM (and its in-process equivalent) lets in-flight streams finish. Bounded: loopback only, short outputs."""
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import PROMPTS, make_llm

from lanner import SamplingParams
from lanner.server.app import build_app
from lanner.server.async_engine import AsyncEngine
from lanner.server.runner import BackgroundServer
from lanner.server.models import ModelRegistry

MODEL = "base"
NUM_REQUESTS, CONCURRENCY, NUM_DROPPED = 300, 64, 30
TIME_LIMIT_S = 300


@pytest.fixture(scope="module")
def server(default_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = make_llm(default_model_path).engine
    async_engine = AsyncEngine(engine)
    srv = BackgroundServer(build_app(async_engine, ModelRegistry(MODEL, engine.max_model_len)), async_engine).start()
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("lanner:")}


def workload():
    rng = random.Random(0)
    dropped = set(rng.sample(range(NUM_REQUESTS), NUM_DROPPED))
    return [{"prompt": f"Note {i}. {PROMPTS[i % len(PROMPTS)]}", "chat": i % 3 == 0,
             "max_tokens": rng.randint(8, 12), "drop_after": rng.randint(1, 3) if i in dropped else None}
            for i in range(NUM_REQUESTS)]


async def stream_one(client: openai.AsyncOpenAI, req: dict):
    kw = dict(model=MODEL, max_tokens=req["max_tokens"], temperature=0, stream=True)
    if req["chat"]:
        stream = await client.chat.completions.create(messages=[{"role": "user", "content": req["prompt"]}], **kw)
    else:
        stream = await client.completions.create(prompt=req["prompt"], **kw)
    text, finish, chunks = "", None, 0
    async for chunk in stream:
        chunks += 1
        if req["drop_after"] and chunks >= req["drop_after"]:
            await stream.close()            # hang up mid-stream
            return None
        for c in chunk.choices:
            text += (c.delta.content or "") if req["chat"] else c.text
            finish = c.finish_reason or finish
    return text, finish


async def run_clients(url: str, reqs: list[dict]):
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=CONCURRENCY + 8), timeout=TIME_LIMIT_S)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, http_client=http)
    gate = asyncio.Semaphore(CONCURRENCY)

    async def gated(req):
        async with gate:
            return await stream_one(client, req)

    try:
        return await asyncio.wait_for(asyncio.gather(*(gated(r) for r in reqs)), TIME_LIMIT_S)
    finally:
        await http.aclose()


def offline(llm, reqs: list[dict]) -> list[tuple[str, str]]:
    def results(kind):
        idx = [i for i, r in enumerate(reqs) if r["chat"] == kind]
        params = [SamplingParams(temperature=0, max_tokens=reqs[i]["max_tokens"]) for i in idx]
        if kind:
            outs = llm.chat([[{"role": "user", "content": reqs[i]["prompt"]}] for i in idx], params, use_tqdm=False)
        else:
            outs = llm.generate([reqs[i]["prompt"] for i in idx], params, use_tqdm=False)
        return {i: (o.outputs[0].text, o.outputs[0].finish_reason) for i, o in zip(idx, outs)}
    merged = results(True) | results(False)
    return [merged[i] for i in range(len(reqs))]


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if m["lanner:num_requests_running"] == m["lanner:num_requests_waiting"] == m["lanner:kv_cache_blocks_used"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle: {m}")
        time.sleep(0.05)


def test_300_streams_at_64_concurrent_with_disconnects_match_offline_and_free_everything(server, llm):
    reqs = workload()
    t0 = time.monotonic()
    got = asyncio.run(run_clients(server.url, reqs))
    elapsed = time.monotonic() - t0
    m = wait_idle(server.url)
    kept = [i for i, r in enumerate(reqs) if r["drop_after"] is None]
    assert all(got[i] is not None for i in kept) and len(kept) == NUM_REQUESTS - NUM_DROPPED
    expected = offline(llm, [reqs[i] for i in kept])
    mismatches = [(reqs[i]["prompt"], got[i], e) for i, e in zip(kept, expected) if got[i] != e]
    assert not mismatches, f"{len(mismatches)} differ from offline, e.g. {mismatches[:3]}"
    assert m["lanner:request_aborted_total"] > 0
    assert m["lanner:kv_cache_blocks_used"] == 0 and m["lanner:num_requests_running"] == 0
    assert m["lanner:inter_token_latency_seconds_count"] > 0
    print(f"\n{NUM_REQUESTS} requests at {CONCURRENCY} concurrent in {elapsed:.1f}s; "
          f"{m['lanner:request_aborted_total']:.0f} aborted by their clients")


def read_stream(url: str, body: dict, first_chunk: threading.Event, out: list) -> None:
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                events.append(line[6:] if line.startswith("data: ") else line)
                first_chunk.set()
    finally:
        out.append(events)
        first_chunk.set()


def start_streams(url: str, num: int, max_tokens: int):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    results, started, workers = [], [], []
    for _ in range(num):
        started.append(threading.Event())
        workers.append(threading.Thread(target=read_stream, args=(url, body, started[-1], results)))
        workers[-1].start()
    for s in started:
        assert s.wait(120)
    return workers, results


def assert_streams_finished(results: list, num: int, max_tokens: int) -> None:
    assert len(results) == num
    for events in [[e for e in events if e] for events in results]:
        assert events[-1] == "[DONE]", events
        assert json.loads(events[-2])["usage"]["completion_tokens"] == max_tokens


def test_shutdown_stops_accepting_lets_streams_finish_and_ends_the_rest_cleanly(server):
    short, short_results = start_streams(server.url, 3, 16)
    long, long_results = start_streams(server.url, 1, 4000)
    t0 = time.monotonic()
    server.stop(grace_s=8)                  # what SIGINT / SIGTERM do, with an 8 s grace period
    for w in short + long:
        w.join(120)
    assert_streams_finished(short_results, 3, 16)
    events = [e for e in long_results[0] if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "unavailable"
    assert 8 <= time.monotonic() - t0 < 60
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health")
    assert not server.engine.alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lanner_serve_binds_loopback_and_finishes_streams_on_sigterm(default_model_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lanner.cli", "serve", "--model", default_model_path, "--port", str(port),
           "--dtype", "float32", "--kv-cache-memory", "0.25", "--threads", "1", "--no-access-log",
           "--served-model-name", MODEL, "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        listening = [line.split()[1] for line in open("/proc/net/tcp").read().splitlines()[1:]]
        assert f"0100007F:{port:04X}" in listening          # 127.0.0.1:port, and nothing wider
        assert f"00000000:{port:04X}" not in listening
        workers, results = start_streams(url, 2, 16)
        proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(120)
        assert_streams_finished(results, 2, 16)
        assert proc.wait(60) in (0, -signal.SIGTERM)      # uvicorn re-raises the signal once shut down
        assert "Application shutdown complete" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
