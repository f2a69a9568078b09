"""The decoder of the Llama family and its relatives (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, SmolLM) on the
paged KV cache, and hybrids whose SSM layers (Bamba's Mamba-2 mixers) sit between attention layers."""
import re

import torch
from torch import nn

from lanner.attention import AttentionMetadata
from lanner.config import ModelConfig
from lanner.model import fused
from lanner.model.decode_step import MAX_ROWS, DecodeStep
from lanner.model.layers import Embedding, Linear, RMSNorm, RotaryEmbedding
from lanner.quant import head_format
from lanner.quant.ggml import GGMLRows, GGMLTensor


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend, window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias, device="meta")
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias, device="meta")
        self.qk_norm = cfg.qk_norm   # a flag, not hasattr: a missing module attribute raises, every layer every step
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.rotary, self.backend = rotary, backend
        self.fused_rope = rotary.dim == cfg.head_dim   # fused.rope_store rotates whole heads
        # what departs from plain causal attention, passed to the backend only when set
        options = dict(scale=cfg.attention_scale, window=window, softcap=cfg.attn_softcap)
        self.options = {k: v for k, v in options.items() if v is not None}
        self.k_cache = self.v_cache = None   # [num_blocks, block_size, Hkv, D], set by the runner
        self.adaption = None                 # lanner.lora.adaption.AdaptionSlots when adapters are enabled

    def forward(self, x: torch.Tensor, rope: torch.Tensor, meta: AttentionMetadata, last: bool = False) -> torch.Tensor:
        """last: the model's last layer, which returns meta.output_rows' rows alone (o_proj on them only)"""
        qkv = self.qkv_proj(x)
        if self.qk_norm:
            self.norm_heads(qkv)
        if self.fused_rope and fused.rope_store(qkv, rope, self.k_cache, self.v_cache, meta.slot_mapping,
                                                self.num_heads, self.num_kv_heads):
            q = qkv.view(qkv.shape[0], -1, self.head_dim)[:, :self.num_heads]
        else:
            qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            qk, = self.rotary(rope, qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim))  # q, k at once
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            self.backend.store_kv(k, v.view_as(k), self.k_cache, self.v_cache, meta.slot_mapping)
        out = self.backend.attention(q, self.k_cache, self.v_cache, meta, **self.options).flatten(1)
        if self.adaption is not None and self.adaption.by_slot:
            out = self.adaption.with_adaption(q, out)
        # (the attention of every row, as a whole step runs it: the kernel picks its path, and so the order of its
        # sums, by a sequence's number of rows)
        return self.o_proj(out[meta.output_rows] if last else out)

    def norm_heads(self, qkv: torch.Tensor) -> None:
        """RMSNorm of every q and k head, in place in qkv (Qwen3, Gemma 3: before rotary)."""
        for norm, cols in ((self.q_norm, slice(0, self.q_size)), (self.k_norm, slice(self.q_size, self.q_size + self.kv_size))):
            heads = qkv[:, cols].reshape(-1, self.head_dim)
            qkv[:, cols] = norm(heads).view(qkv.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, device="meta")
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, device="meta")
        self.silu = cfg.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(x))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up (GeGLU's gelu): from the gate_up call itself where its kernel gives it, else after it"""
        act = self.gate_up_proj.silu_mul(x) if self.silu else None
        if act is not None:
            return act
        gate_up = self.gate_up_proj(x)
        act = fused.silu_mul(gate_up) if self.silu else None
        if act is not None:
            return act
        gate, up = gate_up.chunk(2, dim=-1)
        return (nn.functional.silu(gate) if self.silu else nn.functional.gelu(gate, approximate="tanh")) * up


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks. With sandwich norms (Gemma 2/3) the blocks' outputs are normed
    too: HF names that one post_attention_layernorm and the MLP's input norm pre_feedforward_layernorm,
    where Llama's post_attention_layernorm is the MLP's input norm. In a hybrid's SSM layers (Bamba) a Mamba-2
    mixer, reading and writing the sequences' state slots, takes attention's place."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend, window: int | None, ssm: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary
        if ssm:
            from lanner.model.ssm import Mamba2Mixer
            self.mamba = Mamba2Mixer(cfg.ssm)
        else:
            self.self_attn, self.mamba = Attention(cfg, rotary, backend, window), None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, rope, meta, last: bool = False):
        """last: the model's last layer, an attention one: past its attention, meta.output_rows' rows alone"""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, meta, last) if self.mamba is None else self.mamba(x, meta.ssm)
        if last:
            residual = residual[meta.output_rows]
        sandwich = self.sandwich
        if sandwich:
            x = self.post_attention_layernorm(x)
        x, residual = (self.pre_feedforward_layernorm if sandwich else self.post_attention_layernorm)(x, residual)
        x = self.mlp(x)
        return (self.post_feedforward_layernorm(x) if sandwich else x), residual


class LlamaForCausalLM(nn.Module):
    """The decoder of every supported architecture (ModelConfig says how each departs from Llama)."""

    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.rotary_dim or cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                 cfg.max_position_embeddings)
        local = rotary if cfg.local_rope_theta is None else RotaryEmbedding(
            cfg.rotary_dim or cfg.head_dim, max_positions, cfg.local_rope_theta, None, cfg.max_position_embeddings)
        # linears and the embedding start on the meta device: load_hf_weights puts the checkpoint's tensors
        # (or GGML blocks) in their place, so no dense copy is allocated or initialized for nothing
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, device="meta")
        self.rotary, self.local_rotary = rotary, local   # tables shared by every layer's attention
        windows = cfg.layer_windows or (None,) * cfg.num_layers
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary if w is None else local, backend, w, i in cfg.ssm_layers)
                                    for i, w in enumerate(windows))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        self.decode_step = None   # every layer of a few-row step in one C call, where the model qualifies
        self.step_logits = None   # (hidden, logits) of every row, where that call ran the LM head too

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states of every row, or of meta.output_rows' rows alone where set. embeds: (rows, values) that
        replace those rows' token embeddings (a prompt adapter's virtual tokens; the embedding scale applies to them
        too, as HF applies it to inputs_embeds)."""
        x, residual = self.embed_tokens(input_ids), None
        if embeds is not None:
            x = x.index_copy(0, embeds[0], embeds[1].to(x.dtype))
        if self.config.embedding_scale is not None:   # as HF: the factor rounded to the activations' dtype
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        tables = {rotary: rotary.table(positions, x.dtype) for rotary in {self.rotary, self.local_rotary}}
        # a plain attribute set past nn.Module.__setattr__'s checks: they cost ~15 us a decode step, twice
        object.__setattr__(self, "step_logits", None)
        rows = meta.output_rows
        if self.decode_step is not None and self.decode_step.fits(x, meta):
            hidden, logits = self.decode_step(x, tables[self.rotary], meta)
            object.__setattr__(self, "step_logits", None if logits is None else (hidden, logits))
            return hidden if rows is None else hidden[rows]
        # the last layer on those rows alone in steps no one-call step takes: that call computes every row, and a
        # kernel's sums may run in another order at another row count, where both paths must give the same bits
        trim = rows is not None and x.shape[0] > MAX_ROWS
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, tables[layer.rotary], meta, trim and i == len(self.layers) - 1)
        hidden = self.norm(x, residual)[0]
        return hidden if rows is None or trim else hidden[rows]

    @property
    def trims_rows(self) -> bool:
        """Whether forward takes meta.output_rows (its last layer an attention one: an SSM layer's state update reads
        every row)."""
        return self.layers[-1].mamba is None

    def bursts(self, rows: int) -> bool:
        """Whether decode_burst takes a batch of this many rows."""
        return self.decode_step is not None and self.decode_step.bursts(rows)

    def decode_burst(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, steps: int,
                     stops: list[int], sampling=None, keep_logits: list[int] = ()):
        """Up to `steps` decode steps from each sequence's last token (one row each) in one call: the tokens
        of each step, and the kept rows' logits (DecodeStep.burst)."""
        x = self.embed_tokens(input_ids)
        return self.decode_step.burst(x, self.rotary.table(positions, x.dtype), meta, positions, steps, stops,
                                      sampling, keep_logits)

    @property
    def mixers(self) -> list[nn.Module]:
        """The SSM layers' mixers (a hybrid's), whose state the engine's state slots hold."""
        return [layer.mamba for layer in self.layers if layer.mamba is not None]

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers if layer.mamba is None]

    def pack_weights(self, quantization: str = "none", dense_gemm: bool | None = None) -> None:
        """Inference layouts for every linear. An HF model's LM head is not quantized at load (it is the
        most sensitive linear; head_format); a GGUF model's keeps the format its file gives it, as llama.cpp's does."""
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                head = name == "lm_head"
                module.pack(head_format(quantization) if head else quantization, dense_gemm, int8=not head)
        self.decode_step = DecodeStep.build(self)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        ready = self.step_logits   # those the decode step computed with these very hidden states
        logits = ready[1] if ready is not None and ready[0] is hidden else self.lm_head(hidden).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_hf_weights(self, weights: dict) -> None:
        """Put HF-named weights (tensors or GGMLTensors) in, fusing q/k/v and gate/up; refuse missing or
        misshapen tensors."""
        params, modules = dict(self.named_parameters()), dict(self.named_modules())
        if self.config.architecture == "BambaForCausalLM":
            weights = {re.sub(BAMBA_RENAMES_PATTERN, lambda m: BAMBA_RENAMES[m.group(0)], k): v
                       for k, v in weights.items()}
        for name, tensor in fuse_hf_weights(weights, self.config.num_layers).items():
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in params:
                if "rotary_emb." in name:   # inv_freq buffers some checkpoints carry
                    continue
                raise ValueError(f"checkpoint weight {name!r} has no place in a {self.config.architecture}")
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params.pop(name).shape)}")
            if name.endswith("norm.weight") and self.config.norm_offset:   # Gemma scales by 1 + weight
                tensor = tensor + self.config.norm_offset
            module_name, attr = name.rsplit(".", 1)
            place(modules[module_name], attr, tensor)
            params.pop(name)
        if self.config.tie_word_embeddings:
            self.lm_head.weight, self.lm_head.ggml = self.embed_tokens.weight, self.embed_tokens.ggml
            params.pop("lm_head.weight", None)
        if params:
            missing = list(params)
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


BAMBA_RENAMES = {".feed_forward.": ".mlp.", ".pre_ff_layernorm.": ".post_attention_layernorm.",
                 "model.final_layernorm.": "model.norm."}
BAMBA_RENAMES_PATTERN = "|".join(re.escape(k) for k in BAMBA_RENAMES)


def place(module: nn.Module, attr: str, tensor) -> None:
    """A loaded tensor in module.attr: GGML blocks beside a meta placeholder, dense ones as the parameter."""
    param = getattr(module, attr)
    if isinstance(tensor, (GGMLTensor, GGMLRows)):
        module.ggml = tensor
    elif param.device.type == "meta":
        setattr(module, attr, nn.Parameter(tensor.detach().to(param.dtype), requires_grad=False))
    else:
        param.data.copy_(tensor)


def concat(parts: list):
    """Row-wise concatenation of a fused weight's parts: GGML blocks stay blocks, in a format that holds them all or
    as parts in their own (GGMLTensor.cat)."""
    if all(isinstance(p, GGMLTensor) for p in parts):
        return GGMLTensor.cat(parts)
    return torch.cat([p.dequantize() if isinstance(p, GGMLTensor) else p for p in parts])


def fuse_hf_weights(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    fused = {k: v for k, v in weights.items() if ".q_proj." not in k and ".k_proj." not in k
             and ".v_proj." not in k and ".gate_proj." not in k and ".up_proj." not in k}
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for kind in ("weight", "bias"):
            parts = [weights.get(f"{attn}.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                fused[f"{attn}.qkv_proj.{kind}"] = concat(parts)
        for kind in ("weight", "bias"):
            gate, up = weights.get(f"{mlp}.gate_proj.{kind}"), weights.get(f"{mlp}.up_proj.{kind}")
            if gate is not None and up is not None:
                fused[f"{mlp}.gate_up_proj.{kind}"] = concat([gate, up])
    return fused
