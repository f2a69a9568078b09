"""Connectors from a vision tower's patch features to rows of the text model's embedding space, with HF's module
names: LLaVA's MLP projector, Idefics3's pixel shuffle + linear, Idefics2's MLP + perceiver resampler."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lanner.vision.towers import activation


class LlavaProjector(nn.Module):
    """Picks `vision_feature_layer` hidden states (a list: concatenated on the feature axis), drops the first
    token under the "default" strategy (CLIP's class token), then linear_1 -> act -> linear_2."""

    def __init__(self, vision_hidden: int, text_hidden: int, feature_layers: int | list[int], strategy: str,
                 act: str, bias: bool):
        super().__init__()
        if strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
        self.feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
        self.drop_first = strategy == "default"
        self.linear_1 = nn.Linear(vision_hidden * len(self.feature_layers), text_hidden, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """hidden_states: the tower's states at feature_layers, each [B, S, D] -> [B, S or S-1, text_hidden]."""
        x = torch.cat([h[:, 1:] if self.drop_first else h for h in hidden_states], dim=-1)
        return self.linear_2(self.act(self.linear_1(x)))


class Idefics3Connector(nn.Module):
    """Pixel shuffle (each scale x scale block of patches becomes one row, scale^2 times wider), then a linear."""

    def __init__(self, vision_hidden: int, text_hidden: int, scale_factor: int):
        super().__init__()
        self.scale_factor = scale_factor
        self.modality_projection = nn.ModuleDict(
            {"proj": nn.Linear(vision_hidden * scale_factor ** 2, text_hidden, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection["proj"](self.pixel_shuffle(x))

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h*w, D] (a square grid) -> [B, h*w/s^2, D*s^2], in HF's element order."""
        b, seq, d = x.shape
        s, side = self.scale_factor, int(seq ** 0.5)
        x = x.view(b, side, side // s, d * s).permute(0, 2, 1, 3)
        x = x.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
        return x.reshape(b, seq // (s * s), d * s * s)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int, out: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, intermediate, bias=False)
        self.up_proj = nn.Linear(dim, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, out, bias=False)
        self.act = activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    """Latents attend to concat(context, latents); grouped-query heads."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, latents, context, mask):
        b, n, _ = latents.shape
        kv = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (proj(kv).view(b, kv.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
                .repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for proj in (self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        dim, eps = p["hidden_size"], p["rms_norm_eps"]
        self.input_latents_norm, self.input_context_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.self_attn = PerceiverAttention(dim, p["resampler_n_heads"], p["resampler_head_dim"],
                                            p["num_key_value_heads"])
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, 4 * dim, dim, p["hidden_act"])

    def forward(self, latents, context, mask):
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """A fixed number of learned latent queries read the image features (a learned-query abstractor)."""

    def __init__(self, p: dict):
        super().__init__()
        self.latents = nn.Parameter(torch.ones(p["resampler_n_latents"], p["hidden_size"]))
        self.layers = nn.ModuleList(PerceiverLayer(p) for _ in range(p["resampler_depth"]))
        self.norm = RMSNorm(p["hidden_size"], p["rms_norm_eps"])

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """context [B, S, D], context_mask [B, S] bool (True: a real patch) -> [B, n_latents, D]."""
        latents = self.latents.expand(context.shape[0], -1, -1)
        mask = None
        if context_mask is not None and not context_mask.all():
            mask = F.pad(context_mask, (0, latents.shape[1]), value=True)[:, None, None, :]
        for layer in self.layers:
            latents = layer(latents, context, mask)
        return self.norm(latents)


PERCEIVER_DEFAULTS = dict(hidden_act="silu", hidden_size=4096, rms_norm_eps=1e-6, resampler_n_latents=64,
                          resampler_depth=3, resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4)


class Idefics2Connector(nn.Module):
    """modality_projection (gated MLP to the text width) then the perceiver resampler."""

    def __init__(self, vision_hidden: int, text: dict, perceiver: dict):
        super().__init__()
        self.modality_projection = GatedMLP(vision_hidden, text["intermediate_size"], text["hidden_size"],
                                            text.get("hidden_act", "silu"))
        self.perceiver_resampler = PerceiverResampler(perceiver)

    def forward(self, x: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(x), patch_mask)
