"""Builds paged_attention.c with the system C compiler at first use and loads it; None where that fails.

The library is cached under the lanner cache directory, keyed by the source, the flags and the CPU's
feature flags (it is compiled with -march=native). Set LANNER_NATIVE=0 to use the PyTorch path.
"""
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import torch

from lanner.model.loader import cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paged_attention.c")
# reassociation lets sums vectorize as trees; no finite-math: the kernel relies on -inf. 512-bit vectors
# where the CPU has them (GCC's Zen 4 tuning would split loops into 256-bit halves: more instructions)
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-shared", "-fPIC"]
MAX_HEAD_DIM = 256   # the kernel's per-row registers


def fits(head_dim: int) -> bool:
    """Whether the kernel takes this head size: it works in whole 16-lane vectors."""
    return head_dim <= MAX_HEAD_DIM and head_dim % 16 == 0


@functools.lru_cache(maxsize=None)
def paged_attention():
    """The C function, or None when disabled or no compiler could build it (the caller falls back)."""
    if os.environ.get("LANNER_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(_build())
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"native paged attention unavailable ({detail}); using the PyTorch CPU path")
        return None
    fn = lib.paged_attention
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p, p, p, p, i, p, i, p, p, p, i, p, i, i, i, i, i, f, i, p, p, i]
    fn.restype = ctypes.c_int
    return fn


def _build() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found (install gcc)")
    source = open(SOURCE, "rb").read()
    key = hashlib.sha256(source + " ".join([compiler] + FLAGS).encode() + _cpu_flags()).hexdigest()[:16]
    target = os.path.join(cache_dir(), "kernels", f"paged_attention-{key}.so")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True)
            os.replace(tmp, target)   # atomic: concurrent builders never load a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


class Launch:
    """The kernel's per-step arguments (int32 tables, the sequences, the split), built once per step and
    reused by every layer: only q, the caches and the outputs change between layers."""

    def __init__(self, meta, seqs: torch.Tensor):
        self.tables = meta.block_tables.to(torch.int32).contiguous()
        self.seq_lens = meta.seq_lens.to(torch.int32).contiguous()
        self.cu = meta.cu_seqlens_q.to(torch.int32).contiguous()
        self.seqs = seqs.to(torch.int64).contiguous()
        self.tree = None if meta.tree_mask is None else meta.tree_mask.to(torch.uint8).contiguous()
        self.threads = torch.get_num_threads()
        self.split = split_keys(self.seqs.numel(), int(self.seq_lens[self.seqs].max()), self.threads)

    def __call__(self, q, k_cache, v_cache, scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Attention rows of the sequences into out [T, Hq, D] / lse [T, Hq] (both fp32, contiguous)."""
        # a bf16 model with a bf16 cache also passes q as is: the kernel takes its dot products in bf16
        q_bf16 = q.contiguous() if q.dtype == k_cache.dtype == torch.bfloat16 else None
        q = q.float().contiguous()
        tree = self.tree
        failed = paged_attention()(
            q.data_ptr(), None if q_bf16 is None else q_bf16.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
            self.tables.data_ptr(), self.tables.shape[1], self.seq_lens.data_ptr(), self.cu.data_ptr(),
            self.seqs.data_ptr(), self.seqs.numel(), None if tree is None else tree.data_ptr(),
            0 if tree is None else tree.shape[1], q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], scale,
            self.split, out.data_ptr(), lse.data_ptr(), self.threads)
        if failed:
            raise MemoryError("paged attention: out of memory for the splits' partial results")


def split_keys(items: int, max_len: int, threads: int, min_keys: int = 256) -> int:
    """Keys per work item: split contexts only when there are too few sequences to fill
    every thread a few times over, and never into pieces shorter than min_keys."""
    wanted = -(-4 * threads // max(items, 1))
    return max(min_keys, -(-max_len // wanted))
