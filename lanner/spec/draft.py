"""Draft-model proposer: a small model sharing the target's vocabulary drafts k tokens on its own paged KV cache.

The draft keeps a mirror of every speculating sequence (its own block table and num_computed_tokens). Each
call rolls a mirror back to the longest prefix it shares with the target's verified tokens (rejected drafts'
KV is simply overwritten later: rollback by counter), catches all mirrors up in one packed varlen forward that
also yields the first draft token, then runs k - 1 single-token forwards for the batch. Sampled requests draw
each draft token from the draft's own filtered distribution q and leave q on the sequence
(seq.spec_draft_probs [k, V]) so that verification accepts with min(1, p / q): lossless for any draft.
"""
import dataclasses

import torch

from lanner.config import EngineConfig, ModelConfig, SpeculativeConfig
from lanner.engine.kv_cache import BlockManager
from lanner.engine.model_runner import ModelRunner
from lanner.engine.sampler import HistoryView, Sampler, argmax_rows, filtered_probs
from lanner.engine.sequence import Sequence, Status
from lanner.model.loader import load_model_files

DRAFT_SEED_SALT = 0x9E3779B97F4A7C15   # the draft's stream differs from the target's, both follow the seed


class Mirror:
    """The draft's copy of one target sequence: tokens fed so far, its own counter and block table.

    Duck-types the parts of Sequence that ModelRunner and BlockManager read."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.token_ids: list[int] = []
        self.num_verified = 0                 # leading token_ids known to equal the target's
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.num_released_blocks = 0          # the draft keeps all its blocks (see BlockManager.release)
        self.spec_token_ids: list[int] = []   # always empty: every mirror row is an ordinary token
        self.prompt_logprobs = None
        self.lora_id = self.slot_lora_id = 0  # the draft serves no adapters; a target adapter only changes p
        self.prefix = self.prompt = None       # nor a prefix or prompt adapter's virtual tokens
        self.adapter_digest = None
        self.num_virtual_tokens = 0
        self.images = None                     # a text draft: a VLM target's image tokens are plain tokens to it
        self.generator = None if seq.generator is None else \
            torch.Generator().manual_seed((seq.generator.initial_seed() + DRAFT_SEED_SALT) % 2**63)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def tokens_to_compute(self, num: int) -> list[int]:
        return self.token_ids[self.num_computed_tokens:self.num_computed_tokens + num]

    def sync(self, target: list[int]) -> None:
        """Keep the KV of the longest prefix still shared with the target (never its last token); adopt its tokens."""
        limit = min(self.num_computed_tokens, len(target) - 1, len(self.token_ids))
        i = min(self.num_verified, limit)
        while i < limit and self.token_ids[i] == target[i]:
            i += 1
        self.num_computed_tokens = i
        del self.token_ids[i:]
        self.token_ids += target[i:]
        self.num_verified = len(target)


class DraftModelProposer:
    drafts_are_free = False   # each draft token costs a forward of the draft model
    reads_hidden_states = False

    def __init__(self, spec: SpeculativeConfig, engine_config: EngineConfig, target_config: ModelConfig,
                 max_model_len: int):
        hf_config, weights, tokenizer, _ = load_model_files(spec.model)
        self.model_config = ModelConfig.from_hf(hf_config)
        if self.model_config.ssm:   # its mirrors roll back by counter, which an SSM state cannot
            raise ValueError(f"draft model {spec.model!r} is a {self.model_config.architecture}: a draft model must "
                             f"be a transformer")
        if self.model_config.vocab_size != target_config.vocab_size:
            raise ValueError(f"draft model {spec.model!r} has a vocabulary of {self.model_config.vocab_size} tokens, "
                             f"the target has {target_config.vocab_size}: a draft must share the target's vocabulary")
        self.cfg = draft_engine_config(engine_config, spec)
        self.runner = ModelRunner(self.cfg, self.model_config, weights, max_model_len)
        del weights
        self.blocks = BlockManager(self.runner.num_blocks, self.cfg.block_size, enable_prefix_caching=False)
        self.sampler = Sampler(tokenizer.stop_token_ids)
        self.num_tokens = spec.num_speculative_tokens
        self.mirrors: dict[int, Mirror] = {}
        self.num_forwards = 0

    def propose_batch(self, seqs: list[Sequence], wanted: list[int]) -> list[list[int]]:
        """Up to wanted[i] draft tokens for seqs[i]; sets seq.spec_draft_probs (None when greedy or no draft)."""
        self.drop_stale(seqs)
        mirrors, budgets = [], []
        for seq, k in zip(seqs, wanted):
            seq.spec_draft_probs = None
            k = min(k, self.num_tokens)
            if k > 0 and (mirror := self.reserve(seq, k)) is not None:
                mirrors.append(mirror)
                budgets.append(k)
        drafts = self.draft(mirrors, budgets)
        return [drafts.get(seq.seq_id, []) for seq in seqs]

    def drop_stale(self, seqs: list[Sequence]) -> None:
        """Free the draft blocks of sequences that finished or were preempted."""
        asked = {seq.seq_id for seq in seqs}
        for seq_id, mirror in list(self.mirrors.items()):
            if seq_id not in asked and mirror.seq.status != Status.RUNNING:
                self.blocks.release(mirror)
                del self.mirrors[seq_id]

    def reserve(self, seq: Sequence, k: int) -> Mirror | None:
        """Roll the mirror back to what is still valid and give it blocks for k drafts; None if the pool is full."""
        if seq.seq_id not in self.mirrors:
            self.mirrors[seq.seq_id] = Mirror(seq)
        mirror = self.mirrors[seq.seq_id]
        mirror.sync(seq.token_ids)
        num_new = len(mirror.token_ids) + k - 1 - mirror.num_computed_tokens   # the last draft is never fed
        if self.blocks.blocks_needed(mirror, num_new) > self.blocks.num_free_blocks:
            return None
        self.blocks.allocate(mirror, num_new)
        return mirror

    def draft(self, mirrors: list[Mirror], budgets: list[int]) -> dict[int, list[int]]:
        """{seq_id: k drafts}: one catch-up forward for the batch, then single-token forwards."""
        drafts = {m.seq.seq_id: [] for m in mirrors}
        probs = {m.seq.seq_id: [] for m in mirrors}
        active = list(zip(mirrors, budgets))
        while active:
            batch = [m for m, _ in active]
            tokens, rows = self.sample(self.forward(batch), batch, [drafts[m.seq.seq_id] for m in batch])
            for m, token, row in zip(batch, tokens, rows):
                m.token_ids.append(token)
                drafts[m.seq.seq_id].append(token)
                if row is not None:
                    probs[m.seq.seq_id].append(row)
            active = [(m, k) for m, k in active if len(drafts[m.seq.seq_id]) < k]
        for m in mirrors:
            if probs[m.seq.seq_id]:
                m.seq.spec_draft_probs = torch.stack(probs[m.seq.seq_id])
        return drafts

    def forward(self, mirrors: list[Mirror]) -> torch.Tensor:
        """Next-token logits [len(mirrors), V]: every mirror's uncomputed tokens, packed (chunked by the budget)."""
        last: dict[int, torch.Tensor] = {}
        pending = mirrors
        while pending:
            budget, scheduled = self.cfg.max_num_batched_tokens, []
            for m in pending:
                num = min(m.num_tokens - m.num_computed_tokens, budget)
                if num <= 0:
                    break
                scheduled.append((m, num))
                budget -= num
            logits, row_mirrors, _ = self.runner.run(scheduled)
            self.num_forwards += 1
            for m, num in scheduled:
                m.num_computed_tokens += num
            last.update((id(m), row) for m, row in zip(row_mirrors, logits))
            pending = [m for m in pending if m.num_computed_tokens < m.num_tokens]
        return torch.stack([last[id(m)] for m in mirrors])

    def sample(self, logits: torch.Tensor, mirrors: list[Mirror], drafts: list[list[int]]):
        return sample_drafts(self.sampler, logits, [m.seq for m in mirrors], [m.generator for m in mirrors], drafts)


def sample_drafts(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], generators: list, drafts: list[list[int]]):
    """One draft token per row, and the distribution q it was drawn from (None for greedy requests): the
    target's processing of each sequence (penalties, temperature, top-k/p) on the draft's logits."""
    views = [HistoryView(seq, d) for seq, d in zip(seqs, drafts)]
    logits = sampler.processed_logits(logits, views)
    tokens = argmax_rows(logits).tolist()
    rows = [None] * len(seqs)
    sampled = [i for i, v in enumerate(views) if not v.params.greedy]
    if sampled:
        q = filtered_probs(logits[sampled], [views[i] for i in sampled])
        for row, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(q[row], 1, generator=generators[i]))
            rows[i] = q[row]
    return tokens, rows


def draft_engine_config(cfg: EngineConfig, spec: SpeculativeConfig) -> EngineConfig:
    """The draft runs like the target (dtype, backend, quantization) on a pool of a quarter of its KV memory,
    or as many blocks as the target when the target's pool is given in blocks."""
    return dataclasses.replace(cfg, model=spec.model, speculative=None, enable_prefix_caching=False, enable_lora=False,
                               kv_cache_memory=cfg.kv_cache_memory / 4)
