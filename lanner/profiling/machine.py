"""The machine's two roofline ceilings, measured: peak matmul FLOP/s and memory bandwidth (a big copy)."""
import time
from dataclasses import asdict, dataclass

import torch

from lanner.profiling.timing import device_sync


@dataclass
class Machine:
    device: str
    dtype: str
    threads: int
    peak_gflops: float        # best of a big square matmul in the model dtype
    peak_gbs: float           # best of a big tensor copy: (read + write) bytes / s

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where the two ceilings meet: below it, memory-bound."""
        return self.peak_gflops / self.peak_gbs

    def roof(self, intensity: float) -> float:
        """Attainable GFLOP/s at an arithmetic intensity."""
        return min(self.peak_gflops, intensity * self.peak_gbs)

    def bound(self, intensity: float) -> str:
        return "compute" if intensity >= self.ridge else "memory"

    def to_dict(self) -> dict:
        return {**asdict(self), "ridge_flop_per_byte": self.ridge}


def best_seconds(fn, sync, repeats: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def peak_matmul_gflops(dtype: torch.dtype, device="cpu", n: int | None = None, repeats: int = 20) -> float:
    n = n or (8192 if str(device).startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: torch.mm(a, b, out=out), device_sync(device), repeats)
    return 2 * n ** 3 / seconds / 1e9


def peak_bandwidth_gbs(device="cpu", mib: int | None = None, repeats: int = 20) -> float:
    mib = mib or (2048 if str(device).startswith("cuda") else 256)
    src = torch.ones(mib << 18, device=device)   # fp32: 4 bytes an element
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device_sync(device), repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def measure_machine(dtype: torch.dtype, device="cpu", matmul_n: int | None = None, copy_mib: int | None = None,
                    repeats: int = 20) -> Machine:
    """Best of many short runs: on a shared machine the best run is the one nobody else interrupted."""
    return Machine(str(device), str(dtype).removeprefix("torch."), torch.get_num_threads(),
                   peak_matmul_gflops(dtype, device, matmul_n, repeats), peak_bandwidth_gbs(device, copy_mib, repeats))
