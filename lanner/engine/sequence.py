"""Per-sequence state: tokens, the two counters, blocks, and incremental detokenization."""
import itertools
import time
from enum import Enum, auto

import torch

from lanner.sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One generated continuation. num_computed_tokens catches up with num_tokens step by step. Both count KV
    positions: an adapter's virtual tokens come first (never in token_ids), so token i of token_ids sits at position
    num_virtual_tokens + i, as in PEFT. A prefix-tuned adapter's are computed from the start (their KV is pinned);
    a prompt-tuned adapter's are computed like prompt tokens, from its embeddings instead of token embeddings."""
    ids = itertools.count()

    def __init__(self, request_id: str, token_ids: list[int], params: SamplingParams, lora_id: int = 0,
                 index: int = 0, seed: int | None = None):
        self.seq_id, self.request_id, self.index = next(Sequence.ids), request_id, index
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params, self.lora_id = params, lora_id
        self.prefix = None                   # kv_cache.PinnedPrefix of a prefix-tuned adapter
        self.prompt = None                   # lora.prompt.PromptAdapter of a prompt-tuned adapter
        self.adapter_digest = None           # its adapter's files hashed: keys its blocks in the prefix cache
        self.images = None                   # engine.multimodal.ImagePrompt: its images and their token rows
        self.state_slot = None               # a state-space model's state slot (engine.state_cache), while running
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0           # prompt tokens served by the prefix cache
        self.block_table: list[int] = []
        self.num_released_blocks = 0         # leading blocks given back as out of every layer's window
        self.grammar = None                  # lanner.structured.Matcher when the output is constrained
        self.pending_mask = None             # (future, first row, rows) of this step's grammar masks
        self.block_hashes: list[int] = []    # hashes of the leading full, verified blocks
        self.spec_token_ids: list[int] = []  # draft tokens to verify this step
        self.spec_draft_probs = None         # [k, V]: what a sampling draft model drew them from
        self.status, self.finish_reason = Status.WAITING, None
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.logprobs: list[dict[int, float]] = []
        self.prompt_logprobs: list[dict[int, float] | None] = [None] if params.prompt_logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.text, self.prefix_offset, self.read_offset = "", 0, 0
        self.arrival_time, self.first_token_time, self.finish_time = time.perf_counter(), None, None
        self.num_preemptions = 0
        self.spec_k, self.spec_idle_steps = 1 << 30, 0   # adaptive draft length (capped by the config)
        self.spec_drafted = self.spec_accepted = 0
        self.stop_reason: int | str | None = None

    @property
    def num_virtual_tokens(self) -> int:
        adapter = self.prefix or self.prompt
        return adapter.num_virtual_tokens if adapter else 0

    @property
    def num_pinned_tokens(self) -> int:
        """The virtual tokens whose KV is given (a prefix adapter's): computed before any step."""
        return 0 if self.prefix is None else self.prefix.num_virtual_tokens

    @property
    def num_verified_tokens(self) -> int:
        """KV positions of every token but the drafts."""
        return self.num_virtual_tokens + len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        """KV positions it wants computed: virtual, prompt, output and draft tokens."""
        return self.num_verified_tokens + len(self.spec_token_ids)

    @property
    def slot_lora_id(self) -> int:
        """The adapter whose weights its rows need in a LoRA slot: none for a prefix adapter (it lives in KV) or a
        prompt adapter (its embeddings go with the sequence)."""
        return 0 if self.prefix is not None or self.prompt is not None else self.lora_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def fit_drafts(self, budget: int) -> None:
        """Drop the drafts that would not fit in a step of budget tokens: a sequence's verify rows are
        never split across steps. Verifying a shorter prefix of the drafts is just as lossless."""
        keep = max(0, budget - (self.num_verified_tokens - self.num_computed_tokens))
        if keep < len(self.spec_token_ids):
            self.spec_token_ids = self.spec_token_ids[:keep]
            probs = self.spec_draft_probs
            self.spec_draft_probs = None if probs is None or keep == 0 else probs[:keep]

    def tokens_to_compute(self, num: int) -> list[int]:
        """The next num tokens to feed; 0 stands in for a virtual token (the runner feeds its embedding)."""
        start = self.num_computed_tokens - self.num_virtual_tokens
        virtual = min(num, max(0, -start))
        return [0] * virtual + (self.token_ids + self.spec_token_ids)[start + virtual:start + num]

    def block_token_ids(self, i: int, block_size: int) -> tuple:
        """What KV block i holds, as the prefix cache keys it: its virtual tokens (a prompt adapter's as the digest of
        its embeddings and their index, so no two adapters share them) and then its tokens (an image's as its digest
        and row)."""
        start, end = i * block_size - self.num_virtual_tokens, (i + 1) * block_size - self.num_virtual_tokens
        tokens = (tuple(self.token_ids[max(0, start):max(0, end)]) if self.images is None
                  else self.images.keys(max(0, start), max(0, end), self.token_ids))
        if start >= 0 or self.prompt is None:
            return tokens
        return tuple((self.prompt.digest, j) for j in range(start, min(end, 0))) + tokens

    def fork(self, index: int, seed: int | None) -> "Sequence":
        """A sibling for n > 1 that continues from the same computed prompt (blocks shared by the caller)."""
        child = Sequence(self.request_id, self.token_ids, self.params, self.lora_id, index, seed)
        child.prefix, child.prompt, child.adapter_digest = self.prefix, self.prompt, self.adapter_digest
        child.images = self.images
        child.num_prompt_tokens, child.num_computed_tokens = self.num_prompt_tokens, self.num_computed_tokens
        child.num_cached_tokens, child.prompt_logprobs = self.num_cached_tokens, self.prompt_logprobs
        child.block_hashes, child.status, child.arrival_time = list(self.block_hashes), self.status, self.arrival_time
        child.grammar = None if self.grammar is None else self.grammar.copy()
        return child

    def detokenize(self, tokenizer) -> str:
        """Append the newest token's text; hold back bytes that do not yet form a whole character."""
        out = self.output_token_ids
        skip = self.params.skip_special_tokens
        prefix = tokenizer.decode(out[self.prefix_offset:self.read_offset], skip)
        full = tokenizer.decode(out[self.prefix_offset:], skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(out)
        self.text += new
        return new
