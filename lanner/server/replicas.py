"""Data parallel: N engine replicas behind one server, each in its own process (multiprocessing, spawn) or a Ray
actor, requests routed by prefix and load, a replica that dies restarted.

ReplicaSet is an EngineClient (the interface the app uses from AsyncEngine), so app.py serves either one. Each
replica runs ReplicaWorker: its own LLMEngine on the same EngineLoop as the in-process path. Messages go in
("add", "abort", "stats", "stop") and events come out ("ready", "outputs", "failed", "stats", "crashed", "fatal"),
always as lists, over a pipe (ProcessChannel) or through the actor's push / pull methods (RayChannel). On the
server side two threads per replica move them: one sends (so the event loop never blocks on a pipe), one
receives and hands each batch to the event loop; a receive that finds the replica gone is its death notice.
"""
import asyncio
import atexit
import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from lanner.engine.engine import LLMEngine, TokenizedPrompt
from lanner.engine.kv_cache import block_hash
from lanner.engine.multimodal import split_prompt
from lanner.sampling_params import SamplingParams
from lanner.server.async_engine import EngineClient, EngineFacts, EngineLoop, EngineStopped
from lanner.server.metrics import ServerMetrics

log = logging.getLogger("lanner.server")

EXECUTORS = ("mp", "ray")
ROUTING_POLICIES = ("prefix", "round_robin", "least_tokens")
PREFIX_MAP_CAPACITY = 1 << 16          # block hashes the router remembers (LRU); ~10 MB at most
STATS_TIMEOUT_S = 10.0
RAY_PULL_TIMEOUT_S = 0.5               # a pull returns at least this often, so a dead actor is noticed
MAX_RESTART_DELAY_S = 30.0
# Counters of a replica's engine that restart from 0 with a new incarnation; the server keeps the sum.
ENGINE_COUNTERS = ("preemptions", "generated_tokens", "spec_drafted_tokens", "spec_accepted_tokens", "prefix_hits",
                   "prefix_queries")


class ReplicaDied(RuntimeError):
    pass


@dataclass
class ReplicaSpec:
    """How every replica builds its engine: lanner.LLM(model, **engine_kwargs), torch using `threads` threads."""
    model: str | None
    engine_kwargs: dict = field(default_factory=dict)
    threads: int | None = None

    def build_engine(self) -> LLMEngine:
        import torch

        from lanner import LLM
        if self.threads:
            torch.set_num_threads(self.threads)
        return LLM(self.model, **self.engine_kwargs).engine


def portable_error(e: BaseException) -> Exception:
    """An error that pickles and still says what it was: a ValueError stays one (the server answers 400)."""
    if isinstance(e, ValueError):
        return ValueError(str(e))
    return RuntimeError(f"{type(e).__name__}: {e}")


def replica_stats(engine: LLMEngine) -> dict:
    return {**engine.stats(), "prefix_hits": engine.blocks.prefix_hits, "prefix_queries": engine.blocks.prefix_queries}


# ---- inside a replica ---------------------------------------------------------------------------------------
class ReplicaWorker:
    """One replica's engine on an EngineLoop: messages in through handle(), events out through emit(list)."""

    def __init__(self, spec: ReplicaSpec, emit):
        self.engine = spec.build_engine()
        self.emit = emit
        self.loop = EngineLoop(self.engine, self.report)

    def handle(self, messages: list[tuple]) -> None:
        for kind, *args in messages:
            if kind == "add":
                self.add(*args)
            elif kind == "abort":
                self.loop.commands.put(("abort", args[0]))
            elif kind == "stats":
                self.stats(args[0])
            elif kind == "stop":
                self.loop.commands.put(("stop",))
            else:
                raise ValueError(f"unknown replica message {kind!r}")

    def add(self, request_id: str, prompt, params: SamplingParams, lora_request) -> None:
        if params.structured_outputs is not None:   # compiled here, off the engine thread, as the server does
            try:
                self.engine.compile_constraint(params.structured_outputs)
            except ValueError as e:
                return self.emit([("failed", request_id, portable_error(e))])
        self.loop.commands.put(("add", request_id, prompt, params, lora_request))

    def stats(self, token: int) -> None:
        future = concurrent.futures.Future()
        future.add_done_callback(lambda f: self.emit([("stats", token, None if f.exception() else f.result())]))
        self.loop.commands.put(("call", replica_stats, future))

    def report(self, kind: str, *args) -> None:
        if kind == "outputs":
            self.emit([("outputs", args[0], replica_stats(self.engine))])
        elif kind == "failed":
            self.emit([("failed", args[0], portable_error(args[1]))])
        else:
            self.emit([("crashed", portable_error(args[0]))])


def run_replica_process(spec: ReplicaSpec, conn) -> None:
    """A replica process: build the engine, say ready, serve messages until "stop" or until the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C reaches the whole group; the server stops us itself
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s replica {os.getpid()} %(name)s: %(message)s")
    lock = threading.Lock()

    def emit(events: list) -> None:
        with lock:
            try:
                conn.send(events)
            except (OSError, EOFError):
                pass            # the server is gone: the reader thread stops the loop

    try:
        worker = ReplicaWorker(spec, emit)
    except Exception as e:
        return emit([("fatal", portable_error(e))])
    emit([("ready", EngineFacts.of(worker.engine).portable())])
    threading.Thread(target=read_messages, args=(conn, worker), name="lanner-replica-inbox", daemon=True).start()
    worker.loop.run()


def read_messages(conn, worker: ReplicaWorker) -> None:
    try:
        while True:
            worker.handle(conn.recv())
    except (EOFError, OSError):
        worker.handle([("stop",)])


class RayReplicaActor:
    """A replica as a Ray actor (created with max_concurrency > 1: the engine loop runs on a thread of its own,
    push and pull beside it)."""

    def __init__(self, spec: ReplicaSpec):
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.worker = ReplicaWorker(spec, self.outbox.put)
        threading.Thread(target=self.worker.loop.run, name="lanner-engine", daemon=True).start()

    def facts(self) -> EngineFacts:
        return EngineFacts.of(self.worker.engine).portable()

    def pid(self) -> int:
        return os.getpid()

    def push(self, messages: list[tuple]) -> None:
        self.worker.handle(messages)

    def pull(self, timeout: float) -> list:
        try:
            events = list(self.outbox.get(timeout=timeout))
        except queue.Empty:
            return []
        while True:
            try:
                events += self.outbox.get_nowait()
            except queue.Empty:
                return events


# ---- the server's side of one replica -----------------------------------------------------------------------
class ProcessChannel:
    """A replica in a spawned process of this machine; messages and events over a pipe."""
    kind = "mp"

    def __init__(self, spec: ReplicaSpec):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        # not daemonic: a replica may start processes of its own (tensor-parallel workers)
        self.process = ctx.Process(target=run_replica_process, args=(spec, child), name="lanner-replica")
        self.process.start()
        child.close()           # else this process holds the child's end open and never sees EOF when it dies
        self.pid = self.process.pid

    def ready(self) -> EngineFacts:
        try:
            return expect_ready(self.recv())
        except ReplicaDied as e:
            raise ValueError(f"the replica could not start its engine: {e}") from None

    def send(self, messages: list[tuple]) -> None:
        self.conn.send(messages)

    def recv(self) -> list:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise ReplicaDied(f"replica process {self.pid} exited (exit code {self.process.exitcode})") from None

    def kill(self) -> None:
        try:
            if self.process.is_alive():
                self.process.kill()
        except ValueError:      # already closed (released)
            pass

    def stop(self) -> None:
        """Only where no sender thread uses the pipe (two writers would interleave their bytes)."""
        try:
            self.conn.send([("stop",)])
        except OSError:
            pass

    def close(self, timeout: float) -> None:
        """Wait up to timeout for the process to end (after "stop"), then kill it."""
        self.process.join(timeout)
        self.kill()
        self.process.join()

    def release(self) -> None:
        """After the threads that use it are gone."""
        self.conn.close()
        self.process.close()


@functools.lru_cache(maxsize=1)
def ray_actor_class():
    import ray
    return ray.remote(RayReplicaActor)


def connect_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--distributed-executor ray needs Ray: pip install ray") from None
    if not ray.is_initialized():
        ray.init()      # joins the cluster RAY_ADDRESS names, else starts a local instance
    return ray


class RayChannel:
    """A replica as a Ray actor, on whatever node Ray places it (a local instance unless RAY_ADDRESS names one)."""
    kind = "ray"

    def __init__(self, spec: ReplicaSpec, num_cpus: float = 1):
        self.ray = connect_ray()
        actor = ray_actor_class().options(max_concurrency=4, num_cpus=num_cpus, max_restarts=0)
        self.actor = actor.remote(spec)
        self.pid = None

    def ready(self) -> EngineFacts:
        try:
            facts = self.ray.get(self.actor.facts.remote())
            self.pid = self.ray.get(self.actor.pid.remote())
        except self.ray.exceptions.RayError as e:
            raise ValueError(f"the replica actor did not start: {e}") from None
        return facts

    def send(self, messages: list[tuple]) -> None:
        # waited on: calls to a threaded actor may run out of order, and an abort must not pass its add
        self.ray.get(self.actor.push.remote(messages))

    def recv(self) -> list:
        try:
            return self.ray.get(self.actor.pull.remote(RAY_PULL_TIMEOUT_S))
        except self.ray.exceptions.RayError as e:
            raise ReplicaDied(f"replica actor {self.pid} is gone: {type(e).__name__}") from None

    def kill(self) -> None:
        self.ray.kill(self.actor, no_restart=True)

    def stop(self) -> None:
        try:
            self.send([("stop",)])
        except self.ray.exceptions.RayError:
            pass

    def close(self, timeout: float) -> None:
        """The actor is killed: its engine has nothing left to finish once "stop" went through its sender."""
        self.kill()

    def release(self) -> None:
        pass


def expect_ready(events: list) -> EngineFacts:
    kind, value = events[0]
    if kind == "fatal":
        raise ValueError(f"the replica could not start its engine: {value}")
    if kind != "ready":
        raise RuntimeError(f"a replica said {kind!r} before 'ready'")
    return value


@dataclass(eq=False)
class Replica:
    """The server's view of one replica: its current incarnation (channel), state and load."""
    id: int
    state: str = "starting"             # starting | alive | dead | stopped
    channel: object = None
    starting: object = None             # an incarnation being started
    outbox: queue.SimpleQueue | None = None
    threads: list = field(default_factory=list)
    restarts: int = 0
    failed_starts: int = 0
    requests: int = 0                   # routed to it, all incarnations
    incarnation_requests: int = 0       # routed to its current incarnation: a restarted replica wins ties
    in_flight: int = 0
    outstanding_tokens: int = 0         # prompt + max output tokens of its unfinished requests
    stats: dict = field(default_factory=dict)          # its engine's, as of its latest step
    retired: Counter = field(default_factory=Counter)  # ENGINE_COUNTERS of its earlier incarnations

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    def total(self, counter: str) -> int:
        return self.retired[counter] + self.stats.get(counter, 0)

    def describe(self) -> dict:
        queries = self.total("prefix_queries")
        return {"id": self.id, "alive": self.alive, "state": self.state, "restarts": self.restarts,
                "pid": getattr(self.channel, "pid", None), "requests": self.requests, "in_flight": self.in_flight,
                "outstanding_tokens": self.outstanding_tokens, "prefix_hits": self.total("prefix_hits"),
                "prefix_queries": queries,
                "prefix_cache_hit_rate": self.total("prefix_hits") / queries if queries else 0.0}


# ---- routing --------------------------------------------------------------------------------------------------
def prefix_hashes(token_ids: list[int], block_size: int, adapter_key) -> list[int]:
    """The chained hashes of the prompt's full blocks, as the engine's prefix cache keys them (the adapter in
    every key: KV depends on it)."""
    hashes, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, tuple(token_ids[start:start + block_size]), adapter_key)
        hashes.append(parent)
    return hashes


def adapter_key(lora_request):
    return None if lora_request is None else (lora_request.lora_int_id, lora_request.lora_path)


class Router:
    """Picks a replica per request. prefix: the replica that most recently served the longest run of the
    request's leading blocks (it likely still caches them), unless that would put it more than imbalance_tokens
    ahead of the lightest replica; then, and without a match, the least outstanding tokens (ties: the fewest
    requests routed to the current incarnation, so a restarted replica gets work). round_robin and least_tokens
    are there to compare against."""

    def __init__(self, policy: str, imbalance_tokens: int, capacity: int = PREFIX_MAP_CAPACITY):
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.policy, self.imbalance_tokens, self.capacity = policy, imbalance_tokens, capacity
        self.owner: OrderedDict[int, int] = OrderedDict()     # block hash -> replica id, least recent first
        self.turn = itertools.count()
        self.prefix_routed = 0              # requests sent where their prefix was

    def choose(self, live: list[Replica], hashes: list[int]) -> Replica:
        if self.policy == "round_robin":
            return live[next(self.turn) % len(live)]
        lightest = min(live, key=lambda r: (r.outstanding_tokens, r.incarnation_requests))
        holder = self.holder(live, hashes) if self.policy == "prefix" else None
        if holder is not None and holder.outstanding_tokens - lightest.outstanding_tokens <= self.imbalance_tokens:
            self.prefix_routed += 1
            return holder
        return lightest

    def holder(self, live: list[Replica], hashes: list[int]) -> Replica | None:
        by_id = {r.id: r for r in live}
        for h in reversed(hashes):          # chained hashes: a match on block i is a match on blocks 0..i
            replica = by_id.get(self.owner.get(h))
            if replica is not None:
                return replica
        return None

    def remember(self, hashes: list[int], replica: Replica) -> None:
        for h in hashes:
            self.owner[h] = replica.id
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)

    def forget(self, replica: Replica) -> None:
        """A replica that died took its cache with it."""
        for h in [h for h, owner in self.owner.items() if owner == replica.id]:
            del self.owner[h]


@dataclass(eq=False)
class Placement:
    """A request as routed: enough to send it again to another replica."""
    request_id: str
    prompt: object
    params: SamplingParams
    lora_request: object
    hashes: list[int]
    cost: int
    replica: Replica | None = None


# ---- the replica set ------------------------------------------------------------------------------------------
class ReplicaSet(EngineClient):
    """N engine replicas behind one server: AsyncEngine's interface, requests routed by prefix and load.

    A replica that dies: its requests that showed their client nothing yet (not streamed, or no token streamed)
    go to another live replica; the others end with an EngineStopped (503 + Retry-After, or an error event in
    the stream); it is started again. Build one with ReplicaSet.launch (it waits for every replica's engine)."""

    def __init__(self, spec: ReplicaSpec, replicas: list[Replica], facts: EngineFacts, routing: str = "prefix",
                 executor: str = "mp", metrics: ServerMetrics | None = None, ray_num_cpus: float = 1):
        super().__init__(facts, metrics)
        self.spec, self.replicas, self.executor, self.ray_num_cpus = spec, replicas, executor, ray_num_cpus
        self.router = Router(routing, imbalance_tokens=facts.cfg.max_num_batched_tokens)
        self.validate_prompt = facts.validate_prompt
        self.vision = None
        self.placements: dict[str, Placement] = {}
        self.stat_waiters: dict[int, tuple[Replica, asyncio.Future]] = {}
        self.stat_tokens = itertools.count()
        self.restarting: set[asyncio.Task] = set()
        self.rerouted = self.cut_off = 0   # requests moved off a dead replica / ended by its death
        self.stopping = False
        self.stop_requested = asyncio.Event()
        atexit.register(self.kill_all)      # never leave replica processes behind, however this process ends

    @classmethod
    def launch(cls, spec: ReplicaSpec, size: int, executor: str = "mp", routing: str = "prefix",
               metrics: ServerMetrics | None = None, ray_num_cpus: float = 1) -> "ReplicaSet":
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"data_parallel_size must be an integer >= 1, got {size!r}")
        if executor not in EXECUTORS:
            raise ValueError(f"distributed executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if routing not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {routing!r}")
        replicas = [Replica(i) for i in range(size)]
        try:
            for replica in replicas:    # every replica loads at once
                replica.channel = open_channel(executor, spec, ray_num_cpus)
            facts = [replica.channel.ready() for replica in replicas][0]
            if facts.vision:
                raise ValueError("--data-parallel-size > 1 serves text-only models (image inputs are processed in "
                                 "the server process, which holds no vision processor)")
        except BaseException:
            for replica in replicas:
                if replica.channel is not None:
                    replica.channel.stop()
                    replica.channel.close(5.0)
                    replica.channel.release()
            raise
        return cls(spec, replicas, facts, routing, executor, metrics, ray_num_cpus)

    # ---- lifecycle (event loop) -----------------------------------------------------------------
    def start(self) -> None:
        self.loop, self.draining = asyncio.get_running_loop(), False
        for replica in self.replicas:
            self.attach(replica, replica.channel)

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_requested.set()
        await asyncio.to_thread(self.close_all)
        await asyncio.gather(*self.restarting, return_exceptions=True)
        self.end_tracked("the server is shutting down")
        atexit.unregister(self.kill_all)

    def close_all(self) -> None:
        """Every replica told to stop (through its sender) at once, then each waited for."""
        closing = []
        for replica in self.replicas:
            if replica.starting is not None:
                replica.starting.kill()     # its restart sees it fail, and stopping
            channel, replica.channel, replica.state = replica.channel, None, "stopped"
            if channel is not None:
                replica.outbox.put(("stop",))
                replica.outbox.put(None)
                closing.append((replica, channel))
        for replica, channel in closing:
            replica.threads[0].join(10.0)   # the sender: "stop" sent
            channel.close(timeout=10.0)
            for thread in replica.threads:
                thread.join(10.0)
            channel.release()

    def kill_all(self) -> None:
        for replica in self.replicas:
            if replica.channel is not None:
                replica.channel.kill()

    @property
    def alive(self) -> bool:
        return self.loop is not None and not self.stopping and any(r.alive for r in self.replicas)

    def health(self) -> dict:
        return {"routing": self.router.policy, "executor": self.executor, "rerouted_requests": self.rerouted,
                "cut_off_requests": self.cut_off, "replicas": [r.describe() for r in self.replicas]}

    def attach(self, replica: Replica, channel) -> None:
        """A ready incarnation of the replica: start its sender and receiver threads."""
        replica.channel, replica.outbox, replica.state, replica.stats = channel, queue.SimpleQueue(), "alive", {}
        replica.incarnation_requests = 0
        replica.threads = [
            threading.Thread(target=self.transmit, args=(channel, replica.outbox), daemon=True,
                             name=f"lanner-replica-{replica.id}-out"),
            threading.Thread(target=self.receive, args=(replica, channel), daemon=True,
                             name=f"lanner-replica-{replica.id}-in")]
        for thread in replica.threads:
            thread.start()

    # ---- requests (event loop) ------------------------------------------------------------------
    def tokenize(self, prompt) -> TokenizedPrompt:
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        prompt, images = split_prompt(prompt)
        if images:
            raise ValueError(f"the model {self.facts.model_path} takes no images (a text-only "
                             f"{self.facts.model_config.architecture})")
        text = prompt if isinstance(prompt, str) else None
        return TokenizedPrompt(text, self.tokenizer.encode(prompt) if text is not None else list(prompt))

    def compile_constraint(self, constraint) -> None:
        """Compiled here too, so a bad constraint is a 400 before any replica sees it."""
        self.grammars.compiled(constraint.grammar_text)

    @functools.cached_property
    def grammars(self):
        from lanner.structured import GrammarCompiler
        return GrammarCompiler(self.tokenizer, self.vocab_size)

    def add(self, request_id: str, prompt_ids: "list[int] | TokenizedPrompt", params: SamplingParams, lora_request,
            out: asyncio.Queue, arrival: float, restartable: bool = False) -> None:
        if not self.alive:
            raise EngineStopped("no engine replica is running")
        ids = getattr(prompt_ids, "token_ids", prompt_ids)
        self.track(request_id, len(ids), out, arrival, restartable)
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        hashes = prefix_hashes(ids, self.facts.cfg.block_size, adapter_key(lora_request))
        self.place(Placement(request_id, prompt_ids, params, lora_request, hashes, len(ids) + params.n * max_tokens))

    def place(self, placement: Placement) -> None:
        live = [r for r in self.replicas if r.alive]
        if not live:
            return self.fail(placement.request_id, EngineStopped("no engine replica is running; retry shortly"))
        replica = self.router.choose(live, placement.hashes)
        self.router.remember(placement.hashes, replica)
        placement.replica = replica
        replica.requests += 1
        replica.incarnation_requests += 1
        replica.in_flight += 1
        replica.outstanding_tokens += placement.cost
        self.placements[placement.request_id] = placement
        replica.outbox.put(("add", placement.request_id, placement.prompt, placement.params, placement.lora_request))

    def release(self, request_id: str) -> Placement | None:
        placement = self.placements.pop(request_id, None)
        if placement is not None:
            placement.replica.in_flight -= 1
            placement.replica.outstanding_tokens -= placement.cost
        return placement

    def abort(self, request_id: str) -> None:
        if not self.untrack(request_id):
            return
        placement = self.release(request_id)
        if placement is not None and placement.replica.alive:
            placement.replica.outbox.put(("abort", request_id))

    def fail(self, request_id: str, error: BaseException) -> None:
        self.release(request_id)
        super().fail(request_id, error)

    async def stats(self) -> dict:
        """Every live replica asked afresh; counters summed over every incarnation, gauges over the live ones."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise EngineStopped("no engine replica is running")
        for replica, result in zip(live, await asyncio.gather(*map(self.ask_stats, live), return_exceptions=True)):
            if isinstance(result, dict):
                replica.stats = result
        return self.combined_stats(live)

    async def ask_stats(self, replica: Replica) -> dict | None:
        token, future = next(self.stat_tokens), self.loop.create_future()
        self.stat_waiters[token] = (replica, future)
        replica.outbox.put(("stats", token))
        try:
            return await asyncio.wait_for(future, STATS_TIMEOUT_S)
        finally:
            self.stat_waiters.pop(token, None)

    def combined_stats(self, live: list[Replica]) -> dict:
        gauges = ("running", "waiting", "kv_blocks_total", "kv_blocks_used")
        stats = {k: sum(r.stats.get(k, 0) for r in live) for k in gauges}
        stats.update({k: sum(r.total(k) for r in self.replicas) for k in ENGINE_COUNTERS})
        queries = stats["prefix_queries"]
        stats["prefix_cache_hit_rate"] = stats["prefix_hits"] / queries if queries else 0.0
        stats["replicas"] = [r.describe() for r in self.replicas]
        return stats

    # ---- events (event loop) --------------------------------------------------------------------
    def on_events(self, replica: Replica, channel, events: list) -> None:
        if replica.channel is not channel or not replica.alive:
            return                          # from an incarnation already given up on
        for kind, *args in events:
            if kind == "outputs":
                replica.stats = args[1]
                self.deliver_from(replica, args[0])
            elif kind == "failed":
                if self.owned_by(args[0], replica):
                    self.fail(args[0], args[1])
            elif kind == "stats":
                self.answer_stats(*args)
            elif kind == "crashed":         # its engine loop is broken: replace the replica
                log.error("replica %d: engine loop crashed: %s", replica.id, args[0])
                channel.kill()

    def owned_by(self, request_id: str, replica: Replica) -> bool:
        placement = self.placements.get(request_id)
        return placement is not None and placement.replica is replica

    def deliver_from(self, replica: Replica, outputs: list) -> None:
        outputs = [o for o in outputs if self.owned_by(o.request_id, replica)]
        for o in outputs:
            if o.finished:
                self.release(o.request_id)
        self.deliver(outputs, time.perf_counter())

    def answer_stats(self, token: int, stats: dict | None) -> None:
        _, future = self.stat_waiters.get(token, (None, None))
        if future is not None and not future.done():
            future.set_result(stats)

    def on_death(self, replica: Replica, channel, reason: str) -> None:
        if replica.channel is not channel or replica.state != "alive":
            return
        log.warning("replica %d died (%s): rerouting its requests, restarting it", replica.id, reason)
        replica.state, replica.channel = "dead", None
        replica.retired.update({k: replica.stats.get(k, 0) for k in ENGINE_COUNTERS})
        replica.stats = {}
        replica.outbox.put(None)
        self.router.forget(replica)
        for token, (owner, future) in list(self.stat_waiters.items()):
            if owner is replica and not future.done():
                future.set_exception(ReplicaDied(reason))
        for placement in [p for p in self.placements.values() if p.replica is replica]:
            self.reroute(placement, replica.id)
        task = self.loop.create_task(self.restart(replica, channel))
        self.restarting.add(task)
        task.add_done_callback(self.restarting.discard)

    def reroute(self, placement: Placement, dead_id: int) -> None:
        """Run again elsewhere when its client has seen nothing of it; else end it (the client retries)."""
        self.release(placement.request_id)
        tracked = self.tracked.get(placement.request_id)
        if tracked is None:
            return
        if tracked.restartable or tracked.num_tokens == 0:
            tracked.num_tokens = 0
            self.unstarted.add(placement.request_id)
            self.rerouted += 1
            return self.place(placement)
        self.cut_off += 1
        self.fail(placement.request_id, EngineStopped(f"engine replica {dead_id} stopped mid-stream; retry the "
                                                      "request"))

    async def restart(self, replica: Replica, dead_channel) -> None:
        await asyncio.to_thread(self.bury, replica, dead_channel)
        while not self.stopping:
            delay = min(MAX_RESTART_DELAY_S, 2 ** replica.failed_starts - 1)
            if delay and await self.stopped_within(delay):
                return
            try:
                channel = await asyncio.to_thread(self.start_incarnation, replica)
            except Exception as e:
                replica.failed_starts += 1
                if not self.stopping:
                    log.error("replica %d did not restart (%s); trying again", replica.id, e)
                continue
            if self.stopping:
                channel.stop()
                await asyncio.to_thread(channel.close, 5.0)
                return channel.release()
            replica.restarts += 1
            replica.failed_starts = 0
            self.attach(replica, channel)
            return log.warning("replica %d is back (restart %d)", replica.id, replica.restarts)

    async def stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stop_requested.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def start_incarnation(self, replica: Replica):
        """A new process / actor for the replica, once its engine is ready (close_all kills it meanwhile)."""
        replica.starting = channel = open_channel(self.executor, self.spec, self.ray_num_cpus)
        try:
            channel.ready()
        except BaseException:
            channel.kill()
            channel.close(timeout=1.0)
            channel.release()
            raise
        finally:
            replica.starting = None
        return channel

    def bury(self, replica: Replica, channel) -> None:
        """Reap the dead incarnation (its process, its threads) before starting the next one."""
        channel.kill()
        for thread in replica.threads:
            thread.join(10.0)
        channel.close(timeout=1.0)
        channel.release()

    # ---- the threads of each replica ------------------------------------------------------------
    def transmit(self, channel, outbox: queue.SimpleQueue) -> None:
        while True:
            batch = [outbox.get()]
            while True:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            messages = [m for m in batch if m is not None]
            try:
                if messages:
                    channel.send(messages)
            except Exception:
                return                      # it died: its receiver reports that
            if len(messages) < len(batch):
                return

    def receive(self, replica: Replica, channel) -> None:
        try:
            while True:
                events = channel.recv()
                if events:
                    self.send(self.on_events, replica, channel, events)
        except ReplicaDied as e:
            self.send(self.on_death, replica, channel, str(e))


def open_channel(executor: str, spec: ReplicaSpec, ray_num_cpus: float = 1):
    return RayChannel(spec, ray_num_cpus) if executor == "ray" else ProcessChannel(spec)
