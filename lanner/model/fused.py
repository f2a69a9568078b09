"""fused.c: small decoder steps in one call each (PyTorch would dispatch several ops for each)."""
import ctypes
import functools
import os

import torch

from lanner import native

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fused.c")


@functools.lru_cache(maxsize=None)
def _lib_for(flags: tuple):
    lib = native.load(SOURCE, flags)
    if lib is not None:
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.rms_norm.argtypes = [p, p, p, p, i64, i64, ctypes.c_float, ctypes.c_int]
        lib.rms_norm.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def library():
    """Built once per process: these steps are plain C, the same on every ISA level."""
    return _lib_for(tuple(native.isa_flags())) if native.enabled() else None


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(x + residual) normalized and scaled by weight, residual updated in place to the sum; None where
    the fused kernel does not apply (gradients, other devices or dtypes, strided rows, no compiler)."""
    lib = library()
    dtype = x.dtype
    if lib is None or torch.is_grad_enabled() or x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16) \
            or weight.dtype != dtype or not x.is_contiguous() or (residual is not None and (
                residual.dtype != dtype or not residual.is_contiguous() or residual.shape != x.shape)):
        return None
    out = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
                 x.numel() // x.shape[-1], x.shape[-1], eps, int(dtype == torch.bfloat16))
    return out
