"""Tool calling: the grammar that forces a call (tool_choice "required" or a named function) and the parser
that finds calls in free text (tool_choice "auto").

A call is written as SmolLM2 was trained to write it, a JSON list inside one tag:
`<tool_call>[{"name": "f", "arguments": {...}}, ...]</tool_call>`. The parser also reads the Hermes form
(Qwen 2.5, Hermes, many others): one `<tool_call>{"name": "f", "arguments": {...}}</tool_call>` per call.
"""
import json
import re
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAGGED = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")      # OpenAI's rule; it also keeps the grammar literal plain
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


def tool_call_grammar(tools: list[Tool], parallel: bool) -> str:
    """Lark (llguidance's dialect): one or more calls (exactly one unless parallel), each naming one of the tools
    and giving arguments that follow that tool's parameter schema."""
    more = ' (", " call)*' if parallel else ""
    rules = [f'start: "{OPEN}[" call{more} "]{CLOSE}"',
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        rules.append(f'call_{i}: {head} arguments_{i} "}}"')
        rules.append(f"arguments_{i}: %json {json.dumps(compact(tool.function.parameters or NO_PARAMETERS))}")
    return "\n".join(rules)


def compact(schema: dict) -> dict:
    # no free whitespace inside the arguments, as for response_format: a model cannot pad them with blanks forever
    return {**schema, "x-guidance": {"whitespace_flexible": False, **schema.get("x-guidance", {})}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside the parsed tags or None, the calls in OpenAI's shape). A tag whose content is not
    a call or a list of calls stays in the text."""
    calls, kept, start = [], [], 0
    for match in TAGGED.finditer(text):
        parsed = calls_in(match.group(1))
        if parsed is None:
            continue
        kept.append(text[start:match.start()])
        calls += parsed
        start = match.end()
    kept.append(text[start:])
    content = "".join(kept).strip() if calls else text
    return content or None, calls


def calls_in(tag_content: str) -> list[dict] | None:
    try:
        value = json.loads(tag_content)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [openai_call(item) for item in items]
    return None if not calls or None in calls else calls


def openai_call(item) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(arguments, (dict, str)):
        return None
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": item["name"], "arguments": arguments}}


def tag_start(text: str) -> int:
    """Where a tool call begins in text, or could still begin (a trailing prefix of the tag): a stream sends
    nothing from there on until the choice ends and the calls can be parsed."""
    found = text.find(OPEN)
    if found >= 0:
        return found
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:size]):
            return len(text) - size
    return len(text)
