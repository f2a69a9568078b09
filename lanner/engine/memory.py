"""Host memory: the KV cache (zero-filled, touched only when written unless faulted in at start-up, on transparent
huge pages on request), the packed weights (on transparent huge pages: WeightMemory), and glibc's malloc told
to keep what a step frees.

The attention kernels read the cache block by block from scattered places. Session 3's VM measured 2 MiB
pages ~10 % faster decode attention (bf16, batch 32 x 2,048; 4 % fp32); on the Zen 4 machines since, bf16 and
fp32 at batch 1-32 x 2,048 came out the same with and without them, while the first write into each huge
page cost up to 5 ms where the kernel compacts memory for it (THP defrag=madvise): 0.1-0.35 s of the first
request after start-up, and stalls of later ones wherever a new page is touched. So the pool takes 4 KiB
pages unless LANNER_KV_HUGE_PAGES=1 asks for huge ones (the memory is 2 MiB-aligned either way).

Each page's first write is a page fault, inside whichever kernel writes it. On this project's VMs a fault took
1.3-5 us (likely the host backing the page; faulting the pages in from the engine's thread just ahead of use
cost as much); bench/throughput.py's bf16 run writes ~330 MB of KV, 73k pages, and ran 1.04-1.05x faster with
the pool faulted in before it (two sets of 4 alternating pairs). vLLM's CPU backend allocates its pool with
torch.zeros, which pays that at start-up: prefault_kv_cache does the same here, 0.7-1.4 s a GiB on these VMs,
off by default for a fast start.
"""
import ctypes
import functools
import mmap
import os
import threading

import torch

HUGE_PAGE = 2 << 20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20                  # the largest mmap threshold glibc accepts on 64-bit


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve blocks of up to 32 MiB from its heap and keep what is freed there. By default
    much of a big step's memory (activations: a 2,048-token chunk's gate_up output is 25 MB in fp32; oneDNN's
    scratch) is mapped fresh, zeroed by the kernel page by page and unmapped again, step after step: on
    bench/throughput.py's workload 1.97M page faults where 0.44M remain with this (the KV pool's first
    touches), and 5-15 % more tokens/s (measured offline, on the main thread's heap; a server's engine thread
    allocates from its own glibc arena). vLLM's CPU backend gets the same from tcmalloc. The process keeps its
    peak working set. False where the C library is not glibc (nothing changed then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


def anonymous_memory(nbytes: int, huge_pages: bool) -> torch.Tensor:
    """nbytes (uint8) on an anonymous private mapping, zero-filled by the OS and touched only when written,
    starting on a huge-page boundary; advised for transparent huge pages where asked (THP's madvise mode, the
    usual default, gives none otherwise)."""
    memory, tensor = _anonymous_mapping(nbytes)
    if huge_pages:
        _advise_huge_pages(memory)
    return tensor


def _anonymous_mapping(nbytes: int) -> tuple[mmap.mmap | None, torch.Tensor]:
    if not hasattr(mmap, "MAP_PRIVATE"):   # not a POSIX system
        return None, torch.zeros(nbytes, dtype=torch.uint8)
    memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # shared maps get no THP
    start = torch.frombuffer(memory, dtype=torch.uint8, count=1).data_ptr()
    return memory, torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=-start % HUGE_PAGE)


def _advise_huge_pages(memory: mmap.mmap | None) -> None:
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):   # no mapping or no such advice here, or a kernel without THP: 4 KiB pages
        pass


def zeroed_kv_memory(shape: tuple[int, ...], dtype: torch.dtype, prefault: bool = False) -> torch.Tensor:
    """torch.zeros(shape, dtype) on anonymous memory (every page faulted in now with prefault), advised for huge
    pages with LANNER_KV_HUGE_PAGES=1."""
    pool = anonymous_memory(torch.Size(shape).numel() * dtype.itemsize,
                            os.environ.get("LANNER_KV_HUGE_PAGES", "0") == "1")
    if prefault:   # a zero written into each page (all zeros yet)
        pool[::mmap.PAGESIZE].zero_()
    return pool.view(dtype).view(shape)


class WeightMemory:
    """Memory for the weights a decode step streams (GGML linears' packed copies), carved from mappings of
    CHUNK bytes or more, advised for transparent huge pages once written (advise_huge_pages). A step reads ~96 MB
    of them: on 4 KiB pages ~24k TLB misses a step, each a walk of the host's page tables too on a VM; on 2 MiB
    pages ~50. 30 layers' Q4_1 GEMVs, caches flushed, 40 alternating sweeps: 1.02-1.06x at 1 row, 1.01-1.08x at 4
    (whole decode steps within this VM's noise). Advised before the packing wrote them, each huge page's first
    write waited for the kernel to compact memory for it (THP defrag=madvise): packing the default model took
    0.27-0.40 s against 0.09-0.13 on 4 KiB pages (Zen 3, 4 alternating runs each), a sixth of `lanner generate`.
    Written first, they are merged into huge pages by a thread in the background (advise_huge_pages): `lanner
    generate "Hi" --max-tokens 1` 1.95-2.06 -> 1.70-1.75 s, decode as before. A chunk's untouched pages cost nothing."""
    CHUNK = 64 << 20
    ALIGN = 64

    def __init__(self):
        self.chunk, self.used, self.lock, self.mappings = None, 0, threading.Lock(), []

    def take(self, nbytes: int) -> torch.Tensor:
        """nbytes (uint8, zero-filled), ALIGN-aligned."""
        size = -(-nbytes // self.ALIGN) * self.ALIGN
        with self.lock:
            if self.chunk is None or self.used + size > self.chunk.numel():
                memory, self.chunk = _anonymous_mapping(max(self.CHUNK, size))
                self.used = 0
                self.mappings.append(memory)
            out, self.used = self.chunk[self.used:self.used + nbytes], self.used + size
        return out

    def advise_huge_pages(self) -> None:
        """The mappings taken so far, written by now, advised for huge pages and merged into them by a thread in the
        background (MADV_COLLAPSE, Linux 6.1 on; else khugepaged merges them, within a minute or so)."""
        with self.lock:
            mappings, self.mappings = self.mappings, []
        for memory in mappings:
            _advise_huge_pages(memory)
        threading.Thread(target=_collapse, args=(mappings,), daemon=True, name="lanner-huge-pages").start()


MADV_COLLAPSE = 25


def _collapse(mappings: list) -> None:
    """Each mapping's pages merged into huge pages now: through libc (ctypes lets go of the GIL), so the engine's
    thread runs on while the kernel compacts and copies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for memory in mappings:
        if memory is not None:
            start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
            madvise(start, len(memory), MADV_COLLAPSE)   # fails harmlessly on older kernels (EINVAL)


weight_memory = WeightMemory()
