"""Every decoder layer of a step of up to MAX_ROWS rows (single-stream and batched decode, short prompt
chunks) in one C call: fused.c's decode_layers runs what the PyTorch path runs for a layer of GGML linears --
norm, qkv, rotary + KV store, paged attention, o, norm, gate_up, silu * up, down -- then the final norm and, for
a GGML LM head whose kernel takes that many rows, every row's logits, with the same kernels and roundings, so
hidden states and logits are bitwise equal. At these sizes the ~10 module calls and ~30 dispatches of a layer
cost more than its kernels (a batch's 64-row step ran ~900 small ops one after another); here a step pays for
one call, and its per-row stages run on every thread.

Taken only where everything is plain: GGML weights on the kernels' small-row path, the compiled attention,
no adapter rows in the step other than LoRA and IA3 ones (each linear applies them: LoRAWeights.adapt_input and
adapt_output in C), and an architecture without sandwich norms, partial rotary, GeGLU or SSM layers (q/k head norms,
Qwen3's, it runs). Anything else takes the PyTorch path, which stays the reference (tests compare the two)."""
from __future__ import annotations

import ctypes

import torch

from lanner.attention import native as attention_native
from lanner.attention.cpu import KERNEL_QUERY
from lanner.attention.native import CACHE_KINDS
from lanner.lora.adapter import FUSED, output_slices
from lanner.model import fused
from lanner.quant import ggml

c_int, c_int64, c_float, c_void_p = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
# the most rows a step runs here: each of its sequences then fits the compiled attention kernel. A batch's 64-row
# decode step took 48 ms on the PyTorch path, most of it ~900 small ops run one after another.
MAX_ROWS = KERNEL_QUERY
PLAIN_DTYPES = (torch.float32, torch.bfloat16)   # activations the C kernels take (caches: CACHE_KINDS)
# the most rows of a step with adapter rows: the deltas' per-row dot products here lose to the PyTorch path's GEMMs
# past it (a 250-row LoRA prompt chunk 1.1x slower; 8-row decode steps 4x faster here)
ADAPTER_ROWS = 128
# the parts of a step decode_layers times when asked (DecodeStep.timings), in its order: the profiler's components
STEP_PARTS = ("norms", "qkv_proj", "rotary", "attention", "o_proj", "gate_up_proj", "mlp_act", "down_proj", "lm_head")


class LoRAArgs(ctypes.Structure):
    _fields_ = [("a", c_void_p), ("b", c_void_p), ("ranks", c_void_p), ("R", c_int64), ("parts", c_int),
                ("starts", c_int64 * 4), ("in_scales", c_void_p), ("out_scales", c_void_p)]


class LinearArgs(ctypes.Structure):
    _fields_ = [("type", c_int), ("flags", c_int), ("w", c_void_p), ("packed", c_void_p), ("row_bytes", c_int64),
                ("n", c_int64), ("k", c_int64), ("bias", c_void_p), ("lora", LoRAArgs), ("rows", c_int64),
                ("next", c_void_p)]


class LayerArgs(ctypes.Structure):
    _fields_ = [("input_norm", c_void_p), ("post_norm", c_void_p), ("qkv", LinearArgs), ("o", LinearArgs),
                ("gate_up", LinearArgs), ("down", LinearArgs), ("k_cache", c_void_p), ("v_cache", c_void_p),
                ("window", c_int), ("split", c_int), ("q_norm", c_void_p), ("k_norm", c_void_p)]


class StepArgs(ctypes.Structure):
    _fields_ = [("matmul", c_void_p), ("attention", c_void_p), ("threads", c_int), ("bf16", c_int),
                ("kv_type", c_int), ("hq", c_int), ("hkv", c_int), ("D", c_int), ("H", c_int), ("I", c_int),
                ("block_size", c_int), ("eps", c_float), ("scale", c_float), ("softcap", c_float), ("T", c_int64),
                ("slots", c_void_p), ("cos_sin", c_void_p), ("tables", c_void_p), ("seq_lens", c_void_p),
                ("cu", c_void_p), ("table_width", c_int), ("num_seqs", c_int), ("tree_width", c_int),
                ("seqs", c_void_p), ("tree", c_void_p), ("final_norm", c_void_p), ("head", LinearArgs),
                ("logits", c_void_p), ("argmax", c_void_p), ("head_norms", c_void_p), ("row_slots", c_void_p),
                ("timings", c_void_p), ("team_matmul", c_void_p), ("team_takes", c_void_p),
                ("team_attention", c_void_p)]


class BurstArgs(ctypes.Structure):
    _fields_ = [("dequantize", c_void_p), ("embed_type", c_int), ("embed", c_void_p), ("embed_row_bytes", c_int64),
                ("rotary", c_void_p), ("positions", c_void_p), ("stops", c_void_p), ("num_stops", c_int),
                ("steps", c_int), ("tokens", c_void_p), ("temps", c_void_p), ("top_p", c_void_p),
                ("min_p", c_void_p), ("top_k", c_void_p), ("uniforms", c_void_p), ("repetition", c_void_p),
                ("presence", c_void_p), ("frequency", c_void_p), ("seen", c_void_p), ("counts", c_void_p),
                ("keep", c_void_p), ("num_kept", c_int64), ("kept", c_void_p)]


def penalty_state(histories: list[tuple[list[int], list[int]]], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens seen (its prompt and output: repetition) [T, V] uint8 and its output tokens' counts
    (presence, frequency) [T, V] int32, for decode_burst to penalize by and update step by step."""
    seen = torch.zeros(len(histories), vocab, dtype=torch.uint8)
    counts = torch.zeros(len(histories), vocab, dtype=torch.int32)
    for row, (tokens, output) in enumerate(histories):
        seen[row, torch.tensor(tokens, dtype=torch.long)] = 1
        counts[row] = fused.token_counts(output, vocab).int()
    return seen, counts


class DecodeStep:
    """decode_layers bound to a model; build() returns None where the model does not qualify."""

    def __init__(self, model, lib, linears: list[list]):
        self.model, self.lib, self.linears = model, lib, linears
        self.attn = model.layers[0].self_attn   # (ModuleList indexing costs ~20 us a step, cold)
        cfg = model.config
        # the linears' own build: its ISA level packed their weights
        self.matmul = ctypes.cast(linears[0][0].lib.ggml_matmul, c_void_p).value
        self.dequantize = ctypes.cast(linears[0][0].lib.ggml_dequantize, c_void_p).value
        self.argmax = ctypes.cast(linears[0][0].lib.ggml_argmax, c_void_p).value
        self.attention = ctypes.cast(attention_native.paged_attention(), c_void_p).value
        # the same kernels run by every thread of one region for all the layers (fused.c's team_layers)
        team = (linears[0][0].lib.ggml_team_matmul, linears[0][0].lib.ggml_team_takes,
                attention_native.paged_attention().lib.paged_attention_team)
        self.team = [ctypes.cast(fn, c_void_p).value for fn in team]
        self.window = self.attn.options.get("window")   # the key of the step's attention arrays (layers pass their own)
        self.scale = cfg.attention_scale or cfg.head_dim ** -0.5
        dtype = model.norm.weight.dtype
        self.max_rows = min([MAX_ROWS] + [q.kernel_rows(dtype) for qs in linears for q in qs])
        self.chains = {}   # id(GGMLParts): the LinearArgs of its parts after the first (the structs point at them)
        head = model.lm_head.quantized
        # the LM head in the same call where it runs on the same kernels (a GGUF's; an HF model's stays dense)
        self.head = head if isinstance(head, ggml.GGMLLinear) and head.lib is linears[0][0].lib else None
        self.head_args = None if self.head is None else self.linear_args(self.head)
        self.layers, self.layers_key = None, None
        self.timings = None   # float64 [len(STEP_PARTS)]: where set, each step adds its parts' seconds there

    @classmethod
    def build(cls, model) -> DecodeStep | None:
        cfg, lib = model.config, fused.library()
        if cfg.ssm_layers:
            return None
        attn = model.layers[0].self_attn
        plain = (not cfg.sandwich_norms and cfg.hidden_act == "silu" and attn.fused_rope
                 and model.local_rotary is model.rotary and attention_native.fits(cfg.head_dim)
                 and getattr(attn.backend, "__name__", "") == "lanner.attention.cpu")
        if not plain or lib is None or ggml.kernels() is None or attention_native.paged_attention() is None:
            return None
        linears = [[m.quantized for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                          layer.mlp.down_proj)] for layer in model.layers]
        if not all(isinstance(q, (ggml.GGMLLinear, ggml.GGMLParts)) and q.lib is not None for qs in linears for q in qs):
            return None
        return cls(model, lib, linears)

    def fits(self, x: torch.Tensor, meta) -> bool:
        """A step this call runs exactly as the PyTorch path would."""
        return x.device.type == "cpu" and not torch.is_grad_enabled() and self.takes(x.shape[0], x.dtype)

    def takes(self, rows: int, dtype: torch.dtype) -> bool:
        attn = self.attn
        lora = attn.qkv_proj.lora   # set by the LoRA manager, which is built after the weights are packed
        adapted = lora is not None and lora.manager.batch
        return (1 <= rows <= (min(self.max_rows, ADAPTER_ROWS) if adapted else self.max_rows)
                and dtype in PLAIN_DTYPES and attn.k_cache.dtype in CACHE_KINDS
                and self.model.norm.weight.dtype == dtype and (not adapted or lora.manager.only_linear_adapters()))

    def bursts(self, rows: int) -> bool:
        """Whether burst() runs greedy decode steps of this many rows: the LM head and the embedding lookup are
        GGML kernels it can call (a GGUF model's) and nothing scales the embeddings."""
        model = self.model
        dtype = model.norm.weight.dtype
        return (self.head is not None and self.head.takes(rows, dtype) and model.embed_tokens.ggml is not None
                and model.config.embedding_scale is None and self.takes(rows, dtype))

    def __call__(self, x: torch.Tensor, cos_sin: torch.Tensor, meta) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final hidden states (after the model's last norm) for embeddings x [T, H], [T, H] in x's dtype, and
        every row's fp32 logits [T, V] as compute_logits gives them (None where the head is not ours to run, its
        kernel would not take this many rows, or the caller samples only some of them (meta.every_row_sampled): then
        the PyTorch path's head takes the rows it samples)."""
        x = x.contiguous()   # (the call writes its residual stream there)
        step, keep = self.step_args(x, cos_sin, meta)
        lora = self.model.lm_head.lora
        logits = None
        adapted = lora is not None and lora.manager.batch
        # the head where its logits are all used (a prompt chunk samples its last row: compute_logits takes that)
        if self.head is not None and meta.every_row_sampled and self.head.takes(x.shape[0], x.dtype) and not adapted:
            logits = torch.empty(x.shape[0], self.head.out_features)
            step.head, step.logits = self.head_args, logits.data_ptr()
        layers, residual, out = self.layer_structs(), torch.empty_like(x), torch.empty_like(x)
        ggml.check(self.lib.decode_layers(ctypes.byref(step), layers, len(layers), x.data_ptr(), residual.data_ptr(),
                                          out.data_ptr()), "decode step")
        return out, logits

    def burst(self, x: torch.Tensor, cos_sin: torch.Tensor, meta, positions: torch.Tensor, steps: int,
              stops: list[int], sampling: tuple[list[torch.Tensor], torch.Tensor] | None = None,
              keep_logits: list[int] = ()) -> tuple[list[list[int]], torch.Tensor | None]:
        """Up to `steps` decode steps of rows x [T, H] (embeddings of each sequence's last token, at positions),
        each row's token fed back as its next one, in one C call: the tokens of each step run, [T] per step, those
        the steps one by one would sample (a greedy batch's from ggml_argmax, which finds the exact head's argmax
        without computing all of it, recomputing its few candidates as a step computes them, on bf16 pairs where a
        step takes those; where the head runs on the AMX tiles or has a bias, the argmax of the logits a step takes:
        MATMUL_ARGMAX, on the tiles none written). Stops
        after a step where a row gave one of stops. The KV slots of every step must be allocated (meta's block tables
        hold them). sampling: where a row samples or has penalties, the rows'
        fused.sampling_arrays, uniform numbers [steps, T] and (with penalties) their fused.penalty_arrays and each
        row's (prompt + output tokens, output tokens); then every row's logits are computed, penalized as Sampler
        penalizes them, and each step's tokens drawn as fused.sample_rows draws them (a greedy row's: its argmax).
        keep_logits: rows (sampling given) whose logits of each step come back, before penalties, [steps run,
        len(keep_logits), V] (else None): what a step's logprobs are taken from."""
        x = x.contiguous()
        step, keep = self.step_args(x, cos_sin, meta)
        logits = torch.empty(x.shape[0], self.head.out_features)
        tokens = torch.empty(steps, x.shape[0], dtype=torch.int64)
        step.head, step.logits = self.head_args, logits.data_ptr()
        rows, dtype = x.shape[0], x.dtype
        if sampling is None and self.head.bias is None and not self.head.on_tiles(rows, dtype):
            # the int8 head's tokens, the exact one (its pairs' where a step takes them) recomputing the groups that
            # could win (on the tiles, the argmax of the logits a step there takes)
            step.argmax, step.head_norms = self.argmax, self.head.row_norms().data_ptr()
        embed = self.model.embed_tokens.ggml
        positions, stops = positions.to(torch.int64).contiguous(), torch.tensor(stops, dtype=torch.int64)
        burst = BurstArgs(self.dequantize, embed.type_id, embed.data.data_ptr(), embed.row_bytes,
                          self.model.rotary.in_dtype(x.dtype).data_ptr(), positions.data_ptr(), stops.data_ptr(),
                          stops.numel(), steps, tokens.data_ptr())
        if sampling is not None:
            (temps, top_k, top_p, min_p), uniforms, penalties = sampling
            uniforms = uniforms.to(torch.float32).contiguous()
            burst.temps, burst.top_p, burst.min_p = temps.data_ptr(), top_p.data_ptr(), min_p.data_ptr()
            burst.top_k, burst.uniforms = top_k.data_ptr(), uniforms.data_ptr()
            if penalties is not None:
                (rep, pres, freq), histories = penalties
                seen, counts = penalty_state(histories, self.head.out_features)
                burst.repetition, burst.presence, burst.frequency = rep.data_ptr(), pres.data_ptr(), freq.data_ptr()
                burst.seen, burst.counts = seen.data_ptr(), counts.data_ptr()
        kept = None
        if keep_logits:
            kept_at = torch.full((x.shape[0],), -1, dtype=torch.int32)
            kept_at[list(keep_logits)] = torch.arange(len(keep_logits), dtype=torch.int32)
            kept = torch.empty(steps, len(keep_logits), self.head.out_features)
            burst.keep, burst.num_kept, burst.kept = kept_at.data_ptr(), len(keep_logits), kept.data_ptr()
        layers, residual, out = self.layer_structs(), torch.empty_like(x), torch.empty_like(x)
        ran = self.lib.decode_burst(ctypes.byref(step), layers, len(layers), ctypes.byref(burst), x.data_ptr(),
                                    residual.data_ptr(), out.data_ptr())
        ggml.check(int(ran < 0), "decode burst")
        return tokens[:ran].tolist(), None if kept is None else kept[:ran]

    def step_args(self, x: torch.Tensor, cos_sin: torch.Tensor, meta) -> tuple[StepArgs, tuple]:
        """decode_layers' arguments for a step of rows x, and the tensors they point into (kept alive through the
        call by the caller)."""
        launch = self.launch(meta, self.window)   # the per-step arrays; each layer passes its own window
        cfg, attn = self.model.config, self.attn
        cos_sin, slots = cos_sin.contiguous(), meta.slot_mapping.to(torch.int64).contiguous()
        tree = launch.tree
        lora = attn.qkv_proj.lora
        row_slots = None if lora is None or not lora.manager.batch else self.row_slots(lora.manager.batch, x.shape[0])
        step = StepArgs(self.matmul, self.attention, torch.get_num_threads(), int(x.dtype == torch.bfloat16),
                        CACHE_KINDS[attn.k_cache.dtype], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.hidden_size, cfg.intermediate_size, attn.k_cache.shape[1], cfg.rms_norm_eps, self.scale,
                        cfg.attn_softcap or 0.0, x.shape[0], slots.data_ptr(), cos_sin.data_ptr(),
                        launch.tables.data_ptr(), launch.seq_lens.data_ptr(), launch.cu.data_ptr(),
                        launch.tables.shape[1], launch.seqs.numel(), 0 if tree is None else tree.shape[1],
                        launch.seqs.data_ptr(), None if tree is None else tree.data_ptr(),
                        self.model.norm.weight.data_ptr())
        step.row_slots = None if row_slots is None else row_slots.data_ptr()
        step.timings = None if self.timings is None else self.timings.data_ptr()
        step.team_matmul, step.team_takes, step.team_attention = self.team
        return step, (launch, cos_sin, slots, row_slots)

    @staticmethod
    def row_slots(batch: list, rows: int) -> torch.Tensor:
        """Each row's adapter slot (0: none), int32 [rows], from LoRAManager.batch's (slot, rows or None: all)."""
        slots = torch.zeros(rows, dtype=torch.int32)
        for slot, which in batch:
            if which is None:
                slots.fill_(slot)
            else:
                slots[which] = slot
        return slots

    @staticmethod
    def launch(meta, window: int | None) -> attention_native.Launch:
        """The attention kernel's per-step arguments for the sequences with new rows, as the CPU backend builds
        them (the same pieces, so the same summation order)."""
        key = ("decode", window)
        if key not in meta.derived:
            every_one_row = meta.max_seqlen_q == 1 and meta.slot_mapping.numel() == meta.num_seqs   # plain decode
            seqs = torch.arange(meta.num_seqs) if every_one_row else (meta.query_lens >= 1).nonzero().flatten()
            meta.derived[key] = attention_native.Launch(meta, seqs, window)
        return meta.derived[key]

    def layer_structs(self) -> ctypes.Array:
        """Per-layer pointers, built once the runner has set the KV caches (again if it replaced them, or once the
        LoRA manager has given the linears their adapter slots); weights and flags are fixed once pack_weights has
        built this step."""
        layers = self.model.layers
        key = (layers[0].self_attn.k_cache.data_ptr(), layers[0].self_attn.qkv_proj.lora is not None)
        if self.layers is None or self.layers_key != key:
            self.layers = (LayerArgs * len(layers))(*[self.layer(layer, qs) for layer, qs in zip(layers, self.linears)])
            self.layers_key = key
        return self.layers

    def layer(self, layer, linears) -> LayerArgs:
        attn, mlp = layer.self_attn, layer.mlp
        modules = (("self_attn.qkv_proj", attn.qkv_proj), ("self_attn.o_proj", attn.o_proj),
                   ("mlp.gate_up_proj", mlp.gate_up_proj), ("mlp.down_proj", mlp.down_proj))
        head_norms = (attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()) if attn.qk_norm else (None, None)
        return LayerArgs(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                         *[self.linear_args(q, self.lora_args(name, m.lora)) for q, (name, m) in zip(linears, modules)],
                         attn.k_cache.data_ptr(), attn.v_cache.data_ptr(), attn.options.get("window") or 0,
                         attention_native.MAX_PIECE_KEYS, *head_norms)

    def lora_args(self, fused_name: str, lora) -> LoRAArgs:
        """A linear's adapter slots as the C step reads them (none without adapters): its PEFT modules' output slices
        are the blocks of LoRA slots' block-diagonal layout (LoRAManager.write_lora)."""
        if lora is None:
            return LoRAArgs()
        slices = output_slices(self.model.config)
        starts = [slices[sub].start for sub in FUSED[fused_name]]
        scales = lora.scale_table
        return LoRAArgs(lora.a.data_ptr(), lora.b.data_ptr(), lora.ranks.data_ptr(), lora.a.shape[1],
                        len(starts), (c_int64 * 4)(*starts, *[lora.b.shape[1]] * (4 - len(starts))),
                        scales[0].data_ptr(), scales[1].data_ptr())

    def linear_args(self, q: ggml.GGMLLinear | ggml.GGMLParts, lora: LoRAArgs | None = None) -> LinearArgs:
        """q's arguments: its first part's, the parts after it chained by `next` (made once)."""
        first, *rest = q.parts
        if rest and id(q) not in self.chains:
            chain = []
            for p in reversed(rest):
                chain.append(self.part_args(q, p, None, ctypes.addressof(chain[-1]) if chain else None))
            self.chains[id(q)] = chain
        return self.part_args(q, first, lora, ctypes.addressof(self.chains[id(q)][-1]) if rest else None)

    @staticmethod
    def part_args(q, p: ggml.GGMLLinear, lora: LoRAArgs | None, next_part: int | None) -> LinearArgs:
        return LinearArgs(p.weight.type_id, p.flags, p.weight.data_ptr, p.packed_ptr(), p.weight.row_bytes,
                          q.out_features, q.in_features, None if p.bias is None else p.bias_fp32.data_ptr(),
                          lora or LoRAArgs(), p.out_features, next_part)
