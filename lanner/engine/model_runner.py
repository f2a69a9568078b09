"""Owns the model and its paged KV cache; turns a schedule into one packed forward pass."""
import os

import torch

from lanner.attention import AttentionMetadata, get_backend
from lanner.config import EngineConfig, ModelConfig
from lanner.engine.memory import keep_freed_memory, weight_memory, zeroed_kv_memory
from lanner.engine.sampler import rows_of
from lanner.engine.sequence import Sequence
from lanner.engine.state_cache import StateCache
from lanner.model.llama import LlamaForCausalLM
from lanner.model.mamba import MambaForCausalLM, state_shapes
from lanner.quant import resolve_quantization


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls run natively instead of being emulated. A level forced by LANNER_ISA
    (avx512, avx2, ...) answers as a machine of that level would: none of them has bf16."""
    from lanner import native
    if os.environ.get("LANNER_ISA"):
        return False
    flags = native.cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def refuse_for_ssm_layers(cfg: EngineConfig, architecture: str) -> None:
    """What a model with SSM layers (Mamba, or a hybrid's) cannot be served with, refused before it loads."""
    if cfg.device != "cpu":
        raise ValueError(f"a {architecture} runs on the CPU (its state slots and scan kernel are CPU code), "
                         f"not on {cfg.device}")
    if cfg.enable_lora:
        raise ValueError(f"LoRA adapters are served on transformer models; a {architecture} takes none")
    if cfg.speculative is not None and cfg.speculative.uses_head:
        raise ValueError(f"an EAGLE head drafts for transformer targets, not a {architecture} with SSM layers; "
                         f"use ngram")


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_cfg: ModelConfig, weights: dict, max_model_len: int):
        self.cfg, self.model_cfg, self.max_model_len = cfg, model_cfg, max_model_len
        if model_cfg.ssm:
            refuse_for_ssm_layers(cfg, model_cfg.architecture)
        self.dtype = resolve_dtype(cfg.dtype)
        # K and V as stored: the model's dtype, or one the user picked (a bf16 cache halves the bytes attention
        # reads for an fp32 model, as llama.cpp's f16 cache does)
        self.kv_dtype = self.dtype if cfg.kv_cache_dtype == "auto" else resolve_dtype(cfg.kv_cache_dtype)
        self.backend = get_backend(cfg.attention_backend, cfg.device)
        self.model = (MambaForCausalLM(model_cfg) if model_cfg.architecture in ModelConfig.SSM_ARCHITECTURES else
                      LlamaForCausalLM(model_cfg, self.backend, max_model_len))
        self.model.load_hf_weights(weights)
        # weights kept in GGML blocks leave meta placeholders, which only change dtype (GGUF loads dense off CPU)
        if cfg.device == "cpu":
            self.model.to(dtype=self.dtype).eval()
        else:
            self.model.to(cfg.device, self.dtype).eval()
        for rotary in {getattr(self.model, "rotary", None), getattr(self.model, "local_rotary", None)} - {None}:
            rotary.cos_sin = rotary.cos_sin.float()   # tables stay fp32, rounded per lookup as HF
        self.quantization = resolve_quantization(cfg.quantization, self.model, cfg.device)
        self.model.pack_weights(self.quantization, cfg.dense_gemm_weights)
        weight_memory.advise_huge_pages()
        self.states = self.make_state_cache() if model_cfg.ssm else None
        state_gib = self.states.nbytes / 2**30 if self.states is not None else 0.0
        self.num_blocks = cfg.num_kv_blocks or self.blocks_for_memory(max(cfg.kv_cache_memory - state_gib, 0.0))
        attention_layers = self.cache_layers()
        shape = (attention_layers, 2, self.num_blocks, cfg.block_size, model_cfg.num_kv_heads, model_cfg.head_dim)
        self.kv_cache = (zeroed_kv_memory(shape, self.kv_dtype, cfg.prefault_kv_cache)
                         if cfg.device == "cpu" and attention_layers
                         else torch.zeros(shape, dtype=self.kv_dtype, device=cfg.device))
        if cfg.device == "cpu":
            keep_freed_memory()
        for attn, cache in zip(self.model.attention_layers, self.kv_cache):
            attn.k_cache, attn.v_cache = cache[0], cache[1]
        self.last_hidden = None
        self.vision = None   # engine.multimodal.VisionPath of a vision-language model
        self.lora = None
        if cfg.enable_lora:
            from lanner.lora.manager import LoRAManager
            self.lora = LoRAManager(self.model, model_cfg, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras)

    def make_state_cache(self) -> StateCache:
        """Slots in the states' memory (kv_cache_memory, or half of it in a hybrid, whose KV blocks get what the
        states leave): half for running sequences (at most max_num_seqs) and the scratch of speculating ones (k
        slots each, for the rollback of their draft rows; at most a quarter of the memory), the other half for
        prefix checkpoints (at most 256)."""
        cfg, shapes, m = self.cfg, state_shapes(self.model_cfg), self.model_cfg
        per_slot = StateCache.slot_bytes(shapes, self.dtype, len(m.ssm_layers))
        share = 0.5 if m.num_kv_layers else 1.0
        half = int(cfg.kv_cache_memory * share * 2**30 / 2 // per_slot)
        if half < 1:
            raise ValueError(f"kv_cache_memory {cfg.kv_cache_memory} GiB holds no state slot of a {m.architecture} "
                             f"({per_slot / 2**20:.1f} MiB in {self.dtype}): raise --kv-cache-memory to at least "
                             f"{2 * per_slot / 2**30 / share:.3g} GiB")
        k = cfg.speculative.num_speculative_tokens if cfg.speculative else 0
        drafting = min(cfg.speculative.max_batch_size, half // (2 * k)) if k else 0
        running = min(cfg.max_num_seqs, half - k * drafting)
        checkpoints = min(half, 256) if cfg.enable_prefix_caching else 0
        return StateCache(self.model.mixers, shapes, self.dtype, running, checkpoints, k * drafting, cfg.block_size)

    def cache_layers(self) -> int:
        """KV layers in the pool: the model's, and one for an EAGLE draft head (its KV shares the blocks)."""
        spec = self.cfg.speculative
        return self.model_cfg.num_kv_layers + (spec is not None and spec.uses_head)

    def blocks_for_memory(self, gib: float) -> int:
        """KV blocks that fit in gib; a model without attention gets block ids only (they hold no memory), enough
        for every running sequence at max_model_len."""
        if not self.model_cfg.num_kv_layers:
            return min(1 << 20, self.cfg.max_num_seqs * -(-self.max_model_len // self.cfg.block_size))
        m = self.model_cfg
        per_block = 2 * self.cache_layers() * self.cfg.block_size * m.num_kv_heads * m.head_dim * self.kv_dtype.itemsize
        return max(1, int(gib * 2**30 // per_block))

    def prepare(self, scheduled: list[tuple[Sequence, int]], every_hidden: bool = False):
        """Packed inputs, attention metadata, and which rows get logits (with their sequences and the index in
        token_ids of the token each reads). Positions are KV positions: after an adapter's virtual tokens. Rows at a
        prompt adapter's virtual positions get its embeddings, and rows at image tokens their image's features,
        instead of token embeddings: embeds is (rows, values) or None. Unless every_hidden, the model's last layer
        may run on the logit rows alone (meta.output_rows)."""
        bs = self.cfg.block_size
        input_ids, positions, slots, query_lens, seq_lens, tables, loras = [], [], [], [], [], [], []
        embed_rows, embed_values, image_chunks = [], [], []
        logit_rows, logit_seqs, logit_tokens = [], [], []
        for seq, num in scheduled:
            start = seq.num_computed_tokens
            row0 = len(input_ids)
            input_ids += seq.tokens_to_compute(num)
            if seq.prompt is not None and start < seq.num_virtual_tokens:
                end = min(start + num, seq.num_virtual_tokens)
                embed_rows += range(row0, row0 + end - start)
                embed_values.append(seq.prompt.embeddings[start:end])
            skip = max(0, seq.num_virtual_tokens - start)
            if seq.images is not None and num > skip:   # (image prompt, first row, first token index, tokens)
                image_chunks.append((seq.images, row0 + skip, start + skip - seq.num_virtual_tokens, num - skip))
            positions += range(start, start + num)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + num)]
            query_lens.append(num)
            loras += [seq.slot_lora_id] * num
            seq_lens.append(start + num)
            tables.append(table)
            for r in self.rows_to_sample(seq, start, num):
                logit_rows.append(row0 + r)
                logit_seqs.append(seq)
                logit_tokens.append(start + r - seq.num_virtual_tokens)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, slots)
        meta.every_row_sampled = len(logit_rows) == len(input_ids)
        logit_rows = torch.tensor(logit_rows, dtype=torch.long)
        if self.states is not None:
            meta.ssm = self.ssm_batch(scheduled)
        if self.lora is not None:
            self.lora.set_batch(loras)
        # the model's hidden states of the logit rows alone (its last layer may run on them alone): not where a step's
        # adapters pick rows by index (LoRA, IA3)
        if (not meta.every_row_sampled and not every_hidden and getattr(self.model, "trims_rows", False)
                and (self.lora is None or self.lora.batch is None)):
            meta.output_rows = logit_rows
        if image_chunks:
            rows, values = self.vision.embeds(image_chunks)
            embed_rows += rows
            embed_values += values
        embeds = (torch.tensor(embed_rows), torch.cat([v.to(self.dtype) for v in embed_values])) if embed_rows else None
        return torch.tensor(input_ids), torch.tensor(positions), meta, embeds, logit_rows, logit_seqs, logit_tokens

    def ssm_batch(self, scheduled: list[tuple[Sequence, int]]):
        """Each sequence's state slot, whether it starts fresh, and the rows whose state is kept as well: prefix
        checkpoints at block boundaries of prompts, and every verify row but the last for speculative rollback."""
        from lanner.model.ssm import SSMBatch
        row, cu, snapshots = 0, [0], []
        for seq, num in scheduled:
            snapshots += [(row + r, slot) for r, slot in self.states.plan_checkpoints(seq, seq.num_computed_tokens, num)]
            if seq.spec_token_ids:
                snapshots += self.states.plan_drafts(seq, row + num - 1 - len(seq.spec_token_ids))
            row += num
            cu.append(row)
        return SSMBatch(torch.tensor(cu), torch.tensor([s.state_slot for s, _ in scheduled]),
                        torch.tensor([s.num_computed_tokens == 0 for s, _ in scheduled]), snapshots)

    @staticmethod
    def rows_to_sample(seq: Sequence, start: int, num: int) -> range:
        """Rows whose logits are needed: prompt rows for prompt_logprobs, the last row (+ draft rows)."""
        end = start + num
        first = end - 1 - len(seq.spec_token_ids) if end == seq.num_tokens else end
        if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < seq.num_prompt_tokens:
            first = seq.num_virtual_tokens
        return range(max(0, first - start), num)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], every_hidden: bool = False
            ) -> tuple[torch.Tensor, list[Sequence], list[int]]:
        """fp32 logits [R, V] for the sampled rows, the sequence of each row, and the index in its token_ids of
        the token the row reads. every_hidden: every row's final hidden state in last_hidden (what an EAGLE head
        reads), else the logit rows' alone may be computed."""
        input_ids, positions, meta, embeds, rows, seqs, token_indices = self.prepare(scheduled, every_hidden)
        dev = self.cfg.device
        if embeds is not None:
            embeds = tuple(t.to(dev) for t in embeds)
        hidden = self.model(input_ids.to(dev), positions.to(dev), meta.to(dev), embeds)
        trimmed = meta.output_rows is not None   # (hidden: the logit rows' alone)
        self.last_hidden = None if trimmed else hidden
        logits = self.model.compute_logits(hidden if trimmed else rows_of(hidden, rows.to(dev))).cpu()
        return logits, seqs, token_indices

    def bursts(self, rows: int) -> bool:
        """Whether run_burst takes a batch of this many decode rows (the model's one-call step, on the CPU)."""
        return self.cfg.device == "cpu" and isinstance(self.model, LlamaForCausalLM) and self.model.bursts(rows)

    @torch.inference_mode()
    def run_burst(self, scheduled: list[tuple[Sequence, int]], steps: int, stops: list[int],
                  sampling=None, keep_logits: list[int] = ()) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to `steps` decode steps of the scheduled sequences (one new token each, the KV blocks of every step
        allocated) in one call: each step's tokens, in scheduled order, and the logits of the rows keep_logits
        names (sampling, keep_logits: DecodeStep.burst's)."""
        input_ids, positions, meta, _, _, _, _ = self.prepare(scheduled)
        return self.model.decode_burst(input_ids, positions, meta, steps, stops, sampling, keep_logits)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: every layer's K and V of each (source, destination) block."""
        if pairs:
            source, destination = torch.tensor(pairs, device=self.kv_cache.device).T
            self.kv_cache[:, :, destination] = self.kv_cache[:, :, source]
