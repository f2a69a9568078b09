"""Data parallel: `lanner serve --data-parallel-size 2` behind the real `openai` client. Two replica processes (a
tiny random Llama with the default model's tokenizer) answer 200 concurrent requests between them, with the same
greedy tokens as one engine; prefix-aware routing gets more prefix-cache hits than round-robin on a workload of
repeated prefixes; a replica killed under load loses no non-streamed request, hangs none, and comes back; and the
same holds for replicas as Ray actors on a local Ray instance."""
import asyncio
import json
import os
import random
import signal
import time

import httpx
import openai
import pytest
from conftest import make_llm, save_tiny_model

from lanner import SamplingParams
from lanner.server.app import ServerSettings, build_app
from lanner.server.cli import make_registry
from lanner.server.replicas import Replica, ReplicaSet, ReplicaSpec, Router, prefix_hashes
from lanner.server.runner import BackgroundServer

MODEL = "tiny-dp"
BLOCK = 16
ENGINE_KWARGS = dict(dtype="float32", num_kv_blocks=512, block_size=BLOCK, max_model_len=512)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_path):
    from lanner.model.gguf import GGUFFile
    from lanner.model.tokenizer import from_gguf
    tokenizer = from_gguf(GGUFFile(default_model_path))
    path = tmp_path_factory.mktemp("tiny-dp")
    save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    eos_token_id=tokenizer.eos_token_id)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "eos_token": tokenizer.id_to_token(tokenizer.eos_token_id)}))
    return str(path)


def serve(tiny_dir: str, executor: str = "mp") -> BackgroundServer:
    replicas = ReplicaSet.launch(ReplicaSpec(tiny_dir, ENGINE_KWARGS, threads=1), 2, executor, routing="prefix")
    app = build_app(replicas, make_registry(MODEL, replicas.facts, []), ServerSettings())
    return BackgroundServer(app, replicas).start()


def pids_of(server) -> set[int]:
    return {r["pid"] for r in health(server)["replicas"] if r["pid"] is not None}


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = serve(tiny_dir)
    srv.pids = pids_of(srv)              # every replica process the module sees, to check none is left
    yield srv
    srv.pids |= pids_of(srv)
    srv.stop()
    for pid in srv.pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def offline(tiny_dir):
    return make_llm(tiny_dir, **ENGINE_KWARGS)


def health(server) -> dict:
    r = httpx.get(server.url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def replica_counts(server) -> list[dict]:
    httpx.get(server.url + "/metrics", timeout=30).raise_for_status()     # refreshes every replica's stats
    return health(server)["replicas"]


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(100, 49000) for _ in range(n)]


async def run_all(coroutines, timeout: float):
    return await asyncio.wait_for(asyncio.gather(*coroutines, return_exceptions=True), timeout)


def client_for(server, timeout: float = 60) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=timeout)


# ---- routing, without processes -----------------------------------------------------------------------------
def test_router_prefix_hashes_are_the_engines_block_hashes(offline):
    ids = random_ids(random.Random(1), 3 * BLOCK + 5)
    offline.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(prefix_hashes(ids, BLOCK, None)) == 3
    assert set(prefix_hashes(ids, BLOCK, None)) <= set(offline.engine.blocks.block_of)


def test_router_follows_the_prefix_until_its_replica_runs_too_far_ahead():
    replicas = [Replica(0, state="alive"), Replica(1, state="alive")]
    router = Router("prefix", imbalance_tokens=100)
    hot, cold = [11, 12, 13], [21, 22]
    router.remember(hot, replicas[1])
    assert router.choose(replicas, hot) is replicas[1]
    assert router.choose(replicas, hot[:2] + [99]) is replicas[1]          # longest matching run of blocks
    replicas[1].outstanding_tokens = 101
    assert router.choose(replicas, hot) is replicas[0]                    # the imbalance guard
    assert router.choose(replicas, cold) is replicas[0]                   # no match: least outstanding tokens
    router.forget(replicas[1])
    replicas[1].outstanding_tokens = 0
    assert router.holder(replicas, hot) is None
    replicas[0].requests, replicas[0].incarnation_requests = 50, 50
    replicas[1].requests, replicas[1].incarnation_requests = 193, 0       # just restarted, busy in its past life
    assert router.choose(replicas, cold) is replicas[1]                   # ties: fewest routed to this incarnation


def test_bad_replica_settings_are_clear_errors(tiny_dir):
    spec = ReplicaSpec(tiny_dir, ENGINE_KWARGS)
    for kwargs, message in [(dict(size=0), "data_parallel_size"), (dict(size=2, executor="slurm"), "executor"),
                            (dict(size=2, routing="random"), "routing policy")]:
        with pytest.raises(ValueError, match=message):
            ReplicaSet.launch(spec, **kwargs)


def test_a_replica_that_cannot_load_its_model_stops_the_launch(tmp_path):
    with pytest.raises(ValueError, match="could not start its engine"):
        ReplicaSet.launch(ReplicaSpec(str(tmp_path / "missing.gguf"), ENGINE_KWARGS), 1)


# ---- behind the server --------------------------------------------------------------------------------------
def test_200_concurrent_requests_are_answered_by_both_replicas_as_one_engine_would(server, offline):
    rng = random.Random(0)
    prompts = [random_ids(rng, rng.randint(4, 40)) for _ in range(150)]
    before = [r["requests"] for r in health(server)["replicas"]]

    async def main():
        async with client_for(server) as client:
            completions = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0)
                           for p in prompts]
            chats = [client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
                {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]) for i in range(50)]
            return await run_all(completions + chats, timeout=90)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    offline_texts = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=4),
                                                                 use_tqdm=False)]
    assert [r.choices[0].text for r in results[:150]] == offline_texts
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    served = [r["requests"] - b for r, b in zip(health(server)["replicas"], before)]
    assert sum(served) == 200 and min(served) >= 40, served      # the chats share a prefix: the guard spreads them
    assert all(r["in_flight"] == 0 and r["outstanding_tokens"] == 0 for r in health(server)["replicas"])


def hit_rate(server, policy: str, seed: int) -> float:
    """5 prefixes of 3 blocks, each asked 6 times (in waves: the cache holds a prefix once its prefill is done)."""
    server.engine.router.policy = policy
    rng = random.Random(seed)
    prefixes = [random_ids(rng, 3 * BLOCK) for _ in range(5)]
    before = replica_counts(server)

    async def main():
        async with client_for(server) as client:
            for _ in range(6):
                results = await run_all([client.completions.create(
                    model=MODEL, prompt=p + random_ids(rng, 5), max_tokens=2) for p in prefixes], timeout=60)
                assert not [r for r in results if isinstance(r, BaseException)], results

    try:
        asyncio.run(main())
    finally:
        server.engine.router.policy = "prefix"
    after = replica_counts(server)
    hits = sum(a["prefix_hits"] - b["prefix_hits"] for a, b in zip(after, before))
    queries = sum(a["prefix_queries"] - b["prefix_queries"] for a, b in zip(after, before))
    return hits / queries


def test_prefix_routing_gets_more_prefix_cache_hits_than_round_robin(server):
    prefix, round_robin = hit_rate(server, "prefix", seed=10), hit_rate(server, "round_robin", seed=11)
    # each prefix misses once on its replica; round-robin sends it to both, so it misses twice
    assert prefix == pytest.approx(5 / 6 * 48 / 53, abs=0.02)
    assert round_robin == pytest.approx(4 / 6 * 48 / 53, abs=0.02)


def test_killed_replica_answers_every_non_streamed_request_and_comes_back(server):
    victim = health(server)["replicas"][1]
    rerouted = health(server)["rerouted_requests"]
    rng = random.Random(2)

    async def stream(client, prompt):
        chunks = []
        async for chunk in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=48,
                                                           stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk)
        return chunks

    async def kill_when_busy():
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(health, server))["replicas"][1]["in_flight"] < 5:
            assert time.monotonic() < deadline, "the replica never got busy"
            await asyncio.sleep(0.02)
        os.kill(victim["pid"], signal.SIGKILL)

    async def main():
        async with client_for(server, timeout=60) as client:
            plain = [client.completions.create(model=MODEL, prompt=random_ids(rng, 20), max_tokens=48,
                                               extra_body={"ignore_eos": True}) for _ in range(60)]
            streams = [stream(client, random_ids(rng, 20)) for _ in range(12)]
            return await run_all(plain + streams + [kill_when_busy()], timeout=120)

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 100                          # nothing hung
    plain, streams = results[:60], results[60:72]
    assert results[-1] is None                                       # the kill happened under load
    assert not [r for r in plain if isinstance(r, BaseException)], [r for r in plain if isinstance(r, BaseException)]
    assert all(len(r.choices[0].text) > 0 and r.usage.completion_tokens == 48 for r in plain)
    for r in streams:       # finished, or cut off with the error event (openai raises it as an APIError)
        assert not isinstance(r, BaseException) or isinstance(r, openai.APIError), r
    assert health(server)["rerouted_requests"] > rerouted
    deadline = time.monotonic() + 60
    while not (health(server)["replicas"][1]["alive"] and health(server)["replicas"][1]["restarts"] >= 1):
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.2)
    server.pids |= pids_of(server)
    assert health(server)["replicas"][1]["pid"] != victim["pid"]
    assert all(r["in_flight"] == 0 for r in health(server)["replicas"])
    served_before = health(server)["replicas"][1]["requests"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=30)
    for i in range(6):      # fewest outstanding tokens, ties by requests to this incarnation: the new one gets work
        client.completions.create(model=MODEL, prompt=random_ids(rng, 8), max_tokens=2)
    assert health(server)["replicas"][1]["requests"] > served_before


def test_replicas_as_ray_actors_serve_and_restart(tiny_dir):
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"Ray is not installed here ({e}); the Ray path is tested where `pip install ray` works")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        srv = serve(tiny_dir, executor="ray")
        try:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            for i in range(8):
                assert client.completions.create(model=MODEL, prompt=f"Ray request {i}", max_tokens=3).choices[0].text
            assert [r["requests"] for r in health(srv)["replicas"]] == [4, 4]
            assert health(srv)["executor"] == "ray"
            ray.kill(srv.engine.replicas[0].channel.actor)
            deadline = time.monotonic() + 90
            while health(srv)["replicas"][0]["restarts"] < 1 or not health(srv)["replicas"][0]["alive"]:
                assert time.monotonic() < deadline, health(srv)
                time.sleep(0.2)
            assert client.completions.create(model=MODEL, prompt="After the restart", max_tokens=3).choices[0].text
        finally:
            srv.stop()
    finally:
        ray.shutdown()
