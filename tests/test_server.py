"""The OpenAI-compatible server, driven by the real `openai` client over loopback: it returns what the offline
LLM returns, streams the same text, and answers every bad input with the right 4xx in OpenAI's error shape."""
import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import PROMPTS, make_llm

from lanner import SamplingParams
from lanner.server.app import ServerSettings, build_app
from lanner.server.async_engine import AsyncEngine
from lanner.server.runner import BackgroundServer
from lanner.server.models import ModelRegistry

KEY = "test-key"
MODEL = "smollm2-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(default_model_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # two shared cores: one for torch, one for the HTTP side and the client
    engine = make_llm(default_model_path).engine
    async_engine = AsyncEngine(engine)
    settings = ServerSettings(api_key=KEY, max_body_bytes=1 << 20)
    app = build_app(async_engine, ModelRegistry(MODEL, engine.max_model_len), settings)
    srv = BackgroundServer(app, async_engine).start()
    srv.settings = settings
    yield srv
    srv.stop()
    torch.set_num_threads(threads)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body=None, headers=AUTH, **kwargs):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120, **kwargs)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"lanner:{name} ")))


def wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(server, "num_requests_running") == metric(server, "num_requests_waiting") == 0 \
                and metric(server, "kv_cache_blocks_used") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server did not go idle / free its KV blocks")


def greedy(max_tokens=8, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# ---- what it serves ---------------------------------------------------------------------------------
def test_models_lists_the_base_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_offline_generate_with_correct_usage(client, llm):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    offline = llm.generate(PROMPTS[:2], greedy(), use_tqdm=False)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in offline]
    assert [c.finish_reason for c in r.choices] == [o.outputs[0].finish_reason for o in offline]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in offline)
    completion_tokens = sum(len(o.outputs[0].token_ids) for o in offline)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_chat_uses_the_chat_template_and_max_completion_tokens(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0)
    offline = llm.chat(CHAT, greedy(), use_tqdm=False)[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == offline.outputs[0].text
    assert r.usage.prompt_tokens == len(offline.prompt_token_ids)
    assert r.usage.completion_tokens == len(offline.outputs[0].token_ids) <= 8


def test_streamed_completion_concatenates_to_the_full_text_and_reports_usage(client, llm):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    offline = llm.generate(PROMPTS[2], greedy(10), use_tqdm=False)[0]
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == offline.outputs[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == offline.outputs[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(offline.outputs[0].token_ids)


def test_streamed_chat_starts_with_the_role_and_matches_offline(client, llm):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        llm.chat(CHAT, greedy(10), use_tqdm=False)[0].outputs[0].text


def test_n_choices_are_seeded_and_counted(client, llm):
    kw = dict(model=MODEL, prompt=PROMPTS[5], max_tokens=5, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True})
    r = client.completions.create(**kw)
    offline = llm.generate(PROMPTS[5], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True),
                           use_tqdm=False)[0]
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [o.text for o in offline.outputs]
    assert r.usage.completion_tokens == 15
    streamed = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in r.choices}


def test_seed_makes_sampling_reproducible_and_equal_to_offline(client, llm):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, top_p=0.9, seed=1234)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first
    offline = llm.chat(CHAT, SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=8), use_tqdm=False)
    assert first == offline[0].outputs[0].text


def test_stop_string_ends_the_text_before_it_also_when_streamed(client, llm):
    prompt = PROMPTS[6]   # "1, 2, 3, 4, 5,"
    offline = llm.generate(prompt, greedy(16, stop=[" 8"]), use_tqdm=False)[0].outputs[0]
    assert offline.finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=" 8")
    assert (r.choices[0].text, r.choices[0].finish_reason) == (offline.text, "stop")
    assert " 8" not in r.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[" 8"], stream=True))
    assert streamed == offline.text


def test_presence_and_frequency_penalties_reach_the_sampler(client, llm):
    kw = dict(presence_penalty=1.5, frequency_penalty=1.0)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=10, temperature=0, **kw)
    assert r.choices[0].text == llm.generate(PROMPTS[6], greedy(10, **kw), use_tqdm=False)[0].outputs[0].text


def test_completion_logprobs_are_per_token_and_greedy_picks_the_top(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) >= 3 and max(top.values()) == pytest.approx(value) and top[token] == value
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and bytes(t.bytes).decode() == t.token


def test_tokenize_and_detokenize_round_trip(server, llm):
    ids = post(server, "/tokenize", {"prompt": "Hello, world!"}).json()
    assert ids["tokens"] == llm.tokenizer.encode("Hello, world!") and ids["count"] == len(ids["tokens"])
    chat = post(server, "/tokenize", {"messages": CHAT}).json()
    assert chat["tokens"] == llm.tokenizer.encode(llm.tokenizer.apply_chat_template(CHAT))
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": "Hello, world!"}


def test_health_and_prometheus_metrics(server, client):
    client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert httpx.get(server.url + "/health", headers=AUTH).status_code == 200
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "prefix_cache_hit_rate",
                 "spec_decode_acceptance_rate", "prompt_tokens_total", "generation_tokens_total"):
        assert f"# TYPE lanner:{name} " in text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert f"# TYPE lanner:{name} histogram" in text
        assert metric(server, f"{name}_count") > 0
    assert 'lanner:time_to_first_token_seconds_bucket{le="+Inf"}' in text
    assert metric(server, "spec_decode_acceptance_rate") == 0
    assert metric(server, "generation_tokens_total") >= 4


# ---- holding up -------------------------------------------------------------------------------------
def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_invalid_parameter_is_a_400_that_names_it(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    assert e.value.param == "temperature" and "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, top_p=1.5)
    assert e.value.param == "top_p"


def test_too_long_prompt_is_a_400_with_both_lengths(client, server):
    max_len = server.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[11] * (max_len + 5), max_tokens=4)
    assert str(max_len + 5) in e.value.message and str(max_len) in e.value.message
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-adapter", messages=CHAT, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"


def test_missing_or_wrong_api_key_is_a_401(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_oversized_body_is_a_413(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


@pytest.mark.parametrize("body", [b"{", b'{"model": ', b"not json", b"\xff\xfe", b""], ids=repr)
def test_malformed_json_is_a_400(server, body):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", [], None),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 10 ** 9}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 10 ** 6}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stop": 5}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": -3}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "seed": 2 ** 70}, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "presence_penalty": 5}, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "frequency_penalty": -9}, "frequency_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "Hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "Hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content.0"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_logprobs": 50, "logprobs": True},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": "yes please"}, "stream"),
    ("/tokenize", {"model": MODEL}, "prompt"),
    ("/detokenize", {"tokens": [-5]}, "tokens"),
    ("/detokenize", {"tokens": "abc"}, "tokens"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_a_named_400_never_a_500(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == param


def test_full_waiting_queue_is_a_503_with_retry_after(server):
    """Hold the engine loop so admitted requests cannot start: the third one finds the queue full."""
    release = threading.Event()
    held = asyncio.run_coroutine_threadsafe(server.engine.call(lambda engine: release.wait(60)), server.engine.loop)
    server.settings.max_waiting = 2
    results = []
    workers = [threading.Thread(target=lambda: results.append(
        post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}))) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while server.engine.num_unstarted < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert error_of(r)["code"] == "queue_full"
    finally:
        server.settings.max_waiting = 512
        release.set()
        held.result(30)
        for w in workers:
            w.join(60)
    assert [x.status_code for x in results] == [200, 200]
    assert metric(server, 'request_rejected_total{reason="queue_full"}') == 1


def test_lora_endpoints_say_lora_is_not_enabled(server):
    for path, body in [("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp/a"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a"})]:
        r = post(server, path, body)
        assert r.status_code == 400 and "LoRA is not enabled" in error_of(r)["message"]


def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(server):
    generated = metric(server, "generation_tokens_total")
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    wait_idle(server, timeout=20)
    assert metric(server, "generation_tokens_total") - generated < 200
    assert metric(server, "request_aborted_total") == 1


def test_client_giving_up_on_a_non_streaming_request_aborts_it(server):
    aborted = metric(server, "request_aborted_total")
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=httpx.Timeout(60, read=1.0))
    wait_idle(server, timeout=20)
    assert metric(server, "request_aborted_total") == aborted + 1


def test_serve_refuses_a_bad_lora_adapter_at_startup(capsys, tmp_path):
    from lanner.cli import build_parser, main
    argv = ["serve", "--lora", f"sql={tmp_path}/missing", "--kv-cache-memory", "0.1"]
    args = build_parser().parse_args(argv)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    assert main(argv) == 2
    assert "does not exist" in capsys.readouterr().err
