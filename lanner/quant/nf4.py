"""NF4, QLoRA's 4-bit NormalFloat: the frozen base of QLoRA training and the `quantization="nf4"` linears.

Each row of a weight [out, in] is cut into blocks of 64 along the input dimension (zero-padded at the
end of the row); a block stores its absmax in fp32 and, per weight, the index of the nearest of the 16
NF4 code values to w / absmax, two indices per byte. The code values are the quantiles of N(0, 1)
normalized to [-1, 1], with an exact zero, as in QLoRA (Dettmers et al., 2023) and bitsandbytes.
When `in` is a multiple of 64 the blocks are exactly bitsandbytes' blocks of 64 over the flattened
weight. The absmax is kept in fp32 (QLoRA's double quantization of the absmax is not done).

The forward dequantizes the weight on the fly in the activations' dtype and multiplies with it:
training (lanner.lora.train_model) and inference (Linear.pack("nf4")) share this one code path.
"""
import torch

BLOCK_SIZE = 64

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")), ascending; index 7 is the exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)

# decision boundaries between neighbouring code values: index = number of boundaries below w / absmax
_MIDPOINTS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
# byte -> (code of its low nibble, code of its high nibble): dequantization is one table lookup per byte
_PAIRS = torch.stack([NF4_CODE[torch.arange(256) & 15], NF4_CODE[torch.arange(256) >> 4]], dim=1)


def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [out, in_padded / 2], absmax fp32 [out, in_padded / block_size])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if block_size % 2:
        raise ValueError(f"NF4 block size must be even, got {block_size}")
    w = weight.detach().float()
    pad = -w.shape[1] % block_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.view(w.shape[0], -1, block_size)
    absmax = blocks.abs().amax(dim=2)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
    index = torch.bucketize(scaled, _MIDPOINTS).to(torch.uint8).view(w.shape[0], -1)
    packed = index[:, 0::2] | (index[:, 1::2] << 4)
    return packed.contiguous(), absmax.contiguous()


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [out, in_features] weight in dtype: code value times its block's absmax."""
    out = packed.shape[0]
    block_size = 2 * packed.shape[1] // absmax.shape[1]
    pairs = _PAIRS.to(device=packed.device, dtype=dtype).index_select(0, packed.view(-1).int())   # fastest gather
    codes = pairs.view(out, absmax.shape[1], block_size)
    w = (codes * absmax.to(dtype)[..., None]).view(out, -1)
    return w[:, :in_features] if w.shape[1] != in_features else w


class NF4Linear:
    """x -> x @ W^T + b with W held in NF4 (0.5 byte per weight + 4 bytes per block of 64)."""
    mode = "nf4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int = BLOCK_SIZE):
        self.out_features, self.in_features = weight.shape
        self.packed, self.absmax = quantize_nf4(weight, block_size)
        self.bias = None if bias is None else bias.detach()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.packed, self.absmax, self.in_features, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def nbytes(self) -> int:
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size()


def quantize_linear_nf4(weight: torch.Tensor, bias: torch.Tensor | None) -> NF4Linear:
    return NF4Linear(weight, bias)
