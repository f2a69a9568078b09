"""The event-loop side of serving (EngineClient: requests tracked, outputs delivered to their queues, metrics) and
AsyncEngine, the engine in this process: one thread owns the LLMEngine; asyncio handlers talk to it through a queue.

The loop thread (EngineLoop) is the only code that touches the engine (adds, aborts and stats go through the
command queue too). Each step it drains the queue, steps once and hands the step's outputs to the event loop in
one call_soon_threadsafe, which puts each output on its request's asyncio.Queue. Outputs are cumulative
(full text so far), so a consumer that falls behind just takes the latest one. lanner/server/replicas.py runs the
same EngineLoop in each data-parallel replica and is an EngineClient too.
"""
import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

from lanner.config import EngineConfig, ModelConfig
from lanner.engine.engine import LLMEngine
from lanner.engine.outputs import RequestOutput
from lanner.sampling_params import SamplingParams
from lanner.server.metrics import ServerMetrics

log = logging.getLogger("lanner.server")


class EngineStopped(RuntimeError):
    pass


class RequestFailed(RuntimeError):
    def __init__(self, request_id: str, error: BaseException):
        super().__init__(str(error))
        self.request_id, self.error = request_id, error


@dataclass
class Tracked:
    """What the event loop keeps per engine request: where its outputs go, and timing for the metrics."""
    queue: asyncio.Queue
    arrival: float
    last_time: float = 0.0
    num_tokens: int = 0
    restartable: bool = False          # its consumer shows nothing before it finishes (not streamed)


@dataclass
class EngineFacts:
    """An engine's constants, all a server needs to validate and tokenize requests without the engine itself
    (a data-parallel front gets them from its first replica)."""
    tokenizer: object
    cfg: EngineConfig
    model_config: ModelConfig
    max_model_len: int
    num_blocks: int
    kv_window: int | None
    model_path: str
    lora_enabled: bool
    vision: bool

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineFacts":
        return cls(engine.tokenizer, engine.cfg, engine.model_config, engine.max_model_len, engine.blocks.num_blocks,
                   engine.kv_window, engine.model_path, lora_enabled=engine.runner.lora is not None,
                   vision=engine.runner.vision is not None)

    def portable(self) -> "EngineFacts":
        """A copy that pickles: the tokenizer without its compiled chat template (jinja closures do not pickle)."""
        tokenizer = object.__new__(type(self.tokenizer))
        tokenizer.__dict__.update({k: v for k, v in vars(self.tokenizer).items() if k != "compiled_template"})
        return replace(self, tokenizer=tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.cfg.block_size

    @property
    def blocks(self):
        return SimpleNamespace(num_blocks=self.num_blocks)

    def validate_prompt(self, token_ids: list[int], params: SamplingParams, num_virtual_tokens: int = 0) -> None:
        # the engine's own check, run on these constants (it reads nothing else), so the two never disagree
        LLMEngine.validate_prompt(self, token_ids, params, num_virtual_tokens)


class EngineClient:
    """The event-loop side: each engine request's queue and timing, outputs delivered, metrics observed. Subclasses
    say where requests run (add / abort / stats / start / stop / alive) and set the engine's constants."""

    def __init__(self, facts: EngineFacts, metrics: ServerMetrics | None = None):
        self.facts = facts
        self.metrics = metrics or ServerMetrics()
        # Constants of the engine, read once here so handlers never touch the engine itself.
        self.tokenizer = facts.tokenizer
        self.max_model_len = facts.max_model_len
        self.vocab_size = facts.vocab_size
        self.kv_capacity_tokens = facts.kv_capacity_tokens
        self.tracked: dict[str, Tracked] = {}                  # event-loop side only
        self.unstarted: set[str] = set()                       # admitted, no token yet (the "waiting queue")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    # ---- lifecycle (event loop) -----------------------------------------------------------------
    def end_all_after(self, grace_s: float) -> None:
        """Shutdown has begun: refuse new requests; after grace_s end the ones still running."""
        self.draining = True
        self.loop.call_later(grace_s, self.end_all)

    def end_all(self) -> None:
        for request_id, tracked in list(self.tracked.items()):
            self.abort(request_id)
            tracked.queue.put_nowait(EngineStopped("the server is shutting down"))

    def end_tracked(self, message: str) -> None:
        for tracked in self.tracked.values():
            tracked.queue.put_nowait(EngineStopped(message))
        self.tracked.clear()
        self.unstarted.clear()

    @property
    def num_unstarted(self) -> int:
        return len(self.unstarted)

    def health(self) -> dict:
        return {}

    # ---- requests (event loop) ------------------------------------------------------------------
    def track(self, request_id: str, num_prompt_tokens: int, out: asyncio.Queue, arrival: float,
              restartable: bool) -> None:
        self.tracked[request_id] = Tracked(out, arrival, restartable=restartable)
        self.unstarted.add(request_id)
        self.metrics.prompt_tokens += num_prompt_tokens

    def untrack(self, request_id: str) -> bool:
        """Forget a request its client gave up on; whether it was still running."""
        if self.tracked.pop(request_id, None) is None:
            return False
        self.unstarted.discard(request_id)
        self.metrics.aborted += 1
        return True

    async def generate(self, prompts: list[tuple[str, list[int]]], params: SamplingParams, lora_request=None,
                       restartable: bool = False):
        """Yield lists of the latest RequestOutput of each request that changed, until all have finished.
        Closing the generator early (client gone) aborts the unfinished ones. restartable: the caller uses only
        finished outputs, so a request may be run again from the start elsewhere (data-parallel replica lost)."""
        out: asyncio.Queue = asyncio.Queue()
        pending, arrival = set(), time.perf_counter()
        try:
            for request_id, ids in prompts:
                self.add(request_id, ids, params, lora_request, out, arrival, restartable)
                pending.add(request_id)
            while pending:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                latest = {}
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    latest[item.request_id] = item
                for o in latest.values():
                    if o.finished:
                        pending.discard(o.request_id)
                yield list(latest.values())
        finally:
            for request_id in pending:
                self.abort(request_id)

    # ---- delivery (event loop, one call per engine step) ----------------------------------------
    def deliver(self, outputs: list[RequestOutput], now: float) -> None:
        m = self.metrics
        for o in outputs:
            tracked = self.tracked.get(o.request_id)
            if tracked is None:
                continue    # aborted by its client after this step began
            num_tokens = sum(len(c.token_ids) for c in o.outputs)
            new = num_tokens - tracked.num_tokens
            if new > 0:
                if tracked.num_tokens == 0:
                    m.ttft.observe(now - tracked.arrival)
                    self.unstarted.discard(o.request_id)
                else:
                    per_seq = max(1, round(new / len(o.outputs)))     # > 1 when drafts were accepted
                    m.itl.observe((now - tracked.last_time) / per_seq)
                m.generation_tokens += new
                tracked.num_tokens, tracked.last_time = num_tokens, now
            tracked.queue.put_nowait(o)
            if o.finished:
                del self.tracked[o.request_id]
                self.unstarted.discard(o.request_id)
                m.e2e.observe(now - tracked.arrival)
                for c in o.outputs:
                    m.finished[c.finish_reason] += 1

    def fail(self, request_id: str, error: BaseException) -> None:
        tracked = self.tracked.pop(request_id, None)
        self.unstarted.discard(request_id)
        if tracked is not None:
            tracked.queue.put_nowait(RequestFailed(request_id, error))

    def fail_all(self, error: BaseException) -> None:
        for request_id in list(self.tracked):
            self.fail(request_id, error)

    def send(self, fn, *args) -> None:
        """fn(*args) on the event loop, from another thread."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:    # the event loop is closed: nobody is listening any more
            pass


class AsyncEngine(EngineClient):
    """The engine in this process, on its own loop thread."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        super().__init__(EngineFacts.of(engine), metrics)
        self.engine = engine
        self.validate_prompt = engine.validate_prompt          # reads only the engine's constants
        self.compile_constraint = engine.compile_constraint    # thread-safe: handlers call it off the loop
        self.tokenize = engine.tokenize                        # thread-safe too (images are processed there)
        self.vision = engine.runner.vision                     # its processor: the image placeholder
        self.engine_loop = EngineLoop(engine, self.report)
        self.commands = self.engine_loop.commands
        self.thread: threading.Thread | None = None

    # ---- lifecycle (event loop) -----------------------------------------------------------------
    def start(self) -> None:
        self.loop, self.draining = asyncio.get_running_loop(), False
        self.thread = threading.Thread(target=self.engine_loop.run, name="lanner-engine", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Abort whatever is left, end the loop thread; open streams end with EngineStopped."""
        if self.thread is None:
            return
        self.commands.put(("stop",))
        await asyncio.to_thread(self.thread.join, 30)
        self.thread = None
        self.end_tracked("the server is shutting down")

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def error(self) -> BaseException | None:
        return self.engine_loop.error

    # ---- requests (event loop) ------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: "list[int] | TokenizedPrompt", params: SamplingParams, lora_request,
            out: asyncio.Queue, arrival: float, restartable: bool = False) -> None:
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        self.track(request_id, len(getattr(prompt_ids, "token_ids", prompt_ids)), out, arrival, restartable)
        self.commands.put(("add", request_id, prompt_ids, params, lora_request))

    def abort(self, request_id: str) -> None:
        if self.untrack(request_id):
            self.commands.put(("abort", request_id))

    async def call(self, fn):
        """fn(engine) on the loop thread (after the current step); its result here."""
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        future = concurrent.futures.Future()
        self.commands.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    async def stats(self) -> dict:
        return await self.call(LLMEngine.stats)

    def report(self, kind: str, *args) -> None:
        """EngineLoop's reports (loop thread) -> the event loop."""
        self.send({"outputs": self.deliver, "failed": self.fail, "crashed": self.fail_all}[kind], *args)


class EngineLoop:
    """The thread that owns an LLMEngine: it drains a command queue ("add", "abort", "call", "stop"), steps, and
    reports through report(kind, *args): "outputs" (outputs, time), "failed" (request id, error), "crashed" (error)."""

    def __init__(self, engine: LLMEngine, report):
        self.engine, self.report = engine, report
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None

    def run(self) -> None:
        engine = self.engine
        try:
            while True:
                busy = engine.has_unfinished_requests()
                commands = [self.commands.get()] if not busy else []
                while True:
                    try:
                        commands.append(self.commands.get_nowait())
                    except queue.Empty:
                        break
                if any(c[0] == "stop" for c in commands):
                    return self.shutdown(commands)
                for command in commands:
                    self.apply(command)
                if engine.has_unfinished_requests():
                    self.step()
        except BaseException as e:          # a bug in the loop itself: fail everything, report unhealthy
            log.exception("engine loop crashed")
            self.error = e
            self.report("crashed", e)

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:              # the engine failed on this batch: end its requests, keep serving
            log.exception("engine step failed")
            for request_id in list(self.engine.requests):
                self.abort_in_engine(request_id)
                self.report("failed", request_id, e)
            return
        if outputs:
            self.report("outputs", outputs, time.perf_counter())

    def apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, lora_request = command
            try:
                self.engine.add_request(prompt_ids, params, request_id=request_id, lora_request=lora_request)
            except Exception as e:
                self.report("failed", request_id, e)
        elif kind == "abort":
            self.abort_in_engine(command[1])
        elif kind == "call":
            _, fn, future = command
            try:
                future.set_result(fn(self.engine))
            except Exception as e:
                future.set_exception(e)

    def abort_in_engine(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)

    def shutdown(self, commands: list) -> None:
        for command in commands:
            if command[0] == "call":
                command[2].set_exception(EngineStopped("the engine loop is stopping"))
        for request_id in list(self.engine.requests):
            self.abort_in_engine(request_id)
