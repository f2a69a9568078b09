"""Prefix-tuned adapters: served from KV blocks pinned once and shared by every request of the adapter; logits and
greedy tokens match PEFT, mixed batches equal each request alone, and no block leaks."""
import json
import shutil

import pytest
import torch
from conftest import hf_logits, make_llm
from test_ia3 import make_ia3, tiny_base
from test_lora import PROMPTS, TOL, alone_and_batched, base_dir, greedy, make_adapter  # noqa: F401 (fixtures)

from lanner import LoRARequest, SamplingParams

SPECS = {"p5": dict(num_virtual_tokens=5), "p5-projection": dict(num_virtual_tokens=5, prefix_projection=True),
         "p16": dict(num_virtual_tokens=16), "p16-projection": dict(num_virtual_tokens=16, prefix_projection=True,
                                                                     encoder_hidden_size=48)}


def save_peft(base_model, out, seed: int, config):
    """A PEFT model of config over base_model (PEFT's random init), saved as PEFT does; returned for eval."""
    from peft import get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(base_model, config)
    model.save_pretrained(str(out))
    return model.eval()


def make_prefix(base_model, out, seed: int, **config):
    """A PEFT prefix-tuning adapter with random prefixes."""
    from peft import PrefixTuningConfig
    return save_peft(base_model, out, seed, PrefixTuningConfig(task_type="CAUSAL_LM", **config))


@pytest.fixture(scope="module")
def prefixes(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    return {name: (LoRARequest(name, 300 + i, str(root / name)),
                   make_prefix(tiny_base(base_dir), root / name, i, **spec))
            for i, (name, spec) in enumerate(SPECS.items())}


def adapter_llm(base_dir, block_size: int = 4, **kwargs):
    kwargs = {"enable_lora": True, "max_loras": 4, "max_lora_rank": 8, "kv_cache_memory": 0.02, **kwargs}
    return make_llm(str(base_dir), block_size=block_size, **kwargs)


@pytest.fixture(scope="module")
def llm4(base_dir):
    return adapter_llm(base_dir, block_size=4)


@pytest.fixture(scope="module")
def llm16(base_dir):
    return adapter_llm(base_dir, block_size=16)


def peft_greedy(peft_model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Step-by-step argmax of PEFT's forward: with transformers 5 PEFT's generate drops the prefix (it passes the
    prefix as past_key_values, which generate's own `cache` overrides)."""
    out = list(ids)
    for _ in range(max_new_tokens):
        out.append(int(hf_logits(peft_model, out)[-1].argmax()))
    return out[len(ids):]


def blocks_in_use(llm) -> int:
    blocks = llm.engine.blocks
    return blocks.num_blocks - blocks.num_free_blocks


def pinned_blocks(llm) -> int:
    """Blocks the loaded prefix adapters pin: all that may stay in use once no request runs."""
    lora = llm.engine.runner.lora
    return sum(len(lora.pinned_prefix(i).blocks) for i in lora.loaded if lora.pinned_prefix(i) is not None)


def assert_only_pinned_blocks_in_use(llm):
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting
    assert blocks_in_use(llm) == pinned_blocks(llm)


def served_logits(llm, ids, request) -> torch.Tensor:
    """Every prompt row's logits through the engine's own path: prompt_logprobs makes it compute them all."""
    model, captured = llm.engine.runner.model, []
    compute_logits = model.compute_logits
    model.compute_logits = lambda hidden: captured.append(compute_logits(hidden)) or captured[-1]
    try:
        llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False, lora_request=request)
    finally:
        del model.compute_logits
    return torch.cat(captured)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("name", list(SPECS))
def test_logits_equal_peft(llm4, llm16, prefixes, name, block_size):
    llm = llm4 if block_size == 4 else llm16
    request, peft_model = prefixes[name]
    for ids in PROMPTS:
        assert (served_logits(llm, ids, request) - hf_logits(peft_model, ids)).abs().max() < TOL
    assert_only_pinned_blocks_in_use(llm)


def test_prefix_changes_the_output(llm4, prefixes, base_dir):
    ids = PROMPTS[0]
    assert (served_logits(llm4, ids, prefixes["p5"][0]) - hf_logits(tiny_base(base_dir), ids)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["p5", "p16-projection"])
def test_greedy_equals_peft_generate_with_chunked_prefill(base_dir, prefixes, name):
    request, peft_model = prefixes[name]
    llm = adapter_llm(base_dir, block_size=4, max_num_batched_tokens=3)
    ours = greedy(llm, PROMPTS, [request] * len(PROMPTS))
    assert ours == [peft_greedy(peft_model, ids, 10) for ids in PROMPTS]
    assert_only_pinned_blocks_in_use(llm)


def test_mixed_batch_of_base_lora_ia3_and_prefixes_equals_each_alone(llm4, prefixes, base_dir, tmp_path):
    lora = LoRARequest("lora", 400, str(tmp_path / "lora"))
    make_adapter(base_dir, lora.lora_path, seed=7)
    ia3 = LoRARequest("ia3", 401, str(tmp_path / "ia3"))
    make_ia3(tiny_base(base_dir), ia3.lora_path, 8, target_modules=["k_proj", "v_proj", "down_proj"],
             feedforward_modules=["down_proj"])
    requests = [None, lora, ia3, prefixes["p5"][0], prefixes["p16-projection"][0], prefixes["p5"][0]]
    alone, batched = alone_and_batched(llm4, requests)
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 2
    assert_only_pinned_blocks_in_use(llm4)


def test_concurrent_requests_share_the_prefix_blocks(base_dir, prefixes):
    """8 requests of a 16-token prefix (4 full blocks of 4): the prefix is held once, each request owns only the
    blocks of its own 7 tokens."""
    llm = adapter_llm(base_dir, block_size=4)
    request = prefixes["p16"][0]
    torch.manual_seed(0)
    prompts = torch.randint(0, 1000, (8, 7)).tolist()
    for ids in prompts:
        llm.engine.add_request(ids, SamplingParams(max_tokens=4, ignore_eos=True), lora_request=request)
    llm.engine.step()
    pinned = llm.engine.runner.lora.pinned_prefix(request.lora_int_id)
    assert len(pinned.full_blocks) == 4 and pinned.tail_block is None
    assert all(seq.block_table[:4] == pinned.full_blocks for seq in llm.engine.scheduler.running)
    assert blocks_in_use(llm) == 4 + 8 * 2
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_only_pinned_blocks_in_use(llm)


def test_partial_last_block_is_copied_per_request(llm4, prefixes):
    request = prefixes["p5"][0]
    for ids in PROMPTS:
        llm4.engine.add_request(ids, SamplingParams(max_tokens=2, ignore_eos=True), lora_request=request)
    llm4.engine.step()
    pinned = llm4.engine.runner.lora.pinned_prefix(request.lora_int_id)
    seqs = llm4.engine.scheduler.running
    assert all(seq.block_table[0] == pinned.full_blocks[0] for seq in seqs)
    assert len({seq.block_table[1] for seq in seqs} | {pinned.tail_block}) == len(seqs) + 1
    while llm4.engine.has_unfinished_requests():
        llm4.engine.step()
    assert_only_pinned_blocks_in_use(llm4)


def test_prefix_cache_of_the_prompt_is_per_adapter(llm4, prefixes):
    prompt = list(range(500, 510))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = prefixes["p5"][0], prefixes["p5-projection"][0]
    first = llm4.generate(prompt, params, use_tqdm=False, lora_request=a)[0]
    other = llm4.generate(prompt, params, use_tqdm=False, lora_request=b)[0]
    same = llm4.generate(prompt, params, use_tqdm=False, lora_request=a)[0]
    assert other.metrics.num_cached_tokens == 0
    assert same.metrics.num_cached_tokens == 7   # KV blocks 1 and 2 (positions 4..11) hold prompt tokens 0..6
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    assert_only_pinned_blocks_in_use(llm4)


def test_preemption_n_and_speculation_keep_outputs_and_free_blocks(base_dir, prefixes):
    request = prefixes["p5"][0]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    expected = greedy(adapter_llm(base_dir), prompts, [request] * 6)
    tight = adapter_llm(base_dir, num_kv_blocks=20)   # 2 pinned + about 3 requests' worth
    assert greedy(tight, prompts, [request] * 6) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert_only_pinned_blocks_in_use(tight)
    spec = adapter_llm(base_dir, speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert greedy(spec, prompts, [request] * 6) == expected
    assert spec.engine.stats()["spec_drafted_tokens"] > 0
    both = spec.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=3),
                         use_tqdm=False, lora_request=request)
    assert [[o.token_ids for o in out.outputs] for out in both] == [[e] * 3 for e in expected[:2]]
    assert_only_pinned_blocks_in_use(spec)


def test_abort_and_unload_give_every_block_back(base_dir, prefixes):
    llm = adapter_llm(base_dir)
    request = prefixes["p16-projection"][0]
    rid = llm.engine.add_request(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True), lora_request=request)
    llm.engine.step()
    llm.engine.runner.lora.remove(request.lora_int_id)   # unloaded mid-request: the request keeps the blocks
    llm.engine.step()
    assert blocks_in_use(llm) > 0
    llm.engine.abort_request(rid)
    assert blocks_in_use(llm) == 0
    llm.engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3), lora_request=request)   # pinned again
    with pytest.raises(ValueError, match="unfinished requests"):
        llm.engine.remove_lora(request.lora_int_id)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_only_pinned_blocks_in_use(llm)
    llm.engine.remove_lora(request.lora_int_id)
    assert blocks_in_use(llm) == 0


def test_lru_eviction_unpins_and_running_requests_finish(base_dir, prefixes):
    a, b = prefixes["p5"][0], prefixes["p16"][0]
    expected = greedy(adapter_llm(base_dir), [PROMPTS[0]], [a])
    llm = adapter_llm(base_dir, max_loras=1, max_cpu_loras=1)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    rid = llm.engine.add_request(PROMPTS[0], params, lora_request=a)
    llm.engine.step()
    llm.engine.add_request(PROMPTS[1], params, lora_request=b)   # evicts a: its request holds a's blocks on
    assert llm.engine.runner.lora.pinned_prefix(a.lora_int_id) is None
    outputs = {}
    while llm.engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in llm.engine.step())
    assert outputs[rid].outputs[0].token_ids == expected[0]
    assert_only_pinned_blocks_in_use(llm)
    assert blocks_in_use(llm) == 4   # b's 16 virtual tokens


def break_adapter(adapter_dir, breakage: str) -> None:
    from safetensors.torch import load_file, save_file
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(str(weights_file))
    if breakage == "missing-weights":
        weights_file.unlink()
        return
    if breakage == "wrong-shape":
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-1].contiguous()
    elif breakage == "no-embeddings":
        tensors = {"embedding.weight": tensors.pop("prompt_embeddings")}
    elif breakage == "layers":
        config["num_layers"] = 3
    elif breakage == "heads":
        config["num_attention_heads"], config["token_dim"] = 4, 64
    elif breakage == "virtual-tokens":
        config["num_virtual_tokens"] = 0
    elif breakage == "encoder-decoder":
        config["num_transformer_submodules"] = 2
    config_file.write_text(json.dumps(config))
    save_file(tensors, str(weights_file))


@pytest.mark.parametrize("breakage,message", [
    ("missing-weights", "no adapter_model.safetensors"),
    ("wrong-shape", r"prompt_embeddings has shape \(5, 127\), expected \(5, 128\)"),
    ("no-embeddings", "no 'prompt_embeddings' tensor"),
    ("layers", "num_layers=3, but the base model needs 2"),
    ("heads", "num_attention_heads=4, but the base model needs 2"),
    ("virtual-tokens", "num_virtual_tokens must be a positive integer"),
    ("encoder-decoder", "only decoder-only models"),
])
def test_bad_adapters_are_refused_and_engine_keeps_serving(llm4, prefixes, tmp_path, breakage, message):
    assert_broken_copy_refused(llm4, prefixes["p5"][0], tmp_path, lambda bad: break_adapter(bad, breakage), message)


def assert_broken_copy_refused(llm, good, tmp_path, breaks, message):
    """A copy of the good adapter broken by breaks(dir) is refused with message; nothing held, still serving."""
    bad = tmp_path / "bad"
    shutil.copytree(good.lora_path, bad)
    breaks(bad)
    before = blocks_in_use(llm)
    with pytest.raises(ValueError, match=message):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False,
                     lora_request=LoRARequest("bad", 99, str(bad)))
    assert blocks_in_use(llm) == before
    assert greedy(llm, [PROMPTS[0]], [good])   # still serving
    assert_only_pinned_blocks_in_use(llm)


def test_prefix_counts_against_max_model_len(base_dir, prefixes):
    llm = adapter_llm(base_dir, max_model_len=20)
    with pytest.raises(ValueError, match="with 16 virtual tokens"):
        llm.generate(list(range(1, 5)), SamplingParams(max_tokens=1), use_tqdm=False,
                     lora_request=prefixes["p16"][0])
    out = llm.generate(list(range(1, 4)), SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False,
                       lora_request=prefixes["p16"][0])[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_a_prefix_the_pool_cannot_hold_is_refused(base_dir, prefixes):
    llm = adapter_llm(base_dir, num_kv_blocks=3)
    with pytest.raises(ValueError, match="needs 4 KV blocks, only 3 are free"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=1), use_tqdm=False, lora_request=prefixes["p16"][0])
    assert blocks_in_use(llm) == 0 and not llm.engine.runner.lora.loaded


def test_bf16_cache_holds_the_prefix_rounded(base_dir, prefixes):
    llm = adapter_llm(base_dir, dtype="bfloat16")
    request, peft_model = prefixes["p5-projection"]
    assert (served_logits(llm, PROMPTS[0], request).float() - hf_logits(peft_model, PROMPTS[0])).abs().max() < 0.02
