"""How a decoder splits over tensor-parallel ranks (Megatron-style) and each rank's slice of the checkpoint.

Column-parallel: q/k/v by heads and gate/up by FFN columns (their weights' rows, so GGML blocks stay whole).
Row-parallel: o and down by the same heads / columns (their weights' columns: a cut must fall between blocks,
else that shard is dequantized). Vocabulary-parallel: embedding and LM-head rows. Everything else is replicated.
Splits need not be even (SmolLM2's 3 key/value heads go 2 + 1): ranks take whole key/value groups, or, with
fewer key/value heads than ranks, each key/value head is replicated on size / num_kv_heads ranks that share
its query heads."""
import dataclasses
import logging
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig
from lanner.quant.ggml import GGMLTensor

log = logging.getLogger("lanner.distributed")
FFN_UNIT = 32   # FFN columns per rank in multiples of this: whole int8-activation and q8_0..q5_1 blocks


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds, as ranges of the full model's heads, FFN columns and vocabulary rows."""
    rank: int
    size: int
    q_heads: range
    kv_heads: range
    ffn: range
    vocab: range

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The shape of this rank's decoder: its heads, FFN columns and vocabulary rows."""
        return dataclasses.replace(cfg, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=len(self.ffn), vocab_size=len(self.vocab))

    def fused_rows(self, cfg: ModelConfig) -> dict[str, list[range]]:
        """The full fused weights' rows this rank holds (column-parallel: qkv, gate_up) and the inputs it reads
        (row-parallel: o, down), in the local order."""
        d, q, kv, ffn = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, self.ffn
        q_rows, kv_rows = scaled(self.q_heads, d), scaled(self.kv_heads, d)
        return {"self_attn.qkv_proj": [q_rows, shifted(kv_rows, q), shifted(kv_rows, q + kv)],
                "mlp.gate_up_proj": [ffn, shifted(ffn, cfg.intermediate_size)],
                "self_attn.o_proj": [q_rows], "mlp.down_proj": [ffn]}


def scaled(r: range, factor: int) -> range:
    return range(r.start * factor, r.stop * factor)


def shifted(r: range, offset: int) -> range:
    return range(r.start + offset, r.stop + offset)


def split(total: int, parts: int, unit: int = 1) -> list[range]:
    """total items in `parts` contiguous ranges of whole units; the first ranges take the remainder (rank 0
    holds the most key/value heads: its pool's size is everyone's)."""
    units = total // unit
    bounds = [-(-units * r // parts) * unit for r in range(parts)] + [total]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def check_splittable(cfg: ModelConfig, size: int) -> None:
    """ValueError, naming the reason, when the model cannot be split over `size` ranks."""
    if cfg.ssm:
        raise ValueError(f"tensor parallelism splits attention heads and MLPs, not the SSM layers a "
                         f"{cfg.architecture} has; run it with tensor_parallel_size=1")
    if cfg.num_heads < size:
        raise ValueError(f"tensor_parallel_size={size} exceeds the model's {cfg.num_heads} attention heads "
                         f"(each rank needs at least one)")
    if cfg.num_kv_heads < size and size % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={size} with {cfg.num_kv_heads} key/value heads: with fewer "
                         f"key/value heads than ranks, the ranks must be a multiple of them (each is replicated "
                         f"on tensor_parallel_size / num_kv_heads ranks)")
    if cfg.intermediate_size < size:
        raise ValueError(f"tensor_parallel_size={size} exceeds the model's {cfg.intermediate_size} FFN columns")


def head_ranges(cfg: ModelConfig, size: int) -> list[tuple[range, range]]:
    """(query heads, key/value heads) of each rank: whole GQA groups, or parts of one group per rank when there
    are fewer key/value heads than ranks."""
    group = cfg.num_heads // cfg.num_kv_heads
    if cfg.num_kv_heads >= size:
        return [(scaled(kv, group), kv) for kv in split(cfg.num_kv_heads, size)]
    copies = size // cfg.num_kv_heads
    parts = split(group, copies)
    return [(shifted(parts[r % copies], r // copies * group), range(r // copies, r // copies + 1))
            for r in range(size)]


def ffn_unit(cfg: ModelConfig, size: int, weights: dict) -> int:
    """FFN columns go to ranks in whole blocks of the down projection's widest GGML format (Q4_K: 256), so its
    row-parallel split keeps the blocks, where every rank then gets some; else in the finest unit that does."""
    blocks = [t.block for name, t in weights.items() if name.endswith("down_proj.weight") and isinstance(t, GGMLTensor)]
    units = sorted(set(blocks + [FFN_UNIT]), reverse=True) + [1]
    return next(u for u in units if cfg.intermediate_size % u == 0 and cfg.intermediate_size // u >= size)


def plan_shards(cfg: ModelConfig, size: int, weights: dict) -> list[ShardPlan]:
    check_splittable(cfg, size)
    ffn, vocab = split(cfg.intermediate_size, size, ffn_unit(cfg, size, weights)), split(cfg.vocab_size, size)
    return [ShardPlan(r, size, q, kv, ffn[r], vocab[r]) for r, (q, kv) in enumerate(head_ranges(cfg, size))]


# ---- the checkpoint's slices ------------------------------------------------------------------------
def shard_weights(weights: dict, plan: ShardPlan, cfg: ModelConfig) -> dict:
    """This rank's HF-named weights (tensors or GGMLTensors), shaped for plan.local_config(cfg)."""
    return {name: shard_tensor(name, tensor, plan, cfg) for name, tensor in weights.items()}


ROW_PARALLEL = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}


def shard_tensor(name: str, t, plan: ShardPlan, cfg: ModelConfig):
    *_, module, kind = name.split(".")
    if module in ROW_PARALLEL:
        if kind == "bias":   # added once, by rank 0, before the all-reduce
            return t if plan.rank == 0 else torch.zeros_like(t)
        return take_columns(name, t, plan.fused_rows(cfg)[ROW_PARALLEL[module]][0])
    rows = held_rows(plan, cfg).get(module)
    return t if rows is None else take_rows(t, rows)


def held_rows(plan: ShardPlan, cfg: ModelConfig) -> dict[str, list[range]]:
    """Rows this rank holds of each column-parallel or vocabulary-parallel checkpoint tensor (Phi-3 stores
    qkv_proj and gate_up_proj fused)."""
    heads, kv_heads = scaled(plan.q_heads, cfg.head_dim), scaled(plan.kv_heads, cfg.head_dim)
    fused = plan.fused_rows(cfg)
    return {"q_proj": [heads], "k_proj": [kv_heads], "v_proj": [kv_heads], "gate_proj": [plan.ffn],
            "up_proj": [plan.ffn], "qkv_proj": fused["self_attn.qkv_proj"], "gate_up_proj": fused["mlp.gate_up_proj"],
            "embed_tokens": [plan.vocab], "lm_head": [plan.vocab]}


def take_rows(t, ranges: list[range]):
    """Rows of a weight or bias (GGML blocks never straddle rows)."""
    if isinstance(t, GGMLTensor):
        data = torch.cat([t.data[r.start:r.stop] for r in ranges])
        return GGMLTensor(t.type_name, (data.shape[0], t.shape[1]), data)
    return torch.cat([t[r.start:r.stop] for r in ranges]).contiguous()


def take_columns(name: str, t, cols: range):
    """Columns of a row-parallel weight: whole blocks of a GGML one, or its slice dequantized (logged)."""
    if not isinstance(t, GGMLTensor):
        return t[:, cols.start:cols.stop].contiguous()
    if cols.start % t.block == 0 and cols.stop % t.block == 0:
        a, b = cols.start // t.block * t.block_bytes, cols.stop // t.block * t.block_bytes
        return GGMLTensor(t.type_name, (t.shape[0], len(cols)), t.data[:, a:b].contiguous())
    log.warning("%s: columns %d:%d cut %s blocks of %d; this rank's shard is dequantized (dense, more memory)",
                name, cols.start, cols.stop, t.type_name, t.block)
    return t.dequantize()[:, cols.start:cols.stop].contiguous()
