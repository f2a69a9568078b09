"""Unified FlashAttention over the paged KV cache: one launch serves prefill chunks, decode and verify rows.

A program owns BLOCK_Q query tokens of one sequence times the GROUP query heads that share one KV head
(BLOCK_M = BLOCK_Q * GROUP rows, so every K/V tile it loads is used by the whole group), and walks that
sequence's keys TILE_N at a time through its block table with FlashAttention's online softmax.
With NUM_SPLITS > 1 (Flash-Decoding) the key range is cut into segments run by separate programs; each
writes a normalized partial output and its log-sum-exp, and merge_splits combines them.
With a sliding window (WINDOW > 0) a program's keys start at the window of its first row; soft-capped
scores (SOFTCAP > 0) go through tanh before masking.
"""
import torch
import triton
import triton.language as tl

from lanner.attention.metadata import AttentionMetadata

LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning q_block; sequence i's q-blocks start at cu_seqlens_q[i] // BLOCK_Q + i."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh from exp(-2|x|) <= 1, which cannot overflow; the sign put back."""
    t = 2.0 / (1.0 + tl.exp(-2.0 * tl.abs(x))) - 1.0
    return tl.where(x < 0, -t, t)


@triton.jit
def _attention_kernel(
    out_ptr, lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr, tree_mask_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os, stride_lt, stride_lh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt, stride_tm,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_TREE: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """WINDOW: query at position p sees keys (p - WINDOW, p], 0 = all. SOFTCAP: the soft-capping bound in
    the kernel's log2 units of the scores (softcap * log2(e)), 0 = none."""
    q_block, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = _find_seq(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # causal offset: query j sits at position ctx_len + j

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, TILE_N)
    q_pos = q_block_local * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_pos < q_len)
    d_ok = offs_d < HEAD_DIM
    rows = (q_start + q_pos).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys from the window of this block's first row up to the causal bound of its last row; a split takes
    # an equal share of those tiles.
    kv_end = tl.minimum(seq_len, ctx_len + (q_block_local + 1) * BLOCK_Q)
    first_tile = 0
    if WINDOW > 0:
        first_tile = tl.maximum(ctx_len + q_block_local * BLOCK_Q - WINDOW + 1, 0) // TILE_N
    last_tile = tl.cdiv(kv_end, TILE_N)
    tiles_per_split = tl.cdiv(last_tile - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, last_tile)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for tile in range(tile_lo, tile_hi):
        kv_pos = tile * TILE_N + offs_n
        kv_ok = kv_pos < seq_len
        block = tl.load(block_tables_ptr + seq * stride_bt + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0).to(tl.int64)
        in_block = kv_pos % BLOCK_SIZE
        k = tl.load(k_cache_ptr + (block * stride_kb + in_block * stride_ks + kv_head * stride_kh)[None, :]
                    + offs_d[:, None], mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * scale_log2
        if SOFTCAP > 0:
            s = SOFTCAP * _tanh(s / SOFTCAP)

        visible = kv_ok[None, :] & (kv_pos[None, :] <= ctx_len + q_pos[:, None])
        if WINDOW > 0:
            visible = visible & (kv_pos[None, :] > ctx_len + q_pos[:, None] - WINDOW)
        if HAS_TREE:
            draft = kv_pos[None, :] - ctx_len
            in_tree = tl.load(tree_mask_ptr + rows[:, None] * stride_tm + draft,
                              mask=row_ok[:, None] & visible & (draft >= 0), other=1)
            visible = visible & (in_tree != 0)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay exactly 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + (block * stride_vb + in_block * stride_vs + kv_head * stride_vh)[:, None]
                    + offs_d[None, :], mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453  # log2 -> natural log
        lse = tl.where(seen, lse, float("-inf"))
        tl.store(lse_ptr + rows * stride_lt + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    stride_ot, stride_oh, stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_plt, stride_plh,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """out[t, h] = sum over splits of exp(lse_s - lse) * out_s, with lse = logsumexp(lse_s)."""
    t, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    part_lse = tl.load(part_lse_ptr + t * stride_plt + h * stride_plh + offs_s,
                       mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(part_lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(part_lse - m_safe)
    total = tl.sum(w, 0)
    parts = tl.load(part_out_ptr + t * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=(offs_s[:, None] < NUM_SPLITS) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        tl.store(lse_ptr + t * stride_lt + h * stride_lh, tl.where(total > 0.0, m_safe + tl.log(total), float("-inf")))


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def choose_num_splits(meta: AttentionMetadata, num_kv_heads: int, device, tile_n: int = 64,
                      window: int | None = None) -> int:
    """Split-KV only for decode-only batches whose (sequence, kv head) programs would leave SMs idle."""
    if meta.max_seqlen_q != 1:
        return 1
    programs = max(1, meta.num_seqs * num_kv_heads)
    want = triton.cdiv(4 * _num_sms(device), programs)        # about four waves of programs
    keys = meta.max_seqlen_k if window is None else min(meta.max_seqlen_k, window)   # what a decode row reads
    by_length = triton.cdiv(keys, tile_n) // 4                 # at least four tiles per segment
    return max(1, min(want, by_length, 64))


def _launch_config(meta: AttentionMetadata, group: int, head_dim_pad: int) -> dict:
    decode = meta.max_seqlen_q <= max(1, 16 // group)
    block_m = _pow2(group) if decode else max(64 if head_dim_pad > 128 else 128, _pow2(group))
    return dict(BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=32 if head_dim_pad > 128 else 64,
                num_warps=4 if block_m <= 64 else 8)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float | None = None, return_lse: bool = False, num_splits: int | None = None,
                    window: int | None = None, softcap: float | None = None):
    """q [T, Hq, D] over the paged cache -> out [T, Hq, D] (and lse [T, Hq] fp32). num_splits=None chooses;
    window and softcap as in reference.attention."""
    T, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert num_heads % num_kv_heads == 0 and q.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    scale = head_dim ** -0.5 if scale is None else scale
    head_dim_pad = _pow2(head_dim)
    cfg = _launch_config(meta, group, head_dim_pad)
    if num_splits is None:
        num_splits = choose_num_splits(meta, num_kv_heads, q.device, cfg["TILE_N"], window)

    out = torch.empty_like(q)
    lse = torch.empty(T, num_heads, dtype=torch.float32, device=q.device) if return_lse else None
    if T == 0:
        return (out, lse) if return_lse else out
    if num_splits > 1:
        part_out = torch.empty(T, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, num_heads, num_splits, dtype=torch.float32, device=q.device)
        dest, dest_lse = part_out, part_lse
    else:
        dest, dest_lse = out, lse

    tree = meta.tree_mask
    tree = tree.contiguous().view(torch.uint8) if tree is not None else None
    grid = (T // cfg["BLOCK_Q"] + meta.num_seqs, num_kv_heads, num_splits)
    _attention_kernel[grid](
        dest, dest_lse if dest_lse is not None else dest, q, k_cache, v_cache,
        meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, tree if tree is not None else meta.slot_mapping,
        scale * LOG2E, meta.num_seqs,
        q.stride(0), q.stride(1), dest.stride(0), dest.stride(1), dest.stride(2) if num_splits > 1 else 0,
        dest_lse.stride(0) if dest_lse is not None else 0, dest_lse.stride(1) if dest_lse is not None else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        meta.block_tables.stride(0), tree.stride(0) if tree is not None else 0,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], TILE_N=cfg["TILE_N"], NUM_SPLITS=num_splits,
        HAS_TREE=tree is not None, WRITE_LSE=dest_lse is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WINDOW=window or 0, SOFTCAP=softcap * LOG2E if softcap else 0.0, num_warps=cfg["num_warps"],
    )
    if num_splits > 1:
        merge_splits(part_out, part_lse, out, lse)
    return (out, lse) if return_lse else out


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Combine partial outputs [T, H, S, D] weighted by their log-sum-exp [T, H, S] into out [T, H, D]."""
    T, num_heads, num_splits, head_dim = part_out.shape
    _merge_splits_kernel[(T, num_heads)](
        out, lse if lse is not None else out, part_out, part_lse,
        out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        part_lse.stride(0), part_lse.stride(1),
        NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), WRITE_LSE=lse is not None, num_warps=1 if head_dim <= 64 else 2,
    )


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float | None = None, return_lse: bool = False, window: int | None = None,
              softcap: float | None = None):
    """The backend entry point: unified kernel, split-KV for decode batches that would underfill the GPU."""
    return paged_attention(q, k_cache, v_cache, meta, scale, return_lse, window=window, softcap=softcap)
