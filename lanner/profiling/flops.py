"""FLOPs and bytes moved per component of one engine step: pure functions of the config and the shapes.

A step is B sequences at context C in one phase:
  prefill: each sequence computes its C prompt tokens (T = B * C rows), causal attention over them;
  decode:  each sequence has C tokens of KV cached and computes 1 new token (T = B rows, C + 1 keys).
Logits (LM head) and sampling are for one row per sequence in both phases.

Counting rules (a model of the minimum work, not of what a kernel happens to do):
  - a matmul [T, n] @ [n, m] is 2 T n m FLOPs and moves its weight once plus its input and output;
  - attention counts the two matmuls (Q K^T and P V) over the causal pairs only (softmax not counted),
    and moves Q, the K/V context (read once, as a flash kernel does) and the output;
  - elementwise ops count one FLOP per arithmetic op: fused residual-add + RMSNorm 5 per element
    (add, square, sum, scale, weight); rotary 3 per element of q and k; silu(gate) * up 5 per element;
  - every layer's two norms are counted as fused add + norm, and so is the final norm (2 L + 1 norms);
  - activations and weights move in the model dtype (`dtype_bytes`); the rotary cos/sin table is fp32;
  - KV write reads the new k, v and writes them into the cache; embedding reads T rows and writes them.
"""
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved (arithmetic intensity)."""
        return self.flops / self.bytes if self.bytes else 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)


def num_tokens(phase: str, batch: int, context: int) -> int:
    """Rows the model computes this step."""
    check_phase(phase)
    return batch * context if phase == "prefill" else batch


def check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def linear(rows: int, n_in: int, n_out: int, b: int, weight_b: float | None = None) -> Cost:
    """weight_b: bytes a weight takes (GGML blocks take fewer than the activations' b)."""
    weight_b = b if weight_b is None else weight_b
    return Cost(2.0 * rows * n_in * n_out, float(weight_b * n_in * n_out + b * (rows * n_in + rows * n_out)))


def attention_core(cfg: ModelConfig, phase: str, batch: int, context: int, b: int) -> Cost:
    """One layer: QK^T and PV over the causal (query, key) pairs of every sequence."""
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if phase == "prefill":
        pairs, q_rows, keys = context * (context + 1) // 2, context, context
    else:
        pairs, q_rows, keys = context + 1, 1, context + 1
    flops = 2 * 2 * hq * d * pairs
    moved = b * (2 * q_rows * hq * d + 2 * keys * hkv * d)   # q in, out; K and V read once
    return Cost(float(batch * flops), float(batch * moved))


def component_costs(cfg: ModelConfig, phase: str, batch: int, context: int, dtype_bytes: int = 2,
                    weight_bytes: dict[str, float] | None = None) -> dict[str, Cost]:
    """{component: Cost} of one step over all layers; names match the profiler's timed components.
    weight_bytes: bytes per weight of a linear component where it differs from dtype_bytes."""
    if not cfg.num_kv_layers:
        return ssm_component_costs(cfg, phase, batch, context, dtype_bytes, weight_bytes)
    t, b, L, A = num_tokens(phase, batch, context), dtype_bytes, cfg.num_layers, cfg.num_kv_layers
    wb = (weight_bytes or {}).get
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rotary_elems = t * (hq + hkv) * (cfg.rotary_dim or d)
    costs = {
        "embedding": Cost(0.0, float(2 * t * h * b)),
        "norms": Cost(5.0 * t * h, float(4 * t * h * b)) * (2 * L + 1),
        "qkv_proj": linear(t, h, (hq + 2 * hkv) * d, b, wb("qkv_proj")) * A,
        "rotary": Cost(3.0 * rotary_elems, float(2 * rotary_elems * b + t * d * 4)) * A,
        "kv_store": Cost(0.0, float(2 * 2 * t * hkv * d * b)) * A,
        "attention": attention_core(cfg, phase, batch, context, b) * A,
        "o_proj": linear(t, hq * d, h, b, wb("o_proj")) * A,
        "gate_up_proj": linear(t, h, 2 * i, b, wb("gate_up_proj")) * L,
        "mlp_act": Cost(5.0 * t * i, float(3 * t * i * b)) * L,
        "down_proj": linear(t, i, h, b, wb("down_proj")) * L,
        "lm_head": linear(batch, h, v, b, wb("lm_head")),
        "sampling": Cost(0.0, float(4 * batch * v)),
    }
    if cfg.ssm_layers:   # a hybrid: its SSM layers' mixers besides the attention layers'
        mixers = ssm_component_costs(cfg, phase, batch, context, dtype_bytes, weight_bytes)
        costs.update({name: cost for name, cost in mixers.items() if name.startswith("ssm_")})
    return costs


def ssm_component_costs(cfg: ModelConfig, phase: str, batch: int, context: int, dtype_bytes: int = 2,
                        weight_bytes: dict[str, float] | None = None) -> dict[str, Cost]:
    """A Mamba / Mamba-2 step: the projections stream their weights, the conv and scan read and write each
    sequence's state once (fp32) and touch every new token's channels; nothing depends on the context."""
    from lanner.model.mamba import state_shapes
    t, b, L, h, v = num_tokens(phase, batch, context), dtype_bytes, len(cfg.ssm_layers), cfg.hidden_size, cfg.vocab_size
    wb = (weight_bytes or {}).get
    (conv_ch, k1), ssm_shape = state_shapes(cfg)
    n, state = cfg.ssm.get("state_size", 16), torch.Size(ssm_shape).numel()
    mamba1 = cfg.architecture == "MambaForCausalLM"
    inner = ssm_shape[0] if mamba1 else ssm_shape[0] * ssm_shape[1]
    rank = cfg.ssm.get("time_step_rank", "auto")
    rank = -(-h // 16) if rank == "auto" else int(rank)
    in_out = 2 * inner if mamba1 else inner + conv_ch + ssm_shape[0]
    state_io = float(2 * batch * state * 4)
    costs = {
        "embedding": Cost(0.0, float(2 * t * h * b)),
        "norms": Cost(5.0 * t * h, float(4 * t * h * b)) * (L + 1),
        "ssm_in_proj": linear(t, h, in_out, b, wb("ssm_in_proj")) * L,
        "ssm_conv": Cost(2.0 * t * conv_ch * (k1 + 1), float(2 * t * conv_ch * b + 2 * batch * conv_ch * k1 * 4)) * L,
        "ssm_scan": Cost(6.0 * t * state, state_io + float(4 * t * inner * 4)) * L,
        "ssm_out_proj": linear(t, inner, h, b, wb("ssm_out_proj")) * L,
        "lm_head": linear(batch, h, v, b, wb("lm_head")),
        "sampling": Cost(0.0, float(4 * batch * v)),
    }
    if mamba1:
        costs["ssm_dt_bc_proj"] = (linear(t, inner, rank + 2 * n, b) + linear(t, rank, inner, b)) * L
    return costs


def step_cost(cfg: ModelConfig, phase: str, batch: int, context: int, dtype_bytes: int = 2) -> Cost:
    total = Cost(0.0, 0.0)
    for cost in component_costs(cfg, phase, batch, context, dtype_bytes).values():
        total = total + cost
    return total
