"""Resample a ViT position-embedding grid so the encoder accepts another image size."""
from __future__ import annotations

import math

import numpy as np
import torch

from lanner.vision.resize import resize


def interpolate_pos_embed(pos_embed, new_grid, num_prefix_tokens=1, mode="bilinear", align="half_pixel",
                          antialias=False):
    """[1, P + g*g, C] or [P + g*g, C] -> the same rank with P + h*w tokens.

    The P prefix tokens (the class token; 2 for DeiT's class + distillation) are kept as is;
    the square g x g grid is resized to new_grid (int or (h, w)) with `resize`. Many ViT
    codebases use bicubic here; bilinear half-pixel (torch's align_corners=False) is
    smoother but close, and exact on linear trends.
    """
    batched = pos_embed.ndim == 3
    if pos_embed.ndim not in (2, 3) or (batched and pos_embed.shape[0] != 1):
        raise ValueError(f"pos_embed must be [1, N, C] or [N, C], got shape {tuple(pos_embed.shape)}")
    tokens = pos_embed[0] if batched else pos_embed
    n_grid, dim = tokens.shape[0] - num_prefix_tokens, tokens.shape[1]
    g = math.isqrt(max(n_grid, 0))
    if n_grid < 1 or g * g != n_grid:
        raise ValueError(f"pos_embed must hold {num_prefix_tokens} prefix tokens and a square grid, "
                         f"got {tokens.shape[0]} tokens")
    h, w = new_grid if isinstance(new_grid, (tuple, list)) else (new_grid, new_grid)
    if min(h, w) < 1:
        raise ValueError(f"new_grid must be positive, got {new_grid!r}")
    grid = resize(tokens[num_prefix_tokens:].reshape(g, g, dim), size=(h, w), mode=mode, align=align,
                  antialias=antialias, layout="HWC")
    cat = torch.cat if isinstance(tokens, torch.Tensor) else np.concatenate
    out = cat([tokens[:num_prefix_tokens], grid.reshape(h * w, dim)])
    return out[None] if batched else out
