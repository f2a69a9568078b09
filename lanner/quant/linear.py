"""Weight-only int8 / int4 linears on PyTorch's native CPU kernels.

int8: symmetric per-output-channel scales, w ~= q * s with q in [-127, 127]. Small batches run
      aten._weight_int8pack_mm (int8 weights, activations and scales in bf16/fp16/fp32).
int4: asymmetric group-wise along the input dimension (group 32 by default; 64, 128, 256 also work),
      w ~= (q - 8) * s + z with q in [0, 15]: the min/max grid of GGUF Q4_1 (and gpt-fast / torchao's
      tinygemm layout), so a model that came from a Q4_1 file re-quantizes onto (almost) its own grid.
      Small batches run aten._weight_int4pack_mm_for_cpu on the weight packed by
      aten._convert_weight_to_int4pack_for_cpu.

The native kernels are weight-streaming GEMV-like loops: at decode batch 1 they read 2x (int8) or ~3.2x (int4)
fewer bytes than bf16, but they barely block over M, so beyond a few rows they are 2-4x slower than oneDNN.
Above `small_m` rows a linear therefore dequantizes its weight (in chunks of at most DEQUANT_CHUNK_ELEMENTS)
and runs the ordinary GEMM: for int8 only the int8 -> float conversion touches the weight (the per-channel
scale multiplies the output), for int4 the nibbles are unpacked straight into W^T and scaled per group.
Both paths compute with the same quantized weights. docs/quantization.md has the measurements behind
SMALL_M.
"""
from __future__ import annotations

import abc
import threading

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)   # what the CPU int4 kernel accepts
INT4_BLOCK_N = 64                      # the packed int4 layout interleaves 64 output rows
DEQUANT_CHUNK_ELEMENTS = 4 << 20       # weights dequantized at a time by the large-M path (8 MiB in bf16)

# Rows at or below which the native kernels beat dequantize + GEMM (bench/quant.py on AVX-512 Zen 4 with the
# default model's shapes; docs/quantization.md). Beyond them the kernels' per-row cost exceeds dequantizing
# the weight once per call (int8: a conversion; int4: unpack + a per-group multiply-add, ~3x the cost).
SMALL_M = {"int8": 8, "int4": 32}


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for dequantized weights, reused across calls and linears: a fresh multi-MiB
    allocation per call goes back to the OS and page-faults in again, which costs as much as the dequantize."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) cast to dtype, never below x (so a scale rounded to bf16 never overflows the int range)."""
    y = x.to(dtype)
    low = y.float() < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y


class QuantizedLinear(abc.ABC):
    """x -> x @ W^T + b from quantized weights; subclasses define the format."""
    mode = "none"

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None, dtype: torch.dtype,
                 small_m: int | None = None):
        self.out_features, self.in_features, self.dtype = out_features, in_features, dtype
        self.bias = None if bias is None else bias.detach()
        self.small_m = SMALL_M[self.mode] if small_m is None else small_m
        self._cast: dict = {}   # per-activation-dtype copies of the scales / bias
        self._kernel_for: dict = {}   # activation dtype -> whether the native kernel takes it

    def _in(self, name: str, t: torch.Tensor | None, dtype: torch.dtype):
        if t is None or t.dtype == dtype:
            return t
        key = (name, dtype)
        if key not in self._cast:
            self._cast[key] = t.to(dtype)
        return self._cast[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        use_kernel = x2.shape[0] <= self.small_m and self._kernel_for.get(x2.dtype)
        if use_kernel is None:
            use_kernel = self._kernel_for[x2.dtype] = self.kernel_ok(x2.dtype)
            use_kernel = use_kernel and x2.shape[0] <= self.small_m
        if use_kernel:
            y = self.kernel(x2)
            if self.bias is not None:
                y += self._in("bias", self.bias, y.dtype)
        else:
            y = self.dequant_matmul(x2)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    # -- to be defined by the formats ------------------------------------------------------------------
    @abc.abstractmethod
    def kernel_ok(self, dtype: torch.dtype) -> bool:
        ...

    @abc.abstractmethod
    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def dequant_matmul(self, x: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight the quantized linear multiplies with (a reference for tests)."""
        ...

    @abc.abstractmethod
    def nbytes(self) -> int:
        ...


class Int8Linear(QuantizedLinear):
    mode = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, small_m: int | None = None):
        out_f, in_f = weight.shape
        super().__init__(out_f, in_f, bias, weight.dtype, small_m)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.scales = _round_up_to(scale, weight.dtype)                                   # [out]
        self.qweight = torch.round(w / self.scales.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.chunk_rows = max(64, DEQUANT_CHUNK_ELEMENTS // in_f)   # rows per chunk of the large-M path

    def kernel_ok(self, dtype):
        # torch 2.13's bf16 _weight_int8pack_mm reads out of bounds (garbage, then a segfault) unless
        # in_features % 16 == 0; such shapes take the dequantize path instead
        return dtype in (torch.bfloat16, torch.float16, torch.float32) and _has("_weight_int8pack_mm") \
            and self.in_features % 16 == 0

    def kernel(self, x):
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self._in("scales", self.scales, x.dtype))

    def dequant_matmul(self, x):
        # W = diag(s) q, so x W^T = (x q^T) s: only the int8 -> float conversion touches the weight
        # (exact: |q| <= 127 fits bf16's mantissa); the per-channel scale multiplies the [M, out] result
        dt, n, step = x.dtype, self.out_features, self.chunk_rows
        scales, bias = self._in("scales", self.scales, dt), self._in("bias", self.bias, dt)
        if n <= step:
            y = torch.nn.functional.linear(x, self._converted(0, n, dt))
        else:
            y = torch.empty(x.shape[0], n, dtype=dt)
            for a in range(0, n, step):
                b = min(n, a + step)
                y[:, a:b] = torch.nn.functional.linear(x, self._converted(a, b, dt))
        return y.mul_(scales) if bias is None else torch.addcmul(bias, y, scales, out=y)

    def _converted(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        return _scratch((b - a) * self.in_features, dtype).view(b - a, self.in_features).copy_(self.qweight[a:b])

    def dequantize(self, dtype=torch.float32):
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    def nbytes(self):
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric int4 in the CPU kernel's packed layout.

    _convert_weight_to_int4pack_for_cpu lays out [N, K] nibbles as bytes [N/64, K, 32]: byte (b, k, j) holds
    row b*64+j of column k in its low nibble and row b*64+32+j in its high nibble. The large-M path decodes
    that layout directly into W^T, so only the packed bytes (0.5 B/weight) and the scales/zeros are stored.
    """
    mode = "int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32,
                 small_m: int | None = None):
        out_f, in_f = weight.shape
        super().__init__(out_f, in_f, bias, weight.dtype, small_m)
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        self.group_size = g = group_size
        self.k_pad = -in_f % g                          # zero columns so groups tile `in`
        self.n_pad = -out_f % INT4_BLOCK_N              # zero rows so the packed layout is whole blocks
        w = weight.detach().float()
        if self.k_pad or self.n_pad:
            w = torch.nn.functional.pad(w, (0, self.k_pad, 0, self.n_pad))
        n, k = w.shape
        groups = w.view(n, k // g, g)
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)                                  # [N, K/g]
        scale = _round_up_to(((hi - lo) / 15).clamp(min=1e-12), weight.dtype)
        zero = (lo + 8 * scale.float()).to(weight.dtype)                                  # value of q = 8
        offset = zero.float() - 8 * scale.float()                                         # value of q = 0
        q = torch.round((groups - offset[..., None]) / scale.float()[..., None]).clamp_(0, 15)
        q = q.to(torch.int32).view(n, k)
        self.scales, self.zeros = scale, zero                                            # [N, K/g]
        # the kernel's [K/g, N, 2] scale-and-zero table, in the activation dtype
        self.scales_and_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
        if _has("_convert_weight_to_int4pack_for_cpu"):
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)     # [N, K/2] uint8
        else:   # same layout, by hand
            blocks = q.view(n // 64, 2, 32, k).permute(0, 3, 1, 2)                      # [N/64, K, 2, 32]
            self.packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8).reshape(n, k // 2)
        # for the large-M path: scales and offsets (the value of q = 0), [K/g, N] like W^T
        self._scales_t = scale.t().contiguous()
        self._offsets_t = offset.to(weight.dtype).t().contiguous()
        self.chunk_blocks = max(1, DEQUANT_CHUNK_ELEMENTS // (k * INT4_BLOCK_N))

    def kernel_ok(self, dtype):
        return dtype in (torch.bfloat16, torch.float16, torch.float32) and _has("_weight_int4pack_mm_for_cpu")

    def _pad_x(self, x):
        return torch.nn.functional.pad(x, (0, self.k_pad)) if self.k_pad else x

    def kernel(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._pad_x(x), self.packed, self.group_size,
                                                      self._in("sz", self.scales_and_zeros, x.dtype))
        return y[:, :self.out_features] if self.n_pad else y

    def _dequant_blocks(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Blocks a..b (64 output rows each) of W^T, as a contiguous [K, (b - a) * 64] in dtype."""
        k, g = self.in_features + self.k_pad, self.group_size
        n = (b - a) * 64
        p = self.packed.view(-1, k, 32)[a:b]                                              # [nb, K, 32]
        wt = _scratch(k * n, dtype).view(k, b - a, 64)
        blocks = wt.permute(1, 0, 2)                                                      # [nb, K, 64]
        blocks[..., :32] = p & 15
        blocks[..., 32:] = p >> 4
        wt = wt.view(k // g, g, n)
        scale = self._in("scales_t", self._scales_t, dtype)[:, None, a * 64:b * 64]      # [K/g, 1, n]
        offset = self._in("offsets_t", self._offsets_t, dtype)[:, None, a * 64:b * 64]
        return torch.addcmul(offset, wt, scale, out=wt).view(k, n)

    def dequant_matmul(self, x):
        dt, n = x.dtype, self.out_features
        x = self._pad_x(x)
        bias = self._in("bias", self.bias, dt)
        nblocks, step = (n + self.n_pad) // 64, self.chunk_blocks
        if nblocks <= step:
            wt = self._dequant_blocks(0, nblocks, dt)[:, :n]
            return torch.addmm(bias, x, wt) if bias is not None else x @ wt
        y = torch.empty(x.shape[0], n, dtype=dt)
        for a in range(0, nblocks, step):
            b = min(nblocks, a + step)
            c0, c1 = a * 64, min(n, b * 64)
            wt = self._dequant_blocks(a, b, dt)[:, :c1 - c0]
            y[:, c0:c1] = x @ wt if bias is None else torch.addmm(bias[c0:c1], x, wt)
        return y

    def dequantize(self, dtype=torch.float32):
        k, g, n = self.in_features + self.k_pad, self.group_size, self.out_features + self.n_pad
        p = self.packed.view(n // 64, k, 32)
        q = torch.cat([p & 15, p >> 4], dim=2).permute(0, 2, 1).reshape(n, k).to(dtype)   # [N, K] nibbles
        s, z = self.scales.to(dtype), self.zeros.to(dtype)
        w = ((q.view(n, k // g, g) - 8) * s[..., None] + z[..., None]).view(n, k)
        return w[:self.out_features, :self.in_features]

    def nbytes(self):
        return self.packed.numel() + 2 * self.scales.numel() * self.scales.element_size()


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, **options) -> QuantizedLinear:
    """A callable x[..., in] -> x @ weight.T + bias (in x's dtype) computed from `mode`-quantized weights.

    options: group_size (int4, default 32), small_m (rows up to which the native kernel is used).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if mode == "int8":
        return Int8Linear(weight, bias, **options)
    if mode == "int4":
        return Int4Linear(weight, bias, **options)
    raise ValueError(f"unknown quantization mode {mode!r} (int8 or int4)")
