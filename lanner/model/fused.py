"""fused.c: small steps in one call each (PyTorch would dispatch several ops for each): RMSNorm with the
residual add, rotary with the KV store, silu(gate) * up, grammar bitmasks applied to logits, and sampling."""
import ctypes
import functools
import os

import numpy as np
import torch

from lanner import native
from lanner.attention.native import CACHE_KINDS

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused.c")


@functools.lru_cache(maxsize=None)
def library():
    """Built once per process: these steps are plain C, the same on every ISA level."""
    lib = native.library(SOURCE)
    if lib is not None:
        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        lib.rms_norm.argtypes = [p, p, p, p, i64, i64, ctypes.c_float, i]
        lib.rope_store.argtypes = [p, p, i64, i, i, i, p, p, p, i, i]
        lib.silu_mul.argtypes = [p, p, i64, i64, i]
        lib.mask_logits.argtypes = [p, i64, p, i64, i64, i64]
        lib.decode_layers.argtypes = [p, p, i, p, p, p]
        lib.decode_burst.argtypes = [p, p, i, p, p, p, p]
        lib.sample_rows.argtypes = [p, i64, i64, i64, p, p, p, p, p, i, p]
        lib.rms_norm.restype = lib.rope_store.restype = lib.silu_mul.restype = lib.mask_logits.restype = None
        lib.decode_layers.restype = lib.decode_burst.restype = lib.sample_rows.restype = ctypes.c_int
    return lib


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + residual) normalized and scaled by weight, residual updated in place to the sum; None where
    the fused kernel does not apply (gradients, other devices or dtypes, strided rows, no compiler)."""
    lib = library()
    dtype = x.dtype
    others = () if residual is None else (residual,)
    if lib is None or not _fits(x, weight, *others) or any(r.shape != x.shape for r in others):
        return None
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                 x.numel() // x.shape[-1], x.shape[-1], eps, int(dtype == torch.bfloat16))
    return out


def _fits(*tensors: torch.Tensor, dtypes=(torch.float32, torch.bfloat16)) -> bool:
    """Inference, one of dtypes throughout, contiguous on the CPU: any number of rows. From 8 rows the kernels split
    them over the threads; at prefill sizes that was 13-17 % faster per 2,048-token step than PyTorch's several
    ops for each (one pass, and the KV cache's first-touch page faults taken on both cores)."""
    dtype = tensors[0].dtype
    return not torch.is_grad_enabled() and dtype in dtypes \
        and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def rope_store(qkv: torch.Tensor, cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slots: torch.Tensor, num_heads: int, num_kv_heads: int) -> bool:
    """Rotary on qkv's q and k heads in place, k and v stored at their slots; False where it does not
    apply (the caller then runs the PyTorch ops)."""
    lib = library()
    caches_fit = _fits(k_cache, v_cache, dtypes=CACHE_KINDS)   # whatever qkv's
    if lib is None or not _fits(qkv, cos_sin) or not caches_fit or slots.dtype != torch.int64:
        return False
    lib.rope_store(qkv.data_ptr(), cos_sin.data_ptr(), qkv.shape[0], num_heads, num_kv_heads, k_cache.shape[-1],
                   slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(qkv.dtype == torch.bfloat16),
                   CACHE_KINDS[k_cache.dtype])
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for gate | up = gate_up [T, 2I]; None where it does not apply."""
    lib = library()
    if lib is None or not _fits(gate_up):
        return None
    t, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, i, dtype=gate_up.dtype)
    lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), t, i, int(gate_up.dtype == torch.bfloat16))
    return out


def mask_logits(logits: torch.Tensor, bits: torch.Tensor) -> None:
    """logits [R, V] fp32 -> -inf where the grammar bitmask bits [R, W] int32 (token t: bit t % 32 of word
    t / 32) is clear, in place."""
    lib = library()
    if lib is not None and logits.dtype == torch.float32 and logits.stride(-1) == 1 and bits.is_contiguous():
        lib.mask_logits(logits.data_ptr(), logits.stride(0), bits.data_ptr(), logits.shape[0], bits.shape[1],
                        logits.shape[1])
        return
    unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[1]]
    logits.masked_fill_(torch.from_numpy(np.ascontiguousarray(unpacked) == 0), float("-inf"))


def sampling_arrays(seqs) -> list[torch.Tensor]:
    """Per-row temperature (0: greedy, the argmax), top-k (<= 0: none), top-p and min-p as sample_rows (fused.c)
    takes them."""
    params = [s.params for s in seqs]
    return [torch.tensor([0.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
            torch.tensor([p.top_k for p in params], dtype=torch.int64),
            torch.tensor([p.top_p for p in params], dtype=torch.float32),
            torch.tensor([p.min_p for p in params], dtype=torch.float32)]


def penalty_arrays(seqs) -> list[torch.Tensor]:
    """Per-row repetition, presence and frequency penalties as decode_burst (fused.c) takes them."""
    return [torch.tensor([getattr(s.params, name) for s in seqs], dtype=torch.float32)
            for name in ("repetition_penalty", "presence_penalty", "frequency_penalty")]


def token_counts(ids: list[int], vocab: int) -> torch.Tensor:
    """How often each of the vocab's tokens is in ids, int64 [vocab] (presence and frequency penalties)."""
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab)[:vocab]


def sample_rows(logits: torch.Tensor, seqs, u: torch.Tensor) -> torch.Tensor | None:
    """One token per row of fp32 logits [R, V], drawn from seqs' distributions (temperature, top-k, top-p,
    min-p; Sampler's) at the uniforms u [R]; None where the kernel does not apply."""
    lib = library()
    if lib is None or logits.dtype != torch.float32 or logits.stride(-1) != 1 or logits.device.type != "cpu":
        return None
    arrays = sampling_arrays(seqs)
    u = u.to(torch.float32).contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    if lib.sample_rows(logits.data_ptr(), logits.stride(0), logits.shape[0], logits.shape[1],
                       *[a.data_ptr() for a in arrays], u.data_ptr(), torch.get_num_threads(), tokens.data_ptr()):
        raise MemoryError("sampling: out of memory for a row's scratch")
    return tokens
