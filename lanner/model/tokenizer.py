"""Tokenizer + chat template: built from GGUF metadata or loaded from an HF model directory."""
import functools
import json
import os

import jinja2
import jinja2.meta
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "</s>")


def byte_level(split: str | None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    return pre_tokenizers.Sequence(steps)


PRE_TOKENIZERS = {"smollm": lambda: byte_level(None, digits=True), "gpt2": lambda: byte_level(None),
                  "default": lambda: byte_level(None), "llama-bpe": lambda: byte_level(LLAMA3_SPLIT),
                  "qwen2": lambda: byte_level(QWEN2_SPLIT)}


class ChatTokenizer:
    """encode/decode plus the model's chat template and its end-of-generation token ids."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None, bos_token_id: int | None,
                 eos_token_id: int | None, add_bos: bool):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos
        ids = (tokenizer.token_to_id(t) for t in END_OF_TURN)   # not get_vocab(): 30 ms for 49k tokens
        self.stop_token_ids = {i for i in ids if i is not None}
        if eos_token_id is not None:
            self.stop_token_ids.add(eos_token_id)
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """messages (and tools, in OpenAI's shape) through the template, as HF's apply_chat_template: tool calls'
        arguments as dicts. A template that does not render tools gets them, tool calls and tool results written
        into the messages instead."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a raw prompt instead")
        template, renders_tools = self.compiled_template
        if not renders_tools:
            messages, tools = tools_as_messages(messages, tools), None
        token = lambda i: self.id_to_token(i) if i is not None else ""
        return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               bos_token=token(self.bos_token_id), eos_token=token(self.eos_token_id))

    @functools.cached_property
    def compiled_template(self) -> tuple[jinja2.Template, bool]:
        """The chat template compiled, and whether it renders tools itself."""
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
        env.filters["tojson"] = tojson      # HF's: templates print tool schemas with it, unescaped
        parsed = env.parse(self.chat_template)
        return env.from_string(parsed), "tools" in jinja2.meta.find_undeclared_variables(parsed)


def tojson(value, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=False)


TOOLS_PROMPT = """You can call these functions:
<tools>{tools}</tools>

To call functions, answer with only this, and no other text:
<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>
The list holds one object per call. If no function fits, answer in plain text."""


def tools_as_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """For a template that knows nothing of tools: the tools in the system message, an assistant's tool calls
    as the text the model would write, tool results as user turns (consecutive ones merged, so templates
    that insist on alternating roles still render)."""
    written, previous_role = [], None
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
            if previous_role == "tool":
                written[-1] = {**written[-1], "content": f"{written[-1]['content']}\n{result}"}
            else:
                written.append({"role": "user", "content": result})
        elif message.get("tool_calls"):
            written.append({"role": message["role"], "content": with_tool_calls(message)})
        else:
            written.append(message)
        previous_role = message["role"]
    if tools:
        prompt = TOOLS_PROMPT.format(tools=json.dumps(tools, ensure_ascii=False))
        if written and written[0]["role"] == "system":
            written[0] = {**written[0], "content": f"{written[0]['content']}\n\n{prompt}"}
        else:
            written.insert(0, {"role": "system", "content": prompt})
    return written


def with_tool_calls(message: dict) -> str:
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
    text = f"<tool_call>{json.dumps(calls, ensure_ascii=False)}</tool_call>"
    return f"{message['content']}\n{text}" if message.get("content") else text


def from_gguf(reader) -> ChatTokenizer:
    from lanner.model.gguf import field
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE)")
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
    tok.pre_tokenizer = PRE_TOKENIZERS.get(field(reader, "tokenizer.ggml.pre", "default"),
                                           PRE_TOKENIZERS["default"])()
    tok.decoder = decoders.ByteLevel()
    types = field(reader, "tokenizer.ggml.token_type") or []
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)])
    return ChatTokenizer(tok, field(reader, "tokenizer.chat_template"),
                         field(reader, "tokenizer.ggml.bos_token_id"),
                         field(reader, "tokenizer.ggml.eos_token_id"),
                         bool(field(reader, "tokenizer.ggml.add_bos_token", False)))


def from_hf_dir(path: str, config: dict) -> ChatTokenizer:
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    meta_path = os.path.join(path, "tokenizer_config.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    template = meta.get("chat_template")
    template_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(template_file):
        template = open(template_file).read()
    vocab = tok.get_vocab()
    special_id = lambda name: vocab.get(meta[name]) if isinstance(meta.get(name), str) else None
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    return ChatTokenizer(tok, template, special_id("bos_token") or config.get("bos_token_id"),
                         special_id("eos_token") if special_id("eos_token") is not None else eos,
                         bool(meta.get("add_bos_token", False)))
