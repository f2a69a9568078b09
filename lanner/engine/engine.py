"""LLMEngine.step(): schedule -> run the model -> sample -> postprocess."""
import functools
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lanner.config import EngineConfig, ModelConfig
from lanner.engine.kv_cache import BlockManager
from lanner.distributed import make_runner
from lanner.engine.multimodal import VisionPath, is_vision_model, split_prompt
from lanner.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lanner.engine.sampler import (HistoryView, Sampler, argmax_rows, burst_sampling, filtered_probs, rows_of,
                                   top_logprobs)
from lanner.engine.scheduler import Scheduler
from lanner.engine.sequence import Sequence, Status
from lanner.lora.prefix import PrefixPool
from lanner.model import fused
from lanner.model.loader import load_model_files
from lanner.sampling_params import SamplingParams
from lanner.spec.proposers import NgramProposer
from lanner.spec.rejection import verify_greedy, verify_sampled
from lanner.startup import collector_paused
from lanner.structured import GrammarCompiler, StructuredOutputs

# A decode step of up to this many rows costs about what one row does on CPU (the forward streams the weights
# either way: bench/speculative.py, batch 1: full k 2.2x vs acceptance-adaptive k 1.6x), so a proposer whose
# drafts are free (n-gram lookup) always proposes the full k there.
CHEAP_STEP_ROWS = 16


class StepCosts:
    """Measured seconds of a target forward by its number of rows (decode-sized steps), a moving average: what a
    speculating proposer weighs its drafts against."""
    MAX_ROWS = 256

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        if rows <= self.MAX_ROWS:
            old = self.seconds.get(rows)
            self.seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def of(self, rows: int) -> float | None:
        """Measured, or the nearest smaller measured count's (optimistic, so an unmeasured shape gets tried);
        past MAX_ROWS, scaled by rows from the largest measured."""
        if rows in self.seconds:
            return self.seconds[rows]
        smaller = [r for r in self.seconds if r < rows]
        if not smaller:
            return None
        r = max(smaller)
        return self.seconds[r] * (rows / r if rows > self.MAX_ROWS else 1.0)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    lora_request: object = None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


@dataclass
class TokenizedPrompt:
    text: str | None
    token_ids: list[int]
    images: object = None   # engine.multimodal.ImagePrompt


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        with collector_paused():
            hf_config, weights, self.tokenizer, self.model_path = load_model_files(cfg.model, dense=cfg.device != "cpu")
            vision_files = (hf_config, weights) if is_vision_model(hf_config) else None
            if vision_files:
                hf_config, weights = VisionPath.split(hf_config, weights)
            self.model_config = ModelConfig.from_hf(hf_config)
            self.max_model_len = cfg.max_model_len or self.model_config.max_position_embeddings
            self.runner = make_runner(cfg, self.model_config, weights, self.max_model_len)
            if vision_files:
                self.runner.vision = VisionPath(self.model_path, *vision_files, self.tokenizer, self.runner.dtype,
                                                cfg.limit_mm_per_prompt["image"])
            del weights, vision_files
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        if self.runner.lora is not None:
            self.runner.lora.prefix_pool = PrefixPool(self.blocks, self.runner.kv_cache)
        windows = self.model_config.layer_windows
        # when every layer slides (Mistral), KV older than the widest window is never read again
        self.kv_window = max(windows) if windows and None not in windows else None
        self.scheduler = Scheduler(cfg, self.blocks, self.runner.states)
        self.sampler = Sampler(self.tokenizer.stop_token_ids)
        self.requests: dict[str, Request] = {}
        self.request_counter = itertools.count()
        self.num_generated_tokens = self.num_computed_tokens_total = 0
        self.spec = cfg.speculative
        self.step_costs = StepCosts()
        self.proposer = self.make_proposer()
        # sequences that may speculate at once: SSM layers keep a scratch state slot per draft row
        states = self.runner.states
        self.max_drafting = self.spec.max_batch_size if self.spec else 0
        if self.spec and states is not None:
            self.max_drafting = min(self.max_drafting, len(states.free_scratch) // self.spec.num_speculative_tokens)
        self.num_drafted_tokens = self.num_accepted_tokens = self.num_verify_steps = 0

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: "str | list[int] | dict | TokenizedPrompt", params: SamplingParams | None = None,
                    request_id: str | None = None, lora_request=None) -> str:
        """prompt: text, token ids, or vLLM's {"prompt": text, "multi_modal_data": {"image": ...}}."""
        params = params or SamplingParams()
        prompt = self.tokenize(prompt)
        token_ids, image_prompt = prompt.token_ids, prompt.images
        lora_id = self.register_lora(lora_request) if lora_request is not None else 0
        prefix = self.runner.lora.pinned_prefix(lora_id) if lora_id else None
        prompt_adapter = self.runner.lora.prompt_adapter(lora_id) if lora_id else None
        adapter = prefix or prompt_adapter
        num_virtual_tokens = adapter.num_virtual_tokens if adapter else 0
        self.validate_prompt(token_ids, params, num_virtual_tokens)
        request_id = str(next(self.request_counter)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = Sequence(request_id, token_ids, params, lora_id=lora_id, seed=params.seed)
        seq.prefix, seq.prompt, seq.images = prefix, prompt_adapter, image_prompt
        seq.adapter_digest = self.runner.lora.digests[lora_id] if lora_id else None
        if params.structured_outputs is not None:
            seq.grammar = self.grammars.matcher(params.structured_outputs)
        self.requests[request_id] = Request(request_id, prompt.text, token_ids, params, [seq], lora_request)
        self.scheduler.add(seq)
        return request_id

    def tokenize(self, prompt: "str | list[int] | dict | TokenizedPrompt") -> TokenizedPrompt:
        """Token ids, and the images processed (ValueError on a bad one). Thread-safe: a server runs it off the
        engine thread, since decoding and resizing images takes a while."""
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        prompt, images = split_prompt(prompt)
        text = prompt if isinstance(prompt, str) else None
        if not images:
            return TokenizedPrompt(text, self.tokenizer.encode(prompt) if text is not None else list(prompt))
        if self.runner.vision is None:
            raise ValueError(f"the model {self.model_path} takes no images (a text-only "
                             f"{self.model_config.architecture})")
        return TokenizedPrompt(text, *self.runner.vision.prompt(prompt, images, self.cfg.allowed_local_media_path))

    @functools.cached_property
    def grammars(self) -> GrammarCompiler:
        return GrammarCompiler(self.tokenizer, self.model_config.vocab_size)

    @functools.cached_property
    def mask_thread(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix="lanner-grammar-masks")

    def start_grammar_masks(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """The masks of the constrained sequences that sample this step (1 + drafts rows each), computed while
        the forward pass runs: their matchers are where the last step left them."""
        sampling = [seq for seq, num in scheduled
                    if seq.grammar is not None and seq.num_computed_tokens + num == seq.num_tokens]
        if not sampling:
            return
        future = self.mask_thread.submit(self.grammars.masks, [(s.grammar, s.spec_token_ids) for s in sampling])
        at = 0
        for seq in sampling:
            seq.pending_mask = (future, at, 1 + len(seq.spec_token_ids))
            at += 1 + len(seq.spec_token_ids)

    @staticmethod
    def grammar_mask(seq: Sequence) -> torch.Tensor:
        """[1 + drafts, W] int32 bitmasks: what seq's grammar allows at each of its rows this step."""
        future, at, count = seq.pending_mask
        seq.pending_mask = None
        return future.result()[at:at + count]

    def compile_constraint(self, constraint: StructuredOutputs) -> None:
        """Compile (and cache) a constraint's grammar; ValueError when it is bad. Thread-safe: a server calls
        it off the engine thread, so add_request then finds it compiled and no step waits on a compile."""
        self.grammars.compiled(constraint.grammar_text)

    def register_lora(self, lora_request) -> int:
        """Load and validate the adapter once (clear ValueError on a bad one); the digest of its files keys its
        KV blocks."""
        if self.runner.lora is None:
            raise ValueError("lora_request given but LoRA is not enabled (LLM(..., enable_lora=True))")
        self.runner.lora.add(lora_request)
        return lora_request.lora_int_id

    def remove_lora(self, lora_id: int) -> None:
        """Forget an adapter (a prefix adapter's pinned blocks go back to the pool once its requests end)."""
        if any(s.lora_id == lora_id for s in [*self.scheduler.running, *self.scheduler.waiting]):
            raise ValueError(f"adapter {lora_id} still has unfinished requests")
        self.runner.lora.remove(lora_id)

    def validate_prompt(self, token_ids: list[int], params: SamplingParams, num_virtual_tokens: int = 0) -> None:
        """num_virtual_tokens (a prefix or prompt adapter's) take positions and KV slots before the prompt's."""
        if not token_ids:
            raise ValueError("prompt is empty")
        if min(token_ids) < 0 or max(token_ids) >= self.model_config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
        length = num_virtual_tokens + len(token_ids)
        if length >= self.max_model_len:
            raise ValueError(f"prompt is {length} tokens (with {num_virtual_tokens} virtual tokens of the adapter), "
                             f"but max_model_len is {self.max_model_len} "
                             f"(the prompt plus at least one generated token must fit)")
        total = min(length + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.kv_window:   # held at once: the window, one step's tokens, a partly filled block at each end
            total = min(total, self.kv_window + self.cfg.max_num_batched_tokens + self.cfg.block_size)
        if -(-total // self.cfg.block_size) > self.blocks.num_blocks:
            raise ValueError(f"prompt + max_tokens = {total} tokens need more KV blocks than the whole pool "
                             f"({self.blocks.num_blocks} blocks of {self.cfg.block_size}); lower max_tokens "
                             f"or raise --kv-cache-memory / --num-kv-blocks")

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One packed forward for everything scheduled; returns the requests that changed."""
        self.propose_drafts()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        steps = self.burst_steps(scheduled)
        if steps:
            return self.run_burst(scheduled, steps)
        self.start_grammar_masks(scheduled)
        self.runner.copy_blocks(self.blocks.pop_copies())
        starts = [seq.num_computed_tokens for seq, _ in scheduled]
        began = time.perf_counter()
        logits, row_seqs, row_tokens = self.runner.run(scheduled, self.proposer is not None
                                                       and self.proposer.reads_hidden_states)
        self.step_costs.record(sum(num for _, num in scheduled), time.perf_counter() - began)
        for seq, num in scheduled:
            seq.num_computed_tokens += num
            self.num_computed_tokens_total += num
        sample_rows = self.record_prompt_logprobs(logits, row_seqs, row_tokens)
        touched = self.sample_and_append(rows_of(logits, sample_rows), [row_seqs[r] for r in sample_rows])
        if self.proposer is not None and self.proposer.reads_hidden_states and \
                len(self.scheduler.running) <= self.spec.max_batch_size:   # (no drafts above: nothing to feed)
            self.proposer.observe(scheduled, starts, self.runner.last_hidden)
        for seq, _ in scheduled:
            if not seq.is_finished:
                self.cache_blocks(seq)
                if self.kv_window:
                    self.blocks.release_out_of_window(seq, self.kv_window)
        return [self.make_output(self.requests[rid]) for rid in touched if rid in self.requests]

    # ---- bursts: decode steps in one call ---------------------------------------------------------
    def burst_steps(self, scheduled: list[tuple[Sequence, int]]) -> int:
        """How many decode steps this batch runs in one call: up to num_scheduler_steps (> 1: bursts are on) when
        every row is a decode row whose token its logits, history and sampling parameters alone decide (greedy, or
        temperature, top-k, top-p, min-p and penalties, with or without logprobs; no grammar, drafts or adapter but
        LoRA and IA3), no request waits to join, the model's one-call step takes the batch, and the KV blocks of
        every step are free (they are allocated here);
        else 0, a plain step. Never past a row's max_tokens or max_model_len: a row one token from its end makes a
        burst of 1, still cheaper than a step (a greedy batch: no logits, the head's argmax in C). A row with stop
        strings bursts only alone: a stop string is found after the call, and the other rows' later steps would have
        run beside a row that had stopped (attention splits its work by the batch: their rounding changes)."""
        steps = self.cfg.num_scheduler_steps
        if steps < 2 or self.scheduler.waiting or self.proposer is not None or not self.runner.bursts(len(scheduled)):
            return 0
        for seq, num in scheduled:
            p = seq.params
            if (num != 1 or seq.spec_token_ids
                    or seq.num_output_tokens < max(p.min_tokens, 1) or seq.grammar is not None
                    or (seq.slot_lora_id and not self.runner.lora.linear_adapter(seq.slot_lora_id))
                    or (p.stop and len(scheduled) > 1)):
                return 0
            steps = min(steps, self.max_model_len - seq.num_verified_tokens)
            if p.max_tokens is not None:
                steps = min(steps, p.max_tokens - seq.num_output_tokens)
        if steps < 1 or sum(self.blocks.blocks_needed(s, steps) for s, _ in scheduled) > self.blocks.num_free_blocks:
            return 0
        for seq, _ in scheduled:
            self.blocks.allocate(seq, steps)
        return steps

    def run_burst(self, scheduled: list[tuple[Sequence, int]], steps: int) -> list[RequestOutput]:
        """The batch's next `steps` tokens from one call, each appended as a step's would be (with its logprobs, from
        the step's logits the call keeps for rows that ask them). The call ends after a step that gave a row its stop
        token, so each step runs the batch steps one by one would; a stop string (a row alone), found only here, drops
        the tokens after it."""
        self.runner.copy_blocks(self.blocks.pop_copies())
        stops, eos = set(), set(self.tokenizer.stop_token_ids)
        for seq, _ in scheduled:
            stops |= set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else eos)
        sampling, generators = burst_sampling([seq for seq, _ in scheduled], steps)
        keep = [r for r, (seq, _) in enumerate(scheduled) if seq.params.logprobs is not None]
        tokens, kept = self.runner.run_burst(scheduled, steps, sorted(stops), sampling, keep)
        kept_at = {r: k for k, r in enumerate(keep)}   # row -> its place in kept
        if len(tokens) < steps:   # a burst cut short: each generator as if it had drawn for the steps run only
            for generator, state in generators:
                generator.set_state(state)
                for _ in tokens:
                    torch.rand(1, generator=generator)
        now = time.perf_counter()
        for r, (seq, _) in enumerate(scheduled):
            for i, step_tokens in enumerate(tokens):
                seq.num_computed_tokens += 1
                self.num_computed_tokens_total += 1
                if r in kept_at:
                    self.record_logprobs(seq, kept[i, kept_at[r]][None], [step_tokens[r]])
                self.append_token(seq, step_tokens[r], now)
                if seq.is_finished:
                    break
            if not seq.is_finished:
                self.cache_blocks(seq)
                if self.kv_window:
                    self.blocks.release_out_of_window(seq, self.kv_window)
        return [self.make_output(self.requests[rid]) for rid in {s.request_id for s, _ in scheduled}
                if rid in self.requests]

    def record_prompt_logprobs(self, logits, row_seqs, row_tokens) -> list[int]:
        """Store prompt logprobs from prompt rows (row_tokens: the index in token_ids of the token each row reads);
        return the rows that sample a new token."""
        sample_rows = []
        for r, (seq, i) in enumerate(zip(row_seqs, row_tokens)):
            if i + 1 < len(seq.token_ids):   # this row predicts a token we already have
                logprobs = torch.log_softmax(logits[r], dim=-1)
                nxt = seq.token_ids[i + 1]
                seq.prompt_logprobs.append(top_logprobs(logprobs, torch.tensor(nxt), seq.params.prompt_logprobs))
            else:
                sample_rows.append(r)
        return sample_rows

    def sample_and_append(self, logits: torch.Tensor, seqs: list[Sequence]) -> set[str]:
        """Plain rows sample one token each; a speculating sequence's 1 + k rows verify its drafts."""
        plain = [r for r, s in enumerate(seqs) if not s.spec_token_ids]
        if plain:
            self.sample_plain(rows_of(logits, plain), [seqs[r] for r in plain])
        r = 0
        while r < len(seqs):
            seq = seqs[r]
            if seq.spec_token_ids:
                width = 1 + len(seq.spec_token_ids)
                self.verify(seq, logits[r:r + width])
                r += width
            else:
                r += 1
        return {s.request_id for s in seqs}

    def sample_plain(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for r, seq in enumerate(seqs):
            if seq.grammar is not None:
                fused.mask_logits(logits[r:r + 1], self.grammar_mask(seq))
        logits, seqs = self.fork_children(logits, seqs)
        tokens = self.sampler(logits, seqs).tolist()
        now = time.perf_counter()
        for r, (seq, token) in enumerate(zip(seqs, tokens)):
            self.record_logprobs(seq, logits[r:r + 1], [token])
            self.append_token(seq, token, now)

    def verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Accept a prefix of the drafts (lossless), roll num_computed_tokens back past the rest."""
        drafts, num_before = seq.spec_token_ids, seq.num_verified_tokens
        views = [HistoryView(seq, drafts[:j]) for j in range(len(drafts) + 1)]
        if seq.grammar is not None:   # row j: what the grammar allows after the first j drafts
            fused.mask_logits(logits, self.grammar_mask(seq))
        processed = self.sampler.processed_logits(logits, views)
        if seq.params.greedy:
            tokens = verify_greedy(argmax_rows(processed).tolist(), drafts)
        else:
            tokens = verify_sampled(filtered_probs(processed, views), drafts, seq.spec_draft_probs,
                                    seq.generator)
        seq.spec_token_ids, seq.spec_draft_probs = [], None
        seq.num_computed_tokens = num_before + len(tokens) - 1   # KV is valid through the accepted drafts
        if self.runner.states is not None:   # and an SSM layer's state is the one after the last accepted row
            self.runner.states.roll_back(seq, len(tokens) - 1)
        self.blocks.trim(seq)
        self.num_verify_steps += 1
        self.num_drafted_tokens += len(drafts)
        self.num_accepted_tokens += len(tokens) - 1
        seq.spec_drafted += len(drafts)
        seq.spec_accepted += len(tokens) - 1
        seq.spec_k = min(self.spec.num_speculative_tokens, seq.spec_k + 1) if len(tokens) > len(drafts) \
            else len(tokens) - 1
        self.record_logprobs(seq, logits[:len(tokens)], tokens)
        now = time.perf_counter()
        for token in tokens:
            self.append_token(seq, token, now)
            if seq.is_finished:
                break

    def record_logprobs(self, seq: Sequence, logits: torch.Tensor, tokens: list[int]) -> None:
        if seq.params.logprobs is None:
            return
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, token in zip(logprobs, tokens):
            entry = top_logprobs(row, torch.tensor(token), seq.params.logprobs)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[token]

    # ---- speculation ----------------------------------------------------------------------------
    def make_proposer(self):
        if self.spec is None:
            return None
        if self.spec.method == "ngram":
            return NgramProposer(self.spec.num_speculative_tokens, self.spec.prompt_lookup_min,
                                 self.spec.prompt_lookup_max)
        if self.spec.uses_head:
            from lanner.spec.eagle import EagleProposer
            return EagleProposer(self.spec, self.runner, self.blocks, self.sampler, self.model_path, self.step_costs)
        from lanner.spec.draft import DraftModelProposer
        return DraftModelProposer(self.spec, self.cfg, self.model_config, self.max_model_len)

    def propose_drafts(self) -> None:
        """Give each decoding sequence up to k draft tokens; none when the batch is already large."""
        if self.proposer is None or len(self.scheduler.running) > self.max_drafting:
            return
        ready = [s for s in self.scheduler.running if s.num_computed_tokens == s.num_verified_tokens - 1]
        cheap = (self.proposer.drafts_are_free
                 and len(ready) * (1 + self.spec.num_speculative_tokens) <= CHEAP_STEP_ROWS)
        wanted = [self.draft_budget(s, cheap) for s in ready]
        drafts = self.proposer.propose_batch(ready, wanted)
        for seq, draft in zip(ready, drafts):
            if seq.grammar is not None:   # a draft token the grammar forbids ends the draft
                draft = draft[:seq.grammar.valid_prefix(list(draft))]
            seq.spec_token_ids = list(draft)

    def draft_budget(self, seq: Sequence, cheap: bool = False) -> int:
        """Drafts for seq, never past max_tokens or max_model_len. In a cheap step (few rows: the forward is
        bound by streaming the weights, so rejected drafts cost almost nothing) always the full k; otherwise
        k adapts to recent acceptance, and k = 0 probes again after a while."""
        left = self.max_model_len - seq.num_verified_tokens - 1
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens - 1)
        if cheap:
            return max(0, min(self.spec.num_speculative_tokens, left))
        if seq.spec_k == 0:
            seq.spec_idle_steps += 1
            if seq.spec_idle_steps < 8:
                return 0
            seq.spec_k, seq.spec_idle_steps = 1, 0
        return max(0, min(seq.spec_k, self.spec.num_speculative_tokens, left))

    def fork_children(self, logits: torch.Tensor, seqs: list[Sequence]):
        """n > 1: when the prompt is done, the first sequence forks n - 1 siblings sharing its blocks."""
        extra_rows, extra_seqs = [], []
        for r, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            if seq.num_output_tokens == 0 and len(request.seqs) < request.params.n:
                for i in range(1, request.params.n):
                    seed = None if request.params.seed is None else hash((request.params.seed, i)) % 2**63
                    child = seq.fork(i, seed)
                    request.seqs.append(child)
                    if self.runner.states is None:
                        self.blocks.share(seq, child)
                        self.scheduler.running.append(child)
                    else:   # a state-space model's child continues from a copy of the state, or recomputes
                        self.fork_state(seq, child)
                    extra_rows.append(r)
                    extra_seqs.append(child)
        if not extra_rows:
            return logits, seqs
        return torch.cat([logits, logits[extra_rows]]), seqs + extra_seqs

    def fork_state(self, parent: Sequence, child: Sequence) -> None:
        """A child of a model with SSM layers continues from a copy of the parent's state (and, in a hybrid, of
        its partial KV block); without a free state slot or KV block for it, it waits and recomputes."""
        states = self.runner.states
        self.blocks.share(parent, child)
        shared = len(child.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        if self.blocks.blocks_needed(child, 0) <= self.blocks.num_free_blocks and states.acquire(child):
            states.copy(parent.state_slot, child.state_slot)
            self.blocks.allocate(child, 0)   # the partial block after the shared full ones
            if self.model_config.num_kv_layers:   # a hybrid's attention layers read that block's KV too
                self.runner.copy_blocks(list(zip(parent.block_table[shared:], child.block_table[shared:])))
            self.scheduler.running.append(child)
            return
        self.blocks.release(child)
        child.num_computed_tokens = 0
        child.status = Status.WAITING
        self.scheduler.waiting.appendleft(child)

    def append_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.token_ids.append(token)
        self.num_generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.tokenizer.stop_token_ids):
            return self.finish(seq, "stop", now, stop_reason=token)
        if seq.grammar is not None:
            seq.grammar.consume(token)
        new_text = seq.detokenize(self.tokenizer)
        if p.stop and new_text and self.truncate_at_stop_string(seq, len(new_text)):
            return self.finish(seq, "stop", now)
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or \
                seq.num_verified_tokens >= self.max_model_len:
            return self.finish(seq, "length", now)
        if seq.grammar is not None and seq.grammar.done:   # complete: nothing but a stop token could follow
            return self.finish(seq, "stop", now)

    @staticmethod
    def truncate_at_stop_string(seq: Sequence, num_new_chars: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - num_new_chars - longest + 1)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, search_from)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text, seq.stop_reason = seq.text[:index], stop
        return True

    def finish(self, seq: Sequence, reason: str, now: float, stop_reason=None) -> None:
        seq.finish_reason, seq.finish_time = reason, now
        if stop_reason is not None:
            seq.stop_reason = stop_reason
        self.cache_blocks(seq)
        self.scheduler.finish(seq)

    def cache_blocks(self, seq: Sequence) -> None:
        """Hash seq's full verified blocks into the prefix cache (and file a state-space model's checkpoints
        of them)."""
        self.blocks.cache_full_blocks(seq)
        if self.runner.states is not None:
            self.runner.states.commit(seq)

    def make_output(self, request: Request) -> RequestOutput:
        outputs = [CompletionOutput(s.index, s.text, list(s.output_token_ids), s.finish_reason,
                                    s.cumulative_logprob if s.params.logprobs is not None else None,
                                    list(s.logprobs) if s.params.logprobs is not None else None,
                                    s.stop_reason)
                   for s in sorted(request.seqs, key=lambda s: s.index)]
        first = request.seqs[0]
        finish_times = [s.finish_time for s in request.seqs if s.finish_time is not None]
        metrics = RequestMetrics(first.arrival_time, first.first_token_time,
                                 max(finish_times) if request.finished else None,
                                 len(request.prompt_token_ids), sum(len(o.token_ids) for o in outputs),
                                 first.num_cached_tokens)
        finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, finished,
                             metrics, first.prompt_logprobs, request.lora_request)

    # ---- stats ----------------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": self.blocks.num_blocks,
                "kv_blocks_used": self.blocks.num_blocks - self.blocks.num_free_blocks,
                "prefix_cache_hit_rate": self.blocks.hit_rate(), "preemptions": self.scheduler.num_preemptions,
                "generated_tokens": self.num_generated_tokens, "spec_drafted_tokens": self.num_drafted_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens,
                "spec_mean_accepted_length": (self.num_accepted_tokens + self.num_verify_steps)
                / max(1, self.num_verify_steps)}
