"""Scheduling, preemption, chunked prefill, prefix caching and block accounting keep outputs identical."""
import gc

import pytest
import torch
from conftest import PROMPTS, assert_all_blocks_free, make_llm

from lanner import SamplingParams
from lanner.engine.memory import HUGE_PAGE, keep_freed_memory, zeroed_kv_memory

GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(llm):
    return [llm.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def generate_ids(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("options", [
    dict(num_kv_blocks=12, block_size=4),                                  # tiny pool: preemption
    dict(num_kv_blocks=12, block_size=4, enable_prefix_caching=False),
    dict(max_num_batched_tokens=7),                                        # chunked prefill
    dict(block_size=1),
    dict(block_size=32),
    dict(max_num_seqs=3),
], ids=["preempt", "preempt-no-prefix-cache", "chunked-prefill", "block-1", "block-32", "few-seqs"])
def test_outputs_identical_under_memory_pressure_and_scheduling_limits(default_model_path, prompts, expected, options):
    llm = make_llm(default_model_path, **options)
    assert generate_ids(llm, prompts) == expected
    if options.get("num_kv_blocks"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)


def test_prefix_hit_computes_only_new_tokens(llm):
    shared = llm.tokenizer.encode("Here is a long shared system prompt. " * 20)
    first = llm.generate(shared + llm.tokenizer.encode(" Question one?"), GREEDY, use_tqdm=False)[0]
    second = llm.generate(shared + llm.tokenizer.encode(" Another question?"), GREEDY, use_tqdm=False)[0]
    bs = llm.engine.cfg.block_size
    assert first.metrics.num_cached_tokens == 0 or first.metrics.num_cached_tokens < len(shared)
    assert second.metrics.num_cached_tokens == (len(shared) // bs) * bs
    assert second.metrics.num_cached_tokens >= 128
    assert_all_blocks_free(llm)


def test_prefix_cache_keys_include_the_full_prefix(llm):
    a = llm.tokenizer.encode("Alpha beta gamma delta. " * 8)
    b = llm.tokenizer.encode("Omega psi chi phi. " * 8) + a
    llm.generate(a, GREEDY, use_tqdm=False)
    out = llm.generate(b, GREEDY, use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == 0   # same blocks of tokens, different parents: no hit


def test_aborted_and_rejected_requests_free_their_blocks(llm, prompts):
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    engine.step()
    engine.step()
    for rid in ids[::2]:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([prompts[0], list(range(10, 10 + engine.max_model_len))], GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)


def test_prompt_longer_than_pool_is_rejected_with_both_sizes(default_model_path, prompts):
    llm = make_llm(default_model_path, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match=r"more KV blocks than the whole pool \(4 blocks of 4\)"):
        llm.generate(prompts[2], GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)


def test_finish_reasons_and_metrics(llm, prompts):
    out = llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    assert out.metrics.num_prompt_tokens == len(prompts[0]) and out.metrics.ttft > 0
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=200),
                    use_tqdm=False)[0]
    assert chat.outputs[0].finish_reason == "stop"
    assert chat.outputs[0].token_ids[-1] in llm.tokenizer.stop_token_ids


def test_stats_report_running_waiting_blocks_and_hit_rate(llm):
    stats = llm.engine.stats()
    assert {"running", "waiting", "kv_blocks_used", "prefix_cache_hit_rate"} <= stats.keys()
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0


def test_incremental_detokenization_never_splits_a_character(llm):
    text = "Emoji 🙂🚀 and CJK 你好世界 and accents éàü."
    ids = llm.tokenizer.encode(text)
    from lanner.engine.sequence import Sequence
    seq = Sequence("x", [], SamplingParams())
    pieces = []
    for t in ids:
        seq.token_ids.append(t)
        pieces.append(seq.detokenize(llm.tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_kv_memory_is_zeroed_aligned_and_outlives_its_first_view():
    cache = zeroed_kv_memory((3, 2, 5, 16, 2, 64), torch.bfloat16)
    assert cache.shape == (3, 2, 5, 16, 2, 64) and cache.dtype == torch.bfloat16
    assert cache.data_ptr() % HUGE_PAGE == 0 and not cache.any()
    layer = cache[2]
    del cache
    gc.collect()
    layer.fill_(1.5)   # the mapping lives as long as a view of it
    assert float(layer.float().sum()) == 1.5 * layer.numel()


def vm_flags_at(address: int) -> list[str] | None:
    """The kernel's VmFlags of the mapping that holds address (None where /proc does not report them)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:   # a mapping's first line: start-end perms ...
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


def test_packed_weights_are_advised_for_huge_pages_once_written(llm):
    from lanner.engine.memory import WeightMemory
    from lanner.quant.ggml import GGMLLinear
    memory = WeightMemory()
    a, b = memory.take(100), memory.take(5000)
    assert a.data_ptr() % 64 == 0 and b.data_ptr() == a.data_ptr() + 128
    assert not a.any() and not b.any()
    big = memory.take(WeightMemory.CHUNK + 1)   # more than a chunk holds: a mapping of its own
    assert big.numel() == WeightMemory.CHUNK + 1 and big.data_ptr() % HUGE_PAGE == 0
    flags = vm_flags_at(a.data_ptr())
    if flags is None:
        pytest.skip("the kernel does not report VmFlags")
    assert "hg" not in flags and "hg" not in vm_flags_at(big.data_ptr())   # written first on 4 KiB pages
    memory.advise_huge_pages()
    assert "hg" in vm_flags_at(a.data_ptr()) and "hg" in vm_flags_at(big.data_ptr())
    linears = [getattr(m, "quantized", None) for m in llm.engine.runner.model.modules()]
    packed = [q.packed for q in linears if isinstance(q, GGMLLinear) and q.packed is not None]
    if not packed:
        pytest.skip("no packed layout on this build")
    assert all("hg" in vm_flags_at(p.data_ptr()) for p in packed)   # the engine advised its own once loaded


def page_faults_of(action) -> int:
    """The minor page faults this process took while action() ran."""
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    action()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_a_prefaulted_kv_pool_is_written_without_page_faults():
    def faults_of_writing(prefault):
        cache = zeroed_kv_memory((2, 2, 128, 16, 2, 64), torch.float32, prefault)   # 16 MiB
        assert not cache.any()
        return page_faults_of(lambda: cache[:, :, ::2].fill_(1.0))   # as the steps write it: its blocks

    lazy, prefaulted = faults_of_writing(False), faults_of_writing(True)
    assert prefaulted <= lazy // 4 + 2, (lazy, prefaulted)


def test_a_steps_freed_scratch_stays_in_the_heap():
    import ctypes
    if not keep_freed_memory():
        pytest.skip("the C library is not glibc")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def a_step(nbytes=20 << 20):   # a big step's scratch: written, then freed
        block = libc.malloc(nbytes)
        libc.memset(block, 1, nbytes)
        libc.free(block)

    a_step()
    assert page_faults_of(a_step) < 100   # mapped afresh, its 4 KiB pages would fault 5,120 times


def test_start_up_leaves_the_collector_on_and_an_engine_collectable(default_model_path):
    """Imports and the model's load run without cyclic collections; the collector runs again after them (and
    after a load that fails). What the imports made is frozen out of later collections; nothing of an engine is,
    which could never be freed then."""
    assert gc.isenabled() and gc.get_freeze_count() > 0
    frozen = gc.get_freeze_count()
    make_llm(default_model_path, kv_cache_memory=0.01)
    assert gc.isenabled() and gc.get_freeze_count() < frozen + 1000   # freezing a load froze ~8,000
    with pytest.raises(ValueError):
        make_llm(default_model_path + ".missing", kv_cache_memory=0.01)
    assert gc.isenabled()


def test_the_last_layer_runs_on_the_logit_rows_alone(llm, prompts):
    """A prefill step (one whole prompt, one chunk of another) computes past the last layer's attention only the rows
    it samples: the same logits as every row's pass (up to the linears' order of sums at another row count), and
    every row's K/V stored all the same."""
    from lanner.engine.sequence import Sequence
    engine, runner = llm.engine, llm.engine.runner
    seen = []
    hook = runner.model.layers[-1].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        logits, kv = {}, {}
        for every in (False, True):
            # past MAX_ROWS rows (a one-call step computes every row of the steps it takes)
            seqs = [Sequence(f"trim{i}", (p * 64)[:200], SamplingParams(max_tokens=1)) for i, p in enumerate(prompts[:2])]
            scheduled = [(seqs[0], seqs[0].num_tokens), (seqs[1], seqs[1].num_tokens - 3)]   # the second: a chunk
            for seq, num in scheduled:
                engine.blocks.allocate(seq, num)
            logits[every], _, tokens = runner.run(scheduled, every_hidden=every)
            last = runner.model.layers[-1].self_attn
            blocks = torch.tensor(seqs[0].block_table)
            kv[every] = (last.k_cache[blocks].clone(), last.v_cache[blocks].clone())
            assert tokens == [seqs[0].num_tokens - 1]   # the chunk's rows are not sampled
            for seq, _ in scheduled:
                engine.blocks.release(seq)
    finally:
        hook.remove()
    rows = sum(num for _, num in scheduled)
    assert seen == [1, rows]
    torch.testing.assert_close(logits[False], logits[True], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(kv[False], kv[True]))
