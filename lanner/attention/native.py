"""Loads paged_attention.c, built by lanner.native at first use; None where that fails.

Set LANNER_NATIVE=0 to use the PyTorch path, LANNER_ISA to build it for a lower instruction set.
"""
import ctypes
import functools
import os

import torch

from lanner import native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paged_attention.c")
MAX_HEAD_DIM = 256   # the kernel's per-row registers
MAX_PIECE_KEYS = 1 << 30   # the kernel cuts work items by work per thread; this caps their keys (tests lower it)


# the KV cache dtypes the C kernels take, as their element types (vec16.h's ELEM_*)
CACHE_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def fits(head_dim: int) -> bool:
    """Whether the kernel takes this head size: it works in whole 16-lane vectors."""
    return head_dim <= MAX_HEAD_DIM and head_dim % 16 == 0


@functools.lru_cache(maxsize=None)
def paged_attention():
    """The C function, or None when disabled or no compiler could build it (the caller falls back)."""
    lib = native.library(SOURCE)
    if lib is None:
        return None
    fn = lib.paged_attention
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, p, p, p, i, p, i, p, p, p, i, p, i, i, i, i, i, f, i, f, i, p, i, p, i]
    fn.restype = ctypes.c_int
    fn.lib = lib   # (query_in_bf16 asks this build, the one the calls run, whatever LANNER_ISA says later)
    return fn


def query_in_bf16(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel scores a cache of this kind with the bf16 query alone (no fp32 copy of q needed)."""
    fn = paged_attention()
    return fn is not None and bool(fn.lib.query_in_bf16(CACHE_KINDS[cache_dtype], head_dim))


def turns_keys(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernel scores prompts on this cache by turned keys (a bf16 cache with AVX512-BF16, an fp32 one
    with AVX-512), where it beats torch's flash attention on prompts up to thousands of tokens (attention.cpu)."""
    lib = native.library(SOURCE)
    return lib is not None and bool(lib.turns_keys(CACHE_KINDS[cache_dtype], head_dim))


class Launch:
    """The kernel's per-step arguments (int32 tables, the sequences, the window), built once per
    step and window and reused by every layer with that window: only q, the caches and the outputs change."""

    def __init__(self, meta, seqs: torch.Tensor, window: int | None = None):
        self.tables = meta.block_tables.to(torch.int32).contiguous()
        self.seq_lens = meta.seq_lens.to(torch.int32).contiguous()
        self.cu = meta.cu_seqlens_q.to(torch.int32).contiguous()
        self.seqs = seqs.to(torch.int64).contiguous()
        self.tree = None if meta.tree_mask is None else meta.tree_mask.to(torch.uint8).contiguous()
        self.window = window or 0
        self.threads = torch.get_num_threads()
        self.bf16_query_only = None   # query_in_bf16 for this step's cache, asked by its first layer

    def __call__(self, q, k_cache, v_cache, scale: float, out: torch.Tensor, lse: torch.Tensor | None,
                 softcap: float | None = None) -> None:
        """Attention rows of the sequences into out [T, Hq, D] (fp32 or bf16) / lse [T, Hq] (fp32; None: not
        asked), both contiguous; the caches fp32, bf16 or fp16 (CACHE_KINDS)."""
        # with a bf16 cache q goes in bf16 too (an fp32 model's rounded, as with kv_cache_dtype=bfloat16): the
        # kernel takes its dot products in bf16, and where it takes them from q_bf16 alone no fp32 copy is made
        # (with the bf16 output, a 2,048-token prompt step's attention 1.6x its kernel before)
        bf16_cache = k_cache.dtype == torch.bfloat16
        q_bf16 = q.to(torch.bfloat16).contiguous() if bf16_cache else None
        if self.bf16_query_only is None:   # (every layer of a step has the same cache dtype and head size)
            self.bf16_query_only = bf16_cache and query_in_bf16(k_cache.dtype, q.shape[2])
        q = None if self.bf16_query_only else q.float().contiguous()
        tree = self.tree
        failed = paged_attention()(
            None if q is None else q.data_ptr(), None if q_bf16 is None else q_bf16.data_ptr(), k_cache.data_ptr(),
            v_cache.data_ptr(), CACHE_KINDS[k_cache.dtype],
            self.tables.data_ptr(), self.tables.shape[1], self.seq_lens.data_ptr(), self.cu.data_ptr(),
            self.seqs.data_ptr(), self.seqs.numel(), None if tree is None else tree.data_ptr(),
            0 if tree is None else tree.shape[1], out.shape[1], k_cache.shape[2], out.shape[2], k_cache.shape[1], scale,
            self.window, softcap or 0.0, MAX_PIECE_KEYS, out.data_ptr(), int(out.dtype == torch.bfloat16),
            None if lse is None else lse.data_ptr(), self.threads)
        if failed == 1:
            raise MemoryError("paged attention: out of memory for the pieces' partial results")
        if failed:
            raise ValueError("paged attention: this build scores in fp32 and was given no fp32 query")
