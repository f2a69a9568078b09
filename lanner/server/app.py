"""The OpenAI-compatible HTTP API (FastAPI) over an EngineClient: the engine in this process (AsyncEngine) or
data-parallel replicas (ReplicaSet)."""
import asyncio
import hmac
import json
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lanner.engine.engine import TokenizedPrompt
from lanner.engine.multimodal import chat_parts, template_takes_parts
from lanner.engine.outputs import RequestOutput
from lanner.sampling_params import SamplingParams
from lanner.server import errors, protocol, tools
from lanner.server.async_engine import EngineClient, EngineStopped, RequestFailed
from lanner.server.errors import APIError, error_response
from lanner.server.models import ModelRegistry
from lanner.server.protocol import (ChatCompletionRequest, CompletionRequest, Constraint, DetokenizeRequest,
                                    LoadLoRARequest, TokenizeRequest, UnloadLoRARequest)
from lanner.structured import StructuredOutputs


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_waiting: int = 512              # admitted requests without a token yet; beyond it: 503
    max_body_bytes: int = 4 << 20
    retry_after_s: int = 1


class Guard:
    """ASGI middleware: the bearer token first, then the body size (read here, replayed to the app)."""
    DRAIN_LIMIT = 64 << 20              # past this, stop reading an oversized body and answer at once

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await error_response(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                            code="invalid_api_key")(scope, receive, send)
        limit, size, body, more = self.settings.max_body_bytes, 0, [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size <= limit:
                body.append(chunk)
            elif size > limit + self.DRAIN_LIMIT:
                break
        if size > limit:
            return await error_response(413, f"the request body is {size}{'+' if more else ''} bytes; the limit is "
                                        f"{limit}", code="request_too_large")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        if scope["method"] == "POST":     # every POST body here is JSON, whatever the client labelled it
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"]
                         + [(b"content-type", b"application/json")])
        await self.app(scope, replay, send)


def build_app(engine: EngineClient, registry: ModelRegistry, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="lanner", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.registry, app.state.settings = engine, registry, settings
    errors.install(app)
    app.add_middleware(Guard, settings=settings)
    api = Handlers(engine, registry, settings)

    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)
    app.get("/v1/models")(api.models)
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)
    app.post("/v1/load_lora_adapter")(api.load_lora_adapter)
    app.post("/v1/unload_lora_adapter")(api.unload_lora_adapter)
    return app


class Handlers:
    def __init__(self, engine: EngineClient, registry: ModelRegistry, settings: ServerSettings):
        self.engine, self.registry, self.settings = engine, registry, settings
        self.tokenizer = engine.tokenizer
        self.token_text = protocol.TokenText(engine.tokenizer)

    # ---- plain endpoints ------------------------------------------------------------------------
    async def health(self):
        if not self.engine.alive:     # the body still says what each data-parallel replica is doing
            return JSONResponse({**errors.error_body(503, "the engine loop is not running"), **self.engine.health()},
                                status_code=503, headers={"Retry-After": str(self.settings.retry_after_s)})
        return self.engine.health()

    async def metrics(self):
        stats = await self.engine_call(self.engine.stats())
        return PlainTextResponse(self.engine.metrics.render(stats), media_type="text/plain; version=0.0.4")

    async def models(self):
        return {"object": "list", "data": self.registry.cards()}

    async def tokenize(self, req: TokenizeRequest):
        self.registry.resolve(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        ids = self.encode(req.prompt, "prompt") if req.messages is None else (await self.encode_chat(
            [m.as_template_input(i) for i, m in enumerate(req.messages)], req.add_generation_prompt)).token_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_model_len}

    async def detokenize(self, req: DetokenizeRequest):
        self.registry.resolve(req.model)
        self.check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    async def load_lora_adapter(self, req: LoadLoRARequest):
        self.registry.load(req.lora_name, req.lora_path)
        return {"status": "ok", "lora_name": req.lora_name}

    async def unload_lora_adapter(self, req: UnloadLoRARequest):
        self.registry.unload(req.lora_name)
        return {"status": "ok", "lora_name": req.lora_name}

    # ---- generation -----------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request):
        req.check_unsupported()
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported", "echo")
        lora = self.registry.resolve(req.model)
        prompts = [self.encode(p, "prompt") if isinstance(p, str) else self.check_ids(p, "prompt")
                   for p in req.prompts()]
        structured = await self.compile(req.constraint())
        params = req.sampling_params(self.default_max_tokens(req.max_tokens, prompts), req.logprobs, structured)
        echoes = [(p if isinstance(p, str) else self.tokenizer.decode(p)) if req.echo else ""
                  for p in req.prompts()]
        job = Job(self, protocol.new_id("cmpl"), req.model or self.registry.base_name, prompts, params, lora,
                  "prompt")
        if req.stream:
            return job.sse(job.completion_chunks(echoes, req.logprobs, req.include_usage))
        results = await job.collect(request)
        choices = []
        for i, r in enumerate(results):
            for c in r.outputs:
                lp = None if req.logprobs is None else \
                    protocol.completion_logprobs(self.token_text, c.token_ids, c.logprobs, len(echoes[i]))
                choices.append(protocol.completion_choice(i * params.n + c.index, c, echoes[i] + c.text, lp))
        return JSONResponse({"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
                             "choices": choices, "usage": protocol.usage(results)})

    async def chat_completions(self, req: ChatCompletionRequest, request: Request):
        req.check_unsupported()
        lora = self.registry.resolve(req.model)
        offered_tools = req.offered_tools
        prompt = await self.encode_chat(req.template_messages(), req.add_generation_prompt, offered_tools)
        structured = await self.compile(req.constraint())
        params = req.sampling_params(self.default_max_tokens(req.requested_max_tokens, [prompt.token_ids]),
                                     req.num_logprobs, structured)
        job = Job(self, protocol.new_id("chatcmpl"), req.model or self.registry.base_name, [prompt], params, lora,
                  "messages")
        parse_tools = offered_tools is not None
        if req.stream:
            return job.sse(job.chat_chunks(req.num_logprobs, req.include_usage, parse_tools))
        results = await job.collect(request)
        k = req.num_logprobs
        choices = [protocol.chat_choice(c.index, c, None if k is None else
                                        protocol.chat_logprobs(self.token_text, c.token_ids, c.logprobs, k),
                                        parse_tools)
                   for c in results[0].outputs]
        return JSONResponse({"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                             "choices": choices, "usage": protocol.usage(results)})

    # ---- helpers --------------------------------------------------------------------------------
    def encode(self, text: str, param: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, f"{param} is empty", param)
        return ids

    async def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          tools: list[dict] | None = None) -> TokenizedPrompt:
        """The chat's token ids, its images decoded and processed off the engine thread (a bad one is a 400)."""
        vision = self.engine.vision
        try:
            messages, images = chat_parts(messages, vision is not None and template_takes_parts(
                self.tokenizer.chat_template), vision.processor.image_token if vision else "<image>")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tools=tools)
        except Exception as e:          # ValueError from the template's raise_exception, jinja errors
            raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
        if not images:
            return TokenizedPrompt(text, self.encode(text, "messages"))
        try:
            return await asyncio.to_thread(self.engine.tokenize, {"prompt": text, "multi_modal_data": {"image": images}})
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    async def compile(self, constraint: Constraint | None) -> StructuredOutputs | None:
        """Compiled off the engine thread, so a big schema never stalls the streams; a bad one is a 400."""
        if constraint is None:
            return None
        param, structured = constraint
        try:
            await asyncio.to_thread(self.engine.compile_constraint, structured)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param) from None
        return structured

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} is empty", param)
        bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(400, f"{param} has token ids outside [0, {self.engine.vocab_size}): {bad[:5]}", param)
        return list(ids)

    def default_max_tokens(self, requested: int | None, prompts: list[list[int]]) -> int | None:
        """Unset max_tokens: as many as fit in max_model_len and in the KV pool (one sequence alone)."""
        if requested is not None:
            return requested
        room = min(self.engine.max_model_len, self.engine.kv_capacity_tokens) - max(len(p) for p in prompts)
        return max(1, room)

    def admit(self, num: int) -> None:
        if self.engine.draining or not self.engine.alive:
            raise APIError(503, "the server is shutting down", code="unavailable",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if self.engine.num_unstarted + num > self.settings.max_waiting:
            self.engine.metrics.rejected["queue_full"] += 1
            raise APIError(503, f"the waiting queue is full ({self.settings.max_waiting} requests); retry later",
                           code="queue_full", headers={"Retry-After": str(self.settings.retry_after_s)})

    async def engine_call(self, awaitable):
        try:
            return await awaitable
        except EngineStopped as e:
            raise APIError(503, str(e), code="unavailable", headers={"Retry-After": str(self.settings.retry_after_s)}) \
                from None


def as_api_error(e: BaseException, param: str) -> APIError:
    if isinstance(e, RequestFailed):
        e = e.error
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "1"})
    if isinstance(e, ValueError):
        return errors.bad_param(e, param)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}")


class Job:
    """One HTTP generation request: its engine requests (one per prompt), collected or streamed."""

    def __init__(self, api: Handlers, job_id: str, model: str, prompts: list[list[int] | TokenizedPrompt],
                 params: SamplingParams, lora, param: str):
        self.api, self.id, self.model, self.params, self.lora, self.param = api, job_id, model, params, lora, param
        self.created = protocol.now()
        for prompt in prompts:
            self.validate(prompt.token_ids if isinstance(prompt, TokenizedPrompt) else prompt)
        api.admit(len(prompts))
        self.prompts = [(f"{job_id}-{i}", ids) for i, ids in enumerate(prompts)]
        self.order = {rid: i for i, (rid, _) in enumerate(self.prompts)}

    def validate(self, ids: list[int]) -> None:
        """The engine's own check; blamed on max_tokens when the prompt alone would fit."""
        try:
            self.api.engine.validate_prompt(ids, self.params)
        except ValueError as e:
            code = "context_length_exceeded" if "max_model_len" in str(e) or "KV blocks" in str(e) else None
            try:
                self.api.engine.validate_prompt(ids, replace(self.params, max_tokens=1, min_tokens=0))
                param = "max_tokens"
            except ValueError:
                param = self.param
            raise APIError(400, str(e), param, code) from None

    def outputs(self, restartable: bool = False):
        return aclosing(self.api.engine.generate(self.prompts, self.params, self.lora, restartable))

    async def collect(self, request: Request) -> list[RequestOutput]:
        """Run to completion; a client that goes away meanwhile aborts its requests."""
        final: dict[str, RequestOutput] = {}

        async def run():    # only finished outputs are used: a request may start over on another replica
            async with self.outputs(restartable=True) as stream:
                async for outs in stream:
                    final.update((o.request_id, o) for o in outs if o.finished)

        task = asyncio.ensure_future(run())
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watcher):
                t.cancel()
        if not task.done() or task.cancelled():
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "client disconnected")
        if task.exception() is not None:
            raise as_api_error(task.exception(), self.param)
        return [final[rid] for rid, _ in self.prompts]

    def sse(self, events) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream(self, emit, include_usage: bool, object_name: str):
        """SSE text: emit(index, choice_stream, output) gives each step's chunks; usage and [DONE] at the end."""
        latest: dict[str, RequestOutput] = {}
        states: dict[tuple[str, int], ChoiceStream] = {}
        holdback = max((len(s) - 1 for s in self.params.stop), default=0)
        try:
            async with self.outputs() as stream:
                async for outs in stream:
                    events = []
                    for o in outs:
                        latest[o.request_id] = o
                        base = self.order[o.request_id] * self.params.n
                        for c in o.outputs:
                            state = states.get((o.request_id, c.index))
                            if state is None:
                                state = states[(o.request_id, c.index)] = ChoiceStream()
                            chunk = emit(base + c.index, state, c, holdback)
                            if chunk is not None:
                                events.append(self.event(object_name, [chunk]))
                    if events:
                        yield "".join(events)
            if include_usage:
                results = [latest[rid] for rid, _ in self.prompts if rid in latest]
                yield self.event(object_name, [], usage=protocol.usage(results))
        except Exception as e:
            err = as_api_error(e, self.param)
            yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"

    def event(self, object_name: str, choices: list, **extra) -> str:
        body = {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def completion_chunks(self, echoes: list[str], num_logprobs: int | None, include_usage: bool):
        tt = self.api.token_text
        n = self.params.n

        def emit(index, state, c, holdback):
            delta = state.advance(c, holdback)
            if delta is None:
                return None
            text, token_ids, lps = delta
            if state.first:
                text, state.first = echoes[index // n] + text, False
            lp = None if num_logprobs is None else protocol.completion_logprobs(tt, token_ids, lps, state.offset)
            state.offset += len(text)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}

        return self.stream(emit, include_usage, "text_completion")

    def chat_chunks(self, num_logprobs: int | None, include_usage: bool, parse_tools: bool):
        """With tools, text from a (possible) tool call tag on is held back; when the choice ends it is parsed
        and its calls go out whole in one delta."""
        tt = self.api.token_text
        hold_from = tools.tag_start if parse_tools else None

        def emit(index, state, c, holdback):
            delta = state.advance(c, holdback, hold_from)
            if delta is None:
                return None
            text, token_ids, lps = delta
            message, finish_reason = {"content": text}, c.finish_reason
            if parse_tools and c.finished:
                content, calls = tools.parse_tool_calls(text)
                if calls:
                    message = {"content": content, "tool_calls": protocol.tool_call_deltas(calls)}
                    finish_reason = "tool_calls"
            if state.first:
                message, state.first = {"role": "assistant", **message}, False
            lp = None if num_logprobs is None else protocol.chat_logprobs(tt, token_ids, lps, num_logprobs)
            return {"index": index, "delta": message, "logprobs": lp, "finish_reason": finish_reason}

        return self.stream(emit, include_usage, "chat.completion.chunk")


class ChoiceStream:
    """How much of one choice's text and tokens a stream has sent. Text that could still turn into a stop
    string is held back (as LLM.stream does) until the choice finishes."""
    __slots__ = ("chars", "tokens", "done", "first", "offset")

    def __init__(self):
        self.chars = self.tokens = self.offset = 0
        self.done, self.first = False, True

    def advance(self, c, holdback: int, hold_from=None):
        """(new text, new token ids, their logprobs), or None when there is nothing to send. hold_from(text), when
        given, is where text starts being held back too."""
        if self.done:
            return None
        visible = len(c.text) if c.finished else max(self.chars, len(c.text) - holdback)
        if hold_from is not None and not c.finished:
            visible = max(self.chars, min(visible, hold_from(c.text)))
        text = c.text[self.chars:visible]
        token_ids = c.token_ids[self.tokens:]
        lps = c.logprobs[self.tokens:] if c.logprobs is not None else None
        if not text and not c.finished and not (lps and token_ids):
            return None
        self.chars, self.tokens, self.done = visible, len(c.token_ids), c.finished
        return text, token_ids, lps


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
