"""AsyncEngine: one thread owns the LLMEngine; asyncio handlers talk to it through a queue.

The loop thread is the only code that touches the engine (adds, aborts and stats go through the command
queue too). Each step it drains the queue, steps once and hands the step's outputs to the event loop in
one call_soon_threadsafe, which puts each output on its request's asyncio.Queue. Outputs are cumulative
(full text so far), so a consumer that falls behind just takes the latest one.
"""
import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

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


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        # Constants of the engine, read once here so handlers never touch the engine itself.
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.kv_capacity_tokens = engine.blocks.num_blocks * engine.cfg.block_size
        self.validate_prompt = engine.validate_prompt          # reads only those constants
        self.compile_constraint = engine.compile_constraint    # thread-safe: handlers call it off the loop
        self.tokenize = engine.tokenize                        # thread-safe too (images are processed there)
        self.vision = engine.runner.vision                     # its processor: the image placeholder
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.tracked: dict[str, Tracked] = {}                  # event-loop side only
        self.unstarted: set[str] = set()                       # admitted, no token yet (the "waiting queue")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.draining = False

    # ---- lifecycle (event loop) -----------------------------------------------------------------
    def start(self) -> None:
        self.loop, self.draining = asyncio.get_running_loop(), False
        self.thread = threading.Thread(target=self.run_loop, name="lanner-engine", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Abort whatever is left, end the loop thread; open streams end with EngineStopped."""
        if self.thread is None:
            return
        self.commands.put(("stop",))
        await asyncio.to_thread(self.thread.join, 30)
        self.thread = None
        for tracked in self.tracked.values():
            tracked.queue.put_nowait(EngineStopped("the server is shutting down"))
        self.tracked.clear()
        self.unstarted.clear()

    def end_all_after(self, grace_s: float) -> None:
        """Shutdown has begun: refuse new requests; after grace_s end the ones still running."""
        self.draining = True
        self.loop.call_later(grace_s, self.end_all)

    def end_all(self) -> None:
        for request_id, tracked in list(self.tracked.items()):
            self.abort(request_id)
            tracked.queue.put_nowait(EngineStopped("the server is shutting down"))

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def num_unstarted(self) -> int:
        return len(self.unstarted)

    # ---- requests (event loop) ------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: "list[int] | TokenizedPrompt", params: SamplingParams, lora_request,
            out: asyncio.Queue, arrival: float) -> None:
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        self.tracked[request_id] = Tracked(out, arrival)
        self.unstarted.add(request_id)
        self.metrics.prompt_tokens += len(getattr(prompt_ids, "token_ids", prompt_ids))
        self.commands.put(("add", request_id, prompt_ids, params, lora_request))

    def abort(self, request_id: str) -> None:
        if self.tracked.pop(request_id, None) is not None:
            self.unstarted.discard(request_id)
            self.metrics.aborted += 1
            self.commands.put(("abort", request_id))

    async def generate(self, prompts: list[tuple[str, list[int]]], params: SamplingParams, lora_request=None):
        """Yield lists of the latest RequestOutput of each request that changed, until all have finished.
        Closing the generator early (client gone) aborts the unfinished ones."""
        out: asyncio.Queue = asyncio.Queue()
        pending, arrival = set(), time.perf_counter()
        try:
            for request_id, ids in prompts:
                self.add(request_id, ids, params, lora_request, out, arrival)
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

    async def call(self, fn):
        """fn(engine) on the loop thread (after the current step); its result here."""
        if not self.alive:
            raise EngineStopped("the engine loop is not running")
        future = concurrent.futures.Future()
        self.commands.put(("call", fn, future))
        return await asyncio.wrap_future(future)

    async def stats(self) -> dict:
        return await self.call(LLMEngine.stats)

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
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:    # the event loop is closed: nobody is listening any more
            pass

    # ---- the loop thread ------------------------------------------------------------------------
    def run_loop(self) -> None:
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
            self.send(self.fail_all, e)

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:              # the engine failed on this batch: end its requests, keep serving
            log.exception("engine step failed")
            for request_id in list(self.engine.requests):
                self.abort_in_engine(request_id)
                self.send(self.fail, request_id, e)
            return
        if outputs:
            self.send(self.deliver, outputs, time.perf_counter())

    def apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, lora_request = command
            try:
                self.engine.add_request(prompt_ids, params, request_id=request_id, lora_request=lora_request)
            except Exception as e:
                self.send(self.fail, request_id, e)
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
