"""The oracle: gather each sequence's KV from the paged cache and run plain SDPA.

Slow and obviously right; every other backend is tested against it.
"""
import torch

from lanner.attention.metadata import AttentionMetadata


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new k/v [T, Hkv, D] into the flat slots of [num_blocks, block_size, Hkv, D] caches."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, Hkv, D] context of one sequence, read through its block table."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def causal_mask(q_len: int, seq_len: int, device=None, window: int | None = None) -> torch.Tensor:
    """[q_len, seq_len] bool: query j (at position p = seq_len - q_len + j) sees keys k <= p, and with a
    sliding window only those with p - window < k."""
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]
    keys = torch.arange(seq_len, device=device)[None, :]
    mask = keys <= q_pos
    if window is not None:
        mask &= keys > q_pos - window
    return mask


def attention_mask(meta: AttentionMetadata, i: int, q_len: int, seq_len: int, device=None,
                   window: int | None = None) -> torch.Tensor:
    """Causal (windowed) mask of sequence i, narrowed by the tree mask over its last q_len keys when given."""
    mask = causal_mask(q_len, seq_len, device, window)
    if meta.tree_mask is not None:
        start = int(meta.cu_seqlens_q[i])
        mask[:, seq_len - q_len:] &= meta.tree_mask[start:start + q_len, :q_len].to(device)
    return mask


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float | None = None, return_lse: bool = False, window: int | None = None,
              softcap: float | None = None):
    """q [T, Hq, D] -> out [T, Hq, D] (and lse [T, Hq] in fp32 when asked). Fully masked rows give 0.

    window: each query sees only the last `window` positions up to its own (sliding-window attention).
    softcap: scores become softcap * tanh(scores / softcap) before masking (Gemma 2's soft-capping).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for i in range(meta.num_seqs):
        start, end = int(meta.cu_seqlens_q[i]), int(meta.cu_seqlens_q[i + 1])
        seq_len = int(meta.seq_lens[i])
        if end == start or seq_len == 0:
            continue
        k = gather_kv(k_cache, meta.block_tables[i], seq_len).repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len).repeat_interleave(group, dim=1)
        mask = attention_mask(meta, i, end - start, seq_len, q.device, window)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k.float()) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)                       # [H, q]
        probs = torch.exp(scores - row_lse[..., None]).nan_to_num(0.0)  # fully masked rows -> 0
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)
        lse[start:end] = row_lse.T
    return (out, lse) if return_lse else out
