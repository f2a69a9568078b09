"""Vision transformers of the supported VLMs, with HF's module names: CLIP, SigLIP and the Idefics2/3 ViT
(SigLIP with variable image sizes: patch masks and bucketed position ids)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lanner.vision.pos_embed import interpolate_pos_embed

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}

# HF's defaults per vision model_type, for configs that only write what differs from them.
_SIGLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
               patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
VISION_DEFAULTS = {
    "clip_vision_model": dict(_SIGLIP, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": _SIGLIP,
    "idefics2_vision": dict(_SIGLIP, patch_size=32),
    "idefics3_vision": dict(_SIGLIP, hidden_size=1152, num_attention_heads=16, patch_size=32),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, hf: dict, default_type: str) -> "VisionConfig":
        model_type = hf.get("model_type", default_type)
        if model_type not in VISION_DEFAULTS:
            raise ValueError(f"unsupported vision tower {model_type!r}; supported: {list(VISION_DEFAULTS)}")
        fields = {**VISION_DEFAULTS[model_type], **{k: hf[k] for k in VISION_DEFAULTS[model_type] if k in hf}}
        return cls(model_type=model_type, **fields)

    @property
    def grid(self) -> int:
        """Patches per side of the trained image size."""
        return self.image_size // self.patch_size


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        dim, self.num_heads = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, D]; mask [B, 1, 1, S] bool (True: a key to attend to) or None."""
        b, s, d = x.shape
        q, k, v = (proj(x).view(b, s, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm ViT block, the same in CLIP, SigLIP and Idefics2/3."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, mask=None):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PatchEmbeddings(nn.Module):
    """CLIP (class token, bias-free conv) and SigLIP patch + position embeddings. The trained position grid is
    resampled when the image has another size."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        clip = cfg.model_type == "clip_vision_model"
        self.patch_size, self.grid = cfg.patch_size, cfg.grid
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size)) if clip else None
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=not clip)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + clip, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_table(pixel_values.shape[-2] // self.patch_size,
                                       pixel_values.shape[-1] // self.patch_size)

    def position_table(self, h: int, w: int) -> torch.Tensor:
        table = self.position_embedding.weight
        if (h, w) == (self.grid, self.grid):
            return table
        return interpolate_pos_embed(table, (h, w), num_prefix_tokens=int(self.class_embedding is not None))


class BucketedPatchEmbeddings(nn.Module):
    """Idefics2/3 (NaViT-style): a tile of any size maps its valid patches onto the trained grid by fractional
    coordinates, so each patch takes the position embedding of the bucket it falls in."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size, self.grid = cfg.patch_size, cfg.grid
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.grid ** 2, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + self.position_embedding(self.position_ids(patch_mask))

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """patch_mask [B, h, w] -> [B, h*w]; padding patches get 0. Float steps exactly as HF computes them."""
        boundaries = torch.arange(1 / self.grid, 1.0, 1 / self.grid, device=patch_mask.device)
        rows = self._buckets(patch_mask.shape[1], patch_mask[:, :, 0].sum(1), boundaries)
        cols = self._buckets(patch_mask.shape[2], patch_mask[:, 0, :].sum(1), boundaries)
        ids = (rows[:, :, None] * self.grid + cols[:, None, :]).flatten(1)
        return torch.where(patch_mask.flatten(1), ids, 0)

    @staticmethod
    def _buckets(n: int, num_valid: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
        fractions = torch.arange(n, device=num_valid.device, dtype=torch.float32)[None] * (1.0 / num_valid)[:, None]
        return torch.bucketize(fractions.clamp(max=1.0 - 1e-6), boundaries, right=True)


class VisionTransformer(nn.Module):
    """CLIPVisionModel / SiglipVisionModel / Idefics2-3 VisionTransformer: patch embeddings, (CLIP:
    pre_layrnorm), encoder layers, post_layernorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        bucketed = cfg.model_type in ("idefics2_vision", "idefics3_vision")
        self.embeddings = BucketedPatchEmbeddings(cfg) if bucketed else PatchEmbeddings(cfg)
        clip = cfg.model_type == "clip_vision_model"
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if clip else nn.Identity()
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, layers: list[int],
                      patch_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """HF's `hidden_states[i]` for i in layers (0: the embeddings, i: layer i's output, negative from the
        end; no post_layernorm); only the layers up to the deepest one asked for run."""
        n = self.cfg.num_hidden_layers
        wanted = [i % (n + 1) for i in layers]
        x, mask = self._embed(pixel_values, patch_mask)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            x = states[i] = layer(x, mask)
        return [states[i] for i in wanted]

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden state after post_layernorm: [B, patches, hidden]."""
        return self.post_layernorm(self.hidden_states(pixel_values, [-1], patch_mask)[0])

    def _embed(self, pixel_values, patch_mask):
        """-> (embeddings, attention mask [B, 1, 1, S] bool or None)."""
        if isinstance(self.embeddings, PatchEmbeddings):
            return self.pre_layrnorm(self.embeddings(pixel_values)), None
        if patch_mask is None:
            b, _, h, w = pixel_values.shape
            patch_mask = torch.ones(b, h // self.cfg.patch_size, w // self.cfg.patch_size, dtype=torch.bool,
                                    device=pixel_values.device)
        mask = None if patch_mask.all() else patch_mask.flatten(1)[:, None, None, :]
        return self.embeddings(pixel_values, patch_mask), mask


def pixel_to_patch_mask(pixel_mask: torch.Tensor, patch_size: int, full: bool) -> torch.Tensor:
    """[B, H, W] pixel mask -> [B, H/p, W/p] patch mask: a patch is valid when all its pixels are (full, as
    Idefics2 decides) or any of them (Idefics3). Rows and columns past the last whole patch are dropped."""
    h, w = pixel_mask.shape[-2] // patch_size, pixel_mask.shape[-1] // patch_size
    blocks = pixel_mask[:, :h * patch_size, :w * patch_size].reshape(-1, h, patch_size, w, patch_size)
    counts = blocks.sum(dim=(2, 4))
    return counts == patch_size * patch_size if full else counts > 0
