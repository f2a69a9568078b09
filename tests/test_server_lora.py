"""Adapters are served as models: listed, selected by `model`, loaded and unloaded at runtime."""
import httpx
import openai
import pytest
import torch
from conftest import make_llm

from lanner import LoRARequest, SamplingParams
from lanner.server.app import ServerSettings, build_app
from lanner.server.async_engine import AsyncEngine
from lanner.server.cli import make_registry
from lanner.server.runner import BackgroundServer

PROMPT = "The capital of France is"


def make_adapter(hf_model, out, seed):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    peft_model.unload()   # leave the shared HF model as it was
    return str(out)


@pytest.fixture(scope="module")
def adapter_paths(tmp_path_factory, default_files):
    from conftest import hf_model_from
    config, weights, _, _ = default_files
    root = tmp_path_factory.mktemp("server-adapters")
    return [make_adapter(hf_model_from(config, weights), root / f"a{i}", seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def server(default_model_path, adapter_paths):
    engine = make_llm(default_model_path, enable_lora=True, max_lora_rank=8).engine
    registry = make_registry("base", engine, [f"first={adapter_paths[0]}"])
    async_engine = AsyncEngine(engine)
    srv = BackgroundServer(build_app(async_engine, registry, ServerSettings()), async_engine).start()
    srv.engine = engine
    yield srv
    srv.stop()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def offline(default_model_path, adapter_path):
    llm = make_llm(default_model_path, enable_lora=True, max_lora_rank=8)
    lora = LoRARequest("x", 1, adapter_path) if adapter_path else None
    params = SamplingParams(temperature=0, max_tokens=8)
    return llm.generate(PROMPT, params, use_tqdm=False, lora_request=lora)[0].outputs[0].text


def test_models_lists_base_and_adapters(client, adapter_paths):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"base", "first"}
    assert cards["first"].root == adapter_paths[0]


def test_model_name_selects_the_adapter(client, default_model_path, adapter_paths):
    with_adapter = client.completions.create(model="first", prompt=PROMPT, max_tokens=8, temperature=0)
    base = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    assert with_adapter.choices[0].text == offline(default_model_path, adapter_paths[0])
    assert base.choices[0].text == offline(default_model_path, None)
    assert with_adapter.choices[0].text != base.choices[0].text


def test_load_use_and_unload_an_adapter_at_runtime(server, client, adapter_paths):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": adapter_paths[1]})
    assert r.status_code == 200
    assert client.completions.create(model="second", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "second"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="second", prompt=PROMPT, max_tokens=4)


def test_bad_adapter_load_is_a_400_naming_the_problem(server, tmp_path):
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "first", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "already served" in r.json()["error"]["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
