"""Per-axis resampling taps: which input pixels each output pixel reads, and with what weights.

Coordinates put input pixel i's centre at i. For output index d on an axis of n_in -> n_out
pixels (r = n_in / n_out, or 1 / scale when a scale is given, as torch's scale_factor):

    half_pixel   src = (d + 0.5) * r - 0.5              pixel centres (torch, OpenCV, PIL)
    corners      src = d * (n_in - 1) / (n_out - 1)     torch's align_corners=True
    asymmetric   src = d * r                            the corner-anchored `dst / scale`
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

MODES = ("bilinear", "nearest")
ALIGNS = ("half_pixel", "corners", "asymmetric")


@dataclass(frozen=True, eq=False)  # hashed by identity, so cached taps can key further caches
class Taps:
    """For each output index along one axis: K source indices and weights that sum to 1."""

    index: np.ndarray  # [n_out, K] int64, every entry a valid input index
    weight: np.ndarray  # [n_out, K] float64, >= 0


@functools.lru_cache(maxsize=128)
def axis_taps(n_in, n_out, scale=None, mode="bilinear", align="half_pixel", antialias=False) -> Taps:
    """Taps resampling one axis from n_in to n_out pixels (cached: image sizes recur)."""
    src = sample_positions(n_in, n_out, scale, align)
    if mode == "nearest":
        # The pixel containing src: pixel i spans [i, i+1) when corner-anchored, else [i-0.5, i+0.5).
        offset = 0.0 if align == "asymmetric" else 0.5
        index = np.clip(np.floor(src + offset), 0, n_in - 1).astype(np.int64)
        return _frozen(index[:, None], np.ones((n_out, 1)))
    if not antialias:
        return _tent(np.clip(src, 0, n_in - 1), n_in, radius=1.0)
    return _tent(src, n_in, radius=max(footprint(n_in, n_out, scale, align), 1.0))


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


def _tent(src, n_in, radius) -> Taps:
    """Triangle filter of the given radius around each src, cut at the image edge and renormalised."""
    k = math.ceil(2 * radius)  # an open interval of length 2r holds at most ceil(2r) integers
    index = np.floor(src - radius)[:, None] + 1 + np.arange(k)
    weight = np.maximum(0.0, 1.0 - np.abs(index - src[:, None]) / radius)
    weight[(index < 0) | (index > n_in - 1)] = 0.0
    return _frozen(np.clip(index, 0, n_in - 1).astype(np.int64), weight / weight.sum(axis=1, keepdims=True))


def _frozen(index, weight) -> Taps:
    index.flags.writeable = weight.flags.writeable = False  # shared through the cache
    return Taps(index, weight)
