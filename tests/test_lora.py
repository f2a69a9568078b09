"""LoRA serving matches HF transformers + PEFT, alone and in mixed batches; bad adapters are refused clearly."""
import json
import shutil

import pytest
import torch
from conftest import assert_all_blocks_free, hf_logits, make_llm, our_logits, save_tiny_model

from lanner import LoRARequest, SamplingParams

TOL = 1e-4   # fp32 on CPU
PROMPTS = [[5, 17, 300, 42, 9, 1000, 77], [901, 33, 64, 2, 18], [7, 7, 7, 7, 123, 456, 789, 10, 11, 12]]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, llm):
    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return path


def make_adapter(base_dir, out, seed: int, r: int = 8, **config):
    """A PEFT adapter with random non-zero B (so it changes the output), saved as PEFT does."""
    import transformers
    from peft import LoraConfig, get_peft_model
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    torch.manual_seed(seed)
    config.setdefault("target_modules", ALL_LINEAR)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **config))
    model.save_pretrained(str(out))
    return model.eval()






@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    specs = {"r8": dict(r=8), "r16-rslora": dict(r=16, use_rslora=True), "r64": dict(r=64),
             "patterns": dict(r=8, rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"o_proj": 3.0}),
             "attn-only": dict(r=8, target_modules=["q_proj", "v_proj"])}
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        model = make_adapter(base_dir, root / name, seed=i + 1, **spec)
        out[name] = (LoRARequest(name, i + 1, str(root / name)), model)
    return out


@pytest.fixture(scope="module")
def lora_llm(base_dir):
    return make_llm(str(base_dir), enable_lora=True, max_loras=4, max_lora_rank=64, kv_cache_memory=0.02)


@pytest.mark.parametrize("name", ["r8", "r16-rslora", "r64", "patterns", "attn-only"])
def test_logits_equal_peft(lora_llm, adapters, name):
    request, peft_model = adapters[name]
    for ids in PROMPTS:
        assert (our_logits(lora_llm, ids, request) - hf_logits(peft_model, ids)).abs().max() < TOL


def test_adapter_changes_the_output_and_base_stays_base(lora_llm, adapters, base_dir):
    import transformers
    base = transformers.LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    ids = PROMPTS[0]
    assert (our_logits(lora_llm, ids) - hf_logits(base, ids)).abs().max() < TOL
    assert (our_logits(lora_llm, ids, adapters["r8"][0]) - hf_logits(base, ids)).abs().max() > 1e-2


def greedy(llm, prompts, loras):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False, lora_request=loras)]


def alone_and_batched(llm, loras):
    """Greedy tokens of PROMPTS cycled over the requests' adapters: each request alone, then all in one batch."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(loras))]
    return [greedy(llm, [p], [lora])[0] for p, lora in zip(prompts, loras)], greedy(llm, prompts, loras)


def test_mixed_batch_of_adapters_equals_each_alone(lora_llm, adapters):
    names = ["r8", "r16-rslora", "r64", None]    # three adapters of ranks 8, 16, 64 and the base
    alone, batched = alone_and_batched(lora_llm, [adapters[n][0] if n else None for n in names])
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 1
    assert_all_blocks_free(lora_llm)


def test_more_adapters_than_slots_still_complete(base_dir, adapters):
    llm = make_llm(str(base_dir), enable_lora=True, max_loras=2, max_lora_rank=64, kv_cache_memory=0.02)
    names = list(adapters)
    loras = [adapters[n][0] for n in names]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    want = [greedy(llm, [p], [l])[0] for p, l in zip(prompts, loras)]
    assert greedy(llm, prompts, loras) == want
    assert_all_blocks_free(llm)


def test_prefix_cache_never_shares_kv_across_adapters(lora_llm, adapters):
    prompt = list(range(100, 164))
    a, b = adapters["r8"][0], adapters["r16-rslora"][0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    lora_llm.generate(prompt, params, use_tqdm=False, lora_request=a)
    other = lora_llm.generate(prompt, params, use_tqdm=False, lora_request=b)[0]
    same = lora_llm.generate(prompt, params, use_tqdm=False, lora_request=a)[0]
    assert other.metrics.num_cached_tokens == 0
    assert same.metrics.num_cached_tokens == 48


def test_speculation_with_adapters_is_lossless(base_dir, adapters):
    loras = [adapters["r8"][0], adapters["r64"][0], None]
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 9, 10, 11, 9, 10], [1, 2, 3, 1, 2, 3, 1]]
    plain = make_llm(str(base_dir), enable_lora=True, kv_cache_memory=0.02)
    spec = make_llm(str(base_dir), enable_lora=True, kv_cache_memory=0.02,
                    speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert greedy(spec, prompts, loras) == greedy(plain, prompts, loras)
    assert spec.engine.stats()["spec_drafted_tokens"] > 0


def corrupt(adapters, tmp_path, name="r8"):
    src = adapters[name][0].lora_path
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("breakage,message", [
    ("missing-dir", "does not exist"),
    ("missing-config", "no adapter_config.json"),
    ("missing-weights", "no adapter_model.safetensors"),
    ("dora", "DoRA"),
    ("bias", "bias='none'"),
    ("wrong-shape", "lora_A has shape"),
    ("unknown-module", "targets a module this model does not have"),
    ("corrupt-weights", "cannot read LoRA weights"),
])
def test_bad_adapters_are_refused_and_engine_keeps_serving(lora_llm, adapters, tmp_path, breakage, message):
    from safetensors.torch import load_file, save_file
    bad = corrupt(adapters, tmp_path)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    weights_file = bad / "adapter_model.safetensors"
    if breakage == "missing-dir":
        shutil.rmtree(bad)
    elif breakage == "missing-config":
        (bad / "adapter_config.json").unlink()
    elif breakage == "missing-weights":
        weights_file.unlink()
    elif breakage in ("dora", "bias"):
        cfg.update(use_dora=True) if breakage == "dora" else cfg.update(bias="all")
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
    elif breakage == "corrupt-weights":
        weights_file.write_bytes(b"garbage")
    else:
        tensors = load_file(str(weights_file))
        key = next(k for k in tensors if "q_proj.lora_A" in k)
        if breakage == "wrong-shape":
            tensors[key] = torch.zeros(8, 48)
        else:
            tensors[key.replace("q_proj", "rotary_proj")] = tensors.pop(key)
        save_file(tensors, str(weights_file))
    with pytest.raises(ValueError, match=message):
        lora_llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False,
                          lora_request=LoRARequest("bad", 99, str(bad)))
    assert greedy(lora_llm, [PROMPTS[0]], [adapters["r8"][0]])   # still serving
    assert_all_blocks_free(lora_llm)


def test_lora_request_without_enable_lora_is_an_error(base_dir, adapters):
    llm = make_llm(str(base_dir), kv_cache_memory=0.02)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False, lora_request=adapters["r8"][0])
