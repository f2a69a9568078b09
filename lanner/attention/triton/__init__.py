"""Triton backend: FlashAttention kernels over the paged KV cache, written for NVIDIA GPUs.

Without a GPU they run (slowly) under Triton's interpreter, which this module switches on when CUDA is
absent; it must be on before triton is first imported, so import this package before triton itself.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError as e:  # only reached when this backend is requested
    raise ImportError("attention backend 'triton' needs the triton package: pip install triton "
                      "(on a machine without a GPU it runs under TRITON_INTERPRET=1)") from e

from lanner.attention.triton.cache import store_kv  # noqa: E402
from lanner.attention.triton.unified import attention, choose_num_splits, paged_attention  # noqa: E402

__all__ = ["store_kv", "attention", "paged_attention", "choose_num_splits"]
