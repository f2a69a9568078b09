"""Quantization at load (an HF model's linears into GGML blocks, int8 = q8_0 and int4 = q4_1) and the
default GGUF model on its own blocks: end to end, on every ISA path this CPU runs."""
import os
from unittest import mock

import pytest
import torch
from conftest import PROMPTS, make_llm

from lanner import SamplingParams, native
from lanner.quant.ggml import GGMLLinear

MAX_TOKENS = 16


def greedy(llm, n=6):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:n]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def dense_greedy(hf_dir):
    return greedy(make_llm(hf_dir, dtype="float32"))


def agree_for_half(ref, got):
    return sum(r[:MAX_TOKENS // 2] == g[:MAX_TOKENS // 2] for r, g in zip(ref, got))


@pytest.mark.parametrize("mode", ["int8", "q8_0"])
def test_8_bit_greedy_mostly_matches_dense(hf_dir, dense_greedy, mode):
    llm = make_llm(hf_dir, dtype="float32", quantization=mode)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(getattr(m, "quantized", None), GGMLLinear)]
    assert len(linears) == 4 * model.config.num_layers      # all but the LM head
    assert all(m.weight.device.type == "meta" for m in linears)   # no dense copy kept
    # once a continuation takes another word it keeps differing: count prompts that agree for half the run
    assert agree_for_half(dense_greedy, greedy(llm)) >= 4


@pytest.mark.parametrize("isa,mode", [(isa, "int4") for isa in native.supported_isas()] +
                         [(native.supported_isas()[0], mode) for mode in ("q4_0", "q5_0")])
def test_4_and_5_bit_answer_right_on_every_isa(hf_dir, isa, mode):
    """int4 gave garbage on AVX2 through PyTorch's int4 kernel; it is q4_1 on our kernels now."""
    with mock.patch.dict(os.environ, {"LANNER_ISA": isa}):
        llm = make_llm(hf_dir, dtype="float32", quantization=mode)
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert "Paris" in out


@pytest.mark.parametrize("isa", native.supported_isas())
def test_default_gguf_on_its_blocks_equals_hf_on_every_isa(default_model_path, hf_default, isa):
    """On the exact path the default model's Q4_1 / Q8_0 blocks multiply like HF on the dequantized weights."""
    from conftest import hf_greedy
    with mock.patch.dict(os.environ, {"LANNER_ISA": isa, "LANNER_EXACT_LINEARS": "1"}):
        llm = make_llm(default_model_path, dtype="float32")
        model = llm.engine.runner.model
        assert model.lm_head.ggml is not None and model.lm_head.ggml.type_name == "Q8_0"
        assert model.layers[0].mlp.gate_up_proj.ggml.type_name == "Q4_1"
        ids = llm.tokenizer.encode(PROMPTS[0])
        got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(hf_default, ids, 12)


def stepwise_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits of every position, fed one token a step: decode steps, the kernels' small-M path."""
    from lanner.attention import AttentionMetadata
    model, bs = llm.engine.runner.model, llm.engine.cfg.block_size
    blocks = list(range(-(-len(ids) // bs)))
    with torch.no_grad():
        return torch.cat([model.compute_logits(model(torch.tensor([t]), torch.tensor([p]),
                                                     AttentionMetadata.build([1], [p + 1], [blocks], [p])))
                          for p, t in enumerate(ids)])


def prefill_logits(llm, ids: list[int]) -> torch.Tensor:
    """Logits of every position from one forward over them all: a prefill, the kernels' GEMM path."""
    from lanner.attention import AttentionMetadata
    model, n = llm.engine.runner.model, len(ids)
    blocks = list(range(-(-n // llm.engine.cfg.block_size)))
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n),
                                          AttentionMetadata.build([n], [n], [blocks], list(range(n)))))


def test_int8_activations_answer_right_and_stay_close_to_the_exact_path(default_model_path):
    """Decode steps and prefills run on int8 activations by default. Measured on this text: logits within 0.055
    of the largest one's size (mean |diff| 0.2 logit), the same argmax at every position. (On a near tie they may
    differ: asked for France's capital, the exact path's "The" leads the int8 path's "L'" by 0.08 logit.)"""
    with mock.patch.dict(os.environ, {"LANNER_EXACT_LINEARS": "0"}):
        llm = make_llm(default_model_path)
    assert llm.engine.runner.model.layers[0].mlp.gate_up_proj.quantized.int8 == (native.isa() != "scalar")
    msgs = [{"role": "user", "content": "What is the capital of Germany?"}]
    assert "Berlin" in llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    ids = llm.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Germany is Berlin. " + PROMPTS[2])
    with mock.patch.dict(os.environ, {"LANNER_EXACT_LINEARS": "1"}):
        exact = make_llm(default_model_path)
    twice = ids + ids   # a prefill of more rows than the exact kernel takes: oneDNN's GEMM on the dense copy
    want = stepwise_logits(exact, twice)
    torch.testing.assert_close(prefill_logits(exact, twice), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    want = want[:len(ids)]
    prefill = prefill_logits(llm, ids)
    for got in (stepwise_logits(llm, ids), prefill):   # decode steps; one GEMM-sized prefill
        assert (got - want).abs().max() < 0.1 * want.abs().max()
        assert (got - want).abs().mean() < 0.4
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert prefill.shape[0] == len(ids) > 16   # more rows than any decode path takes
    # memory: the int8 GEMM took that prefill without a dense copy; the exact path made one at its first
    gate_up = lambda m: m.engine.runner.model.layers[0].mlp.gate_up_proj.quantized
    assert (gate_up(llm).dense is None) == gate_up(llm).int8_packed == (native.isa() != "scalar")
    assert len(twice) > gate_up(exact).kernel_rows(torch.float32)
    assert gate_up(exact).dense is not None   # fp32: oneDNN runs it everywhere


def test_bf16_steps_past_16_rows_take_amx_tiles_where_the_cpu_has_them(default_model_path):
    """A bf16 model on a CPU with AMX: steps of more than 16 rows multiply the Q4_1 / Q8_0 blocks rounded to bf16 on
    the tiles (ggml.c's amx_bf16_matmul; bench/throughput.py's bf16 workload 1.5x), and no dense copy is kept;
    smaller steps stay on the int8 GEMM, bitwise as without the tiles."""
    gate_up = lambda m: m.engine.runner.model.layers[0].mlp.gate_up_proj.quantized
    with mock.patch.dict(os.environ, {"LANNER_EXACT_LINEARS": "0"}):
        amx, plain = make_llm(default_model_path, dtype="bfloat16"), make_llm(default_model_path, dtype="bfloat16")
    if not {"amx_tile", "amx_bf16", "avx512_bf16", "avx512vbmi"} <= native.cpu_flags() or os.environ.get("LANNER_ISA"):
        pytest.skip("no AMX bf16 tiles on this CPU, or a lower ISA level forced")
    assert gate_up(amx).amx_bf16
    for module in plain.engine.runner.model.modules():   # the int8 GEMM for every step (before the first)
        if isinstance(getattr(module, "quantized", None), GGMLLinear):
            module.quantized.amx_rows = 0
    ids = amx.tokenizer.encode((PROMPTS[0] + " Paris, and the capital of Germany is Berlin. " + PROMPTS[2]) * 3)
    short = ids[:16]
    torch.testing.assert_close(prefill_logits(amx, short), prefill_logits(plain, short), rtol=0, atol=0)
    want, got = prefill_logits(plain, ids), prefill_logits(amx, ids)
    assert len(ids) > 16 and not torch.equal(got, want)   # the tiles took the long prefill
    # bf16 weights and activations against int8 activations: within the int8 path's own distance from the exact one
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    assert gate_up(amx).dense is None and gate_up(amx).dense_dtype is None
    prompts = [ids[:40], ids[:8], ids]   # the decode steps' 3 rows take the int8 GEMM
    outs = amx.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]


def test_bfloat16_runs_where_onednn_has_no_native_bf16(default_model_path):
    """On AVX2-only CPUs oneDNN's bf16 weight reorder raises: bf16 must still run (unpacked), not crash."""
    with mock.patch("lanner.model.layers.bf16_matmul_native", lambda: False):
        llm = make_llm(default_model_path, dtype="bfloat16", quantization="none")
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].text.strip()


def test_unknown_quantization_is_refused_by_name():
    from lanner.config import EngineConfig
    with pytest.raises(ValueError, match="int3"):
        EngineConfig(quantization="int3")
    from lanner.quant.ggml import quantize_linear
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_linear(torch.randn(8, 40), None, "q4_0")
