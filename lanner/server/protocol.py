"""OpenAI request bodies (pydantic), their SamplingParams, and the response / stream-chunk dicts."""
import functools
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lanner.engine.outputs import CompletionOutput, RequestOutput
from lanner.sampling_params import SamplingParams
from lanner.server.errors import APIError, bad_param
from lanner.server.tools import Tool, parse_tool_calls, tool_call_grammar
from lanner.structured import StructuredOutputs

Constraint = tuple[str, StructuredOutputs]      # the request field that asked for it, the constraint


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputs | None:
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema", "response_format")
            return StructuredOutputs(json=self.json_schema.schema_)
        return None


CONSTRAINT_FIELDS = {       # request field -> its StructuredOutputs (vLLM's structured_outputs and guided_*)
    "response_format": ResponseFormat.structured_outputs,
    "structured_outputs": StructuredOutputs.parse,
    "guided_json": lambda value: StructuredOutputs(json=value),
    "guided_regex": lambda value: StructuredOutputs(regex=value),
    "guided_choice": lambda value: StructuredOutputs(choice=value),
    "guided_grammar": lambda value: StructuredOutputs(grammar=value),
}


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then vLLM's extensions)."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def check_unsupported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias")

    def constraint(self) -> Constraint | None:
        """The one structured-output constraint asked for, if any."""
        found = []
        for param, build in CONSTRAINT_FIELDS.items():
            value = getattr(self, param)
            if value is None:
                continue
            try:
                constraint = build(value)
            except ValueError as e:
                raise APIError(400, f"{param}: {e}", param) from None
            if constraint is not None:
                found.append((param, constraint))
        if len(found) > 1:
            raise APIError(400, f"give at most one of {', '.join(p for p, _ in found)}", found[1][0])
        return found[0] if found else None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputs | None = None) -> SamplingParams:
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise APIError(400, f"seed must be in [0, 2**63), got {self.seed}", "seed")
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or -1,
                min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty or 1.0,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
                skip_special_tokens=self.skip_special_tokens, structured_outputs=structured)
        except ValueError as e:
            raise bad_param(e) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of is not supported (it must equal n)", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """One prompt or a batch of them: a string, token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError(400, "prompt is empty", "prompt")
        return list(p)


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None

    def as_template_input(self, param: str) -> dict:
        """A text part, or an image_url part whose URL is data: (inline) or file:// (read only from the server's
        --allowed-local-media-path, checked when the image is loaded); the server fetches nothing remote."""
        if self.type == "text" and self.text is not None:
            return {"type": "text", "text": self.text}
        if self.type == "image_url" and self.image_url is not None:
            url = self.image_url if isinstance(self.image_url, str) else self.image_url.url
            if not url.startswith(("data:", "file://")):
                raise APIError(400, f"image URLs must be data: URLs (base64) or file:// paths; this server does not "
                                    f"fetch remote images ({url[:40]!r})", f"{param}.image_url")
            return {"type": "image_url", "image_url": {"url": url}}
        raise APIError(400, f"unsupported content part: type {self.type!r} (text and image_url are supported)", param)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict           # OpenAI sends a JSON string


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def as_template_input(self, param: str) -> dict:
        """OpenAI's shape with the arguments as a dict: what chat templates index into (as vLLM passes them)."""
        arguments = self.function.arguments
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise APIError(400, f"{param}.function.arguments is not valid JSON: {e}",
                               f"{param}.function.arguments") from None
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": arguments}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_template_input(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):
            content = [part.as_template_input(f"messages.{index}.content.{i}") for i, part in enumerate(content)]
        message = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.as_template_input(f"messages.{index}.tool_calls.{i}")
                                     for i, call in enumerate(self.tool_calls)]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


TOOL_LIST = TypeAdapter(list[Tool])


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")

    @functools.cached_property
    def function_tools(self) -> list[Tool]:
        try:
            return TOOL_LIST.validate_python(self.tools or [])
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, ("tools", *err["loc"])))
            raise APIError(400, f"{where}: {err['msg']}", "tools") from None

    @property
    def offered_tools(self) -> list[dict] | None:
        """The tools the chat template shows the model: none when tool_choice is "none"."""
        if not self.function_tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.function_tools]

    @property
    def forced_tools(self) -> list[Tool] | None:
        """The tools one of which must be called ("required": any, a named function: that one), else None."""
        choice = self.tool_choice
        if choice in (None, "none", "auto"):
            return None
        tools = self.function_tools
        if choice == "required":
            if not tools:
                raise APIError(400, "tool_choice \"required\" needs at least one tool in tools", "tool_choice")
            return tools
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            offered = ", ".join(tool.function.name for tool in tools) or "none"
            raise APIError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools "
                                f"(offered: {offered})", "tool_choice")
        return named

    def constraint(self) -> Constraint | None:
        """response_format (or vLLM's fields), or the grammar of a forced tool call; not both."""
        asked, forced = super().constraint(), self.forced_tools
        if forced is None:
            return asked
        if asked is not None:
            raise APIError(400, f"tool_choice forces a tool call, which cannot also follow {asked[0]}", "tool_choice")
        parallel = self.parallel_tool_calls and self.tool_choice == "required"
        return "tools", StructuredOutputs(grammar=tool_call_grammar(forced, parallel))

    def template_messages(self) -> list[dict]:
        return [m.as_template_input(i) for i, m in enumerate(self.messages)]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


# ---- responses ----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(results: list[RequestOutput]) -> dict:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(len(c.token_ids) for r in results for c in r.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


class TokenText:
    """A token id's text and bytes (cached), for logprobs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        inner = getattr(tokenizer, "tokenizer", None)
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()} \
            if type(getattr(inner, "decoder", None)).__name__ == "ByteLevel" else None
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self.tokenizer.id_to_token(token_id) or ""
            if self.byte_of is not None and piece and all(c in self.byte_of for c in piece):
                raw = [self.byte_of[c] for c in piece]
            else:
                raw = list(text.encode("utf-8"))
            hit = self.cache[token_id] = (text, raw)
        return hit


def top_sorted(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], offset: int) -> dict:
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = tt(token)[0]
        tokens.append(text)
        token_logprobs.append(entry[token])
        tops.append({tt(t)[0]: lp for t, lp in top_sorted(entry, len(entry))})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tt: TokenText, token_ids: list[int], entries: list[dict], k: int) -> dict:
    content = []
    for token, entry in zip(token_ids, entries):
        text, raw = tt(token)
        top = [{"token": tt(t)[0], "logprob": lp, "bytes": tt(t)[1]} for t, lp in top_sorted(entry, k)]
        content.append({"token": text, "logprob": entry[token], "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_choice(index: int, c: CompletionOutput, text: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def chat_choice(index: int, c: CompletionOutput, logprobs: dict | None, parse_tools: bool) -> dict:
    message, finish_reason = {"role": "assistant", "content": c.text}, c.finish_reason
    if parse_tools:
        content, calls = parse_tool_calls(c.text)
        if calls:
            message, finish_reason = {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": c.stop_reason}


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    return [{"index": i, **call} for i, call in enumerate(calls)]
