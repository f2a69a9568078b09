"""Structured output: decoding held to a JSON schema, a regex, a choice of strings or a grammar.

The grammar engine is llguidance: it measured a token mask in tens of microseconds on our 49k vocabulary
with no compile step worth a thread (bench/structured.py), where a slow mask stalls the whole batch.
A request's grammar is compiled when the request is added (a bad schema, regex or grammar is a ValueError
there, so the engine never sees it), one matcher per sequence then follows the tokens it emits: before
sampling it gives the set of allowed next tokens, after sampling it consumes the token, and drafts it did
not allow are cut; rejected drafts roll it back.
"""
import functools
import json
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StructuredOutputs:
    """vLLM's structured-output parameters: exactly one of them."""
    json: dict | str | None = None        # a JSON schema (a dict or its text)
    json_object: bool = False             # any JSON object
    regex: str | None = None
    choice: list[str] | None = None       # one of these strings
    grammar: str | None = None            # Lark (llguidance's dialect, `%json {...}` included) or GBNF (`::=`)

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")

    @classmethod
    def parse(cls, value) -> "StructuredOutputs | None":
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown structured_outputs fields {sorted(unknown)}")
            return cls(**value)
        raise ValueError(f"structured_outputs must be a dict or StructuredOutputs, got {type(value).__name__}")

    @functools.cached_property
    def grammar_text(self) -> str:
        """The constraint as llguidance's grammar (JSON text); built once (a server's compile_constraint, off the
        engine thread, then add_request)."""
        from llguidance import LLMatcher
        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            # compact separators, no free whitespace: a model cannot pad the output with blanks forever
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if self.regex is not None:
            return LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choice))
        if "::=" in self.grammar:
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                return LLMatcher.grammar_from_lark(gbnf_to_lark(self.grammar))
            except Exception as e:
                raise ValueError(f"structured_outputs.grammar is not a valid GBNF grammar: {e}") from None
        return LLMatcher.grammar_from_lark(self.grammar)


class GrammarCompiler:
    """Compiles constraints for one tokenizer (compiled grammars cached by their text) and computes the token
    masks of many matchers at once."""

    def __init__(self, tokenizer, vocab_size: int):
        from llguidance import LLExecutor, LLTokenizer
        stop = sorted(tokenizer.stop_token_ids) or None
        # llguidance wants the tokenizer's whole vocabulary; fused.mask_logits reads only the model's V
        n_vocab = max(vocab_size, tokenizer.tokenizer.get_vocab_size(with_added_tokens=True))
        self.tokenizer = LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=n_vocab, eos_token=stop)
        self.mask_words, self.stop_ids = (n_vocab + 31) // 32, stop or []
        self.executor = LLExecutor()
        self.compiled = functools.lru_cache(maxsize=64)(self.compile_text)

    def compile_text(self, grammar: str):
        """A matcher at the start of grammar, to copy for each sequence; ValueError naming what is wrong."""
        from llguidance import LLMatcher
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured output constraint cannot be compiled: {matcher.get_error()}")
        return matcher

    def matcher(self, constraint: StructuredOutputs) -> "Matcher":
        return Matcher(self.compiled(constraint.grammar_text).deep_copy())

    def masks(self, rows: list[tuple["Matcher", list[int]]]) -> torch.Tensor:
        """[sum of 1 + len(drafts), W] int32 bitmasks (token t allowed: bit t % 32 of word t / 32): for each
        (matcher, drafts), the tokens it allows next and after each prefix of its drafts (which it must
        accept). One call for all of them: llguidance spreads it over its threads without the GIL, so it can
        run beside the forward pass."""
        # numpy, not torch: this runs beside the forward pass, whose thread pool torch ops here would fight
        total = sum(1 + len(drafts) for _, drafts in rows)
        bits = np.zeros((total, self.mask_words), dtype=np.uint32)
        starts = np.cumsum([0] + [1 + len(drafts) for _, drafts in rows])
        plain = [(m.matcher, int(at)) for (m, drafts), at in zip(rows, starts) if not drafts]
        drafted = [(m.matcher, int(at), list(drafts)) for (m, drafts), at in zip(rows, starts) if drafts]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, bits.ctypes.data, self.mask_words * 4, total)
        if drafted:
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, bits.ctypes.data, self.mask_words * 4, total)
        stuck = ~bits.any(axis=1)   # a matcher in its error state allows nothing: let the sequence end
        for token in self.stop_ids if stuck.any() else ():
            bits[stuck, token // 32] |= np.uint32(1 << token % 32)
        return torch.from_numpy(bits.view(np.int32))


class Matcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher

    def copy(self) -> "Matcher":
        return Matcher(self.matcher.deep_copy())

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many leading drafts the grammar accepts."""
        return self.matcher.validate_tokens(drafts)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """Nothing but a stop token can follow."""
        return self.matcher.is_stopped()
