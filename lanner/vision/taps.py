"""Per-axis resampling taps: which input pixels each output pixel reads, and with what weights.

Coordinates put input pixel i's centre at i. For output index d on an axis of n_in -> n_out
pixels (r = n_in / n_out, or 1 / scale when a scale is given, as torch's scale_factor):

    half_pixel   src = (d + 0.5) * r - 0.5              pixel centres (torch, OpenCV, PIL)
    corners      src = d * (n_in - 1) / (n_out - 1)     torch's align_corners=True
    asymmetric   src = d * r                            the corner-anchored `dst / scale`

Filtered modes weigh the inputs around src with a kernel: bilinear's triangle (support 1),
bicubic's cubic convolution with a = -0.5 (support 2) and lanczos's windowed sinc with a = 3
(support 3), PIL's three filters. With antialias, a downscale by r stretches the kernel by r
(so it covers an output pixel's footprint). Inputs past the edge are dropped and the weights
renormalised, as PIL does; only bilinear without antialias clamps src into the image, as torch does.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

MODES = ("bilinear", "bicubic", "lanczos", "nearest")
ALIGNS = ("half_pixel", "corners", "asymmetric")


@dataclass(frozen=True, eq=False)  # hashed by identity, so cached taps can key further caches
class Taps:
    """For each output index along one axis: K source indices and weights that sum to 1."""

    index: np.ndarray  # [n_out, K] int64, every entry a valid input index
    weight: np.ndarray  # [n_out, K] float64, negative in bicubic's and lanczos's lobes


@functools.lru_cache(maxsize=128)
def axis_taps(n_in, n_out, scale=None, mode="bilinear", align="half_pixel", antialias=False) -> Taps:
    """Taps resampling one axis from n_in to n_out pixels (cached: image sizes recur)."""
    src = sample_positions(n_in, n_out, scale, align)
    if mode == "nearest":
        # The pixel containing src: pixel i spans [i, i+1) when corner-anchored, else [i-0.5, i+0.5).
        offset = 0.0 if align == "asymmetric" else 0.5
        index = np.clip(np.floor(src + offset), 0, n_in - 1).astype(np.int64)
        return _frozen(index[:, None], np.ones((n_out, 1)))
    if mode == "bilinear" and not antialias:  # torch's bilinear: clamp src into the image
        return _filtered(np.clip(src, 0, n_in - 1), n_in, mode, stretch=1.0)
    stretch = max(footprint(n_in, n_out, scale, align), 1.0) if antialias else 1.0
    return _filtered(src, n_in, mode, stretch)


def sample_positions(n_in, n_out, scale=None, align="half_pixel") -> np.ndarray:
    """Source coordinate of each output pixel (module docstring has the formulas).

    Each is one division of an exact numerator, so integer positions come out exact.
    """
    d = np.arange(n_out, dtype=np.float64)
    if align == "corners":
        return d * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(1)
    num, den = (n_in, n_out) if scale is None else (1.0, scale)
    if align == "half_pixel":
        return (2 * d + 1) * num / (2 * den) - 0.5
    return d * num / den


def footprint(n_in, n_out, scale=None, align="half_pixel") -> float:
    """Input pixels per output pixel: the antialias filter is widened by this when > 1."""
    if align == "corners":
        return (n_in - 1) / (n_out - 1) if n_out > 1 else float(n_in)
    return n_in / n_out if scale is None else 1.0 / scale


def _triangle(x):
    return np.maximum(0.0, 1.0 - np.abs(x))


def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _lanczos(x):
    return np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)


KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0), "lanczos": (_lanczos, 3.0)}  # (kernel, support)


def _filtered(src, n_in, mode, stretch) -> Taps:
    """The mode's kernel, stretched, around each src; cut at the image edge and renormalised."""
    kernel, support = KERNELS[mode]
    radius = support * stretch
    k = math.ceil(2 * radius)  # an open interval of length 2r holds at most ceil(2r) integers
    index = np.floor(src - radius)[:, None] + 1 + np.arange(k)
    weight = kernel((index - src[:, None]) / stretch)
    weight[(index < 0) | (index > n_in - 1)] = 0.0
    return _frozen(np.clip(index, 0, n_in - 1).astype(np.int64), weight / weight.sum(axis=1, keepdims=True))


@functools.lru_cache(maxsize=128)
def fixed_point(taps: Taps) -> Taps:
    """The taps with PIL's 8-bit coefficients: each weight rounded (half away from 0) to a multiple of
    2^-22, so their sum may miss 1 by a few 2^-22, as PIL's does."""
    scaled = taps.weight * (1 << 22)
    return _frozen(taps.index, np.trunc(scaled + np.copysign(0.5, scaled)) / (1 << 22))


def _frozen(index, weight) -> Taps:
    index.flags.writeable = weight.flags.writeable = False  # shared through the cache
    return Taps(index, weight)
