"""Tensor parallelism: the engine's runner is rank 0 of N processes, each holding a shard of every layer and a
paged KV cache of its key/value heads.

Rank 0 lives in the engine's process with the scheduler, block manager and sampler, and with the checkpoint the
engine loaded: it cuts every rank's shard from it and hands each worker its own. Each step it prepares the
packed inputs as a single runner does and sends them (ids, positions, attention metadata, embeds, sampled
rows, the LoRA slots in use, pending block copies) down a pipe to every worker; then all ranks run the same
forward, meeting in the all-reduces and the logits gather (lanner.distributed.layers). Workers are spawned with
torch.multiprocessing; they exit when the engine stops them, when it is garbage-collected, or when its process
goes away (their pipe closes). A worker that dies makes the next collective or send raise TensorParallelError.
"""
import copyreg
import dataclasses
import io
import logging
import pickle
import signal
import time
import traceback
import weakref
from contextlib import suppress

import torch
import torch.multiprocessing as mp

from lanner.config import EngineConfig, ModelConfig
from lanner.distributed.collectives import (Collectives, TensorParallelError, make_group, master_store,
                                            worker_store)
from lanner.distributed.layers import parallelize
from lanner.distributed.lora import ShardedLoRAManager, SlotMirror
from lanner.distributed.shards import ShardPlan, plan_shards, shard_weights
from lanner.engine.model_runner import ModelRunner
from lanner.quant.ggml import GGMLTensor

log = logging.getLogger("lanner.distributed")
START_TIMEOUT_S = 600   # loading a big checkpoint takes a while; a worker that dies is noticed at once anyway


def make_runner(cfg: EngineConfig, model_cfg: ModelConfig, weights: dict, max_model_len: int) -> ModelRunner:
    """The engine's runner: one process, or rank 0 of cfg.tensor_parallel_size."""
    if cfg.tensor_parallel_size == 1:
        return ModelRunner(cfg, model_cfg, weights, max_model_len)
    return TensorParallelRunner(cfg, model_cfg, weights, max_model_len)


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: the CPU for every rank, or the r-th GPU after the one the engine was given."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    return f"cuda:{first + rank}"


class RankRunner(ModelRunner):
    """One rank's shard of the model (plan.local_config: its heads, FFN columns, vocabulary rows; shard: its
    slice of the checkpoint) with its own paged KV cache; join() makes it compute its part of the full model."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, plan: ShardPlan, shard: dict,
                 max_model_len: int, num_blocks: int | None):
        # adapters are validated against the full model and sharded once the group exists (join)
        rank_cfg = dataclasses.replace(cfg, enable_lora=False, num_kv_blocks=num_blocks,
                                       device=rank_device(cfg.device, plan.rank))
        super().__init__(rank_cfg, plan.local_config(model_cfg), shard, max_model_len)
        self.engine_cfg, self.full_config, self.plan = cfg, model_cfg, plan
        self.comm = None

    def join(self, comm: Collectives, plans: list[ShardPlan]) -> None:
        parallelize(self.model, plans, comm)
        self.comm = comm
        c = self.engine_cfg
        if c.enable_lora:
            self.lora = ShardedLoRAManager(self.model, self.full_config, self.plan, c.max_loras, c.max_lora_rank,
                                           c.max_cpu_loras)


class TensorParallelRunner(RankRunner):
    """Rank 0: the runner the engine sees (run, copy_blocks, num_blocks, kv_cache, lora, states, vision, dtype),
    driving the workers."""

    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, weights: dict, max_model_len: int):
        check_supported(cfg)
        size = cfg.tensor_parallel_size
        plans = plan_shards(model_cfg, size, weights)
        threads_before = torch.get_num_threads()
        threads = max(1, threads_before // size)
        log.info("tensor parallel: %d ranks of %d threads each", size, threads)
        torch.set_num_threads(threads)   # each rank its share of the cores: more would oversubscribe them
        self.workers = Workers.start(cfg, model_cfg, plans, max_model_len, threads)
        self.finalizer = weakref.finalize(self, shut_down, self.workers, threads_before)
        try:
            # rank 0 holds the most key/value heads (shards.split), so its pool size fits every rank's memory
            super().__init__(cfg, model_cfg, plans[0], shard_weights(weights, plans[0], model_cfg), max_model_len,
                             cfg.num_kv_blocks)
            for plan in plans[1:]:   # one shard in memory at a time
                self.workers.hand_over(plan.rank, (shard_weights(weights, plan, model_cfg), self.num_blocks))
            self.workers.wait_ready()
            group = make_group(self.workers.store, 0, size, self.cfg.device)
            self.join(self.workers.attach(Collectives(group, 0, size, self.workers.failure)), plans)
        except BaseException:
            self.close()
            raise
        self.pending_copies: list[tuple[int, int]] = []

    def close(self) -> None:
        """Stop the workers (done too when the runner is garbage-collected or the process exits)."""
        self.finalizer()

    def prepare(self, scheduled, every_hidden: bool = False):
        inputs = super().prepare(scheduled, every_hidden)
        input_ids, positions, meta, embeds, rows = inputs[:5]
        slots = self.lora.step_slots() if self.lora is not None else None
        self.workers.send((input_ids, positions, meta, embeds, rows, slots, self.pending_copies))
        self.pending_copies = []
        return inputs

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Here now; on the workers before the next step's forward (the engine copies right before a run)."""
        super().copy_blocks(pairs)
        self.pending_copies += pairs


def shut_down(workers: "Workers", threads: int) -> None:
    """Stop the workers, give the process its threads back (once, whichever comes first: close(), garbage
    collection of the runner, the process's exit)."""
    workers.stop()
    torch.set_num_threads(threads)


def check_supported(cfg: EngineConfig) -> None:
    spec = cfg.speculative
    if spec is not None and spec.method not in ("ngram", "draft"):
        raise ValueError(f"speculative method {spec.method!r} reads the target model's full layers and KV cache; "
                         f"with tensor_parallel_size > 1 use 'ngram' or 'draft'")


# ---- rank 0's side of the workers ---------------------------------------------------------------------
class Workers:
    """Ranks 1..N-1 as spawned processes, each with a pipe from rank 0 (step inputs, control) and back
    (ready, or the traceback of what killed it)."""

    def __init__(self, store, procs: list, conns: list):
        self.store, self.procs, self.conns = store, procs, conns
        self.comm: Collectives | None = None
        self.error: TensorParallelError | None = None
        self.stopped = False

    def attach(self, comm: Collectives) -> Collectives:
        """The group that stop() closes."""
        self.comm = comm
        return comm

    @classmethod
    def start(cls, cfg, model_cfg, plans, max_model_len, threads) -> "Workers":
        store = master_store(len(plans))
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for plan in plans[1:]:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"lanner-tp-rank{plan.rank}", daemon=True,
                               args=(cfg, model_cfg, plans, plan.rank, max_model_len, store.port, threads, theirs))
            proc.start()
            theirs.close()   # only the worker holds its end: when it dies, sends here fail instead of blocking
            procs.append(proc)
            conns.append(ours)
        return cls(store, procs, conns)

    def send(self, message) -> None:
        self.check()
        data = dumps(message)
        for conn in self.conns:
            try:
                conn.send_bytes(data)
            except OSError as e:
                raise self.failure("send", e) from e

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if any(p.exitcode is not None for p in self.procs):
            raise self.failure("step", None)

    def hand_over(self, rank: int, shard) -> None:
        """A worker's shard of the checkpoint (and the pool's block count)."""
        try:
            self.conns[rank - 1].send_bytes(dumps(shard))
        except OSError:
            raise self.died_starting(rank) from None

    def died_starting(self, rank: int) -> TensorParallelError:
        proc = self.procs[rank - 1]
        proc.join(timeout=5)
        return TensorParallelError(
            f"tensor-parallel worker rank {rank} exited with code {proc.exitcode} while starting (its traceback is "
            f"on stderr; workers are spawned, so a script that creates the LLM at import time needs "
            f"`if __name__ == '__main__':`)")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if proc.exitcode is not None:
                    raise self.died_starting(rank)
                if time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel worker rank {rank} did not start in "
                                              f"{START_TIMEOUT_S} s")
            kind, detail = conn.recv()
            if kind == "error":
                raise TensorParallelError(f"tensor-parallel worker rank {rank} failed to start:\n{detail}")

    def failure(self, op: str, cause: Exception | None) -> TensorParallelError:
        """The error that ends the group: which workers died and why; the others are stopped."""
        if self.error is not None:
            return self.error
        deadline = time.monotonic() + 2   # a peer's closed socket is often seen before its exit status
        while time.monotonic() < deadline and all(p.exitcode is None for p in self.procs):
            time.sleep(0.05)
        dead = [self.describe(rank, proc, conn) for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), 1)
                if proc.exitcode is not None]
        self.stop()
        reason = "; ".join(dead) if dead else f"{cause}"
        self.error = TensorParallelError(f"tensor-parallel {op} failed: {reason}. This engine cannot continue; "
                                         f"create a new LLM")
        return self.error

    @staticmethod
    def describe(rank: int, proc, conn) -> str:
        text = f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        with suppress(OSError, EOFError):
            if conn.poll():
                kind, detail = conn.recv()
                text += f" after: {detail.strip().splitlines()[-1]}"
        return text

    def stop(self) -> None:
        """Ask every worker to exit, then make sure (kill what does not within seconds). Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        for conn in self.conns:
            with suppress(OSError):
                conn.send_bytes(dumps(None))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        if self.comm is not None:   # its sockets and threads go now, not in the interpreter's teardown
            self.comm.group = None


# ---- a worker --------------------------------------------------------------------------------------------
class WorkerRunner(RankRunner):
    """Ranks 1..N-1: run() takes rank 0's prepared inputs in place of a schedule."""
    mirror: SlotMirror | None = None

    def join(self, comm: Collectives, plans: list[ShardPlan]) -> None:
        super().join(comm, plans)
        if self.lora is not None:
            self.mirror = SlotMirror(self.lora)

    def prepare(self, message, every_hidden: bool = False):   # (rank 0's meta says which rows the last layer takes)
        input_ids, positions, meta, embeds, rows, slots, copies = message
        self.copy_blocks(copies)
        if self.mirror is not None:
            self.mirror.apply(slots)
        return input_ids, positions, meta, embeds, rows, [], []


def worker_main(cfg: EngineConfig, model_cfg: ModelConfig, plans: list[ShardPlan], rank: int, max_model_len: int,
                port: int, threads: int, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the engine, which stops its workers
    torch.set_num_threads(threads)
    try:
        runner = build_worker(cfg, model_cfg, plans[rank], max_model_len, conn)
        conn.send(("ready", None))
        group = make_group(worker_store(port, len(plans)), rank, len(plans), runner.cfg.device)
        runner.join(Collectives(group, rank, len(plans), worker_failure(rank)), plans)
        serve(runner, conn)
        runner.comm.group = None
    except (EOFError, BrokenPipeError):   # the engine's process is gone
        pass
    except BaseException:
        with suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1)


def build_worker(cfg, model_cfg, plan, max_model_len, conn) -> WorkerRunner:
    """This rank's shard and the pool's block count, from rank 0."""
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(rank_device(cfg.device, plan.rank))
    shard, num_blocks = receive(conn)
    return WorkerRunner(cfg, model_cfg, plan, shard, max_model_len, num_blocks)


def worker_failure(rank: int):
    def failure(op: str, cause: Exception) -> TensorParallelError:
        return TensorParallelError(f"tensor-parallel rank {rank}: {op} failed (another rank died or hung): {cause}")
    return failure


def serve(runner: WorkerRunner, conn) -> None:
    while (message := receive(conn)) is not None:
        runner.run(message)


# ---- the pipe's wire format ------------------------------------------------------------------------------
def tensor_to_wire(t: torch.Tensor):
    """Tensors as raw bytes: 20x cheaper than torch's own pickling of a step's small tensors, and nothing is
    moved to shared memory behind the engine's back."""
    t = t.detach().cpu().contiguous()
    return tensor_from_wire, (t.reshape(-1).view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."),
                              tuple(t.shape))


def tensor_from_wire(raw, dtype: str, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(raw).view(getattr(torch, dtype)).view(shape)


def ggml_to_wire(t: GGMLTensor):
    return GGMLTensor, (t.type_name, t.shape, t.data)   # rebuilt around the received bytes (its data_ptr)


class WirePickler(pickle.Pickler):
    dispatch_table = {**copyreg.dispatch_table, torch.Tensor: tensor_to_wire, GGMLTensor: ggml_to_wire}


def dumps(obj) -> bytes:
    buffer = io.BytesIO()
    WirePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def receive(conn):
    return pickle.loads(conn.recv_bytes())
