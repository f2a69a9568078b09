"""Prompt-tuned and P-tuned adapters: their virtual tokens computed from the adapter's embeddings at KV positions
0..P-1 before the prompt; logits and greedy tokens match PEFT, mixed batches equal each request alone, the prefix
cache keys the virtual positions per adapter, and no block leaks."""
import json

import pytest
import torch
from conftest import hf_logits
from test_ia3 import tiny_base
from test_lora import PROMPTS, TOL, alone_and_batched, base_dir, greedy, make_adapter  # noqa: F401 (fixtures)
from test_prefix_tuning import (adapter_llm, assert_broken_copy_refused, assert_only_pinned_blocks_in_use,
                                blocks_in_use, make_prefix, peft_greedy, save_peft, served_logits)

from lanner import LoRARequest, SamplingParams

SPECS = {"p5": dict(kind="PROMPT_TUNING", num_virtual_tokens=5),
         "p16": dict(kind="PROMPT_TUNING", num_virtual_tokens=16),
         "ptuning-mlp": dict(kind="P_TUNING", num_virtual_tokens=6, encoder_hidden_size=32),
         "ptuning-lstm": dict(kind="P_TUNING", num_virtual_tokens=3, encoder_hidden_size=16,
                              encoder_reparameterization_type="LSTM")}


def make_prompt(base_model, out, seed: int, kind: str, **config):
    """A PEFT prompt-tuning (random init) or P-tuning adapter."""
    from peft import PromptEncoderConfig, PromptTuningConfig
    config_class = PromptTuningConfig if kind == "PROMPT_TUNING" else PromptEncoderConfig
    return save_peft(base_model, out, seed, config_class(task_type="CAUSAL_LM", **config))


@pytest.fixture(scope="module")
def prompts(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    return {name: (LoRARequest(name, 500 + i, str(root / name)),
                   make_prompt(tiny_base(base_dir), root / name, i, **spec))
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.fixture(scope="module")
def llm4(base_dir):
    return adapter_llm(base_dir, block_size=4)


def peft_logits(peft_model, ids) -> torch.Tensor:
    """PEFT returns logits for the virtual rows too: the real tokens' are the last len(ids)."""
    return hf_logits(peft_model, ids)[-len(ids):]


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_equal_peft(llm4, prompts, name):
    request, peft_model = prompts[name]
    for ids in PROMPTS:
        assert hf_logits(peft_model, ids).shape[0] == len(ids) + peft_model.peft_config["default"].num_virtual_tokens
        assert (served_logits(llm4, ids, request) - peft_logits(peft_model, ids)).abs().max() < TOL
    assert_only_pinned_blocks_in_use(llm4)


def test_prompt_changes_the_output(llm4, prompts, base_dir):
    ids = PROMPTS[0]
    assert (served_logits(llm4, ids, prompts["p5"][0]) - hf_logits(tiny_base(base_dir), ids)).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["p5", "ptuning-mlp"])
def test_greedy_equals_peft_with_chunked_prefill(base_dir, prompts, name):
    """Chunks of 3 cut inside the virtual positions (and across them into the prompt)."""
    request, peft_model = prompts[name]
    llm = adapter_llm(base_dir, block_size=4, max_num_batched_tokens=3)
    assert greedy(llm, PROMPTS, [request] * len(PROMPTS)) == [peft_greedy(peft_model, ids, 10) for ids in PROMPTS]
    assert_only_pinned_blocks_in_use(llm)


def test_mixed_batch_of_base_lora_prefix_and_prompts_equals_each_alone(llm4, prompts, base_dir, tmp_path):
    lora = LoRARequest("lora", 600, str(tmp_path / "lora"))
    make_adapter(base_dir, lora.lora_path, seed=7)
    prefix = LoRARequest("prefix", 601, str(tmp_path / "prefix"))
    make_prefix(tiny_base(base_dir), prefix.lora_path, 3, num_virtual_tokens=5)
    requests = [None, lora, prefix, prompts["p5"][0], prompts["ptuning-lstm"][0], prompts["p16"][0],
                prompts["p5"][0]]
    alone, batched = alone_and_batched(llm4, requests)
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 3
    assert_only_pinned_blocks_in_use(llm4)


def test_prefix_cache_covers_the_virtual_positions_per_adapter(llm4, prompts):
    """P = 5, blocks of 4: block 0 holds virtual tokens 0..3, block 1 virtual token 4 and prompt tokens 0..2. Another
    adapter of the same P and the same prompt shares none of them."""
    prompt = list(range(700, 710))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = prompts["p5"][0], prompts["ptuning-mlp"][0]
    first = llm4.generate(prompt, params, use_tqdm=False, lora_request=a)[0]
    other = llm4.generate(prompt, params, use_tqdm=False, lora_request=b)[0]
    same = llm4.generate(prompt, params, use_tqdm=False, lora_request=a)[0]
    assert first.metrics.num_cached_tokens == other.metrics.num_cached_tokens == 0
    assert same.metrics.num_cached_tokens == 7   # 3 blocks (positions 0..11) hit: virtual 0..4, prompt 0..6
    assert same.outputs[0].token_ids == first.outputs[0].token_ids
    assert_only_pinned_blocks_in_use(llm4)


def test_requests_of_an_adapter_share_its_virtual_blocks(llm4, prompts):
    """P = 16: the second request of the adapter, with another prompt, computes none of the 16 virtual positions."""
    request, engine = prompts["p16"][0], llm4.engine
    params = SamplingParams(temperature=0, max_tokens=1)
    llm4.generate(list(range(800, 807)), params, use_tqdm=False, lora_request=request)
    before = engine.num_computed_tokens_total
    llm4.generate(list(range(900, 907)), params, use_tqdm=False, lora_request=request)
    assert engine.num_computed_tokens_total - before == 7
    assert_only_pinned_blocks_in_use(llm4)


def test_two_adapters_with_equal_ids_after_reload_never_share_virtual_blocks(base_dir, prompts):
    """The virtual positions are keyed by the embeddings' digest: an id reused for another adapter after
    remove_lora misses the cache."""
    llm = adapter_llm(base_dir)
    prompt = list(range(700, 710))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = prompts["p5"][0], prompts["ptuning-mlp"][0]
    llm.generate(prompt, params, use_tqdm=False, lora_request=a)
    llm.engine.remove_lora(a.lora_int_id)
    reused = LoRARequest("b-as-a", a.lora_int_id, b.lora_path)
    out = llm.generate(prompt, params, use_tqdm=False, lora_request=reused)[0]
    assert out.metrics.num_cached_tokens == 0
    assert out.outputs[0].token_ids == greedy(adapter_llm(base_dir), [prompt], [b])[0][:4]


def test_preemption_n_and_speculation_keep_outputs_and_free_blocks(base_dir, prompts):
    request = prompts["p5"][0]
    inputs = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    expected = greedy(adapter_llm(base_dir), inputs, [request] * 6)
    tight = adapter_llm(base_dir, num_kv_blocks=14)
    assert greedy(tight, inputs, [request] * 6) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert_only_pinned_blocks_in_use(tight)
    spec = adapter_llm(base_dir, speculative={"method": "ngram", "num_speculative_tokens": 3})

    def propose(token_ids, k):   # drafts the right continuation but for a wrong last token: accepts and rejects
        i = next(i for i, ids in enumerate(inputs) if token_ids[:len(ids)] == ids)
        done = len(token_ids) - len(inputs[i])
        return expected[i][done:done + k - 1] + [0] if k else []
    spec.engine.proposer.propose = propose
    assert greedy(spec, inputs, [request] * 6) == expected
    stats = spec.engine.stats()
    assert stats["spec_drafted_tokens"] > stats["spec_accepted_tokens"] > 0
    both = spec.generate(inputs[:2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, n=3),
                         use_tqdm=False, lora_request=request)
    assert [[o.token_ids for o in out.outputs] for out in both] == [[e] * 3 for e in expected[:2]]
    assert_only_pinned_blocks_in_use(spec)


def test_unload_mid_request_and_lru_eviction_let_requests_finish(base_dir, prompts):
    a, b = prompts["p5"][0], prompts["p16"][0]
    expected = greedy(adapter_llm(base_dir), [PROMPTS[0]], [a])
    llm = adapter_llm(base_dir, max_loras=1, max_cpu_loras=1, max_num_batched_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    rid = llm.engine.add_request(PROMPTS[0], params, lora_request=a)
    llm.engine.step()                                              # inside a's virtual positions
    llm.engine.add_request(PROMPTS[1], params, lora_request=b)     # evicts a: its request keeps the embeddings
    assert llm.engine.runner.lora.prompt_adapter(a.lora_int_id) is None
    outputs = {}
    while llm.engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in llm.engine.step())
    assert outputs[rid].outputs[0].token_ids == expected[0]
    assert blocks_in_use(llm) == 0


def test_prompt_counts_against_max_model_len(base_dir, prompts):
    llm = adapter_llm(base_dir, max_model_len=20)
    with pytest.raises(ValueError, match="with 16 virtual tokens"):
        llm.generate(list(range(1, 5)), SamplingParams(max_tokens=1), use_tqdm=False, lora_request=prompts["p16"][0])
    out = llm.generate(list(range(1, 4)), SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False,
                       lora_request=prompts["p16"][0])[0]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert blocks_in_use(llm) == 0


def break_adapter(adapter_dir, breakage: str) -> None:
    from safetensors.torch import load_file, save_file
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(str(weights_file))
    if breakage == "missing-weights":
        weights_file.unlink()
        return
    if breakage == "hidden-size":
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-1].contiguous()
    elif breakage == "token-dim":
        config["token_dim"] = 128
    elif breakage == "rows":
        tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:4].contiguous()
    elif breakage == "no-embeddings":
        tensors = {"embedding.weight": tensors.pop("prompt_embeddings")}
    elif breakage == "virtual-tokens":
        config["num_virtual_tokens"] = 0
    elif breakage == "encoder-decoder":
        config["num_transformer_submodules"] = 2
    elif breakage == "nan":
        tensors["prompt_embeddings"][0, 0] = float("nan")
    config_file.write_text(json.dumps(config))
    save_file(tensors, str(weights_file))


@pytest.mark.parametrize("breakage,message", [
    ("missing-weights", "no adapter_model.safetensors"),
    ("hidden-size", r"prompt_embeddings has shape \(5, 63\), expected \(5, 64\)"),
    ("token-dim", "token_dim=128, but the base model's hidden size is 64"),
    ("rows", r"prompt_embeddings has shape \(4, 64\), expected \(5, 64\)"),
    ("no-embeddings", "no 'prompt_embeddings' tensor"),
    ("virtual-tokens", "num_virtual_tokens must be a positive integer"),
    ("encoder-decoder", "only decoder-only models"),
    ("nan", "NaN or infinite"),
])
def test_bad_adapters_are_refused_and_engine_keeps_serving(llm4, prompts, tmp_path, breakage, message):
    assert_broken_copy_refused(llm4, prompts["p5"][0], tmp_path, lambda bad: break_adapter(bad, breakage), message)


def test_bf16_serving_stays_near_peft(base_dir, prompts):
    llm = adapter_llm(base_dir, dtype="bfloat16")
    request, peft_model = prompts["p5"]
    assert (served_logits(llm, PROMPTS[0], request).float() - peft_logits(peft_model, PROMPTS[0])).abs().max() < 0.02
