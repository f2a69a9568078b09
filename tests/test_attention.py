"""Every attention backend computes reference.attention over the paged KV cache, within tolerance.

The Triton kernels run under TRITON_INTERPRET=1 on CPU (small shapes: the interpreter is slow), and
natively when LANNER_TEST_DEVICE=cuda. The CPU fast path always runs on CPU.
"""
import ctypes
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from conftest import built_for_isa

import lanner.native

DEVICE = os.environ.get("LANNER_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

from lanner.attention import cpu as cpu_backend, native, reference  # noqa: E402
from lanner.attention.metadata import AttentionMetadata  # noqa: E402

try:
    from lanner.attention import triton as triton_backend
except ImportError:
    triton_backend = None

TRITON = pytest.param("triton", marks=pytest.mark.skipif(triton_backend is None, reason="no triton"))
BACKENDS = ["cpu", "cpu-torch", TRITON]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
WINDOWS = [None, 1, 5, 37]   # 1: a row sees only itself; 5: cuts inside a 16-key block; 37: across blocks
SOFTCAPS = [None, 30.0]


def without_native(fn):
    """fn with the compiled kernel switched off: the CPU backend's pure-PyTorch path."""
    def call(*args, **kw):
        with mock.patch.object(native, "paged_attention", lambda: None):
            return fn(*args, **kw)
    return call


CPU_TORCH = SimpleNamespace(attention=without_native(cpu_backend.attention), store_kv=cpu_backend.store_kv)


def backend_and_device(name):
    return {"cpu": (cpu_backend, "cpu"), "cpu-torch": (CPU_TORCH, "cpu")}.get(name, (triton_backend, DEVICE))


def make_batch(q_lens, seq_lens, *, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
               dtype=torch.float32, tree=False, seed=0):
    """Random paged cache holding each sequence's context in shuffled blocks, plus its new queries."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    tree_mask = random_tree_mask(q_lens, gen) if tree else None
    meta = AttentionMetadata.build(q_lens, seq_lens, tables, [-1] * sum(q_lens), tree_mask)
    return q, k_cache, v_cache, meta


def random_tree_mask(q_lens, gen):
    """Each draft row sees itself and its ancestors in a random tree over its sequence's new rows."""
    mask = torch.zeros(sum(q_lens), max(q_lens), dtype=torch.bool)
    start = 0
    for q_len in q_lens:
        for j in range(q_len):
            mask[start + j, j] = True
            if j:
                parent = int(torch.randint(0, j, (1,), generator=gen))
                mask[start + j, :j] = mask[start + parent, :j]
        start += q_len
    return mask


def run(name, q, k_cache, v_cache, meta, **kw):
    backend, device = backend_and_device(name)
    result = backend.attention(q.to(device), k_cache.to(device), v_cache.to(device), meta.to(device), **kw)
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


def assert_matches_reference(name, batch, dtype=torch.float32, **kw):
    out, lse = run(name, *batch, return_lse=True, **kw)
    ref_out, ref_lse = reference.attention(*batch, return_lse=True, **kw)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


def capped_batch(batch, softcap):
    """With a softcap, queries scaled up so that scores reach it and the capping matters."""
    q, k_cache, v_cache, meta = batch
    return (q * 12 if softcap else q), k_cache, v_cache, meta


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_rows_across_block_boundaries(backend):
    assert_matches_reference(backend, make_batch([1] * 6, [1, 15, 16, 17, 33, 64]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_prompt_prefill_is_causal(backend):
    assert_matches_reference(backend, make_batch([1, 7, 40], [1, 7, 40]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunk_sees_its_cached_prefix(backend):
    assert_matches_reference(backend, make_batch([5, 20, 3], [37, 36, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_prefill_decode_and_verify_rows_in_one_call(backend):
    assert_matches_reference(backend, make_batch([30, 1, 4, 0, 1, 12], [30, 50, 21, 9, 16, 40]))


@pytest.fixture(params=["kernel", "sdpa", "past-turned"])
def long_prompts_to(request, monkeypatch):
    """Where prompt chunks past KERNEL_QUERY go: the kernel up to TURNED_QUERY where it turns keys (AVX-512), else
    torch's flash attention, which every machine then tests too (as it would a kernel that does not turn keys, or
    chunks past TURNED_QUERY)."""
    if request.param == "sdpa":
        monkeypatch.setattr(cpu_backend.native, "turns_keys", lambda cache_dtype, head_dim: False)
    if request.param == "past-turned":
        monkeypatch.setattr(cpu_backend, "TURNED_QUERY", cpu_backend.KERNEL_QUERY)
    return request.param


def test_cpu_prompt_chunks_past_the_kernels_limit_share_a_step_with_its_rows(long_prompts_to):
    """The compiled kernel takes prompt chunks up to KERNEL_QUERY tokens (TURNED_QUERY where it scores them by
    turned keys), torch's flash attention the longer ones (one fresh, one after a cached prefix), all in one
    call."""
    long = cpu_backend.KERNEL_QUERY + 9
    q_lens, seq_lens = [long, 1, long, 200, 5], [long, 300, long + 40, 260, 30]
    for dtype in (torch.float32, torch.bfloat16):
        assert_matches_reference("cpu", make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, dtype=dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gqa_query_heads_share_their_kv_head(backend, group, head_dim):
    batch = make_batch([1, 3, 18], [20, 35, 18], num_heads=2 * group, num_kv_heads=2, head_dim=head_dim)
    assert_matches_reference(backend, batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_caches(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; checked on the GPU")
    batch = make_batch([1, 1, 5, 20], [40, 17, 21, 20], num_heads=6, num_kv_heads=2, dtype=dtype)
    assert_matches_reference(backend, batch, dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("window, softcap", [(0, 0.0), (37, 30.0)])
def test_bf16_prompts_on_every_path_of_the_cpu_kernel(head_dim, group, window, softcap):
    """bf16 prompts (AMX tiles where the CPU has them, else dot products on turned keys): 16-row tiles with a partial
    last one, a causal chunk edge, a cached context, windows and softcaps, against the reference."""
    batch = capped_batch(make_batch([150, 9, 40], [150, 9, 100], num_heads=2 * group, num_kv_heads=2,
                                    head_dim=head_dim, dtype=torch.bfloat16, seed=group), softcap)
    assert_matches_reference("cpu", batch, torch.bfloat16, window=window or None, softcap=softcap or None)
    if {"amx_tile", "amx_bf16", "avx512_bf16"} <= lanner.native.cpu_flags() and not os.environ.get("LANNER_ISA"):
        assert lanner.native.library(native.SOURCE).attention_tiles()   # the tiles took them


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size, head_dim", [(8, 64), (32, 80)])
def test_other_block_sizes_and_head_dims(backend, block_size, head_dim):
    batch = make_batch([1, 9, 2], [45, 9, 70], block_size=block_size, head_dim=head_dim)
    assert_matches_reference(backend, batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_mixed_batches(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    q_lens = torch.randint(0, 6, (10,), generator=gen).tolist() + torch.randint(17, 40, (1,), generator=gen).tolist()
    seq_lens = [max(1, q + int(torch.randint(0, 90, (1,), generator=gen))) for q in q_lens]
    assert_matches_reference(backend, make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, tree=True, seed=seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_keep_fp32_precision_with_bf16_cache(backend):
    """Scores rounded to bf16 would be off by ~|logit| / 256: at logits of ~30 that moves the output."""
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; checked on the GPU")
    q, k_cache, v_cache, meta = make_batch([1, 1, 4], [300, 77, 150], num_heads=6, num_kv_heads=2)
    q, k_cache = (6 * q).bfloat16(), (6 * k_cache).bfloat16()
    exact = reference.attention(q.float(), k_cache.float(), v_cache, meta)
    torch.testing.assert_close(run(backend, q, k_cache, v_cache.bfloat16(), meta).float(), exact, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tree_mask_limits_which_draft_rows_each_row_sees(backend):
    batch = make_batch([5, 1, 7, 20], [25, 9, 7, 33], tree=True, seed=3)
    assert_matches_reference(backend, batch)
    plain = run(backend, *make_batch([5, 1, 7, 20], [25, 9, 7, 33], seed=3))
    assert not torch.allclose(run(backend, *batch), plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_with_no_new_tokens_leaves_its_neighbours_alone(backend):
    assert_matches_reference(backend, make_batch([0, 2, 0, 1, 0], [12, 18, 5, 33, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_may_be_a_strided_view_of_a_fused_qkv_projection(backend):
    q, k_cache, v_cache, meta = make_batch([20, 1, 3], [40, 30, 10])
    qkv = torch.cat([q.flatten(1), torch.randn(q.shape[0], 2 * 2 * 64)], dim=1)
    strided_q = qkv[:, :q[0].numel()].view_as(q)
    assert not strided_q.is_contiguous()
    assert_matches_reference(backend, (strided_q, k_cache, v_cache, meta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale_is_used(backend):
    assert_matches_reference(backend, make_batch([1, 6], [30, 6]), scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_that_sees_nothing_gives_zeros_and_minus_inf_lse(backend):
    q, k_cache, v_cache, meta = make_batch([3, 1], [3, 10])
    meta.tree_mask = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out, lse = run(backend, q, k_cache, v_cache, meta, return_lse=True)
    assert out[0].eq(0).all() and lse[0].eq(float("-inf")).all()
    assert_matches_reference(backend, (q, k_cache, v_cache, meta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_block_table_entry_is_caught(backend):
    """Negative control: the comparison is sharp enough to see one misplaced block."""
    q, k_cache, v_cache, meta = make_batch([1, 1], [40, 20])
    good = run(backend, q, k_cache, v_cache, meta)
    meta.block_tables[0, 1] = meta.block_tables[1, 0]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run(backend, q, k_cache, v_cache, meta), good, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_kv_writes_slots_and_skips_minus_one(backend):
    backend_module, device = backend_and_device(backend)
    k_cache, v_cache = torch.zeros(2, 2, 4, 3, 16, device=device).unbind(0)
    k, v = torch.randn(2, 4, 3, 16, device=device).unbind(0)
    slots = torch.tensor([5, -1, 0, 7], device=device)
    backend_module.store_kv(k, v, k_cache, v_cache, slots)
    expect_k, expect_v = torch.zeros(2, 2, 4, 3, 16, device=device).unbind(0)
    reference.store_kv(k, v, expect_k, expect_v, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
    assert k_cache.view(-1, 3, 16)[[1, 2, 3, 4, 6]].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_then_attend_sees_the_new_tokens(backend):
    backend_module, device = backend_and_device(backend)
    q, k_cache, v_cache, meta = make_batch([4, 1], [20, 9])
    pos = [16, 17, 18, 19, 8]
    seq = [0, 0, 0, 0, 1]
    meta.slot_mapping = torch.tensor([int(meta.block_tables[s, p // 16]) * 16 + p % 16 for s, p in zip(seq, pos)])
    k_new, v_new = torch.randn(2, 5, 2, 64).unbind(0)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(k_new, v_new, ref_k, ref_v, meta.slot_mapping)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    backend_module.store_kv(k_new.to(device), v_new.to(device), k_cache, v_cache, meta.slot_mapping.to(device))
    torch.testing.assert_close(run(backend, q, k_cache, v_cache, meta), reference.attention(q, ref_k, ref_v, meta))


@pytest.mark.skipif(triton_backend is None, reason="no triton")
@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("window, softcap", [(None, None), (5, None), (100, 30.0)])
def test_split_kv_segments_merge_by_lse(num_splits, window, softcap):
    batch = capped_batch(make_batch([1, 1, 1, 1], [1, 40, 130, 200], num_heads=6, num_kv_heads=2), softcap)
    q, k_cache, v_cache, meta = (x.to(DEVICE) for x in batch)
    out, lse = triton_backend.paged_attention(q, k_cache, v_cache, meta, return_lse=True, num_splits=num_splits,
                                              window=window, softcap=softcap)
    ref_out, ref_lse = reference.attention(*batch, return_lse=True, window=window, softcap=softcap)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(triton_backend is None, reason="no triton")
def test_split_kv_is_chosen_for_long_decode_only():
    decode = AttentionMetadata.build([1] * 4, [8192] * 4, [[0]] * 4, [0] * 4)
    prefill = AttentionMetadata.build([512], [8192], [[0]], [0] * 512)
    short = AttentionMetadata.build([1] * 4, [64] * 4, [[0]] * 4, [0] * 4)
    assert triton_backend.choose_num_splits(decode, 2, torch.device("cpu")) > 1
    assert triton_backend.choose_num_splits(prefill, 2, torch.device("cpu")) == 1
    assert triton_backend.choose_num_splits(short, 2, torch.device("cpu")) == 1


def test_cpu_segments_and_sequence_groups_merge_exactly(monkeypatch):
    monkeypatch.setattr(cpu_backend, "SEGMENT_BYTES", 1)        # a segment of 16 keys
    monkeypatch.setattr(cpu_backend, "SCORES_ELEMENTS", 4000)   # a few sequences per group
    assert_matches_reference("cpu-torch", make_batch([1, 1, 3, 1, 1, 2], [70, 5, 100, 33, 16, 47], tree=True))


def test_reference_window_and_softcap_are_hf_gemma2_eager_attention():
    """The oracle's window and softcap are HF transformers' sliding-window mask and Gemma 2's eager
    attention (softcap after scaling, before the mask), on one sequence with a cached prefix."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    window, softcap, group = 5, 30.0, 2
    q, k_cache, v_cache, meta = capped_batch(make_batch([6], [40], num_heads=4, num_kv_heads=2), softcap)
    out = reference.attention(q, k_cache, v_cache, meta, window=window, softcap=softcap)
    k, v = (reference.gather_kv(c, meta.block_tables[0], 40).transpose(0, 1)[None] for c in (k_cache, v_cache))
    visible = sliding_window_causal_mask_function(window)(0, 0, torch.arange(34, 40)[:, None], torch.arange(40)[None])
    bias = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    module = SimpleNamespace(num_key_value_groups=group, head_dim=64, training=False)
    hf, _ = eager_attention_forward(module, q.transpose(0, 1)[None], k, v, bias, scaling=64 ** -0.5, softcap=softcap)
    torch.testing.assert_close(out, hf[0], atol=2e-5, rtol=2e-5)
    assert not torch.allclose(out, reference.attention(q, k_cache, v_cache, meta, window=window), atol=1e-3)
    assert not torch.allclose(out, reference.attention(q, k_cache, v_cache, meta, softcap=softcap), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("softcap", SOFTCAPS)
@pytest.mark.parametrize("q_lens, seq_lens", [
    ([1] * 6, [1, 15, 16, 17, 50, 130]),             # decode over several blocks, windows ending mid-block
    ([1, 7, 60], [1, 7, 60]),                        # whole prompts, one longer than every window
    ([5, 20, 3], [90, 76, 3]),                       # prompt chunks after a context longer than the window
    ([30, 1, 4, 0, 1, 12], [30, 50, 21, 9, 16, 40]),  # all kinds of rows in one call
], ids=["decode", "prompts", "chunks-after-context", "mixed"])
def test_sliding_window_and_softcap(backend, window, softcap, q_lens, seq_lens):
    batch = capped_batch(make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2), softcap)
    assert_matches_reference(backend, batch, window=window, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("window, softcap", [(5, None), (37, 30.0)])
def test_sliding_window_and_softcap_with_gqa_and_tree_mask(backend, group, window, softcap):
    batch = make_batch([1, 4, 6, 18], [60, 41, 6, 90], num_heads=2 * group, num_kv_heads=2, tree=True, seed=4)
    assert_matches_reference(backend, capped_batch(batch, softcap), window=window, softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window, softcap", [(5, 30.0), (37, None), (None, 30.0)])
def test_sliding_window_and_softcap_with_half_precision_caches(backend, dtype, window, softcap):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; checked on the GPU")
    batch = make_batch([1, 1, 5, 20], [70, 17, 41, 20], num_heads=6, num_kv_heads=2, dtype=dtype)
    assert_matches_reference(backend, capped_batch(batch, softcap), dtype, window=window, softcap=softcap)


@pytest.mark.parametrize("backend", ["cpu", "cpu-torch"])
@pytest.mark.parametrize("window, softcap", [(5, None), (37, 30.0), (None, 30.0), (300, 30.0)])
def test_cpu_sliding_window_and_softcap_past_the_kernels_limit(backend, window, softcap, long_prompts_to):
    """Prompt chunks longer than KERNEL_QUERY (the kernel where it turns keys, else torch's flash attention, or
    plain matmuls when capped), fresh and after a context, next to the kernel's rows, with fp32 and bf16 caches."""
    long = cpu_backend.KERNEL_QUERY + 9
    q_lens, seq_lens = [long, 1, long, 200, 5], [long, 300, long + 40, 260, 30]
    for dtype in (torch.float32, torch.bfloat16):
        batch = make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, dtype=dtype)
        assert_matches_reference(backend, capped_batch(batch, softcap), dtype, window=window, softcap=softcap)


def test_cpu_capped_prompt_goes_in_query_chunks(monkeypatch):
    monkeypatch.setattr(cpu_backend, "SCORES_ELEMENTS", 5000)   # a few query rows per chunk
    batch = capped_batch(make_batch([40, 70], [40, 100], tree=True, seed=5), 30.0)
    assert_matches_reference("cpu-torch", batch, window=37, softcap=30.0)


@pytest.fixture(params=lanner.native.supported_isas())
def isa(request):
    with built_for_isa(request.param, native.paged_attention) as level:
        yield level


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_window_and_softcap_on_every_isa(isa, dtype):
    q_lens, seq_lens = [1, 1, 1, 5, 20, 3, 12], [1, 17, 130, 90, 76, 3, 40]
    for window in WINDOWS:
        for softcap in SOFTCAPS:
            batch = make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, tree=True, dtype=dtype)
            assert_matches_reference("cpu", capped_batch(batch, softcap), dtype, window=window, softcap=softcap)


@pytest.mark.skipif("avx2" not in lanner.native.supported_isas(), reason="no AVX2 level to build for")
def test_the_build_that_runs_the_calls_decides_whether_q_goes_in_fp32():
    """A kernel built for AVX2 scores a bf16 cache in fp32: it gets the fp32 query even once LANNER_ISA names
    another level (asking the current level's build instead passed it none, and the process crashed)."""
    native.paged_attention.cache_clear()
    try:
        with mock.patch.dict(os.environ, {"LANNER_ISA": "avx2"}):
            assert native.paged_attention() is not None
        assert not native.query_in_bf16(torch.bfloat16, 64)   # the cached AVX2 build's answer
        assert_matches_reference("cpu", make_batch([1, 3, 40], [9, 50, 40], dtype=torch.bfloat16), torch.bfloat16)
    finally:
        native.paged_attention.cache_clear()


@pytest.mark.parametrize("backend", ["cpu", TRITON])
def test_only_the_window_is_read(backend):
    """NaN in every block wholly before a sequence's first window leaves the answer alone: the CPU kernel
    (and its prompt path past KERNEL_QUERY) and the Triton kernel (blocks of whole tiles) never read them."""
    window, long = 37, cpu_backend.KERNEL_QUERY + 9
    q_lens, seq_lens = [1, 1, 6, long], [1000, 200, 300, long + 150]
    q, k_cache, v_cache, meta = make_batch(q_lens, seq_lens, num_heads=6, num_kv_heads=2, block_size=64)
    clean = run(backend, q, k_cache, v_cache, meta, return_lse=True, window=window, softcap=30.0)
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        unseen = meta.block_tables[i, :(seq_len - q_len - window + 1) // 64].long()
        k_cache[unseen], v_cache[unseen] = float("nan"), float("nan")
    assert k_cache.isnan().any()
    poisoned = run(backend, q, k_cache, v_cache, meta, return_lse=True, window=window, softcap=30.0)
    assert torch.equal(poisoned[0], clean[0]) and torch.equal(poisoned[1], clean[1])


def attention_pieces(seq_lens, q_lens, window=0, cap=1 << 30, threads=2):
    """The kernel's work items for these sequences: [(sequence, first key, end key, run)]."""
    fn = lanner.native.library(native.SOURCE).attention_pieces
    seq_lens_c = (ctypes.c_int32 * len(seq_lens))(*seq_lens)
    cu = (ctypes.c_int32 * (len(q_lens) + 1))(*[sum(q_lens[:i]) for i in range(len(q_lens) + 1)])
    seqs = (ctypes.c_int64 * len(seq_lens))(*range(len(seq_lens)))
    args = [seq_lens_c, cu, seqs, len(seq_lens), window, cap, threads]
    n = fn(*args, None, 0)
    out = (ctypes.c_int32 * (4 * n))()
    assert fn(*args, out, n) == n
    return [tuple(out[4 * j:4 * j + 4]) for j in range(n)]


def test_native_pieces_cover_each_window_in_one_run_per_thread():
    """A decode step over 10k keys with a 4k window reads only the window, cut into equal runs, one per thread."""
    for threads in (1, 2, 3):
        pieces = attention_pieces([10_000], [1], window=4096, threads=threads)
        assert [p[3] for p in pieces] == list(range(threads))
        assert pieces[0][1] == 10_000 - 4096 and pieces[-1][2] == 10_000
        assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))
        sizes = [p[2] - p[1] for p in pieces]
        assert max(sizes) - min(sizes) <= threads   # ceil(keys / threads) each, the rest to the last
    assert attention_pieces([40], [1], threads=2) == [(0, 0, 40, 0)]   # too little work to split


def seen_by(key, seq_len, q_len):
    """Query rows of a sequence that see this key: all of them for its context, fewer for its own (causal) keys."""
    return min(q_len, seq_len - key)


@pytest.mark.parametrize("cap", [1 << 30, 37])
def test_native_pieces_balance_work_across_runs(cap):
    """Mixed sequences (decode rows, verify rows, prompt chunks after a context and fresh): every key is in
    exactly one piece, pieces respect the cap, and each run's work (for each key, the query rows that see it) is
    within one key's work (and rounding) of an equal share."""
    seq_lens, q_lens, threads = [700, 50, 1200, 90, 300, 2000, 500], [1, 1, 4, 1, 128, 1, 500], 2
    pieces = attention_pieces(seq_lens, q_lens, cap=cap, threads=threads)
    for i, n in enumerate(seq_lens):
        mine = [p for p in pieces if p[0] == i]
        assert mine[0][1] == 0 and mine[-1][2] == n and all(a[2] == b[1] for a, b in zip(mine, mine[1:]))
    assert all(0 < p[2] - p[1] <= cap for p in pieces)
    assert [p[3] for p in pieces] == sorted(p[3] for p in pieces)
    work = [sum(seen_by(k, seq_lens[p[0]], q_lens[p[0]]) for p in pieces if p[3] == r for k in range(p[1], p[2]))
            for r in range(threads)]
    share = sum(seen_by(k, n, q) for n, q in zip(seq_lens, q_lens) for k in range(n)) / threads
    assert all(abs(w - share) <= max(q_lens) + threads for w in work)


def test_native_pieces_cut_a_fresh_prompt_where_its_causal_work_halves():
    """A 2,048-token prompt's first keys are seen by every row, its last by one: two runs split it near key 600
    (2048 - 2048 / sqrt 2), not at 1,024, where the first run would have three times the second's work."""
    pieces = attention_pieces([2048], [2048], threads=2)
    assert [(p[1], p[3]) for p in pieces] == [(0, 0), (pieces[1][1], 1)] and abs(pieces[1][1] - 600) <= 1


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_native_kernel_is_built_where_a_compiler_exists():
    assert native.paged_attention() is not None


def test_a_failed_build_falls_back_to_pytorch_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("LANNER_HOME", str(tmp_path))      # no cached library to load
    monkeypatch.setenv("CC", "false")                      # a "compiler" that always fails
    native.paged_attention.cache_clear()
    lanner.native.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="paged_attention.c unavailable"):
            assert native.paged_attention() is None
        assert_matches_reference("cpu", make_batch([1, 2], [40, 9]))   # the PyTorch path answers
    finally:
        native.paged_attention.cache_clear()
        lanner.native.load.cache_clear()


@pytest.mark.parametrize("keys_per_split", [1, 16, 37])
@pytest.mark.parametrize("window, softcap", [(None, None), (5, 30.0), (40, None)])
def test_native_splits_merge_by_lse(monkeypatch, keys_per_split, window, softcap):
    monkeypatch.setattr(native, "MAX_PIECE_KEYS", keys_per_split)
    for dtype in (torch.float32, torch.bfloat16):
        batch = make_batch([1, 1, 3, 1, 2], [70, 5, 100, 33, 47], num_heads=6, num_kv_heads=2, tree=True, dtype=dtype)
        assert_matches_reference("cpu", capped_batch(batch, softcap), dtype=dtype, window=window, softcap=softcap)


def test_importing_attention_does_not_need_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from lanner.attention import get_backend\n"
            "get_backend('cpu')\n"
            "try:\n    get_backend('triton')\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install triton" in result.stdout


@pytest.mark.parametrize("nan", [float("nan"), -float("nan")])   # either sign bit: the kernels mask by sign bits
def test_a_nan_in_a_visible_key_reaches_the_rows_that_read_it(nan):
    """As in torch's SDPA: the rows that read a NaN key give NaN (a bad cache shows), no other row does."""
    q, k_cache, v_cache, meta = make_batch([1, 1], [40, 40])
    k_cache[meta.block_tables[0, 0], 3, 0, 5] = nan   # a key the first sequence sees (KV head 0)
    out = run("cpu", q, k_cache, v_cache, meta)
    assert out[0, :2].isnan().all() and not out[0, 2:].isnan().any()   # query heads 0-1 read KV head 0
    torch.testing.assert_close(out[1], reference.attention(q, k_cache, v_cache, meta)[1])
