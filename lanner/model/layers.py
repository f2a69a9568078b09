"""Building blocks of a Llama-family decoder."""
import math

import torch
from torch import nn

from lanner.model import fused


def bf16_matmul_native() -> bool:
    """oneDNN's bf16 GEMM and weight reorder need AVX512BW at least (on AVX2 the reorder raises)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check and check())


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] in oneDNN's blocked layout (2-3x faster than a plain GEMM at decode batch sizes), or
    None where oneDNN does not run its dtype natively (bf16 needs AVX512BW: on AVX2 the reorder raises)."""
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()) \
            or (weight.dtype == torch.bfloat16 and not bf16_matmul_native()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


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
    ggml = None        # lanner.quant.ggml.GGMLTensor, when the checkpoint stored the weight in blocks
    lora = None        # lanner.lora.ops.LoRAWeights when LoRA is enabled

    def reset_parameters(self) -> None:
        """None: every weight comes from a checkpoint (and initializing meta tensors imports torch's compiler
        stack, seconds of start-up)."""

    def pack(self, quantization: str = "none", dense_gemm: bool = True) -> None:
        """dense_gemm: a GGML weight also keeps a dense oneDNN copy for steps of more than SMALL_M rows."""
        if self.ggml is not None:
            from lanner.quant.ggml import GGMLLinear
            dense = onednn_pack(self.ggml.dequantize(self.weight.dtype)) if dense_gemm else None
            self.quantized = GGMLLinear(self.ggml, self.bias, dense)
        elif quantization != "none":
            from lanner.quant import quantize_linear
            self.quantized = quantize_linear(self.weight.detach(), self.bias, quantization)
            self.weight = nn.Parameter(self.weight.detach().to("meta"), requires_grad=False)
        elif self.weight.device.type == "cpu":
            self.packed = onednn_pack(self.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.lora is not None and self.lora.manager.batch:
            y = self.lora.add_delta(x, y)
        return y

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


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: linear, llama3")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the HF (half-split) layout, with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), rope_inv_freq(head_dim, theta, scaling))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1).float(), persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos | sin [T, D] of positions, in dtype: looked up once per forward, shared by every layer."""
        return self.cos_sin[positions].to(dtype)

    def forward(self, table: torch.Tensor, *xs: torch.Tensor):
        cos, sin = table.unsqueeze(-2).chunk(2, dim=-1)
        return tuple(self.rotate(x, cos, sin) for x in xs)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's q * cos + rotate_half(q) * sin, in the activations' dtype as HF does."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
