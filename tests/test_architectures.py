"""Conformance: every supported architecture against HF transformers on a tiny random model that the installed
transformers builds and saves (`save_pretrained`, so configs are exactly what it writes): prompt logits within
1e-4 in fp32, in one pass and in chunks cut at odd places, and greedy tokens identical through the engine, with
prompts longer than the sliding windows."""
import json
import os

import pytest
import torch
from conftest import PROMPTS, assert_all_blocks_free, hf_greedy, make_llm, save_tiny_model

from lanner import SamplingParams
from lanner.config import ModelConfig
from lanner.attention import AttentionMetadata

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend on CPU; set before triton is first imported
LOGIT_TOL = 1e-4
LONG_PROMPT = " ".join(PROMPTS[:4])   # ~40 tokens: several windows, several cache blocks
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, initializer_range=0.2)   # large init: sharp attention, big logits

ARCHITECTURES = {
    "llama3.2": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=2, head_dim=16, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-biases": ("LlamaForCausalLM", "LlamaConfig", dict(num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_hidden_layers=2, head_dim=16, sliding_window=5)),
    "qwen2-yarn": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        num_hidden_layers=3, head_dim=32, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        attn_logit_softcapping=4.0, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=7,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})),
    "phi3-partial-rotary": ("Phi3ForCausalLM", "Phi3Config", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})),
    "phi3-longrope": ("Phi3ForCausalLM", "Phi3Config", dict(
        num_hidden_layers=2, original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.7, 2.9, 4.0, 6.5, 9.0, 11.0],
                         "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0]})),
}


def save_tiny(path, name: str, tokenizer):
    arch, config_class, overrides = ARCHITECTURES[name]
    return save_tiny_model(path, arch, config_class, tokenizer, **SHAPE, **overrides)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request, tmp_path_factory, llm):
    """(HF model, its saved directory) of one architecture."""
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny(path, request.param, llm.tokenizer), str(path)


def chunked_logits(llm, ids: list[int], chunk: int) -> torch.Tensor:
    """Every position's logits from the serving path, the prompt fed `chunk` tokens per forward over the
    paged cache (so each chunk attends to KV the earlier ones stored)."""
    runner, bs, n = llm.engine.runner, llm.engine.cfg.block_size, len(ids)
    table, out = list(range(-(-n // bs))), []
    with torch.no_grad():
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            meta = AttentionMetadata.build([end - start], [end], [table], list(range(start, end)))
            hidden = runner.model(torch.tensor(ids[start:end]), torch.arange(start, end), meta)
            out.append(runner.model.compute_logits(hidden))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_prompt_logits_match_hf_in_one_pass_and_in_chunks(tiny, backend, llm):
    if backend == "triton":   # the interpreter is slow: only where the attention departs from plain causal
        pytest.importorskip("triton")
        if not any(ModelConfig.from_hf(json.load(open(f"{tiny[1]}/config.json"))).layer_windows):
            pytest.skip("plain causal attention: covered by tests/test_attention.py")
    hf, path = tiny
    ours = make_llm(path, kv_cache_memory=0.01, attention_backend=backend)
    for prompt in (PROMPTS[2], LONG_PROMPT):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        for chunk in (len(ids), 5, 3):
            assert (chunked_logits(ours, ids, chunk) - ref).abs().max() < LOGIT_TOL, (prompt, chunk)


def test_greedy_matches_hf_with_chunked_prefill(tiny, llm):
    hf, path = tiny
    ours = make_llm(path, kv_cache_memory=0.01, max_num_batched_tokens=7)   # prompts cut into 7-token chunks
    prompts = [llm.tokenizer.encode(p) for p in (PROMPTS[0], PROMPTS[5], LONG_PROMPT)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in ours.generate(prompts, params, use_tqdm=False)]
    assert got == [hf_greedy(hf, ids, 16) for ids in prompts]


def test_sliding_window_gives_back_blocks_no_layer_can_see(tmp_path, llm):
    """Every Mistral layer slides over 5 tokens: a 70-token sequence runs in a 6-block pool of 4-token
    blocks (it would need 18), tokens identical to HF, parallel samples sharing the prompt's blocks too."""
    hf = save_tiny_model(tmp_path, "MistralForCausalLM", "MistralConfig", llm.tokenizer, **SHAPE,
                         num_hidden_layers=2, head_dim=16, sliding_window=5)
    ours = make_llm(str(tmp_path), num_kv_blocks=6, block_size=4, max_num_batched_tokens=8)
    ids = llm.tokenizer.encode(LONG_PROMPT)
    params = SamplingParams(n=2, temperature=0, max_tokens=30, ignore_eos=True)
    got = [o.token_ids for o in ours.generate([ids], params, use_tqdm=False)[0].outputs]
    assert len(ids) + 30 > 6 * 4 and got == [hf_greedy(hf, ids, 30)] * 2
    assert_all_blocks_free(ours)
