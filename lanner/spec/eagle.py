"""An EAGLE-style draft head: one decoder layer that autoregresses on the target's own hidden states.

The head's row at position p reads [embedding of token x_p, the target's final (normed) hidden state h_{p-1}]
(zeros at p = 0), projects it to the model width (fc), runs one Llama decoder layer over its own KV, and
predicts h_p; the target's LM head, restricted to the most frequent tokens, turns that into a guess of
x_{p+1}. Drafting continues on the head's own outputs: row p + 1 reads [x_{p+1} drafted, the head's h_p].

Serving keeps the head's KV as one more layer of the target's paged cache, addressed by the target's block
tables, so a sequence's head KV lives, is shared, copied and freed with its blocks (EagleProposer). The
features come from the target pass that verified the last drafts, with the request's adapter applied:
an adapter's hidden states are what the head reads.

Training (lanner.spec.train_draft) runs DraftHead.unroll: step 1 on the target's features at every
position, steps 2..k on the head's own outputs, each unrolled row attending to the real context before its
origin and its own earlier unrolled rows, which is exactly what a chain draft sees when served.
"""
import dataclasses
import json
import logging
import os
import time

import torch
from torch import nn

from lanner.config import ModelConfig
from lanner.spec.proposers import NgramProposer

log = logging.getLogger("lanner.spec")
HEAD_WEIGHTS, HEAD_CONFIG = "model.safetensors", "config.json"
SCALE = ".scale"   # an int8 matrix's per-row scales in the head file
DRAFT_FORMAT = "q8_0"   # the served head's linears on the CPU
PROBE_EVERY = 16        # steps without drafts before one 1-draft step re-measures what drafting pays
DEFAULT_HEADS = os.path.join(os.path.dirname(__file__), "heads")


@dataclasses.dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    target_vocab_size: int
    target: str = ""          # the target model file or directory name the head was trained for
    training: dict = dataclasses.field(default_factory=dict)   # how it was made (command, data, measurements)

    @classmethod
    def for_target(cls, cfg: ModelConfig, target: str) -> "HeadConfig":
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.rms_norm_eps, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, cfg.vocab_size,
                   target)

    def layer_config(self) -> ModelConfig:
        """The head's decoder layer is a plain Llama layer of the target's width."""
        return ModelConfig("LlamaForCausalLM", self.hidden_size, self.intermediate_size, 1, self.num_heads,
                           self.num_kv_heads, self.head_dim, self.target_vocab_size, self.rms_norm_eps,
                           self.rope_theta, self.max_position_embeddings, False, False, self.rope_scaling)

    def check_target(self, cfg: ModelConfig, path: str) -> None:
        if cfg.rotary_dim not in (None, cfg.head_dim):
            raise ValueError(f"draft heads rotate whole heads; the target rotates {cfg.rotary_dim} of {cfg.head_dim} "
                             f"dims (partial rotary is not supported by EAGLE heads yet)")
        want = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.target_vocab_size)
        have = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
        if want != have:
            raise ValueError(f"draft head {path} was trained for a model of (hidden, heads, kv heads, head dim, "
                             f"vocab) = {want}, the target has {have}")


def save_head(path: str, config: HeadConfig, state: dict[str, torch.Tensor], vocab_ids: torch.Tensor) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, value in state.items():   # matrices as int8 rows with a scale each: half of bf16's bytes
        value = value.detach().float()
        if value.dim() == 2:
            scale = value.abs().amax(dim=1).clamp_min(1e-12) / 127
            tensors[name] = (value / scale[:, None]).round().to(torch.int8).contiguous()
            tensors[name + SCALE] = scale.contiguous()
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    tensors["vocab_ids"] = vocab_ids.to(torch.int64)
    save_file(tensors, os.path.join(path, HEAD_WEIGHTS))
    with open(os.path.join(path, HEAD_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=1)


def load_head(path: str) -> tuple[HeadConfig, dict[str, torch.Tensor], torch.Tensor]:
    """(config, fp32 weights, the token ids its LM head scores); ValueError on a missing or bad file."""
    from safetensors.torch import load_file
    files = [os.path.join(path, HEAD_CONFIG), os.path.join(path, HEAD_WEIGHTS)]
    if not all(os.path.exists(f) for f in files):
        raise ValueError(f"draft head {path!r} not found: a head directory holds {HEAD_CONFIG} and {HEAD_WEIGHTS} "
                         f"(made by `lanner train-draft`)")
    try:
        with open(files[0]) as f:
            config = HeadConfig(**json.load(f))
        tensors = load_file(files[1])
    except Exception as e:
        raise ValueError(f"cannot read draft head {path!r}: {e}") from e
    vocab_ids = tensors.pop("vocab_ids", None)
    scales = {k[:-len(SCALE)]: tensors.pop(k) for k in [k for k in tensors if k.endswith(SCALE)]}
    for name, scale in scales.items():
        if name not in tensors or tensors[name].dim() != 2 or scale.shape != tensors[name].shape[:1]:
            raise ValueError(f"draft head {path!r}: {name + SCALE} does not fit {name}")
        tensors[name] = tensors[name].float() * scale[:, None]
    want = {k: tuple(v.shape) for k, v in DraftHead(config, 1).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if vocab_ids is None or want != have:
        wrong = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise ValueError(f"draft head {path!r} does not match its config.json: tensors "
                         f"{(['vocab_ids'] if vocab_ids is None else []) + wrong[:5]} are missing, extra or misshapen")
    if vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= config.target_vocab_size:
        raise ValueError(f"draft head {path!r}: vocab_ids must be token ids in [0, {config.target_vocab_size})")
    return config, {k: v.float() for k, v in tensors.items()}, vocab_ids


def default_head_path(model_path: str) -> str:
    """The head shipped for a target model, by its file or directory name."""
    name = os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0].lower()
    path = os.path.join(DEFAULT_HEADS, name)
    if not os.path.isdir(path):
        shipped = sorted(os.listdir(DEFAULT_HEADS)) if os.path.isdir(DEFAULT_HEADS) else []
        raise ValueError(f"no draft head ships for {name!r} (heads ship for {shipped}); train one with "
                         f"`lanner train-draft --model {model_path} --output DIR` and pass eagle:DIR")
    return path


# ---- the head as a dense module: training and offline acceptance -----------------------------------------
class DraftHead(nn.Module):
    """Parameter names follow the EAGLE checkpoints' (fc, layers.0.*), with HF's unfused projections."""

    def __init__(self, cfg: HeadConfig, num_vocab: int):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.fc = nn.Linear(2 * h, h, bias=False)
        layer = nn.Module()
        layer.self_attn = nn.ModuleDict({"q_proj": nn.Linear(h, cfg.num_heads * cfg.head_dim, bias=False),
                                         "k_proj": nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=False),
                                         "v_proj": nn.Linear(h, cfg.num_kv_heads * cfg.head_dim, bias=False),
                                         "o_proj": nn.Linear(cfg.num_heads * cfg.head_dim, h, bias=False)})
        layer.mlp = nn.ModuleDict({"gate_proj": nn.Linear(h, i, bias=False), "up_proj": nn.Linear(h, i, bias=False),
                                   "down_proj": nn.Linear(i, h, bias=False)})
        layer.input_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        layer.post_attention_layernorm = nn.RMSNorm(h, eps=cfg.rms_norm_eps)
        self.layers = nn.ModuleList([layer])
        self.num_vocab = num_vocab
        from lanner.model.layers import RotaryEmbedding
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings)

    def unroll(self, embeds: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """embeds [B, T, H]: embedding of x_p; features [B, T, H]: h_{p-1} (zeros at p = 0). Returns, for
        j = 1..steps, the head's outputs [B, T, H] at row p = origin: step j predicts h_{p+j-1} (and so
        x_{p+j}) from the real context through p and the head's own outputs after it, with teacher-forced
        tokens x_{p+1..p+j-1} (a chain draft only goes on while its tokens are right)."""
        a, mlp = self.layers[0].self_attn, self.layers[0].mlp
        norm1, norm2 = self.layers[0].input_layernorm, self.layers[0].post_attention_layernorm
        B, T, _ = embeds.shape
        heads, kv_heads, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        causal = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
        outputs, own_keys, own_values = [], [], []
        feats, tokens = features, embeds
        for j in range(steps):
            x = self.fc(torch.cat([tokens, feats], dim=-1))
            y = norm1(x)
            positions = torch.arange(j, T + j, device=embeds.device).clamp_max(self.rotary.cos_sin.shape[0] - 1)
            table = self.rotary.table(positions, y.dtype)
            q = a["q_proj"](y).view(B, T, heads, d)
            k = a["k_proj"](y).view(B, T, kv_heads, d)
            v = a["v_proj"](y).view(B, T, kv_heads, d)
            q, k = self.rotary(table, q, k)
            k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
            scale = d ** -0.5
            if j == 0:
                context_k, context_v = k, v
            scores = torch.einsum("bqhd,bkhd->bhqk", q, context_k) * scale
            scores = scores.masked_fill(~causal, float("-inf"))
            own_k, own_v = own_keys + ([k] if j else []), own_values + ([v] if j else [])
            own = [torch.einsum("bqhd,bqhd->bhq", q, kk)[..., None] * scale for kk in own_k]
            probs = torch.softmax(torch.cat([scores, *own], dim=-1), dim=-1)
            out = torch.einsum("bhqk,bkhd->bqhd", probs[..., :T], context_v)
            for i, vv in enumerate(own_v):
                out = out + probs[..., T + i].transpose(1, 2)[..., None] * vv
            if j:
                own_keys, own_values = own_k, own_v
            h = x + a["o_proj"](out.reshape(B, T, heads * d))
            y = norm2(h)
            h = h + mlp["down_proj"](nn.functional.silu(mlp["gate_proj"](y)) * mlp["up_proj"](y))
            outputs.append(h)
            feats = h
            tokens = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)   # x_{p+j} at row p
        return outputs


# ---- serving ------------------------------------------------------------------------------------------------
class HeadState:
    """One sequence's head: positions < computed hold head KV made from real features; pending[i] is the
    feature of position computed + i (h_{computed+i-1}, zeros where the target's is unknown)."""

    def __init__(self, seq):
        self.seq = seq
        self.drafted = 0          # drafts proposed for the step now running, and its (first position, rows)
        self.verify = None
        self.computed = 0
        self.pending: list[torch.Tensor] = []
        self.num_pending = 0

    def add(self, start: int, rows: torch.Tensor) -> None:
        """The target's valid hidden states of positions start.. (the rows it computed and kept)."""
        if start != self.computed - 1 + self.num_pending:   # new, preempted, or a prefix-cache hit: no h_{start-1}
            self.computed, self.pending, self.num_pending = start, [rows.new_zeros(1, rows.shape[1])], 1
        self.pending.append(rows)
        self.num_pending += rows.shape[0]

    def take(self) -> torch.Tensor:
        features = torch.cat(self.pending)
        self.computed += self.num_pending
        self.pending, self.num_pending = [], 0
        return features


class AcceptanceByDepth:
    """P(draft j accepted | drafts before it accepted), counted from verifies, starting from the head's held-out
    measurement (config.training) as a prior worth 20 verifies."""
    PRIOR_WEIGHT = 20

    def __init__(self, k: int, config: HeadConfig):
        history = config.training.get("history") or [{}]
        cumulative = max(history, key=lambda h: h.get("acceptance_length", 0)).get("by_position") or [0.5] * k
        cumulative = (list(cumulative) + [cumulative[-1] * 0.5] * k)[:k]
        self.tried, self.passed = [float(self.PRIOR_WEIGHT)] * k, []
        before = 1.0
        for c in cumulative:
            self.passed.append(self.PRIOR_WEIGHT * min(1.0, c / before) if before > 0 else 0.0)
            before = c

    def record(self, drafted: int, accepted: int) -> None:
        for j in range(min(drafted, accepted + 1)):   # depth j was reached; passed if j < accepted
            self.tried[j] += 1
            self.passed[j] += j < accepted

    def expected_tokens(self, k: int) -> float:
        """Tokens one verify of k drafts yields: the target's own one plus the accepted run."""
        total, run = 1.0, 1.0
        for j in range(k):
            run *= self.passed[j] / self.tried[j]
            total += run
        return total


class Head:
    """A loaded head, ready to serve: fc and the decoder layer in the target's dtype (its attention on the pool's
    head layer), the target's LM head rows of the head's vocabulary."""

    def __init__(self, path: str, runner):
        from lanner.model.layers import Linear
        from lanner.model.llama import DecoderLayer, fuse_hf_weights, place
        self.path = path
        self.config, weights, vocab_ids = load_head(path)
        self.config.check_target(runner.model_cfg, path)
        model, dtype, dev = runner.model, runner.dtype, runner.kv_cache.device
        windows = runner.model_cfg.layer_windows   # when every target layer slides, old blocks are given back
        window = max(windows) if windows and None not in windows else None
        self.layer = DecoderLayer(self.config.layer_config(), model.rotary, runner.backend, window)
        self.fc = Linear(2 * self.config.hidden_size, self.config.hidden_size, bias=False, device="meta")
        modules = {"fc": self.fc} | {f"layers.0.{n}": m for n, m in self.layer.named_modules() if n}
        for name, tensor in fuse_hf_weights({f"model.{k}": v for k, v in weights.items()}, 1).items():
            module, attr = name.removeprefix("model.").rsplit(".", 1)
            place(modules[module], attr, tensor)
        self.lm_head = Linear(self.config.hidden_size, len(vocab_ids), bias=False, device="meta")
        place(self.lm_head, "weight", lm_head_rows(model, vocab_ids))   # [V', H]: the target's rows
        for module in (self.layer, self.fc, self.lm_head):
            module.to(dev, dtype)
        # A draft's precision changes only how often it is accepted, never the output: on the CPU its linears
        # are q8_0 blocks (a quarter of fp32's bytes; drafting streams them between two target steps).
        for linear in (m for m in [self.fc, self.lm_head, *self.layer.modules()] if isinstance(m, Linear)):
            blocks = dev.type == "cpu" and linear.in_features % 32 == 0
            linear.pack(DRAFT_FORMAT if blocks else "none", dense_gemm=False)
        self.layer.self_attn.k_cache, self.layer.self_attn.v_cache = runner.kv_cache[-1]
        self.vocab_ids = vocab_ids.to(dev)

    def __call__(self, embeds: torch.Tensor, features: torch.Tensor, table: torch.Tensor, meta) -> torch.Tensor:
        x = self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))
        x, residual = self.layer(x, None, table, meta)
        return x + residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits, -inf outside the head's tokens."""
        scores = self.lm_head(hidden).float()
        full = torch.full((hidden.shape[0], self.config.target_vocab_size), float("-inf"), device=scores.device)
        return full.index_copy_(1, self.vocab_ids, scores).cpu()


ADAPTER_HEAD = "draft_head"   # an adapter directory's own head (`lanner finetune --with-draft`)


class EagleProposer:
    drafts_are_free = True     # the engine proposes the full k; draft_length() cuts it by measured costs
    reads_hidden_states = True

    def __init__(self, spec, runner, blocks, sampler, model_path: str, step_costs=None):
        self.runner, self.blocks, self.sampler = runner, blocks, sampler
        self.base = Head(spec.model or default_head_path(model_path), runner)
        self.step_costs = step_costs
        self.depth = AcceptanceByDepth(spec.num_speculative_tokens, self.base.config)
        self.draft_seconds = None   # moving average of one head forward
        self.idle_steps = 0
        self.adapter_heads: dict[str, Head] = {}   # by adapter path
        self.num_tokens = spec.num_speculative_tokens
        # eagle+ngram: a long match in the sequence's own tokens (copying) beats the head
        self.lookup = NgramProposer(spec.num_speculative_tokens, max(3, spec.prompt_lookup_min),
                                    max(3, spec.prompt_lookup_max)) if spec.method == "eagle+ngram" else None
        self.embed = runner.model.embed_tokens
        self.states: dict[int, HeadState] = {}
        self.num_forwards = 0

    def head_for(self, seq) -> Head:
        """The head a sequence drafts with: its adapter's own, when the adapter directory has one."""
        if not seq.lora_id or self.runner.lora is None:
            return self.base
        path = os.path.join(self.runner.lora.requests[seq.lora_id].lora_path, ADAPTER_HEAD)
        if path not in self.adapter_heads:
            self.adapter_heads[path] = self.base
            if os.path.isdir(path):
                try:
                    self.adapter_heads[path] = Head(path, self.runner)
                except ValueError as e:   # a bad head costs its adapter's drafts, never a request
                    log.warning("adapter draft head not used, drafting with the base head: %s", e)
        return self.adapter_heads[path]

    # ---- features from the target's step ---------------------------------------------------------------
    def observe(self, scheduled, starts: list[int], hidden: torch.Tensor) -> None:
        """After a target step: keep each sequence's valid hidden rows (the accepted ones of a verify)."""
        row = 0
        for (seq, num), start in zip(scheduled, starts):
            valid = seq.num_computed_tokens - start
            if seq.is_finished or seq.num_virtual_tokens:
                self.states.pop(seq.seq_id, None)
            elif valid > 0:
                state = self.states.setdefault(seq.seq_id, HeadState(seq))
                if state.drafted and (start, num) == state.verify:   # the verify of this head's drafts
                    self.depth.record(state.drafted, valid - 1)
                state.drafted = 0
                state.add(start, hidden[row:row + valid].clone())   # not a view: the step's tensor goes
            row += num

    # ---- drafting ----------------------------------------------------------------------------------------
    def propose_batch(self, seqs, wanted: list[int]) -> list[list[int]]:
        self.drop_stale(seqs)
        batch, budgets, drafts = [], [], {}
        best = self.draft_length(len(seqs))
        for seq, k in zip(seqs, wanted):
            seq.spec_draft_probs = None
            k = min(k, self.num_tokens)
            state = self.states.get(seq.seq_id)
            if state is not None:
                state.drafted = 0
            copied = self.lookup.propose(seq.token_ids, k) if self.lookup is not None and k else []
            if copied and len(copied) == k:   # the head catches up with these rows' features next time
                drafts[seq.seq_id] = copied
                continue
            k = self.reserve(seq, min(k, best)) if state is not None and state.num_pending else 0
            if k > 0:
                batch.append(seq)
                budgets.append(k)
                state.drafted, state.verify = k, (seq.num_computed_tokens, 1 + k)
        drafts |= self.draft(batch, budgets) if batch else {}
        return [drafts.get(seq.seq_id, []) for seq in seqs]

    def draft_length(self, batch: int) -> int:
        """The k that maximizes expected tokens per second for a batch of drafting sequences, from the measured
        cost of a target step by rows, of a head forward, and the acceptance measured at each depth. A row count
        not measured yet counts as costing what one row does, so it gets tried (and measured)."""
        if self.step_costs is None:
            return self.num_tokens
        one = self.step_costs.of(batch)
        if one is None:
            return 0   # measure a plain step first
        if self.draft_seconds is None:
            return self.num_tokens
        self.idle_steps += 1
        best, best_rate = (1, 0.0) if self.idle_steps % PROBE_EVERY == 0 else (0, 1.0 / one)   # keep measuring
        for k in range(1, self.num_tokens + 1):
            cost = (self.step_costs.of(batch * (1 + k)) or one) + k * self.draft_seconds
            rate = self.depth.expected_tokens(k) / cost
            if rate > best_rate:
                best, best_rate = k, rate
        if best:
            self.idle_steps = 0
        return best

    def drop_stale(self, seqs) -> None:
        """Forget the heads of sequences that ended (aborted ones are never observed again)."""
        for seq_id in [i for i, state in self.states.items() if state.seq.is_finished]:
            del self.states[seq_id]

    def reserve(self, seq, k: int) -> int:
        """Blocks for the head's rows through the last draft's input (position N + k - 2, where N tokens are
        verified): the target needs them this step anyway. Fewer drafts when the pool is short."""
        while k > 0 and self.blocks.blocks_needed(seq, k) > self.blocks.num_free_blocks:
            k -= 1
        if k > 0:
            self.blocks.allocate(seq, k)
        return k

    @torch.inference_mode()
    def draft(self, seqs, budgets: list[int]) -> dict[int, list[int]]:
        drafts = {}
        groups: dict[int, list[int]] = {}
        for i, seq in enumerate(seqs):
            groups.setdefault(id(self.head_for(seq)), []).append(i)
        for members in groups.values():
            drafts |= self.draft_with(self.head_for(seqs[members[0]]), [seqs[i] for i in members],
                                      [budgets[i] for i in members])
        return drafts

    def draft_with(self, head: Head, seqs, budgets: list[int]) -> dict[int, list[int]]:
        """Catch every head up with its pending features (the last row drafts the first token), then one
        row per sequence per further draft, fed the head's own output."""
        rows = [(seq, self.states[seq.seq_id].computed, self.states[seq.seq_id].take()) for seq in seqs]
        out = self.forward(head, [(seq, first, seq.token_ids[first:first + len(f)], f) for seq, first, f in rows])
        last = torch.stack([o[-1] for o in out])
        drafts = {seq.seq_id: [] for seq in seqs}
        probs = {seq.seq_id: [] for seq in seqs}
        active = list(range(len(seqs)))
        while True:
            began = time.perf_counter()
            tokens, dists = self.sample(head.logits(last), [seqs[i] for i in active],
                                        [drafts[seqs[i].seq_id] for i in active])
            for i, token, dist in zip(active, tokens, dists):
                drafts[seqs[i].seq_id].append(token)
                if dist is not None:
                    probs[seqs[i].seq_id].append(dist)
            keep = [n for n, i in enumerate(active) if len(drafts[seqs[i].seq_id]) < budgets[i]]
            if not keep:
                break
            active = [active[n] for n in keep]
            feed = [(seqs[i], seqs[i].num_verified_tokens + len(drafts[seqs[i].seq_id]) - 1,
                     [drafts[seqs[i].seq_id][-1]], last[n:n + 1]) for n, i in zip(keep, active)]
            last = torch.cat([o[-1:] for o in self.forward(head, feed)])
            took = time.perf_counter() - began   # one chain step: a draft's logits and sampling, the next forward
            self.draft_seconds = took if self.draft_seconds is None else 0.8 * self.draft_seconds + 0.2 * took
        for seq in seqs:
            if probs[seq.seq_id]:
                seq.spec_draft_probs = torch.stack(probs[seq.seq_id])
        return drafts

    def forward(self, head: Head, rows) -> list[torch.Tensor]:
        """rows: (seq, first position, tokens, features [n, H]) -> the head's outputs [n, H] per sequence, its
        KV written at those positions in the sequence's blocks."""
        from lanner.attention import AttentionMetadata
        bs, dev = self.blocks.block_size, head.vocab_ids.device
        positions, slots, query_lens, seq_lens, tables, token_ids = [], [], [], [], [], []
        for seq, first, tokens, _ in rows:
            span = range(first, first + len(tokens))
            positions += span
            slots += [seq.block_table[p // bs] * bs + p % bs for p in span]
            query_lens.append(len(tokens))
            seq_lens.append(span.stop)
            tables.append(seq.block_table)
            token_ids += tokens
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, slots).to(dev)
        embeds = self.embed(torch.tensor(token_ids, device=dev))
        table = self.runner.model.rotary.table(torch.tensor(positions, device=dev), embeds.dtype)
        hidden = head(embeds, torch.cat([f for *_, f in rows]).to(dev), table, meta)
        self.num_forwards += 1
        return list(hidden.split(query_lens))

    def sample(self, logits, seqs, drafts):
        from lanner.spec.draft import sample_drafts
        return sample_drafts(self.sampler, logits, seqs, [draft_generator(seq) for seq in seqs], drafts)


def draft_generator(seq):
    """The draft's random stream for a seeded request: apart from the target's, reproducible by the seed."""
    from lanner.spec.draft import DRAFT_SEED_SALT
    if seq.generator is None:
        return None
    if getattr(seq, "draft_generator", None) is None:
        seq.draft_generator = torch.Generator().manual_seed((seq.generator.initial_seed() + DRAFT_SEED_SALT) % 2**63)
    return seq.draft_generator


def lm_head_rows(model, vocab_ids: torch.Tensor) -> torch.Tensor:
    """The target's LM head rows of vocab_ids, dense fp32 (GGML blocks dequantized)."""
    head = model.lm_head
    if head.blocks is not None:
        return head.blocks.rows(vocab_ids, torch.float32)
    return head.weight.detach()[vocab_ids].float()
