"""PEFT's ADAPTION_PROMPT (LLaMA-Adapter): learned prompts in the top layers that every query also attends to, in
a softmax of their own, scaled by a gate (zero at init) and added to the layer's attention output before o_proj.
The prompts' keys and values are the layer's own k/v projections of them, without rotary (PEFT's AdaptedAttention);
they are projected once, when the adapter takes a slot, and applied to its rows of each step."""
import math
import re
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig
from lanner.lora.adapter import LoRARequest

KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")   # the model types PEFT adapts


@dataclass(eq=False)
class AdaptionPromptAdapter:
    """A validated adapter: per adapted layer its prompt [adapter_len, hidden] and gate [1] (fp32)."""
    name: str
    id: int
    prompts: dict[int, tuple[torch.Tensor, torch.Tensor]]


def load_adaption_prompt(request: LoRARequest, config: dict, tensors: dict[str, torch.Tensor],
                         cfg: ModelConfig) -> AdaptionPromptAdapter:
    where = f"adaption-prompt adapter {request.lora_path}"
    if cfg.architecture not in ARCHITECTURES or cfg.qk_norm or cfg.o_proj_bias:
        raise ValueError(f"{where}: LLaMA-Adapter is defined (by PEFT) for Llama and Mistral models with no o_proj "
                         f"bias, not for this {cfg.architecture}")
    if config.get("target_modules", "self_attn") != "self_attn":
        raise ValueError(f"{where}: target_modules={config['target_modules']!r}; only 'self_attn' exists here")
    length, num_layers = config.get("adapter_len"), config.get("adapter_layers")
    for name, value in (("adapter_len", length), ("adapter_layers", num_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    if num_layers > cfg.num_layers:
        raise ValueError(f"{where}: adapter_layers={num_layers}, but the base model has {cfg.num_layers} layers "
                         f"(wrong base model?)")
    parts = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if not match:
            raise ValueError(f"{where}: tensor {key!r} is not an adaption prompt or gate")
        parts[(int(match.group(1)), match.group(2))] = tensor
    top = range(cfg.num_layers - num_layers, cfg.num_layers)   # PEFT adapts the top adapter_layers layers
    prompts = {layer: (validated_part(parts, layer, "prompt", (1, length, cfg.hidden_size), where)[0],
                       validated_part(parts, layer, "gate", (1,), where)) for layer in top}
    if len(parts) != 2 * num_layers:
        extra = sorted({layer for layer, _ in parts} - set(top))
        raise ValueError(f"{where}: tensors for layers {extra}, outside the top {num_layers} it adapts")
    return AdaptionPromptAdapter(request.lora_name, request.lora_int_id, prompts)


def validated_part(parts: dict, layer: int, kind: str, shape: tuple, where: str) -> torch.Tensor:
    tensor = parts.get((layer, kind))
    if tensor is None:
        raise ValueError(f"{where}: no adaption_{kind} for layer {layer}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{where}: layers.{layer}.self_attn.adaption_{kind} has shape {tuple(tensor.shape)}, "
                         f"expected {shape} (wrong base model?)")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where}: layers.{layer}.self_attn.adaption_{kind} holds NaN or infinite values")
    return tensor.float()


def prompt_keys_values(qkv: torch.Tensor, num_heads: int, num_kv_heads: int,
                       head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [heads, L, D] of a prompt from its fused projection qkv [L, (Hq + 2 Hkv) * D] (no rotary;
    the key/value heads repeated over their query groups, as PEFT's repeat_interleave)."""
    k, v = qkv[:, num_heads * head_dim:].view(qkv.shape[0], 2, num_kv_heads, head_dim).unbind(1)
    return tuple(t.repeat_interleave(num_heads // num_kv_heads, dim=1).transpose(0, 1) for t in (k, v))


def adaption_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Queries q [T, H, D] (after rotary) over a prompt's keys and values [H, L, D]: gate * softmax(q k^T / sqrt(D))
    (the softmax in fp32, as PEFT) times v, as [T, H * D] in q's dtype."""
    scores = torch.einsum("thd,hld->thl", q, k.to(q.dtype)) / math.sqrt(q.shape[-1])
    weights = gate.to(q.dtype) * torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("thl,hld->thd", weights, v.to(q.dtype)).flatten(1)


class AdaptionSlots:
    """One attention layer's adaption prompts by adapter slot: keys, values [H, L, D] and gate."""

    def __init__(self, manager, attention):
        self.manager, self.attention = manager, attention
        self.by_slot: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def write(self, slot: int, prompt: torch.Tensor, gate: torch.Tensor) -> None:
        """The prompt projected by this layer's k/v weights (base weights: no adapter is active on them)."""
        attn = self.attention
        with torch.no_grad():
            qkv = attn.qkv_proj.base_forward(prompt.to(attn.qkv_proj.weight.dtype))
        k, v = prompt_keys_values(qkv, attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.by_slot[slot] = (k.contiguous(), v.contiguous(), gate)

    def with_adaption(self, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [T, H * D], the attention output, plus each adapted slot's share for its rows."""
        for slot, rows in self.manager.batch or ():
            if slot in self.by_slot:
                if rows is None:
                    out = out + adaption_attention(q, *self.by_slot[slot])
                else:
                    out = out.index_add(0, rows, adaption_attention(q[rows], *self.by_slot[slot]))
        return out
