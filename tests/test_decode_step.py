"""The one-call decode step (lanner.model.decode_step) gives bitwise the PyTorch path's results (LoRA rows: up to the
order of their deltas' sums); models and steps it does not take run the PyTorch path."""
import pytest
import torch
from conftest import assert_all_blocks_free, make_llm, save_tiny_model
from test_lora import base_dir, make_adapter  # noqa: F401 (fixture)

from lanner import LoRARequest, SamplingParams
from lanner.model.decode_step import STEP_PARTS
from lanner.quant.ggml import int8_activations

PROMPTS = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14"]


def both_paths(llm, prompts, lora_request=None, **params):
    """Greedy outputs (token ids and top-3 logprobs) with the decode step, then without it (the engines run without
    prefix caching: a cached prompt's last rows would be computed as a decode-sized step the second time)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3, **params)
    model = llm.engine.runner.model
    step = model.decode_step
    assert step is not None
    outs = []
    for model.decode_step in (step, None):
        outs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs)
                     for o in llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request)])
    model.decode_step = step
    return outs


@pytest.mark.parametrize("dtype, exact", [("float32", "1"), ("float32", "0"), ("bfloat16", "0")],
                         ids=["fp32-exact", "fp32-int8", "bf16-int8"])
def test_default_model_equals_the_pytorch_path(default_model_path, dtype, exact, monkeypatch):
    monkeypatch.setenv("LANNER_EXACT_LINEARS", exact)   # "0": int8 activations, the default
    llm = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False)
    step = llm.engine.runner.model.decode_step
    step.timings = torch.zeros(len(STEP_PARTS), dtype=torch.float64)
    lean, torch_path = both_paths(llm, PROMPTS[:1])
    assert lean == torch_path
    # int8 rows (not on the portable build) run every layer in one parallel region (fused.c's team_layers), which
    # times silu * up apart
    assert (step.timings[STEP_PARTS.index("mlp_act")] > 0) == int8_activations()
    step.timings = None
    lean, torch_path = both_paths(llm, PROMPTS)   # three rows a step
    assert lean == torch_path
    lean, torch_path = both_paths(llm, PROMPTS * 14)   # 42 rows: past AMX_BF16_ROWS (bf16 on AMX CPUs: the tiles)
    assert lean == torch_path
    llm.engine.cfg.num_scheduler_steps = 1   # a plain decode step last (a burst keeps its logits to itself; a
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)   # prompt may exceed the head's rows)
    assert llm.engine.runner.model.step_logits is not None   # the LM head ran in the same call
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1), use_tqdm=False)   # the prompt's step alone samples one
    assert llm.engine.runner.model.step_logits is None   # of its rows: the head runs on that row only, not in the call
    spec = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False,
                    speculative={"method": "ngram", "num_speculative_tokens": 3})
    lean, torch_path = both_paths(spec, PROMPTS[2:])   # verify steps of 4 rows
    assert lean == torch_path
    assert spec.engine.stats()["spec_drafted_tokens"] > 0


@pytest.mark.parametrize("arch, config_class, config", [
    ("Qwen2ForCausalLM", "Qwen2Config", {}),                                               # q/k/v biases
    ("MistralForCausalLM", "MistralConfig", dict(sliding_window=8, head_dim=16)),         # a window in the kernel
    ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16)),                               # q/k head norms
])
@pytest.mark.parametrize("exact", ["1", "0"])   # "0": int8 rows, every layer in one parallel region
def test_biases_windows_and_head_norms_equal_the_pytorch_path(tmp_path, llm, arch, config_class, config, exact,
                                                              monkeypatch):
    monkeypatch.setenv("LANNER_EXACT_LINEARS", exact)
    save_tiny_model(tmp_path, arch, config_class, llm.tokenizer, weight_std=0.2, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **config)
    tiny = make_llm(str(tmp_path), quantization="q8_0", kv_cache_memory=0.02, block_size=4, enable_prefix_caching=False)
    lean, torch_path = both_paths(tiny, PROMPTS)
    assert lean == torch_path
    assert len({tuple(ids) for ids, _ in lean}) > 1


def test_bf16_weights_run_the_step_with_the_head_and_keep_a_bf16_checkpoints_tokens(tmp_path, llm):
    """quantization="bf16": an HF model's linears and LM head kept as GGML BF16 rows (lossless for a bf16 checkpoint)
    run the one-call step, head included, bitwise as the PyTorch path; tokens as the dense fp32 weights give."""
    save_tiny_model(tmp_path, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, weight_std=0.2, dtype=torch.bfloat16,
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    kw = dict(kv_cache_memory=0.02, block_size=4, enable_prefix_caching=False)
    tiny = make_llm(str(tmp_path), quantization="bf16", **kw)
    model = tiny.engine.runner.model
    assert model.decode_step.head is not None
    assert model.lm_head.quantized.nbytes() == 2 * model.lm_head.in_features * model.lm_head.out_features
    lean, torch_path = both_paths(tiny, PROMPTS)
    assert lean == torch_path
    assert len({tuple(ids) for ids, _ in lean}) > 1
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    dense = make_llm(str(tmp_path), quantization="none", **kw)
    assert dense.engine.runner.model.lm_head.quantized is None
    assert_same_tokens_and_logprobs(lean, [o.outputs[0] for o in dense.generate(PROMPTS, params, use_tqdm=False)])


def assert_same_tokens_and_logprobs(got: list, want: list) -> None:
    """got: (token ids, logprobs) per prompt; want: the CompletionOutputs of the same prompts"""
    assert len(got) == len(want)
    for (ids, logprobs), w in zip(got, want):
        assert ids == w.token_ids and len(logprobs) == len(w.logprobs) == len(ids)
        for step, want_step in zip(logprobs, w.logprobs):
            for token, lp in step.items():
                assert abs(lp - want_step[token]) < 1e-4


def test_auto_takes_bf16_rows_where_the_linears_hold_bf16_values(tmp_path, llm):
    """The default quantization="auto": a bf16 checkpoint's linears and head become GGML BF16 rows, so the one-call
    step runs them (tokens and logprobs as the dense weights give); an fp32 checkpoint run in fp32 stays dense (its
    exact values), run in bf16 (rounded by the dtype) it takes the rows too; a GGUF model keeps its file's formats."""
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        save_tiny_model(tmp_path / name, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, weight_std=0.2, dtype=dtype,
                        **shape)
    kw = dict(kv_cache_memory=0.02, block_size=4, enable_prefix_caching=False)
    auto = make_llm(str(tmp_path / "bf16"), **kw)
    assert auto.engine.runner.quantization == "bf16"
    model = auto.engine.runner.model
    assert model.decode_step is not None and model.decode_step.head is not None
    assert {m.quantized.weight.type_name for m in (model.lm_head, model.layers[0].mlp.down_proj)} == {"BF16"}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in auto.generate(PROMPTS, params, use_tqdm=False)]
    dense = make_llm(str(tmp_path / "bf16"), quantization="none", **kw).generate(PROMPTS, params, use_tqdm=False)
    assert_same_tokens_and_logprobs(got, [o.outputs[0] for o in dense])
    assert make_llm(str(tmp_path / "fp32"), **kw).engine.runner.quantization == "none"
    assert make_llm(str(tmp_path / "fp32"), dtype="bfloat16", **kw).engine.runner.quantization == "bf16"
    assert llm.engine.runner.quantization == "none"


def test_models_it_cannot_run_keep_the_pytorch_path(tmp_path, llm):
    save_tiny_model(tmp_path, "Gemma2ForCausalLM", "Gemma2Config", llm.tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    query_pre_attn_scalar=16)   # sandwich norms, GeGLU
    assert make_llm(str(tmp_path), quantization="q8_0", kv_cache_memory=0.02).engine.runner.model.decode_step is None
    assert make_llm(str(tmp_path), kv_cache_memory=0.02).engine.runner.model.decode_step is None   # dense weights


def record_adapter_steps(monkeypatch) -> list[bool]:
    """For each call of the one-call step (a step or a burst): whether adapter rows were in it."""
    from lanner.model.decode_step import DecodeStep
    seen = []

    def recorded(method):
        def call(self, *args, **kwargs):
            lora = self.attn.qkv_proj.lora
            seen.append(bool(lora is not None and lora.manager.batch))
            return method(self, *args, **kwargs)
        return call
    monkeypatch.setattr(DecodeStep, "__call__", recorded(DecodeStep.__call__))
    monkeypatch.setattr(DecodeStep, "burst", recorded(DecodeStep.burst))
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_and_ia3_rows_run_in_the_step_as_on_the_pytorch_path(base_dir, tmp_path, dtype, monkeypatch):
    """LoRA and IA3 rows run in the one-call step, each linear applying them as Linear.forward does: a batch of two
    LoRAs (one of a lower rank on q and v only), an IA3 adapter (scaling k and v's outputs and down's input) and a
    base row gives the PyTorch path's tokens, and its logprobs up to the order of the LoRA deltas' sums (the IA3 and
    base rows' bitwise). LLaMA-Adapter rows keep the PyTorch path."""
    from test_adaption_prompt import make_adaption_prompt
    from test_ia3 import SPECS, make_ia3, tiny_base
    requests = [LoRARequest(name, i + 1, str(tmp_path / name)) for i, name in enumerate(("a", "b", "ia3", "prompt"))]
    make_adapter(base_dir, requests[0].lora_path, seed=3)
    make_adapter(base_dir, requests[1].lora_path, seed=4, r=4, target_modules=["q_proj", "v_proj"])
    make_ia3(tiny_base(base_dir), requests[2].lora_path, 0, **SPECS["kv-down"])
    make_adaption_prompt(tiny_base(base_dir), requests[3].lora_path, 0, adapter_len=4, adapter_layers=1)
    llm = make_llm(str(base_dir), quantization="q8_0", dtype=dtype, enable_lora=True, max_loras=3, max_lora_rank=8,
                   kv_cache_memory=0.02, enable_prefix_caching=False)
    adapter_steps = record_adapter_steps(monkeypatch)
    prompts = PROMPTS + PROMPTS[:1]
    lean, torch_path = both_paths(llm, prompts, lora_request=[*requests[:3], None])
    assert any(adapter_steps)
    for (tokens, logprobs), (tokens_ref, logprobs_ref) in zip(lean, torch_path):
        assert tokens == tokens_ref
        for top, top_ref in zip(logprobs, logprobs_ref):
            assert top.keys() == top_ref.keys()
            assert all(abs(top[t] - top_ref[t]) <= 1e-5 for t in top)
    assert lean[2:] == torch_path[2:]
    base = both_paths(llm, prompts[:3])[0]
    assert all(lean[i][0] != base[i][0] for i in range(3))   # each adapter changes its row's tokens
    assert_all_blocks_free(llm)

    adapter_steps.clear()
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False, lora_request=requests[3])
    assert not any(adapter_steps)


def test_lora_rows_burst_with_the_tokens_of_single_steps(default_model_path, hf_default, tmp_path, monkeypatch):
    """Greedy LoRA rows (beside base rows; one asking logprobs) of the default model run num_scheduler_steps at a
    time in one call, with the tokens and logprobs of steps run one by one."""
    from peft import LoraConfig, get_peft_model
    from test_lora import ALL_LINEAR
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_default, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                       target_modules=ALL_LINEAR))
    try:
        peft_model.save_pretrained(str(tmp_path / "lora"))
    finally:
        peft_model.unload()   # leave the shared HF model as it was
    request = LoRARequest("lora", 1, str(tmp_path / "lora"))
    llm = make_llm(default_model_path, enable_lora=True, max_loras=1, max_lora_rank=8, kv_cache_memory=0.05,
                   enable_prefix_caching=False)
    adapter_steps, asked = record_adapter_steps(monkeypatch), count_bursts(llm)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    params = [greedy, greedy, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)]
    outputs = {}
    for steps in (1, 8):
        llm.engine.cfg.num_scheduler_steps = steps
        outputs[steps] = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                          for o in llm.generate(PROMPTS, params, use_tqdm=False, lora_request=[request, None, request])]
    assert outputs[8] == outputs[1] and max(asked) == 8 and all(adapter_steps)
    assert outputs[8][0][0] != llm.generate(PROMPTS[:1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("dtype, kv_dtype", [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float16"),
                                             ("bfloat16", "float16")])
def test_a_cache_in_another_dtype_equals_the_pytorch_path(default_model_path, dtype, kv_dtype):
    """kv_cache_dtype stores K and V in another dtype than the activations (a bf16 or fp16 cache halves an fp32
    model's KV bytes): both paths round the stored rows alike, and the pool holds as many more blocks as it saves."""
    import torch
    llm = make_llm(default_model_path, dtype=dtype, kv_cache_dtype=kv_dtype, kv_cache_memory=0.05,
                   enable_prefix_caching=False)
    runner = llm.engine.runner
    assert runner.kv_cache.dtype == getattr(torch, kv_dtype) and runner.dtype == getattr(torch, dtype)
    lean, torch_path = both_paths(llm, PROMPTS)
    assert lean == torch_path
    same = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False)
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}   # the same memory, in blocks of the cache's element size
    assert abs(runner.num_blocks * elem[kv_dtype] - same.engine.runner.num_blocks * elem[dtype]) < 4
    if dtype == "float32":   # an fp32 model's prompt KV one rounding apart (a bf16 model's own noise is larger)
        first = lambda outs: [logprobs[0] for _, logprobs in outs]
        for got, want in zip(first(lean), first(both_paths(same, PROMPTS)[0])):
            assert got.keys() == want.keys()
            assert all(abs(got[t] - want[t]) < 0.05 for t in got)   # measured: at most 0.02


def test_kv_cache_dtype_is_checked():
    from lanner.config import EngineConfig
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto, float32, bfloat16 or float16, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype=bfloat16 is for the CPU backend"):
        EngineConfig(kv_cache_dtype="bfloat16", device="cuda")


def count_bursts(llm, rows: list | None = None) -> list[int]:
    """The steps each burst call was asked for (and its rows, into `rows`), recorded as they run."""
    runner, asked = llm.engine.runner, []
    run_burst = runner.run_burst

    def counted(scheduled, steps, stops, sampling=None, keep_logits=()):
        asked.append(steps)
        if rows is not None:
            rows.append(len(scheduled))
        return run_burst(scheduled, steps, stops, sampling, keep_logits)
    runner.run_burst = counted
    return asked


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bursts_give_the_tokens_of_single_steps(default_model_path, dtype):
    """Greedy decode steps run num_scheduler_steps at a time in one call give the tokens, texts and finish reasons
    of steps run one by one: rows that stop on eos, on a stop string, at max_tokens, inside a burst or not."""
    llm = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False)
    rows = []
    asked = count_bursts(llm, rows)
    cases = [(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=40)),
             (PROMPTS, SamplingParams(temperature=0, max_tokens=40)),   # one row ends on eos, the others run on
             (PROMPTS[:1], SamplingParams(temperature=0, max_tokens=30, stop=["."])),   # a burst cut by its string
             (PROMPTS, SamplingParams(temperature=0, max_tokens=30, stop=[","])),   # stop strings: no bursts
             (PROMPTS, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (5, 19, 27)]),
             (PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 10)]),
             (PROMPTS * 2, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))]   # fp32: its head in C
    outputs = {}
    for steps in (1, 8):
        llm.engine.cfg.num_scheduler_steps = steps
        outputs[steps] = [[(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                           for o in llm.generate(prompts, params, use_tqdm=False)] for prompts, params in cases]
        assert_all_blocks_free(llm)
        assert bool(asked) == (steps > 1)
    assert outputs[8] == outputs[1]
    assert {reason for case in outputs[8] for _, _, reason in case} == {"stop", "length"}
    assert max(asked) == 8 and 1 in asked   # (a row one token from max_tokens: a burst of one step)
    # rows the one-call step and the LM head's kernel take: 32 fp32 rows on packed weights; bf16 exact Q4_1 layers 4
    model = llm.engine.runner.model
    step_rows = min(model.decode_step.max_rows, model.lm_head.quantized.kernel_rows(getattr(torch, dtype)))
    assert max(rows) == (6 if step_rows >= 6 else 3)


def test_bursts_past_the_exact_heads_rows_give_the_tokens_of_single_steps(default_model_path, monkeypatch):
    """A bf16 batch past the exact head's rows (on AMX hosts the head's tiles take it) bursts where its head does
    (the argmax of the logits a step takes, kept on the tiles: MATMUL_ARGMAX) and gives the tokens of steps run one
    by one."""
    monkeypatch.setenv("LANNER_EXACT_LINEARS", "0")   # the default: the one-call step takes batches
    llm = make_llm(default_model_path, dtype="bfloat16", kv_cache_memory=0.1, enable_prefix_caching=False)
    rows = []
    asked = count_bursts(llm, rows)
    prompts = [f"{p} ({i})" for i in range(8) for p in PROMPTS]
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    outputs = {}
    for steps in (1, 8):
        llm.engine.cfg.num_scheduler_steps = steps
        outputs[steps] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert_all_blocks_free(llm)
    assert outputs[8] == outputs[1]
    head = llm.engine.runner.model.lm_head.quantized
    assert (max(rows) == len(prompts)) == head.takes(len(prompts), torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampled_bursts_give_the_tokens_of_single_steps(default_model_path, dtype):
    """Rows that sample (temperature, top-k, top-p, min-p; seeded) or have penalties burst beside greedy ones and
    give the tokens of steps run one by one: each step's uniform number from the row's generator as the step would
    draw it, the penalties on the history as it grows step by step, and a burst cut short by another row's stop
    token rewinds the generators to the steps it ran."""
    llm = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False)
    asked = count_bursts(llm)
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop = next(j for j in range(3, 8) if free[j] not in free[:j])   # a token new at step 4-8: inside a burst
    cases = [(PROMPTS[:1], SamplingParams(temperature=0.8, top_p=0.9, max_tokens=40, seed=1, ignore_eos=True)),
             (PROMPTS, [SamplingParams(temperature=1.0, top_k=40, max_tokens=30, seed=2, ignore_eos=True),
                        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        SamplingParams(temperature=0.7, min_p=0.1, max_tokens=30, seed=3, ignore_eos=True)]),
             (PROMPTS, [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
                        SamplingParams(temperature=0.9, max_tokens=30, seed=5, frequency_penalty=0.5,
                                       presence_penalty=0.3, ignore_eos=True),
                        SamplingParams(temperature=0, max_tokens=30, frequency_penalty=1.0, ignore_eos=True)]),
             # the greedy row stops inside the first burst: the seeded row's later tokens hold
             (PROMPTS[:2], [SamplingParams(temperature=1.2, max_tokens=30, seed=4, ignore_eos=True),
                            SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free[stop]],
                                           ignore_eos=True)])]
    outputs = {}
    for steps in (1, 8):
        llm.engine.cfg.num_scheduler_steps = steps
        outputs[steps] = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                          for prompts, params in cases]
        assert_all_blocks_free(llm)
    assert outputs[8] == outputs[1]
    assert len(outputs[8][3][1]) == stop + 1 and len(outputs[8][3][0]) == 30
    assert max(asked) == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprob_rows_burst_with_the_logprobs_of_single_steps(default_model_path, dtype):
    """Rows that ask logprobs (greedy or sampled, beside a row that does not) burst: each step's logprobs come from
    the logits the call kept, bitwise those of steps run one by one, and so does the cumulative logprob."""
    llm = make_llm(default_model_path, dtype=dtype, kv_cache_memory=0.05, enable_prefix_caching=False)
    asked = count_bursts(llm)
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, ignore_eos=True, seed=1, logprobs=0,
                             repetition_penalty=1.2),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    outputs = {}
    for steps in (1, 8):
        llm.engine.cfg.num_scheduler_steps = steps
        outputs[steps] = [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.outputs[0].cumulative_logprob)
                          for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert outputs[8] == outputs[1] and max(asked) == 8
    assert [len(logprobs or ()) for _, logprobs, _ in outputs[8]] == [20, 20, 0]
    assert_all_blocks_free(llm)


def test_bursts_only_where_logits_history_and_sampling_alone_decide(default_model_path):
    """Grammars take a step at a time; so does a batch while a request waits to join."""
    llm = make_llm(default_model_path, kv_cache_memory=0.05, enable_prefix_caching=False, max_num_seqs=1)
    asked = count_bursts(llm)
    llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=12, structured_outputs={"regex": "[a-z ]+"}),
                 use_tqdm=False)
    assert not asked
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert asked == [8, 3]   # the first prompt's steps one by one while the second waits (max_num_seqs=1)
    assert_all_blocks_free(llm)
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        make_llm(default_model_path, num_scheduler_steps=0)
