"""The tensor-parallel group's collectives on torch.distributed: gloo on CPU, NCCL on CUDA.

Each engine makes its own process group from a TCPStore (not the process-wide default group), so several
engines can live in one process. Every collective has a timeout; a failed one raises TensorParallelError
with what rank 0 knows of the cause (a worker that died, its exit code and last error)."""
import datetime
import os
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

# how long a rank waits for the others inside one collective: past it a hung rank is an error, not a hang
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("LANNER_TP_TIMEOUT", "120")))
HOST = "127.0.0.1"   # the ranks of one engine share a machine


class TensorParallelError(RuntimeError):
    """A rank died or a collective timed out: the engine cannot go on (create a new one)."""


def master_store(size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port (store.port)."""
    return dist.TCPStore(HOST, 0, size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def worker_store(port: int, size: int) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, size, False, timeout=COLLECTIVE_TIMEOUT)


def make_group(store: dist.Store, rank: int, size: int, device: str):
    """A process group over the store: NCCL for CUDA tensors, gloo over loopback for CPU ones."""
    store = dist.PrefixStore("lanner-tp", store)
    if device.startswith("cuda"):
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = COLLECTIVE_TIMEOUT
        return dist.ProcessGroupNCCL(store, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = COLLECTIVE_TIMEOUT
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
    return dist.ProcessGroupGloo(store, rank, size, options)


class Collectives:
    """all-reduce and gather-to-rank-0 over one group, counting the bytes each rank puts in."""

    def __init__(self, group, rank: int, size: int, on_failure):
        """on_failure(op, exception) -> TensorParallelError: what to raise when a collective fails."""
        self.group, self.rank, self.size, self.on_failure = group, rank, size, on_failure
        self.bytes, self.calls, self.seconds = Counter(), Counter(), Counter()   # per op, for benchmarks

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place in t (contiguous)."""
        self.run("all_reduce", lambda: self.group.allreduce([t]), t)
        return t

    def gather_columns(self, t: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Rank 0 gets every rank's columns side by side ([rows, sum(widths)]); the others keep their own."""
        if t.shape[0] == 0:
            return t.new_empty(0, sum(widths)) if self.rank == 0 else t
        widest = max(widths)
        padded = F.pad(t, (0, widest - t.shape[1])).contiguous()   # gather takes equal shapes
        outputs = [[torch.empty_like(padded) for _ in widths]] if self.rank == 0 else []
        options = dist.GatherOptions()
        options.rootRank = 0
        self.run("gather", lambda: self.group.gather(outputs, [padded], options), padded)
        if self.rank:
            return t
        return torch.cat([out[:, :w] for out, w in zip(outputs[0], widths)], dim=1)

    def run(self, op: str, start, t: torch.Tensor) -> None:
        self.bytes[op] += t.numel() * t.element_size()
        self.calls[op] += 1
        began = time.perf_counter()
        try:
            start().wait()
        except RuntimeError as e:   # gloo: "Connection closed by peer", timeouts; NCCL: watchdog errors
            raise self.on_failure(op, e) from e
        self.seconds[op] += time.perf_counter() - began   # waiting for the slowest rank included
