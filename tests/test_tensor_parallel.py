"""Tensor parallelism: TP = 2 gives TP = 1's tokens (fp32) on the default model (9 query / 3 key-value heads: an
uneven split) and on a tiny Llama with fewer key/value heads than ranks; adapters and n-gram speculation too;
images (encoded on rank 0) too; a dead worker is a clear error, not a hang; workers never outlive their engine."""
import gc
import os
import signal
import threading
import time

import pytest
import torch
from conftest import PROMPTS, assert_all_blocks_free, make_llm, save_tiny_model
from test_ia3 import SPECS as IA3_SPECS
from test_ia3 import make_ia3, tiny_base
from test_lora import make_adapter

from lanner import LoRARequest, SamplingParams
from lanner.config import EngineConfig, ModelConfig
from lanner.distributed import TensorParallelError
from lanner.distributed.shards import ShardPlan, plan_shards, shard_weights
from lanner.quant.ggml import GGMLTensor

TOKEN_IDS = [[5, 17, 300, 42, 9, 1000, 77], [901, 33, 64, 2, 18], [7, 7, 7, 7, 123, 456, 789, 10, 11, 12]]
REPETITIVE = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 9, 10, 11, 9, 10], [1, 2, 3, 1, 2, 3, 1]]
LOGPROB_TOL = 1e-4   # fp32: the row-parallel sums add the ranks' partial sums in another order


def greedy(llm, prompts, max_tokens=12, loras=None, logprobs=None):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, params, use_tqdm=False, lora_request=loras)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def worker_pids(llm):
    return [p.pid for p in llm.engine.runner.workers.procs]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---- the plan, without processes ----------------------------------------------------------------------
def llama(heads: int, kv_heads: int, **overrides) -> ModelConfig:
    return ModelConfig(**{**dict(architecture="LlamaForCausalLM", hidden_size=64 * heads, intermediate_size=1536,
                                 num_layers=2, num_heads=heads, num_kv_heads=kv_heads, head_dim=64, vocab_size=1001,
                                 rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=256,
                                 tie_word_embeddings=True, attention_bias=False), **overrides})


def test_uneven_heads_split_in_whole_kv_groups_rank0_holding_most():
    plans = plan_shards(llama(9, 3), 2, {})
    assert [(p.q_heads, p.kv_heads) for p in plans] == [(range(0, 6), range(0, 2)), (range(6, 9), range(2, 3))]
    assert [p.ffn for p in plans] == [range(0, 768), range(768, 1536)]
    assert [p.vocab for p in plans] == [range(0, 501), range(501, 1001)]


def test_fewer_kv_heads_than_ranks_replicates_them():
    plans = plan_shards(llama(8, 2), 4, {})
    assert [(p.q_heads, p.kv_heads) for p in plans] == [
        (range(0, 2), range(0, 1)), (range(2, 4), range(0, 1)), (range(4, 6), range(1, 2)), (range(6, 8), range(1, 2))]


@pytest.mark.parametrize("cfg,size,message", [
    (llama(4, 1), 8, "exceeds the model's 4 attention heads"),
    (llama(6, 2), 3, "the ranks must be a multiple of them"),
    (llama(4, 4, intermediate_size=1), 2, "FFN columns"),
    (llama(4, 4, ssm={"x": 1}), 2, "run it with tensor_parallel_size=1"),
])
def test_unsplittable_models_are_refused_by_name(cfg, size, message):
    with pytest.raises(ValueError, match=message):
        plan_shards(cfg, size, {})


def test_tensor_parallel_size_is_validated():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_row_parallel_split_keeps_ggml_blocks_or_dequantizes_with_a_log_line(caplog):
    cfg = llama(4, 4, intermediate_size=96)
    down = GGMLTensor.quantize(torch.randn(256, 96), "Q8_0")
    plans = plan_shards(cfg, 2, {"model.layers.0.mlp.down_proj.weight": down})
    blocks = shard_weights({"model.layers.0.mlp.down_proj.weight": down}, plans[1], cfg)
    assert isinstance(blocks["model.layers.0.mlp.down_proj.weight"], GGMLTensor)   # 64 | 32: whole blocks
    torch.testing.assert_close(blocks["model.layers.0.mlp.down_proj.weight"].dequantize(), down.dequantize()[:, 64:])
    cut = llama(4, 4, intermediate_size=96, num_layers=1)
    plan = ShardPlan(1, 2, range(2, 4), range(2, 4), range(40, 96), range(0, 1))   # 40: inside a block
    dense = shard_weights({"model.layers.0.mlp.down_proj.weight": down}, plan, cut)
    assert isinstance(dense["model.layers.0.mlp.down_proj.weight"], torch.Tensor)
    assert "dequantized" in caplog.text


# ---- the default model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_tp2(default_model_path):
    llm = make_llm(default_model_path, tensor_parallel_size=2)
    yield llm
    llm.engine.runner.close()


@pytest.mark.slow
def test_default_model_greedy_tokens_equal_tp1(llm, default_tp2):
    want = greedy(llm, PROMPTS, max_tokens=16, logprobs=3)
    got = greedy(default_tp2, PROMPTS, max_tokens=16, logprobs=3)
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        for g_step, w_step in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert g_step.keys() == w_step.keys()
            assert max(abs(g_step[t] - w_step[t]) for t in w_step) < LOGPROB_TOL
    assert_all_blocks_free(default_tp2)


@pytest.mark.slow
def test_default_model_ngram_speculation_equals_tp1(llm, default_model_path):
    spec = make_llm(default_model_path, tensor_parallel_size=2,
                    speculative={"method": "ngram", "num_speculative_tokens": 4})
    try:
        prompts = ["1, 2, 3, 4, 5, 6, 7, 8,", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"]
        assert tokens(greedy(spec, prompts, max_tokens=24)) == tokens(greedy(llm, prompts, max_tokens=24))
        assert spec.engine.stats()["spec_accepted_tokens"] > 0
    finally:
        spec.engine.runner.close()


# ---- a tiny Llama with one key/value head over two ranks -----------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llm):
    path = tmp_path_factory.mktemp("tiny-one-kv-head")
    save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
    return path


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-adapters")
    loras = [LoRARequest(f"lora{i}", i + 1, str(root / f"lora{i}")) for i in range(2)]
    make_adapter(tiny_dir, root / "lora0", seed=1, r=8)
    make_adapter(tiny_dir, root / "lora1", seed=2, r=16)
    ia3 = LoRARequest("ia3", 3, str(root / "ia3"))
    make_ia3(tiny_base(tiny_dir), root / "ia3", 3, **IA3_SPECS["kv-down"])
    return [*loras, ia3, None]


@pytest.fixture(scope="module")
def tiny_tp1(tiny_dir):
    return make_llm(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=16, kv_cache_memory=0.02)


@pytest.fixture(scope="module")
def tiny_tp2(tiny_dir):
    llm = make_llm(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=16, kv_cache_memory=0.02,
                   tensor_parallel_size=2, speculative={"method": "ngram", "num_speculative_tokens": 3})
    yield llm
    llm.engine.runner.close()


def test_one_kv_head_is_replicated_and_greedy_equals_tp1(tiny_tp1, tiny_tp2):
    runner = tiny_tp2.engine.runner
    assert runner.model_cfg.num_kv_heads == 1 and runner.model_cfg.num_heads == 2
    assert runner.num_blocks == tiny_tp1.engine.runner.num_blocks   # the pool per rank holds the same heads
    want, got = greedy(tiny_tp1, TOKEN_IDS, logprobs=2), greedy(tiny_tp2, TOKEN_IDS, logprobs=2)
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        for g_step, w_step in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert max(abs(g_step[t] - w_step[t]) for t in w_step) < LOGPROB_TOL


def test_adapters_in_one_batch_equal_tp1(tiny_tp1, tiny_tp2, adapters):
    """Two LoRA ranks, an IA3 adapter and base rows in one step; more adapters than slots, so slots get rewritten."""
    prompts = [TOKEN_IDS[i % len(TOKEN_IDS)] for i in range(len(adapters))]
    want = tokens(greedy(tiny_tp1, prompts, loras=adapters))
    assert tokens(greedy(tiny_tp2, prompts, loras=adapters)) == want
    assert len({tuple(t) for t in want}) == len(want)   # every adapter changed the output
    reordered = adapters[::-1]
    assert tokens(greedy(tiny_tp2, prompts, loras=reordered)) == tokens(greedy(tiny_tp1, prompts, loras=reordered))
    assert_all_blocks_free(tiny_tp2)


def test_ngram_speculation_with_adapters_equals_tp1_without(tiny_tp1, tiny_tp2, adapters):
    loras = [adapters[0], adapters[1], None]
    before = tiny_tp2.engine.stats()["spec_drafted_tokens"]
    assert tokens(greedy(tiny_tp2, REPETITIVE, 16, loras)) == tokens(greedy(tiny_tp1, REPETITIVE, 16, loras))
    assert tiny_tp2.engine.stats()["spec_drafted_tokens"] > before


def test_prefix_tuning_adapters_are_refused_clearly(tiny_tp2, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(ValueError, match="not served with tensor parallelism"):
        greedy(tiny_tp2, TOKEN_IDS[:1], loras=LoRARequest("prefix", 9, str(tmp_path)))


def test_unsplittable_model_is_refused_before_any_worker_starts(tiny_dir):
    with pytest.raises(ValueError, match="exceeds the model's 4 attention heads"):
        make_llm(str(tiny_dir), tensor_parallel_size=5)


def test_image_rows_encoded_on_rank0_reach_every_rank(tmp_path):
    from test_multimodal import IMAGES, mm
    from vlm_models import save_tiny_vlm
    save_tiny_vlm(tmp_path, "llava-clip")
    prompts = [mm("llava-clip", image) for image in IMAGES[:2]] + ["no image here"]
    tp2 = make_llm(str(tmp_path), tensor_parallel_size=2)
    try:
        assert tokens(greedy(tp2, prompts, 8)) == tokens(greedy(make_llm(str(tmp_path)), prompts, 8))
    finally:
        tp2.engine.runner.close()


# ---- lifetime and faults ----------------------------------------------------------------------------
def test_workers_exit_when_the_engine_is_garbage_collected(tiny_dir):
    llm = make_llm(str(tiny_dir), tensor_parallel_size=2, kv_cache_memory=0.02)
    pids = worker_pids(llm)
    greedy(llm, TOKEN_IDS[:1], max_tokens=2)
    del llm
    gc.collect()
    assert all(gone(pid) for pid in pids)


def test_a_worker_killed_mid_generation_is_a_clear_error_not_a_hang(tiny_dir):
    llm = make_llm(str(tiny_dir), tensor_parallel_size=2, kv_cache_memory=0.02)
    pid = worker_pids(llm)[0]
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=f"worker rank 1 \\(pid {pid}\\) exited with code -9"):
        greedy(llm, TOKEN_IDS * 4, max_tokens=200)
    assert time.monotonic() - start < 30
    with pytest.raises(TensorParallelError, match="cannot continue"):   # and stays failed
        greedy(llm, TOKEN_IDS[:1], max_tokens=2)
    assert gone(pid)
