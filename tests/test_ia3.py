"""IA3 serving matches PEFT, mixes with LoRA and base rows in one batch; bad IA3 adapters are refused clearly."""
import json
import shutil

import pytest
import torch
from conftest import assert_all_blocks_free, hf_logits, make_llm, our_logits
from test_lora import (PROMPTS, TOL, alone_and_batched, base_dir, greedy, lora_llm,  # noqa: F401 (fixtures)
                       make_adapter)

from lanner import LoRARequest, SamplingParams

DEFAULT_MODEL_TOL = 1e-3   # as tests/test_model_parity.py: GGUF weights, different summation orders


def make_ia3(base_model, out, seed: int, **config):
    """A PEFT IA3 adapter with random vectors near 1 (PEFT starts them at exactly 1, a no-op), saved as PEFT
    does; the PEFT model is returned."""
    from peft import IA3Config, get_peft_model
    model = get_peft_model(base_model, IA3Config(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, vector in model.named_parameters():
            if "ia3_l" in name:
                vector.uniform_(0.5, 1.5)
    model.save_pretrained(str(out))
    return model.eval()


def tiny_base(path):
    import transformers
    return transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


SPECS = {"kv-down": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
         "no-feedforward": dict(target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], feedforward_modules=[]),
         "regex": dict(target_modules=r".*\.(o_proj|gate_proj|down_proj)", feedforward_modules=r".*\.(o_proj|down_proj)")}


@pytest.fixture(scope="module")
def ia3_adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ia3")
    return {name: (LoRARequest(name, 100 + i, str(root / name)), make_ia3(tiny_base(base_dir), root / name, i, **spec))
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_equal_peft(lora_llm, ia3_adapters, name):
    request, peft_model = ia3_adapters[name]
    for ids in PROMPTS:
        assert (our_logits(lora_llm, ids, request) - hf_logits(peft_model, ids)).abs().max() < TOL


def test_default_model_logits_equal_peft(default_model_path, hf_default, tmp_path):
    llm = make_llm(default_model_path, enable_lora=True, max_loras=1, max_lora_rank=8, kv_cache_memory=0.02)
    peft_model = make_ia3(hf_default, tmp_path / "ia3", seed=0, **SPECS["kv-down"])
    try:
        ids = llm.tokenizer.encode("The capital of France is")
        request = LoRARequest("ia3", 1, str(tmp_path / "ia3"))
        assert (our_logits(llm, ids, request) - hf_logits(peft_model, ids)).abs().max() < DEFAULT_MODEL_TOL
    finally:
        peft_model.unload()   # leave the shared HF model as it was


def test_mixed_batch_of_base_lora_and_ia3_equals_each_alone(lora_llm, ia3_adapters, base_dir, tmp_path):
    loras = [LoRARequest(f"lora{i}", 200 + i, str(tmp_path / f"lora{i}")) for i in range(2)]
    for i, request in enumerate(loras):
        make_adapter(base_dir, request.lora_path, seed=10 + i)
    requests = [None, *loras, ia3_adapters["kv-down"][0], ia3_adapters["no-feedforward"][0]]
    alone, batched = alone_and_batched(lora_llm, requests)
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 1
    assert_all_blocks_free(lora_llm)


def test_bf16_serving_stays_near_peft_and_mixes_rows(base_dir, ia3_adapters):
    """In bf16 the vectors stay fp32 and the scaled rows are stored back in bf16 (as PEFT computes)."""
    llm = make_llm(str(base_dir), dtype="bfloat16", enable_lora=True, max_lora_rank=8, kv_cache_memory=0.02)
    request, peft_model = ia3_adapters["kv-down"]
    assert (our_logits(llm, PROMPTS[0], request).float() - hf_logits(peft_model, PROMPTS[0])).abs().max() < 0.02
    requests = [request, None, ia3_adapters["no-feedforward"][0]]
    assert all(len(tokens) == 10 for tokens in greedy(llm, PROMPTS, requests))
    assert_all_blocks_free(llm)


def test_server_registry_serves_ia3_adapters(lora_llm, ia3_adapters, tmp_path):
    """`--lora NAME=PATH` and /v1/load_lora_adapter validate through the same loader."""
    from lanner.server.cli import make_registry
    from lanner.server.errors import APIError
    registry = make_registry("base", lora_llm.engine, [f"kv={ia3_adapters['kv-down'][0].lora_path}"])
    registry.load("regex", ia3_adapters["regex"][0].lora_path)
    assert registry.resolve("regex").lora_path == ia3_adapters["regex"][0].lora_path
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(APIError, match="no adapter_model.safetensors"):
        registry.load("bad", str(tmp_path))


def break_adapter(adapter_dir, breakage: str) -> None:
    from safetensors.torch import load_file, save_file
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(str(weights_file))
    key = next(k for k in tensors if "k_proj" in k)
    if breakage == "missing-weights":
        weights_file.unlink()
        return
    if breakage == "unknown-peft-type":
        config["peft_type"] = "LOHA"
    elif breakage == "feedforward-on-fused":
        config["feedforward_modules"] = ["k_proj", "down_proj"]
    elif breakage == "wrong-length":
        tensors[key] = torch.ones(7, 1)
    elif breakage == "unknown-module":
        tensors[key.replace("k_proj", "rotary_proj")] = tensors.pop(key)
    elif breakage == "feedforward-mismatch":
        config["feedforward_modules"] = []
    config_file.write_text(json.dumps(config))
    save_file(tensors, str(weights_file))


@pytest.mark.parametrize("breakage,message", [
    ("missing-weights", "no adapter_model.safetensors"),
    ("unknown-peft-type", "peft_type 'LOHA' is not supported"),
    ("wrong-length", r"k_proj.ia3_l has shape \(7, 1\), expected \(32, 1\)"),
    ("feedforward-mismatch", r"down_proj.ia3_l has shape \(1, 128\), expected \(64, 1\)"),
    ("unknown-module", "targets a module this model does not have"),
    ("feedforward-on-fused", "only o_proj and down_proj can scale their input"),
])
def test_bad_adapters_are_refused_and_engine_keeps_serving(lora_llm, ia3_adapters, tmp_path, breakage, message):
    good = ia3_adapters["kv-down"][0]
    bad = tmp_path / "bad"
    shutil.copytree(good.lora_path, bad)
    break_adapter(bad, breakage)
    with pytest.raises(ValueError, match=message):
        lora_llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False,
                          lora_request=LoRARequest("bad", 99, str(bad)))
    assert greedy(lora_llm, [PROMPTS[0]], [good])   # still serving
    assert_all_blocks_free(lora_llm)
