"""Building blocks of a Llama-family decoder."""
import math
import os

import torch
from torch import nn

from lanner.model import fused


def bf16_matmul_native() -> bool:
    """oneDNN's bf16 GEMM and weight reorder need AVX512BW at least (on AVX2 the reorder raises)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs a linear of this dtype natively (bf16 needs AVX512BW: on AVX2 the reorder raises)."""
    return (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
            and (dtype != torch.bfloat16 or bf16_matmul_native()))


def onednn_amx_bf16() -> bool:
    """Whether oneDNN's bf16 GEMM runs on AMX tiles here: the CPU has them and no lower ISA level is forced
    (LANNER_ISA stands in for a CPU without them)."""
    from lanner import native
    return ({"amx_tile", "amx_bf16"} <= native.cpu_flags() and not os.environ.get("LANNER_ISA")
            and onednn_runs(torch.bfloat16))


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] in oneDNN's blocked layout (2-3x faster than a plain GEMM at decode batch sizes), or
    None where oneDNN does not run its dtype natively."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1) if onednn_runs(weight.dtype) else None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that, once packed for inference, multiplies with a faster weight representation.

    A weight loaded as GGML blocks (`ggml`, from a GGUF file) or quantized at load (q8_0, q4_0, q4_1, q5_0,
    q5_1 through lanner.quant.ggml; nf4) multiplies in that format, its dense `weight` left a meta-device
    placeholder; a dense weight goes into oneDNN's blocked layout (2-3x faster than a plain GEMM at decode
    batch sizes) where oneDNN runs its dtype natively.
    """
    packed: torch.Tensor | None = None
    quantized = None   # callable x -> x @ W^T + b from a quantized weight, set by pack()
    ggml = None        # lanner.quant.ggml.GGMLTensor (or GGMLRows), when the checkpoint stored the weight in blocks
    lora = None        # lanner.lora.ops.LoRAWeights (LoRA and IA3 slots) when LoRA is enabled

    def reset_parameters(self) -> None:
        """None: every weight comes from a checkpoint (and initializing meta tensors imports torch's compiler
        stack, seconds of start-up)."""

    @property
    def blocks(self):
        """The GGML blocks this linear multiplies with (the checkpoint's, or those it was quantized into at load), or
        None (dense or NF4 weights)."""
        from lanner.quant.ggml import GGMLLinear, GGMLParts
        return self.quantized.weight if isinstance(self.quantized, (GGMLLinear, GGMLParts)) else self.ggml

    def pack(self, quantization: str = "none", dense_gemm: bool | None = None, int8: bool = True) -> None:
        """dense_gemm: a GGML weight also keeps a dense oneDNN copy (made at the first big step) for big steps
        (None: where the int8 GEMM does not run, or a bf16 model's where oneDNN runs bf16 on AMX); int8: it may run
        on int8 activations (unless LANNER_EXACT_LINEARS=1)."""
        if self.ggml is not None:
            from lanner.quant.ggml import ggml_linear
            self.quantized = ggml_linear(self.ggml, self.bias, int8, bf16=self.weight.dtype == torch.bfloat16)
            for part in self.quantized.parts:
                self.pack_dense(part, dense_gemm)
        elif quantization != "none":
            from lanner.quant import quantize_linear
            self.quantized = quantize_linear(self.weight.detach(), self.bias, quantization)
            self.weight = nn.Parameter(self.weight.detach().to("meta"), requires_grad=False)
        elif self.weight.device.type == "cpu":
            self.packed = onednn_pack(self.weight.detach())

    def pack_dense(self, q, dense_gemm: bool | None) -> None:
        """Set whether GGMLLinear q also keeps a dense copy for big steps (pack's dense_gemm)."""
        from lanner.quant.ggml import COMPACT_FORMATS
        if dense_gemm is None:   # AMX's bf16 tiles beat the int8 GEMM past INT8_GEMM_ROWS (ggml.py)
            dense_gemm = q.weight.type_name not in COMPACT_FORMATS and (
                not q.int8_packed or (self.weight.dtype == torch.bfloat16 and not q.amx_bf16 and onednn_amx_bf16()))
        elif dense_gemm:   # a copy asked for takes the big steps, not the tiles or bf16 pairs
            q.amx_rows, q.pairs = 0, False
        # no copy where oneDNN would not run it: the kernel then takes more rows from the start, so a
        # decode step's row limit (fixed when it is built) is the same before and after the first big step
        q.dense_dtype = self.weight.dtype if dense_gemm and onednn_runs(self.weight.dtype) else None
        if q.pairs and q.dense_dtype == torch.bfloat16:   # its bf16 rows take the pairs, at any count
            q.dense_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora is None or not self.lora.manager.batch:
            return self.base_forward(x)
        return self.lora.adapt_output(x, self.base_forward(self.lora.adapt_input(x)))

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this gate | up linear for x in one GGML kernel call (GGMLLinear.silu_mul), where no
        adapter is in the batch; else None."""
        from lanner.quant.ggml import GGMLLinear
        plain = not torch.is_grad_enabled() and (self.lora is None or not self.lora.manager.batch)
        return self.quantized.silu_mul(x) if plain and isinstance(self.quantized, GGMLLinear) else None

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        if self.quantized is not None:
            return self.quantized(x)
        if self.packed is not None:
            return onednn_linear(x, self.packed, self.bias)
        return super().forward(x)


class Embedding(nn.Embedding):
    """nn.Embedding whose table may stay in GGML blocks (`ggml`): looked-up rows are dequantized."""
    ggml = None

    def reset_parameters(self) -> None:
        """None, as Linear's."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ggml is None:
            return super().forward(ids)
        return self.ggml.rows(ids, self.weight.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x (after adding residual, returned too: the fused add + norm of every layer)."""
        out = fused.rms_norm(x, residual, self.weight, self.eps)
        if out is not None:
            return out if residual is None else (out, residual)
        if residual is not None:
            x = residual = x + residual
        out = nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return out if residual is None else (out, residual)


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, max_position_embeddings: int,
                  long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2], cos/sin factor) of a rope type, in fp32 as transformers computes them,
    so the tables equal HF's bit for bit. `long`: longrope's factors for positions past the original length."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv_freq, 1.0
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings", max_position_embeddings)
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":   # HF's base for a sequence of max_position_embeddings: its frequencies up to there
        return inv_freq, 1.0
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, factor, scaling.get("low_freq_factor", 1.0),
                               scaling.get("high_freq_factor", 4.0), original), 1.0
    factor = factor or max_position_embeddings / original
    if kind == "yarn":
        return yarn_inv_freq(dim, theta, factor, scaling, original)
    if kind == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return inv_freq / ext, scaling.get("attention_factor") or longrope_attention_factor(factor, original)
    raise ValueError(f"unsupported rope type {kind!r}")


def longrope_attention_factor(factor: float, original: int) -> float:
    """LongRoPE's default cos/sin factor for a context factor times the original: sqrt(1 + ln f / ln original)."""
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0


def llama3_inv_freq(inv_freq, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Llama 3.1's: long wavelengths slowed by factor, short ones kept, the band between blended."""
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(mid, blended, scaled)


def yarn_inv_freq(dim: int, theta: float, factor: float, scaling: dict, original: int) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are interpolated
    (divided by factor), those turning more than beta_fast times kept, a linear ramp between; cos/sin
    scaled by 0.1 ln(factor) + 1 (or the mscale ratio DeepSeek configs give)."""
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def turns_dim(turns):
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    low, high = turns_dim(scaling.get("beta_fast") or 32), turns_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    base = theta ** (torch.arange(0, dim, 2).float() / dim)
    keep = 1 - ramp
    return 1.0 / (factor * base) * (1 - keep) + 1.0 / base * keep, float(attention)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the HF (half-split) layout over the first `dim` dims of a head, with a
    precomputed cos/sin table (times the rope type's attention factor)."""

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: dict | None,
                 max_position_embeddings: int | None = None):
        super().__init__()
        self.dim = dim
        context = max_position_embeddings or max_positions
        inv_freq, factor = rope_inv_freq(dim, theta, scaling, context)
        positions = torch.arange(max_positions, dtype=torch.float32)[:, None]
        freqs = positions * inv_freq
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind == "longrope":   # vLLM's choice: positions past the original context take the long factors
            original = scaling.get("original_max_position_embeddings", context)
            long_freqs = positions * rope_inv_freq(dim, theta, scaling, context, long=True)[0]
            freqs = torch.where(positions >= original, long_freqs, freqs)
        if kind == "dynamic" and max_positions > context:   # HF's frequencies at the longest sequence we allow
            base = theta * ((scaling["factor"] * max_positions / context) - (scaling["factor"] - 1)) ** (dim / (dim - 2))
            freqs = positions * rope_inv_freq(dim, base, None, context)[0]
        self.register_buffer("cos_sin", torch.cat([freqs.cos() * factor, freqs.sin() * factor], -1), persistent=False)
        self.converted: dict[torch.dtype, tuple] = {}   # dtype: (the cos_sin it came from, cos_sin in dtype)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos | sin [T, dim] of positions, in dtype: looked up once per forward, shared by every layer. The
        whole table is converted once per dtype (rounding commutes with the lookup): one op per decode step."""
        return self.in_dtype(dtype)[positions]

    def in_dtype(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole cos | sin table [positions, dim] in dtype."""
        source, converted = self.converted.get(dtype, (None, None))
        if source is not self.cos_sin:   # first use, or the buffer was replaced or moved since
            converted = self.cos_sin.to(dtype)
            self.converted[dtype] = self.cos_sin, converted
        return converted

    def forward(self, table: torch.Tensor, *xs: torch.Tensor):
        cos, sin = table.unsqueeze(-2).chunk(2, dim=-1)
        return tuple(self.rotate(x, cos, sin) for x in xs)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's q * cos + rotate_half(q) * sin on the rotary dims, in the activations' dtype as HF does."""
        if self.dim < x.shape[-1]:
            return torch.cat([self.rotate(x[..., :self.dim], cos, sin), x[..., self.dim:]], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
