"""State-space models in the paged engine: tiny random Mamba, Mamba-2 and Bamba (a hybrid: Mamba-2 layers around an
attention layer with partial rotary, its KV in the paged cache) models saved by the installed transformers,
against HF transformers (logits within 1e-4, greedy tokens identical), through chunked prefill cut at odd places,
mixed batches, preemption, prefix-cache hits resumed from state checkpoints, n-gram speculation (rollback of the
state) and n > 1 (a forked state)."""
import pytest
import torch
from conftest import PROMPTS, assert_all_blocks_free, hf_greedy, hf_logits, make_llm, save_tiny_model

from lanner import SamplingParams
from lanner.attention import AttentionMetadata
from lanner.model.ssm import SSMBatch

MODELS = {
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(hidden_size=64, num_hidden_layers=2, state_size=16,
                                                      conv_kernel=4, expand=2, time_step_rank=8)),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", dict(hidden_size=64, num_hidden_layers=2, state_size=16,
                                                         conv_kernel=4, expand=2, num_heads=4, head_dim=32,
                                                         n_groups=2, chunk_size=8)),
    "bamba": ("BambaForCausalLM", "BambaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                                      attn_layer_indices=[1], num_attention_heads=4,
                                                      num_key_value_heads=2, mamba_n_heads=4, mamba_n_groups=2,
                                                      mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                                                      mamba_chunk_size=8, max_position_embeddings=512)),
}
LONG = " ".join(PROMPTS[:4])
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory, llm):
    """(HF model, its directory) of one SSM architecture, with the default model's tokenizer."""
    arch, config_class, shape = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return save_tiny_model(path, arch, config_class, llm.tokenizer, weight_std=0.3, **shape), str(path)


def ssm_logits(llm, ids: list[int], chunk: int) -> torch.Tensor:
    """Every position's logits from the serving model, the prompt fed `chunk` tokens per forward through state
    slot 0 (fresh first, then carried) and KV blocks 0, 1, ... (a hybrid's attention layers)."""
    model, out = llm.engine.runner.model, []
    table = list(range(-(-len(ids) // llm.engine.cfg.block_size)))
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            meta = AttentionMetadata.build([end - start], [end], [table], list(range(start, end)))
            meta.ssm = SSMBatch(torch.tensor([0, end - start]), torch.tensor([0]), torch.tensor([start == 0]))
            out.append(model.compute_logits(model(torch.tensor(ids[start:end]), torch.arange(start, end), meta)))
    return torch.cat(out)


def test_prompt_logits_match_hf_in_one_pass_and_in_chunks(tiny, llm):
    hf, path = tiny
    ours = make_llm(path)
    ids = llm.tokenizer.encode(LONG)
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    for chunk in (len(ids), 7, 1):
        torch.testing.assert_close(ssm_logits(ours, ids, chunk), expected, atol=1e-4, rtol=0)


def test_greedy_matches_hf_with_chunked_prefill_and_a_mixed_batch(tiny, llm):
    hf, path = tiny
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:5]]
    expected = [hf_greedy(hf, ids, 16) for ids in prompts]
    ours = make_llm(path, max_num_batched_tokens=9)   # prompts cut at odd places, prefill beside decode rows
    assert [o.outputs[0].token_ids for o in ours.generate(prompts, GREEDY, use_tqdm=False)] == expected
    assert_all_blocks_free(ours)


def test_preemption_recomputes_the_state(tiny, llm):
    hf, path = tiny
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:4]]
    expected = [hf_greedy(hf, ids, 24) for ids in prompts]
    longest = max(len(p) for p in prompts) + 24
    tight = make_llm(path, block_size=4, num_kv_blocks=-(-longest // 4) + 2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(tight)


def test_a_repeated_prompt_resumes_from_a_state_checkpoint(tiny, llm):
    hf, path = tiny
    ours = make_llm(path, block_size=4)
    ids = llm.tokenizer.encode(LONG)
    first = ours.generate([ids], GREEDY, use_tqdm=False)[0]
    again = ours.generate([ids], GREEDY, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == hf_greedy(hf, ids, 16)
    assert again.metrics.num_cached_tokens == (len(ids) - 1) // 4 * 4
    longer = ids + llm.tokenizer.encode(" and then some more words")   # shares the prefix, continues past it
    out = ours.generate([longer], GREEDY, use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens >= (len(ids) - 1) // 4 * 4 - 4 * 16
    assert out.outputs[0].token_ids == hf_greedy(hf, longer, 16)
    other = ours.generate([ids[:-3] + [ids[-1]] * 3], GREEDY, use_tqdm=False)[0]   # differs near the end
    assert other.outputs[0].token_ids == hf_greedy(hf, ids[:-3] + [ids[-1]] * 3, 16)
    assert_all_blocks_free(ours)


class WrongFromRow:
    """Drafts the true continuation up to a row that moves each call (0..k), wrong tokens from there: every
    rollback depth of the state is exercised."""
    drafts_are_free = True
    reads_hidden_states = False

    def __init__(self, truth: list[list[int]]):
        self.truth, self.calls = truth, 0

    def propose_batch(self, seqs, wanted):
        out = []
        for seq, k in zip(seqs, wanted):
            true = self.truth[int(seq.request_id)][seq.num_output_tokens:seq.num_output_tokens + k]
            cut, self.calls = self.calls % (k + 1), self.calls + 1
            out.append(true[:cut] + [100 + (t + 7) % 1000 for t in true[cut:]])
        return out


def test_speculation_rolls_the_state_back_to_the_last_accepted_row(tiny, llm):
    hf, path = tiny
    prompts = [llm.tokenizer.encode(p) for p in ["1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", PROMPTS[1], LONG]]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in make_llm(path).generate(prompts, params, use_tqdm=False)]
    for proposer in ("ngram", WrongFromRow(plain)):
        spec = make_llm(path, speculative={"method": "ngram", "num_speculative_tokens": 3})
        if proposer != "ngram":
            spec.engine.proposer = proposer
        assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == plain
        assert_all_blocks_free(spec)
    assert spec.engine.num_drafted_tokens > spec.engine.num_accepted_tokens > 0   # rejected at every depth


def test_n_greater_than_one_forks_the_state(tiny, llm):
    _, path = tiny
    ours = make_llm(path)
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = ours.generate([ids], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8), use_tqdm=False)[0]
    alone = [ours.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]]
    assert len(out.outputs) == 3 and all(len(c.token_ids) == 8 for c in out.outputs)
    greedy = ours.generate([ids], SamplingParams(n=2, temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert [c.token_ids for c in greedy.outputs] == [alone[0].outputs[0].token_ids] * 2
    assert_all_blocks_free(ours)


def test_lora_on_a_state_space_model_is_refused(tiny):
    _, path = tiny
    with pytest.raises(ValueError, match="takes none"):
        make_llm(path, enable_lora=True)


def test_profile_breaks_an_ssm_step_into_projections_conv_and_scan(tiny):
    from lanner.engine.engine import LLMEngine
    from lanner.profiling.profile import Case, Profiler, engine_config_for
    from lanner.profiling.report import group_ms
    from lanner.profiling.timing import COMPONENTS
    _, path = tiny
    cases = [Case("prefill", 2, 40), Case("decode", 3, 64)]
    engine = LLMEngine(engine_config_for(cases, model=path, dtype="float32"))
    for r in Profiler(engine, repeats=3, warmup=1).run(cases):
        assert set(r.components_ms) == set(COMPONENTS)
        assert r.measured_ms == pytest.approx(r.instrumented_ms)   # exclusive times cover the step exactly
        for part in ("ssm_in_proj", "ssm_conv", "ssm_scan", "ssm_out_proj", "norms"):
            assert r.components_ms[part] > 0, part
        hybrid = bool(engine.model_config.num_kv_layers)
        assert (r.components_ms["attention"] > 0 and r.components_ms["qkv_proj"] > 0) == hybrid
        assert ("attention" in r.costs and r.costs["attention"]["flops"] > 0) == hybrid
        assert group_ms(r)["ssm"] > 0 and r.costs["ssm_scan"]["flops"] > 0
    assert not engine.has_unfinished_requests()
    assert len(engine.runner.states.free_running) == engine.runner.states.num_running


def test_what_ssm_layers_cannot_do_is_refused_by_name(tiny, tmp_path):
    """EAGLE heads, tensor parallelism and fine-tuning are written for attention-only decoders (a hybrid too)."""
    from lanner.distributed.shards import check_splittable
    from lanner.lora.finetune import finetune
    _, path = tiny
    ours = make_llm(path)
    with pytest.raises(ValueError, match="with SSM layers; use ngram"):
        make_llm(path, speculative={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="not the SSM layers"):
        check_splittable(ours.engine.model_config, 2)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a b", "completion": " c"}\n' * 4)
    with pytest.raises(ValueError, match="ssm_layers"):
        finetune(path, str(data), str(tmp_path / "out"), method="lora", max_steps=1)


def test_state_slots_and_a_hybrids_kv_blocks_share_kv_cache_memory(tiny):
    _, path = tiny
    gib = 0.004
    ours = make_llm(path, kv_cache_memory=gib, speculative={"method": "ngram", "num_speculative_tokens": 3})
    runner = ours.engine.runner
    states, hybrid = runner.states, bool(runner.model_cfg.num_kv_layers)
    assert states.nbytes <= gib * 2**30 * (0.5 if hybrid else 1.0)   # scratch for the draft rows included
    assert states.nbytes + runner.kv_cache.nbytes <= gib * 2**30
    assert runner.num_blocks > (1 if hybrid else 0) and ours.engine.max_drafting >= 1
    with pytest.raises(ValueError, match="holds no state slot"):
        make_llm(path, kv_cache_memory=1e-6)


def edited_copy(path, tmp_path, **changes):
    """The tiny model's directory with config.json keys changed (None: removed)."""
    import json
    import shutil
    copy = tmp_path / "edited"
    shutil.copytree(path, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return str(copy)


def bamba(path, llm, **changes):
    """A tiny random Bamba (MODELS' shapes with changes) saved by transformers: (HF model, directory)."""
    _, config_class, shape = MODELS["bamba"]
    return save_tiny_model(path, "BambaForCausalLM", config_class, llm.tokenizer, weight_std=0.3,
                           **{**shape, **changes}), str(path)


def test_a_bamba_config_in_the_older_style_rotates_half_of_each_head_as_hf(llm, tmp_path):
    import transformers
    _, path = bamba(tmp_path / "bamba", llm)
    older = edited_copy(path, tmp_path, rope_parameters=None, rope_theta=10000.0, attn_rotary_emb=8)
    reference = transformers.AutoModelForCausalLM.from_pretrained(older).float().eval()
    ids = llm.tokenizer.encode(LONG)
    torch.testing.assert_close(ssm_logits(make_llm(older), ids, 7), hf_logits(reference, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", [[0, 1, 2], None])
def test_a_bamba_with_every_or_no_layer_attending_runs_as_hf(llm, tmp_path, attention):
    """(HF's cache cannot hold the all-SSM one: it wants an attention layer; the logits are compared uncached.)"""
    hf, path = bamba(tmp_path, llm, attn_layer_indices=attention)
    ids = llm.tokenizer.encode(LONG)
    ours = make_llm(path, max_num_batched_tokens=5)
    with torch.no_grad():
        expected = hf(torch.tensor([ids]), use_cache=False).logits[0]
    torch.testing.assert_close(ssm_logits(ours, ids, 5), expected, atol=1e-4, rtol=0)
    assert len(ours.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 16
    assert_all_blocks_free(ours)


def test_a_fork_without_a_free_kv_block_recomputes(tiny, llm):
    _, path = tiny
    ids = llm.tokenizer.encode(LONG)[:9]
    tight = make_llm(path, block_size=4, num_kv_blocks=3)   # the parent's prompt fills the pool
    params = SamplingParams(n=2, temperature=0, max_tokens=3, ignore_eos=True)
    out = tight.generate([ids], params, use_tqdm=False)[0]
    alone = make_llm(path).generate([ids], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                    use_tqdm=False)[0].outputs[0].token_ids
    assert [c.token_ids for c in out.outputs] == [alone, alone]
    assert_all_blocks_free(tight)
