"""Separable image resize: per-axis taps (source indices + weights), applied along H then W.

Each output pixel along one axis reads K input pixels with weights that sum to 1
(K = 1 for nearest, 2 for bilinear, more for antialiased downscaling). Applying the
taps is K gathers (`index_select`) and a lerp / multiply-add, so the whole image is
a handful of vectorized tensor ops and never a per-pixel Python loop.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("bilinear", "nearest")
ALIGNS = ("half_pixel", "corners", "asymmetric")
LAYOUTS = ("HW", "HWC", "CHW", "NHWC", "NCHW")


@dataclass(frozen=True)
class Taps:
    """For each output index along one axis: K source indices and weights that sum to 1."""

    index: np.ndarray  # [n_out, K] int64, every entry a valid input index
    weight: np.ndarray  # [n_out, K] float64


def resize(image, size=None, scale=None, mode="bilinear", align="half_pixel", antialias=False, layout=None):
    """Resize a numpy array or torch tensor; returns the same type, dtype, layout and device.

    size: int or (height, width). scale: float or (scale_y, scale_x); output = floor(n * scale)
    and, like torch's scale_factor, the scale itself (not out/in) maps coordinates.
    layout: one of LAYOUTS; by default 2-D is HW, 4-D is NCHW, and 3-D is HWC for numpy
    but CHW for torch (each library's usual image layout).
    Integer images are computed in float, then rounded half up and clipped to the dtype.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("align", align, ALIGNS)
    if antialias and mode != "bilinear":
        raise ValueError("antialias applies to mode='bilinear' only")
    tensor, from_numpy = _as_tensor(image)
    layout = _resolve_layout(layout, tensor.ndim, from_numpy)
    x = _to_bhwc(tensor, layout)
    if x.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {tuple(tensor.shape)}")
    (out_h, out_w), (scale_y, scale_x) = _output_size(x.shape[1:3], size, scale)
    taps_h = axis_taps(x.shape[1], out_h, scale_y, mode, align, antialias)
    taps_w = axis_taps(x.shape[2], out_w, scale_x, mode, align, antialias)
    out = _from_bhwc(_resize_bhwc(x, taps_h, taps_w), layout)
    return out.numpy() if from_numpy else out


@functools.lru_cache(maxsize=128)
def axis_taps(n_in, n_out, scale=None, mode="bilinear", align="half_pixel", antialias=False) -> Taps:
    """Taps resampling one axis from n_in to n_out pixels (cached: images repeat sizes)."""
    src = sample_positions(n_in, n_out, scale, align)
    if mode == "nearest":
        # Pixel i spans [i, i+1) in the asymmetric convention and [i-0.5, i+0.5) otherwise.
        offset = 0.0 if align == "asymmetric" else 0.5
        index = np.clip(np.floor(src + offset), 0, n_in - 1).astype(np.int64)
        return _frozen(Taps(index[:, None], np.ones((n_out, 1))))
    if not antialias:
        return _frozen(_tent_taps(np.clip(src, 0, n_in - 1), n_in, radius=1.0))
    return _frozen(_tent_taps(src, n_in, radius=max(_footprint(n_in, n_out, scale, align), 1.0)))


def sample_positions(n_in, n_out, scale=None, align="half_pixel") -> np.ndarray:
    """Source coordinate of each output pixel, where input pixel i is centred at i.

    Each formula divides an exact numerator once, so an integer position comes out exact.
    """
    i = np.arange(n_out, dtype=np.float64)
    if align == "corners":
        return i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(1)
    num, den = (n_in, n_out) if scale is None else (1.0, scale)
    if align == "half_pixel":
        return (2 * i + 1) * num / (2 * den) - 0.5
    return i * num / den


def _footprint(n_in, n_out, scale, align) -> float:
    """Input pixels per output pixel: how far the antialias tent is widened."""
    if align == "corners":
        return (n_in - 1) / (n_out - 1) if n_out > 1 else float(n_in)
    return n_in / n_out if scale is None else 1.0 / scale


def _tent_taps(src, n_in, radius) -> Taps:
    """Triangle filter of the given radius around each position, cut at the image edge and renormalised."""
    k = math.ceil(2 * radius)  # an open interval of length 2r holds at most ceil(2r) integers
    index = np.floor(src - radius)[:, None] + 1 + np.arange(k)
    weight = np.maximum(0.0, 1.0 - np.abs(index - src[:, None]) / radius)
    weight[(index < 0) | (index > n_in - 1)] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    return Taps(np.clip(index, 0, n_in - 1).astype(np.int64), weight)


def _frozen(taps: Taps) -> Taps:
    taps.index.flags.writeable = False
    taps.weight.flags.writeable = False
    return taps


def _resize_bhwc(x, taps_h, taps_w):
    """Resize a logical [B, H, W, C] tensor, working in whichever memory order it already has."""
    b, _, _, c = x.shape
    out_h, out_w = len(taps_h.index), len(taps_w.index)
    if x.is_contiguous():  # channels-last memory: rows of W*C, each W tap covers C values
        out = _resize_planes(x.reshape(b, x.shape[1], -1), taps_h, taps_w, c)
        return out.view(b, out_h, out_w, c)
    planes = x.permute(0, 3, 1, 2).contiguous()
    out = _resize_planes(planes.view(b * c, *planes.shape[2:]), taps_h, taps_w, 1)
    return out.view(b, c, out_h, out_w).permute(0, 2, 3, 1)


def _resize_planes(x, taps_h, taps_w, channels):
    """Resize contiguous [B, H, W*channels]: the cheaper axis order first, then cast back."""
    h, w = x.shape[1], x.shape[2] // channels
    out_h, out_w = len(taps_h.index), len(taps_w.index)
    k_h, k_w = taps_h.index.shape[1], taps_w.index.shape[1]
    h_first = k_h * out_h * w + k_w * out_h * out_w <= k_w * h * out_w + k_h * out_h * out_w
    passes = [(taps_h, 1, 1), (taps_w, 2, channels)]
    if not h_first:
        passes.reverse()
    dtype, compute = x.dtype, _compute_dtype(x.dtype)
    taps, dim, ch = passes[0]
    # Convert up front unless the first pass gathers less than the whole input (large downscales).
    if taps.index.shape[1] > 1 and taps.index.size > x.shape[dim] // ch:
        x = x.to(compute)
    for taps, dim, ch in passes:
        x = _apply_taps(x, taps, dim, ch, compute)
    return _cast_back(x, dtype)


def _apply_taps(x, taps, dim, channels, compute):
    """Resample dimension `dim` of [B, H, W*channels]: one gather of all K taps, then their weighted sum."""
    index, weight = _taps_tensors(taps, channels, x.device, compute)
    k, n = index.shape
    gathered = x.index_select(dim, index.reshape(-1))
    if k == 1:  # nearest: a pure gather, which keeps the dtype
        return gathered
    gathered = gathered.to(compute).unflatten(dim, (k, n))
    if k == 2:  # weights are (1 - t, t): one fused lerp
        shape = [1, 1, 1]
        shape[dim] = n
        return torch.lerp(gathered.select(dim, 0), gathered.select(dim, 1), weight[1].view(shape))
    shape = [1, 1, 1, 1]
    shape[dim:dim + 2] = k, n
    return (gathered * weight.view(shape)).sum(dim)


def _taps_tensors(taps, channels, device, dtype):
    """Taps as [K, n] tensors; along W each pixel tap expands to its `channels` consecutive values."""
    index, weight = taps.index.T, taps.weight.T
    if channels > 1:
        index = (index[:, :, None] * channels + np.arange(channels)).reshape(len(index), -1)
        weight = np.repeat(weight, channels, axis=1)
    return torch.tensor(index, device=device), torch.tensor(weight, device=device, dtype=dtype)


def _compute_dtype(dtype):
    if dtype == torch.float64 or (not dtype.is_floating_point and dtype.itemsize >= 4):
        return torch.float64  # float32 cannot hold every int32/int64 value
    return torch.float32


def _cast_back(y, dtype):
    """Float result to the input dtype; integers round half up and saturate like OpenCV/PIL."""
    if y.dtype == dtype:
        return y
    if dtype.is_floating_point:
        return y.to(dtype)
    # Tent weights are >= 0 and sum to 1, so y stays inside the input's range: no clipping
    # needed, and for unsigned types the float->int truncation is already the floor.
    y = y.add_(0.5)
    return (y if _is_unsigned(dtype) else y.floor_()).to(dtype)


def _is_unsigned(dtype):
    return torch.iinfo(dtype).min == 0


def _as_tensor(image):
    if isinstance(image, torch.Tensor):
        return image, False
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array or torch tensor, got {type(image).__name__}")
    if not image.flags.writeable:
        # Read-only arrays (np.asarray of a PIL image) are never written to here; silence torch's warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _from_numpy(image), True
    return _from_numpy(image), True


def _from_numpy(array):
    try:
        return torch.from_numpy(array)
    except ValueError:  # negative strides or non-native byte order
        return torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))


def _resolve_layout(layout, ndim, from_numpy):
    if layout is None:
        layout = {2: "HW", 3: "HWC" if from_numpy else "CHW", 4: "NCHW"}.get(ndim)
        if layout is None:
            raise ValueError(f"image must be 2-D, 3-D or 4-D, got {ndim}-D")
    _check_choice("layout", layout, LAYOUTS)
    if len(layout) != ndim:
        raise ValueError(f"layout {layout!r} needs a {len(layout)}-D image, got {ndim}-D")
    return layout


def _to_bhwc(t, layout):
    """A [B, H, W, C] view of the image (no copy)."""
    return {
        "HW": lambda: t[None, :, :, None],
        "HWC": lambda: t[None],
        "CHW": lambda: t.permute(1, 2, 0)[None],
        "NHWC": lambda: t,
        "NCHW": lambda: t.permute(0, 2, 3, 1),
    }[layout]()


def _from_bhwc(t, layout):
    return {
        "HW": lambda: t[0, :, :, 0],
        "HWC": lambda: t[0],
        "CHW": lambda: t[0].permute(2, 0, 1),
        "NHWC": lambda: t,
        "NCHW": lambda: t.permute(0, 3, 1, 2),
    }[layout]()


def _output_size(in_hw, size, scale):
    """((out_h, out_w), (scale_y, scale_x)); the scales are None when size is given."""
    if (size is None) == (scale is None):
        raise ValueError("give exactly one of size and scale")
    if size is not None:
        out = _pair("size", size)
        if any(not isinstance(s, (int, np.integer)) or s <= 0 for s in out):
            raise ValueError(f"size must be positive integers, got {size!r}")
        return tuple(int(s) for s in out), (None, None)
    scales = tuple(float(s) for s in _pair("scale", scale))
    if any(not math.isfinite(s) or s <= 0 for s in scales):
        raise ValueError(f"scale must be positive and finite, got {scale!r}")
    out = tuple(math.floor(n * s) for n, s in zip(in_hw, scales))
    if min(out) < 1:
        raise ValueError(f"scale {scale!r} shrinks the {tuple(in_hw)} image to nothing")
    return out, scales


def _pair(name, value):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a pair, got {value!r}")
        return tuple(value)
    return (value, value)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
