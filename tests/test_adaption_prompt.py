"""LLaMA-Adapter (PEFT's ADAPTION_PROMPT): gated attention over learned prompts in the top layers. Logits and greedy
tokens match PEFT, mixed batches equal each request alone, bad adapters are refused clearly; the prefix cache keys
every adapter's blocks by its files' digest, so an id reused after remove_lora never hits stale blocks."""
import copy
import json

import pytest
import torch
from conftest import assert_all_blocks_free, hf_logits, our_logits, save_tiny_model
from test_ia3 import SPECS as IA3_SPECS, make_ia3, tiny_base
from test_lora import PROMPTS, TOL, alone_and_batched, base_dir, greedy, make_adapter  # noqa: F401 (fixtures)
from test_prefix_tuning import (adapter_llm, assert_broken_copy_refused, assert_only_pinned_blocks_in_use, make_prefix,
                                peft_greedy, save_peft)
from test_prompt_tuning import make_prompt

from lanner import LoRARequest, SamplingParams

SPECS = {"top1-len5": dict(adapter_len=5, adapter_layers=1), "all2-len3": dict(adapter_len=3, adapter_layers=2)}


def make_adaption_prompt(base_model, out, seed: int, **config):
    """A PEFT adaption-prompt adapter with random non-zero gates (PEFT starts them at 0, a no-op)."""
    from peft import AdaptionPromptConfig
    model = save_peft(base_model, out, seed, AdaptionPromptConfig(task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, gate in model.named_parameters():
            if name.endswith("adaption_gate"):
                gate.uniform_(0.5, 2.0)
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def adaptions(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adaption")
    return {name: (LoRARequest(name, 700 + i, str(root / name)),
                   make_adaption_prompt(tiny_base(base_dir), root / name, i, **spec))
            for i, (name, spec) in enumerate(SPECS.items())}


@pytest.fixture(scope="module")
def llm4(base_dir):
    return adapter_llm(base_dir, block_size=4)


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_equal_peft(llm4, adaptions, base_dir, name):
    request, peft_model = adaptions[name]
    for ids in PROMPTS:
        assert (our_logits(llm4, ids, request) - hf_logits(peft_model, ids)).abs().max() < TOL
    assert (our_logits(llm4, PROMPTS[0], request) - hf_logits(tiny_base(base_dir), PROMPTS[0])).abs().max() > 1e-2


def test_greedy_equals_peft_with_chunked_prefill(base_dir, adaptions):
    request, peft_model = adaptions["all2-len3"]
    llm = adapter_llm(base_dir, max_num_batched_tokens=3)
    assert greedy(llm, PROMPTS, [request] * len(PROMPTS)) == [peft_greedy(peft_model, ids, 10) for ids in PROMPTS]
    assert_all_blocks_free(llm)


def test_twelve_requests_over_base_and_two_adapters_of_each_kind_equal_each_alone(adaptions, base_dir, tmp_path):
    """Issue 18's bar: base, LoRA, IA3, prefix, prompt (a prompt-tuned and a P-tuned) and LLaMA-Adapter requests,
    two of each, in one batch (six slot adapters, six slots)."""
    paths = {name: str(tmp_path / name) for name in ("lora0", "lora1", "ia30", "ia31", "prefix0", "prefix1",
                                                      "prompt", "ptuning")}
    for i in range(2):
        make_adapter(base_dir, paths[f"lora{i}"], seed=7 + i)
        make_ia3(tiny_base(base_dir), paths[f"ia3{i}"], i, **IA3_SPECS["kv-down"])
        make_prefix(tiny_base(base_dir), paths[f"prefix{i}"], 3 + i, num_virtual_tokens=5)
    make_prompt(tiny_base(base_dir), paths["prompt"], 5, "PROMPT_TUNING", num_virtual_tokens=5)
    make_prompt(tiny_base(base_dir), paths["ptuning"], 6, "P_TUNING", num_virtual_tokens=3, encoder_hidden_size=32)
    requests = [None, None, *[LoRARequest(name, 720 + i, path) for i, (name, path) in enumerate(paths.items())],
                adaptions["top1-len5"][0], adaptions["all2-len3"][0]]
    llm = adapter_llm(base_dir, max_loras=6)
    alone, batched = alone_and_batched(llm, requests)
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 6
    assert_only_pinned_blocks_in_use(llm)


def test_speculation_and_preemption_keep_outputs(base_dir, adaptions):
    request = adaptions["all2-len3"][0]
    inputs = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    expected = greedy(adapter_llm(base_dir), inputs, [request] * 6)
    tight = adapter_llm(base_dir, num_kv_blocks=12)
    assert greedy(tight, inputs, [request] * 6) == expected
    assert tight.engine.scheduler.num_preemptions > 0
    spec = adapter_llm(base_dir, speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert greedy(spec, inputs, [request] * 6) == expected
    assert spec.engine.stats()["spec_drafted_tokens"] > 0
    assert_all_blocks_free(tight)


def test_default_model_logits_equal_peft(default_model_path, hf_default, tmp_path):
    llm = adapter_llm(default_model_path, max_loras=1, block_size=16)
    # PEFT wraps the attention modules in place: a copy leaves the shared HF model as it was
    peft_model = make_adaption_prompt(copy.deepcopy(hf_default), tmp_path / "adaption", seed=0, adapter_len=10,
                                      adapter_layers=4)
    ids = llm.tokenizer.encode("The capital of France is")
    request = LoRARequest("adaption", 1, str(tmp_path / "adaption"))
    assert (our_logits(llm, ids, request) - hf_logits(peft_model, ids)).abs().max() < 1e-3


def test_an_id_reused_after_remove_never_hits_the_old_adapters_blocks(base_dir, adaptions):
    """Blocks of a request's prompt are keyed by its adapter files' digest, not by lora_int_id."""
    llm = adapter_llm(base_dir)
    prompt, params = list(range(700, 720)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a, b = adaptions["top1-len5"][0], adaptions["all2-len3"][0]
    llm.generate(prompt, params, use_tqdm=False, lora_request=a)
    assert llm.generate(prompt, params, use_tqdm=False, lora_request=a)[0].metrics.num_cached_tokens == 16
    llm.engine.remove_lora(a.lora_int_id)
    out = llm.generate(prompt, params, use_tqdm=False, lora_request=LoRARequest("b-as-a", a.lora_int_id, b.lora_path))[0]
    assert out.metrics.num_cached_tokens == 0
    assert out.outputs[0].token_ids == greedy(adapter_llm(base_dir), [prompt], [b])[0][:4]


def rewrite_config(key, value):
    def breaks(path):
        config = json.loads((path / "adapter_config.json").read_text())
        config[key] = value
        (path / "adapter_config.json").write_text(json.dumps(config))
    return breaks


def rewrite_tensors(change):
    def breaks(path):
        from safetensors.torch import load_file, save_file
        tensors = load_file(str(path / "adapter_model.safetensors"))
        change(tensors)
        save_file(tensors, str(path / "adapter_model.safetensors"))
    return breaks


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("breakage, message", [
    (rewrite_config("adapter_layers", 9), "adapter_layers=9, but the base model has 2 layers"),
    (rewrite_config("adapter_len", 0), "adapter_len must be a positive integer"),
    (rewrite_tensors(lambda t: t.update({first_key(t, "prompt"): torch.zeros(1, 3, 32)})),
     r"adaption_prompt has shape \(1, 3, 32\), expected \(1, 3, 64\)"),
    (rewrite_tensors(lambda t: t.pop(first_key(t, "gate"))), "no adaption_gate for layer 0"),
    (rewrite_tensors(lambda t: t.update({first_key(t, "gate"): torch.tensor([float("nan")])})), "NaN"),
])
def test_bad_adapters_are_refused_and_engine_keeps_serving(llm4, adaptions, tmp_path, breakage, message):
    assert_broken_copy_refused(llm4, adaptions["all2-len3"][0], tmp_path, breakage, message)


def test_a_model_peft_does_not_adapt_is_refused(llm, tmp_path, adaptions):
    path = tmp_path / "qwen3"
    save_tiny_model(path, "Qwen3ForCausalLM", "Qwen3Config", llm.tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    qwen = adapter_llm(path)
    with pytest.raises(ValueError, match="defined .by PEFT. for Llama and Mistral"):
        qwen.generate(PROMPTS[0], SamplingParams(max_tokens=1), use_tqdm=False,
                      lora_request=adaptions["top1-len5"][0])
