"""Our Llama decoder as a plain causal LM over padded [B, L] batches, with trainable PEFT-style LoRA.

Serving runs the decoder on the paged KV cache; training reuses the same modules and weights through
`causal_forward`, which walks embed_tokens / layers / norm / lm_head with SDPA (is_causal). Batches are
right-padded, so a real token never attends to a pad token under the causal mask; pad rows are never
in the loss. Each fused linear (qkv_proj = [q; k; v], gate_up_proj = [gate; up]) is wrapped in a
LoRALinear holding one (A, B) pair per targeted PEFT module, added to that module's slice of the output:
    y_part = x @ W_part^T + dropout(x) @ A^T @ B^T * scaling,   scaling = alpha / r  (rsLoRA: alpha / sqrt(r))
exactly PEFT's LoRA layer. With `nf4`, the frozen base weights are held in NF4 and dequantized on the fly.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from lanner.config import ModelConfig
from lanner.lora.adapter import ALL_LINEAR, FUSED, lora_scaling, submodule_sizes
from lanner.model.layers import Linear
from lanner.model.llama import LlamaForCausalLM


def parse_targets(spec: str | list[str]) -> list[str]:
    """PEFT module names from "all-linear", "q_proj,v_proj" or a list, in ALL_LINEAR order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return list(ALL_LINEAR)
    unknown = [n for n in names if n not in ALL_LINEAR]
    if unknown or not names:
        raise ValueError(f"unknown target modules {unknown}; choose from {list(ALL_LINEAR)} or all-linear")
    return [n for n in ALL_LINEAR if n in names]


class LoRALinear(nn.Module):
    """A frozen base linear (fp or NF4) plus trainable LoRA on some of the PEFT modules fused in it."""

    def __init__(self, base: Linear, names: tuple[str, ...], sizes: list[int], targets: set[str], r: int,
                 scaling: float, dropout: float, nf4: bool):
        super().__init__()
        self.base, self.names, self.sizes, self.r, self.scaling = base, names, sizes, r, scaling
        self.nf4 = None
        if nf4:
            from lanner.quant.nf4 import NF4Linear
            self.nf4 = NF4Linear(base.weight.detach(), base.bias)
            base.weight.data = torch.empty(0, dtype=base.weight.dtype)   # the NF4 copy is the base now
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, d_out in zip(names, sizes):
            if name in targets:
                self.lora_A[name] = nn.Parameter(torch.empty(r, base.in_features))
                self.lora_B[name] = nn.Parameter(torch.zeros(d_out, r))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init_lora_weights=True: A as nn.Linear initializes its weight, B = 0 (so the delta is 0)."""
        for name in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nf4 is not None:
            return self.nf4(x)
        return F.linear(x, self.base.weight, self.base.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """All targeted parts at once: [dropout(x) @ A_i^T]_i @ B^T * scaling, B block-diagonal over the
        output slices (zero rows where a part is not targeted); the same sum as one delta per slice."""
        names = list(self.lora_A)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            h = x @ torch.cat([self.lora_A[n] for n in names]).to(x.dtype).T
        else:   # PEFT draws one dropout mask per LoRA module
            h = torch.cat([self.dropout(x) @ self.lora_A[n].to(x.dtype).T for n in names], dim=-1)
        r, k = self.r, len(names)
        rows = [F.pad(self.lora_B[n], (names.index(n) * r, (k - names.index(n) - 1) * r)) if n in self.lora_B
                else h.new_zeros(d_out, k * r, dtype=torch.float32) for n, d_out in zip(self.names, self.sizes)]
        b = torch.cat(rows) if len(rows) > 1 else rows[0]
        return h @ (b * self.scaling).to(x.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        return y + self.delta(x) if len(self.lora_A) else y


class LoRAModel(nn.Module):
    """The decoder (frozen) with LoRALinear wrappers on every decoder linear; only A and B train."""

    def __init__(self, model: LlamaForCausalLM, targets: str | list[str], r: int, alpha: float,
                 use_rslora: bool = False, dropout: float = 0.0, nf4: bool = False):
        super().__init__()
        targets = set(parse_targets(targets))
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.model, self.cfg = model, model.config
        model.requires_grad_(False)
        sizes = submodule_sizes(model.config)
        self.linears = nn.ModuleList()   # [layer][fused linear], in FUSED order
        for layer in model.layers:
            for path, names in FUSED.items():
                base = layer.get_submodule(path)
                self.linears.append(LoRALinear(base, names, [sizes[n][1] for n in names], targets, r,
                                               lora_scaling(r, alpha, use_rslora), dropout, nf4))

    def linear(self, layer: int, path: str) -> LoRALinear:
        return self.linears[layer * len(FUSED) + list(FUSED).index(path)]

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, L, H] of a right-padded batch, causal attention."""
        cfg = self.cfg
        b, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary.table(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            q, k, v = self.linear(i, "self_attn.qkv_proj")(h).split(
                [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim], -1)
            q = q.view(b, length, cfg.num_heads, cfg.head_dim)
            k = k.view(b, length, cfg.num_kv_heads, cfg.head_dim)
            q, k = layer.self_attn.rotary(rope, q, k)
            v = v.view(b, length, cfg.num_kv_heads, cfg.head_dim)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
            x = x + self.linear(i, "self_attn.o_proj")(attn.transpose(1, 2).reshape(b, length, -1))
            h = layer.post_attention_layernorm(x)
            gate, up = self.linear(i, "mlp.gate_up_proj")(h).chunk(2, dim=-1)
            x = x + self.linear(i, "mlp.down_proj")(F.silu(gate) * up)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.model.lm_head.weight).float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(input_ids))

    def loss(self, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy of the tokens where loss_mask is set, their count); the LM head runs on them only."""
        target_mask = loss_mask[:, 1:]
        hidden = self.hidden(input_ids)[:, :-1][target_mask]
        targets = input_ids[:, 1:][target_mask]
        return F.cross_entropy(self.logits(hidden), targets, reduction="sum"), int(targets.numel())

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for lin in self.linears for d in (lin.lora_A, lin.lora_B) for p in d.values()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.lora_parameters())

    def peft_modules(self):
        """(PEFT module name prefix, its LoRALinear, its PEFT module name) for every trained matrix pair."""
        for i in range(self.cfg.num_layers):
            for path in FUSED:
                lin = self.linear(i, path)
                for name in lin.lora_A:
                    yield f"base_model.model.model.layers.{i}.{path.split('.')[0]}.{name}", lin, name

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """A and B under PEFT's key names (fp32, contiguous)."""
        out = {}
        for prefix, lin, name in self.peft_modules():
            out[f"{prefix}.lora_A.weight"] = lin.lora_A[name].detach().float().contiguous().clone()
            out[f"{prefix}.lora_B.weight"] = lin.lora_B[name].detach().float().contiguous().clone()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of peft_state_dict (e.g. to run a saved adapter through this forward)."""
        own = {f"{prefix}.lora_{m}.weight" for prefix, _, _ in self.peft_modules() for m in "AB"}
        if set(state) != own:
            raise ValueError(f"adapter keys differ from this model's LoRA targets: {sorted(set(state) ^ own)[:4]}")
        for prefix, lin, name in self.peft_modules():
            lin.lora_A[name].data.copy_(state[f"{prefix}.lora_A.weight"])
            lin.lora_B[name].data.copy_(state[f"{prefix}.lora_B.weight"])

    def lora_snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.lora_parameters()]

    def restore_lora(self, snapshot: list[torch.Tensor]) -> None:
        for p, saved in zip(self.lora_parameters(), snapshot):
            p.data.copy_(saved)


# ModelConfig fields whose values the training forward (Llama's math) handles: name -> the plain value
TRAINABLE_AS_LLAMA = {
    "hidden_act": lambda c: "silu", "rotary_dim": lambda c: c.head_dim, "qk_norm": lambda c: False,
    "sandwich_norms": lambda c: False, "embedding_scale": lambda c: None, "attention_scale": lambda c: None,
    "attn_softcap": lambda c: None, "final_softcap": lambda c: None, "mlp_bias": lambda c: False,
    "local_rope_theta": lambda c: None,
}


def build_model(hf_config: dict, weights: dict[str, torch.Tensor], max_positions: int) -> LlamaForCausalLM:
    """Our decoder with HF-named weights loaded, fp32, for training (no KV cache, no attention backend)."""
    cfg = ModelConfig.from_hf(hf_config)
    departures = [name for name, plain in TRAINABLE_AS_LLAMA.items() if getattr(cfg, name) != plain(cfg)]
    if any(w is not None and w < max_positions for w in cfg.layer_windows):   # longer examples than the window
        departures.append("layer_windows")
    if departures:
        raise ValueError(f"fine-tuning {cfg.architecture} is not supported: the training forward is Llama's "
                         f"and this model differs in {', '.join(departures)}")
    model = LlamaForCausalLM(cfg, backend=None, max_positions=max_positions)
    model.load_hf_weights(weights)
    return model.float()
