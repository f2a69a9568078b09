"""The fast CPU path, equal to reference.py within tolerance.

Sequences with up to KERNEL_QUERY new tokens (decode, spec-verify, short prompt chunks) go to the
compiled kernel of paged_attention.c (native.py builds it at first use; fp32, bf16 and fp16 caches), and so do
those up to TURNED_QUERY where it scores them by turned keys (native.turns_keys: AVX-512). Where it cannot be
built, rows of sequences with few new tokens run in plain PyTorch, for all such sequences at once,
a segment of context at a time: one index_select gathers every sequence's blocks for the segment
([S, seg, Hkv, D], whole blocks, so the gather runs at memory bandwidth) into a buffer small enough to
still be in cache when the matmuls read it; per KV head, K is then a strided [S, seg, D] view and
Q @ K^T is one bmm with the GQA group as extra query rows ([S, q_len * group, D]). Scores of all
segments are kept (only Hq / (2 Hkv D) of the KV bytes) and softmaxed once in fp32 -- split-KV with the
merge done on the scores -- then P @ V runs segment by segment. Longer prompt chunks go through torch's
fused CPU flash attention, one sequence at a time: there are few of them and each is a big matmul.

A sliding window is a mask on every path; the kernel and the prompt path also skip the keys before a
sequence's first window, the batched path reads them. Soft-capped scores (which torch's flash attention
cannot do) take plain matmuls on the prompt path, in query chunks of bounded scores.
"""
import torch

from lanner.attention import native
from lanner.attention.metadata import AttentionMetadata
from lanner.attention.reference import attention_mask

SHORT_QUERY = 16               # without the kernel: sequences with at most this many new tokens take the batched path
# the kernel's longest query: up to here it beat torch's flash attention on prompt chunks (bf16 1.3-1.9x,
# fp32 1.0-1.35x at 136-256 tokens, bench/attention.py shapes), beyond it the GEMM-based SDPA wins
KERNEL_QUERY = 256
# the same where the kernel scores prompts by turned keys (AVX-512): against SDPA, bf16 1.8-3.1x at 320-2,048
# tokens, 1.71x at 4,096; fp32 1.2-2.0x, 1.06x at 4,096 and 0.79x at 8,192 (its partial results also grow with
# the chunk's rows)
TURNED_QUERY = 4096
SEGMENT_BYTES = 4 << 20        # gathered K (or V) per segment: stays in L2/L3 until the matmul reads it
SCORES_ELEMENTS = 8 << 20      # bound on the kept scores; more sequences than that are done in groups
_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new k/v [T, Hkv, D] into the flat slots of [num_blocks, block_size, Hkv, D] caches."""
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float | None = None, return_lse: bool = False, window: int | None = None,
              softcap: float | None = None):
    """q [T, Hq, D] -> out [T, Hq, D] (and lse [T, Hq] in fp32 when asked). Fully masked rows give 0.
    window (sliding-window attention) and softcap (score soft-capping) as in reference.attention."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # out in q's dtype where the kernel writes it (fp32 or bf16): no fp32 copy to convert after
    out = torch.empty(q.shape, dtype=q.dtype if q.dtype in (torch.float32, torch.bfloat16) else torch.float32)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    short, prompts, launch = _step_plan(q, k_cache, meta, window)
    if launch is not None:
        launch(q, k_cache, v_cache, scale, out, lse if return_lse else None, softcap)
    else:
        q_lens = meta.query_lens
        for seqs in (short[q_lens[short] == 1], short[q_lens[short] > 1]):  # decode, then verify-sized rows
            for group in _groups(seqs, int(q_lens[seqs].max()) if seqs.numel() else 0, q.shape[1], meta):
                _batched(q, k_cache, v_cache, meta, group, scale, out, lse, window, softcap)
    for i in prompts:
        _prefill(q, k_cache, v_cache, meta, i, scale, out, lse, window, softcap)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _step_plan(q: torch.Tensor, k_cache: torch.Tensor, meta: AttentionMetadata, window: int | None):
    """(sequences with few new tokens, those with many as a list, the compiled kernel's launch or None),
    worked out by the first layer of a step with this window and kept on its metadata for the others."""
    plan = meta.derived.get(("cpu", window))
    if plan is None:
        native_ok = (q.device.type == "cpu" and k_cache.dtype in native.CACHE_KINDS
                     and native.fits(q.shape[-1]) and native.paged_attention() is not None)   # a compiler built it
        q_lens = meta.query_lens
        if not native_ok:
            limit = SHORT_QUERY
        elif native.turns_keys(k_cache.dtype, q.shape[-1]):
            limit = TURNED_QUERY
        else:
            limit = KERNEL_QUERY
        short = ((q_lens >= 1) & (q_lens <= limit)).nonzero().flatten()
        prompts = (q_lens > limit).nonzero().flatten().tolist()
        launch = native.Launch(meta, short, window) if native_ok and short.numel() else None
        plan = meta.derived[("cpu", window)] = (short, prompts, launch)
    return plan


def _groups(seqs: torch.Tensor, max_q: int, num_heads: int, meta: AttentionMetadata) -> list[torch.Tensor]:
    """Split seqs so each group's kept scores (S * Hq * q_len * context) stay bounded."""
    if seqs.numel() == 0:
        return []
    per_seq = num_heads * max_q * int(meta.seq_lens[seqs].max())
    return list(seqs.split(max(1, SCORES_ELEMENTS // per_seq)))


def _batched(q, k_cache, v_cache, meta, seqs, scale, out, lse, window, softcap) -> None:
    """Attention for the sequences seqs (all with few new tokens), all at once."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    group = q.shape[1] // num_kv_heads
    q_lens, seq_lens = meta.query_lens[seqs].long(), meta.seq_lens[seqs].long()
    num_seqs, max_q, max_len = seqs.numel(), int(q_lens.max()), int(seq_lens.max())
    rows = meta.cu_seqlens_q[seqs].long()[:, None] + torch.arange(max_q)
    row_ok = torch.arange(max_q) < q_lens[:, None]
    rows = torch.where(row_ok, rows, rows[:, :1])  # padding rows repeat a real one, then are dropped

    # [Hkv, S, q_len * group, D]: a kv head's group of query heads are extra rows against one K matrix
    qb = (q[rows].float() * scale).view(num_seqs, max_q, num_kv_heads, group, head_dim)
    qb = qb.permute(2, 0, 1, 3, 4).reshape(num_kv_heads, num_seqs, max_q * group, head_dim)

    block_size = k_cache.shape[1]
    seg_blocks = _segment_blocks(num_seqs * k_cache[0].numel() * k_cache.element_size(), block_size, max_len)
    idx = _block_index(meta.block_tables[seqs], seg_blocks, max_len, block_size)
    scores = torch.empty(idx.shape[0], num_kv_heads, num_seqs, qb.shape[2], seg_blocks * block_size)
    for dest, k in zip(scores.unbind(0), _segments(k_cache, idx, num_seqs, torch.float32)):
        for h in range(num_kv_heads):  # K of head h: [S, seg, D] with rows Hkv * D apart, no copy
            torch.bmm(qb[h], k[:, :, h].transpose(1, 2), out=dest[h])

    _soft_cap_(scores, softcap)
    _mask_tail(scores, meta, q_lens, seq_lens, rows, num_kv_heads, group, window)
    m = scores.amax(dim=4).amax(dim=0)
    m = m.masked_fill_(m == float("-inf"), 0.0)  # fully masked rows: every p is exp(-inf) = 0
    p = scores.sub_(m[None, ..., None]).exp_()
    denom = p.sum(dim=(0, 4))

    pv_dtype = torch.bfloat16 if v_cache.dtype == torch.bfloat16 else torch.float32
    p = p.to(pv_dtype)
    parts = torch.empty(idx.shape[0], num_kv_heads, num_seqs, qb.shape[2], head_dim, dtype=pv_dtype)
    for dest, p_seg, v in zip(parts.unbind(0), p.unbind(0), _segments(v_cache, idx, num_seqs, pv_dtype)):
        for h in range(num_kv_heads):
            torch.bmm(p_seg[h], v[:, :, h], out=dest[h])
    o = parts.sum(0, dtype=torch.float32) / denom.clamp_min(1e-30)[..., None]
    row_lse = m + denom.log()

    o = o.view(num_kv_heads, num_seqs, max_q, group, head_dim).permute(1, 2, 0, 3, 4).flatten(2, 3)
    row_lse = row_lse.view(num_kv_heads, num_seqs, max_q, group).permute(1, 2, 0, 3).flatten(2, 3)
    out[rows[row_ok]] = o[row_ok].to(out.dtype)
    lse[rows[row_ok]] = row_lse[row_ok]


def _segments(cache, idx, num_seqs, dtype):
    """Each segment's gathered blocks as [S, seg, Hkv, D] in dtype, in one reused buffer."""
    blocks = cache.view(cache.shape[0], -1)
    buf = torch.empty(idx.shape[1], blocks.shape[1], dtype=cache.dtype)
    converted = buf if dtype == cache.dtype else torch.empty(buf.shape, dtype=dtype)
    segment = converted.view(num_seqs, -1, *cache.shape[2:])
    for seg_idx in idx.unbind(0):
        torch.index_select(blocks, 0, seg_idx, out=buf)
        if converted is not buf:
            converted.copy_(buf)
        yield segment


def _segment_blocks(bytes_per_column: int, block_size: int, max_len: int) -> int:
    """Blocks per sequence in a segment: as many as fit SEGMENT_BYTES, no more than the context needs."""
    return max(1, min(SEGMENT_BYTES // bytes_per_column, -(-max_len // block_size)))


def _block_index(block_tables: torch.Tensor, seg_blocks: int, max_len: int, block_size: int) -> torch.Tensor:
    """[segments, S * seg_blocks] block ids, segment-major. Columns past a table's end repeat its last
    entry: those keys are past the sequence and get masked."""
    num_segments = -(-max_len // (seg_blocks * block_size))
    cols = torch.arange(num_segments * seg_blocks).clamp_max(block_tables.shape[1] - 1)
    blocks = block_tables.long()[:, cols].view(-1, num_segments, seg_blocks)
    return blocks.transpose(0, 1).reshape(num_segments, -1)


def _soft_cap_(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's soft-capping in place, softcap * tanh(scores / softcap); nothing without a softcap."""
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    return scores


def _mask_tail(scores, meta, q_lens, seq_lens, rows, num_kv_heads, group, window) -> None:
    """-inf where a key is past the causal bound, before the window, past the sequence, or outside the
    tree mask.

    Keys before every sequence's context length are visible to all of its rows unless a window cuts them
    off, so without one only the segments from the shortest context on are touched: for a decode batch
    of equal lengths, the last one.
    """
    num_segments, seg = scores.shape[0], scores.shape[-1]
    ctx_lens = seq_lens - q_lens
    seen_by_all = ctx_lens if meta.tree_mask is not None else ctx_lens + 1   # keys [0, this) every row sees
    if window is not None:
        seen_by_all = seen_by_all.masked_fill(seq_lens > window, 0)
    first = int(seen_by_all.min()) // seg
    if first >= num_segments:
        return
    keys = torch.arange(first * seg, num_segments * seg)
    q_pos = (ctx_lens[:, None] + torch.arange(rows.shape[1]))[..., None]             # [S, Q, 1]
    visible = keys <= q_pos                                                          # [S, Q, n]
    if window is not None:
        visible &= keys > q_pos - window
    visible &= keys < seq_lens[:, None, None]
    if meta.tree_mask is not None:
        draft = keys - ctx_lens[:, None, None]                                        # [S, 1, n]
        tree = meta.tree_mask[rows]                                                   # [S, Q, max_q]
        in_tree = tree.gather(2, draft.clamp(0, tree.shape[2] - 1).expand(-1, rows.shape[1], -1))
        visible &= (draft < 0) | in_tree
    num_seqs, max_q = rows.shape
    hidden = ~visible.view(num_seqs, max_q, num_segments - first, seg).permute(2, 0, 1, 3)
    tail = scores[first:].view(num_segments - first, num_kv_heads, num_seqs, max_q, group, seg)
    tail.masked_fill_(hidden[:, None, :, :, None, :], float("-inf"))


def _prefill(q, k_cache, v_cache, meta, i, scale, out, lse, window, softcap) -> None:
    """One sequence with many new tokens: gather its context from the first key a row's window reaches,
    run torch's fused CPU flash attention (plain matmuls for soft-capped scores, which it cannot do)."""
    start, end = int(meta.cu_seqlens_q[i]), int(meta.cu_seqlens_q[i + 1])
    q_len, seq_len = end - start, int(meta.seq_lens[i])
    first = 0 if window is None else max(0, seq_len - q_len - window + 1)
    k = _context(k_cache, meta.block_tables[i], first, seq_len)                     # [1, Hkv, n, D]
    v = _context(v_cache, meta.block_tables[i], first, seq_len)
    qi = q[start:end].transpose(0, 1)[None]                                          # [1, Hq, q_len, D]
    k, v = k.to(qi.dtype), v.to(qi.dtype)
    just_causal = seq_len == q_len and meta.tree_mask is None and (window is None or window >= seq_len)
    if just_causal and softcap is None:
        o, row_lse = _sdpa(qi, k, v, is_causal=True, scale=scale)
    else:
        visible = attention_mask(meta, i, q_len, seq_len, window=window)[:, first:]
        if softcap is None:
            bias = torch.zeros(visible.shape, dtype=qi.dtype).masked_fill_(~visible, float("-inf"))
            o, row_lse = _sdpa(qi, k, v, attn_mask=bias, scale=scale)
        else:
            o, row_lse = _capped_attention(qi, k, v, visible, scale, softcap)
        if not bool(visible.any(-1).all()):  # SDPA gives lse 0 there; the contract is out 0, lse -inf
            row_lse = row_lse.masked_fill(~visible.any(-1), float("-inf"))
            o = o.masked_fill(~visible.any(-1)[:, None], 0.0)
    out[start:end] = o[0].transpose(0, 1)
    lse[start:end] = row_lse[0].transpose(0, 1)


def _context(cache: torch.Tensor, block_table: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """Keys [first, end) of a sequence as [1, Hkv, n, D], read from only the blocks that hold them."""
    block_size = cache.shape[1]
    blocks = block_table[first // block_size:-(-end // block_size)].long()
    skip = first % block_size
    return cache[blocks].flatten(0, 1)[skip:skip + end - first].transpose(0, 1)[None]


def _capped_attention(qi, k, v, visible, scale, softcap):
    """qi [1, Hq, q_len, D] over k, v [1, Hkv, n, D] with soft-capped scores, in fp32 matmuls: the
    query rows go in chunks whose scores stay within SCORES_ELEMENTS. Returns (out [1, Hq, q_len, D],
    lse [1, Hq, q_len]); rows that see nothing give 0 and -inf."""
    num_kv_heads, q_len = k.shape[1], qi.shape[2]
    q = qi[0].float().unflatten(0, (num_kv_heads, -1)) * scale                      # [Hkv, group, q_len, D]
    k, v = k[0].float(), v[0].float()                                                # [Hkv, n, D]
    out = torch.empty(q.shape)
    lse = torch.empty(q.shape[:3])
    chunk = max(1, SCORES_ELEMENTS // (qi.shape[1] * k.shape[1]))
    for r in range(0, q_len, chunk):
        qc = q[:, :, r:r + chunk]
        scores = torch.bmm(qc.flatten(1, 2), k.transpose(1, 2)).view(*qc.shape[:3], -1)   # [Hkv, group, c, n]
        scores = _soft_cap_(scores, softcap).masked_fill_(~visible[r:r + chunk], float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)
        p = scores.sub_(chunk_lse[..., None]).exp_().nan_to_num_(0.0)               # fully masked rows -> 0
        out[:, :, r:r + chunk] = torch.bmm(p.flatten(1, 2), v).view(qc.shape)
        lse[:, :, r:r + chunk] = chunk_lse
    return out.flatten(0, 1)[None], lse.flatten(0, 1)[None]
