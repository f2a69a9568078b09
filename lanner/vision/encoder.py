"""The image side of a VLM checkpoint: `load_vision_encoder` builds its vision tower + connector, whose `encode`
turns one preprocessed image into the rows that replace its <image> tokens; `split_text_config` hands the text
decoder to the causal-LM path as a standalone checkpoint."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from lanner.vision.connectors import PERCEIVER_DEFAULTS, Idefics2Connector, Idefics3Connector, LlavaProjector
from lanner.vision.towers import VisionConfig, VisionTransformer, pixel_to_patch_mask

VISION_ARCHITECTURES = ("LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration",
                        "Idefics2ForConditionalGeneration")

# Where each architecture keeps its text decoder, and the HF defaults its config fills text_config with.
TEXT_PREFIX = {"LlavaForConditionalGeneration": "language_model.", "Idefics3ForConditionalGeneration": "text_model.",
               "Idefics2ForConditionalGeneration": "text_model."}
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
TEXT_DEFAULTS = {"llama": _LLAMA, "mistral": dict(_LLAMA, intermediate_size=14336, num_key_value_heads=8,
                                                   max_position_embeddings=4096 * 32, sliding_window=4096)}
DEFAULT_TEXT = {"LlavaForConditionalGeneration": ("llama", {}),
                "Idefics3ForConditionalGeneration": ("llama", {"rms_norm_eps": 1e-5}),
                "Idefics2ForConditionalGeneration": ("mistral", {"max_position_embeddings": 4096 * 8,
                                                                 "rms_norm_eps": 1e-5, "pad_token_id": 0})}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}
DEFAULT_IMAGE_TOKEN_ID = {"LlavaForConditionalGeneration": 32000, "Idefics3ForConditionalGeneration": 128257,
                          "Idefics2ForConditionalGeneration": 32001}


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in either layout -> the name without the wrapper prefixes that the layouts
    disagree on: transformers>=5 writes `model.vision_tower.*`, `model.language_model.*`, `lm_head.*`; older
    LLaVA checkpoints `vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`."""
    name = re.sub(r"^model\.", "", name)
    name = re.sub(r"^language_model\.(model\.)?", "language_model.", name)
    name = re.sub(r"^language_model\.lm_head\.", "lm_head.", name)
    return re.sub(r"^vision_tower\.vision_model\.", "vision_tower.", name)


def architecture(config: dict) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in VISION_ARCHITECTURES:
        raise ValueError(f"unsupported vision-language architecture {arch!r}; supported: {list(VISION_ARCHITECTURES)}")
    return arch


def text_config(config: dict) -> dict:
    """The VLM's text_config with the defaults HF fills in (older checkpoints only write what differs)."""
    arch = architecture(config)
    model_type, overrides = DEFAULT_TEXT[arch]
    text = config.get("text_config") or {}
    model_type = text.get("model_type", model_type)
    return {**TEXT_DEFAULTS.get(model_type, {}), **overrides, **text, "model_type": model_type}


def tied_embeddings(config: dict) -> bool:
    """Whether lm_head is the embedding matrix. HF ties by the VLM's top-level flag (text_config's is not
    read), except that LlavaConfig also adopts a True from text_config."""
    tie = config.get("tie_word_embeddings", False)
    if architecture(config) == "LlavaForConditionalGeneration":
        tie = tie or (config.get("text_config") or {}).get("tie_word_embeddings", False)
    return tie


def image_token_id(config: dict) -> int:
    """The id of the <image> placeholder token (LlavaConfig calls it image_token_index)."""
    arch = architecture(config)
    return config.get("image_token_id", config.get("image_token_index", DEFAULT_IMAGE_TOKEN_ID[arch]))


class VisionEncoder(nn.Module):
    """Tower + connector. Parameter names are the checkpoint's, as `canonical_name` spells them. Each architecture's
    forward(pixel_values [T, 3, H, W], pixel_mask [T, H, W] or None) -> [T, rows per tile, text_hidden_size]."""
    pads = False   # whether tiles of different sizes may share a tower pass, padded and masked

    def __init__(self, text_hidden_size: int):
        super().__init__()
        self.text_hidden_size = text_hidden_size

    def real_tiles(self, pixel_values, pixel_mask):
        return pixel_values, pixel_mask

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One image's tiles [T, 3, H, W] (mask [T, H, W] bool or None) -> [num_image_tokens, text_hidden_size]:
        the rows, in prompt order, that replace the image's <image> tokens."""
        pixel_values, mask = self.real_tiles(*self._to_device(pixel_values, pixel_attention_mask))
        return self(pixel_values, mask).flatten(0, 1)

    @torch.inference_mode()
    def encode_batch(self, images: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
        """encode() of each image, in as few tower passes as possible: tiles of one size share a pass (all tiles
        share one, padded, where the architecture masks padding)."""
        images = [self.real_tiles(*self._to_device(*image)) for image in images]
        groups: dict[tuple, list[int]] = {}
        for i, (pixel_values, _) in enumerate(images):
            groups.setdefault(() if self.pads else tuple(pixel_values.shape[-2:]), []).append(i)
        out = [None] * len(images)
        for members in groups.values():
            pixel_values, mask = _stack([images[i] for i in members])
            rows = self(pixel_values, mask).split([len(images[i][0]) for i in members])
            for i, r in zip(members, rows):
                out[i] = r.flatten(0, 1)
        return out

    def _to_device(self, pixel_values, mask):
        param = next(self.parameters())
        pixel_values = pixel_values.to(param.device, param.dtype)
        return pixel_values, None if mask is None else mask.to(param.device, torch.bool)


def _stack(images):
    """Concatenate tiles, zero-padding pixels (and masking them out) up to the largest height and width."""
    if len(images) == 1:
        return images[0]
    h = max(pv.shape[-2] for pv, _ in images)
    w = max(pv.shape[-1] for pv, _ in images)
    if all(pv.shape[-2:] == (h, w) for pv, _ in images) and all(m is None for _, m in images):
        return torch.cat([pv for pv, _ in images]), None
    pixel_values, masks = [], []
    for pv, m in images:
        if m is None:
            m = torch.ones(pv.shape[0], *pv.shape[-2:], dtype=torch.bool, device=pv.device)
        pad = (0, w - pv.shape[-1], 0, h - pv.shape[-2])
        pixel_values.append(F.pad(pv, pad))
        masks.append(F.pad(m, pad, value=False))
    return torch.cat(pixel_values), torch.cat(masks)


class LlavaVisionEncoder(VisionEncoder):
    def __init__(self, config: dict):
        text = text_config(config)
        super().__init__(text["hidden_size"])
        cfg = VisionConfig.from_hf(config.get("vision_config") or {}, "clip_vision_model")
        self.vision_tower = VisionTransformer(cfg)
        self.multi_modal_projector = LlavaProjector(
            cfg.hidden_size, text["hidden_size"], config.get("vision_feature_layer", -2),
            config.get("vision_feature_select_strategy", "default"), config.get("projector_hidden_act", "gelu"),
            config.get("multimodal_projector_bias", True))

    def forward(self, pixel_values, pixel_mask=None):
        return self.multi_modal_projector(
            self.vision_tower.hidden_states(pixel_values, self.multi_modal_projector.feature_layers))


class IdeficsVisionEncoder(VisionEncoder):
    """Idefics2/3: HF drops tiles whose pixels are all zero (padding images of a batch) before the tower."""
    full_patches: bool   # a patch is real when all its pixels are (Idefics2) or any (Idefics3)

    def real_tiles(self, pixel_values, pixel_mask):
        real = (pixel_values != 0).flatten(1).any(1)
        if real.all():
            return pixel_values, pixel_mask
        return pixel_values[real], None if pixel_mask is None else pixel_mask[real]

    def patch_mask(self, pixel_mask):
        if pixel_mask is None:
            return None
        return pixel_to_patch_mask(pixel_mask, self.vision_model.cfg.patch_size, self.full_patches)


class Idefics3VisionEncoder(IdeficsVisionEncoder):
    full_patches = False

    def __init__(self, config: dict):
        text = text_config(config)
        super().__init__(text["hidden_size"])
        cfg = VisionConfig.from_hf(config.get("vision_config") or {}, "idefics3_vision")
        self.vision_model = VisionTransformer(cfg)
        self.connector = Idefics3Connector(cfg.hidden_size, text["hidden_size"], config.get("scale_factor", 2))

    def forward(self, pixel_values, pixel_mask=None):
        return self.connector(self.vision_model(pixel_values, self.patch_mask(pixel_mask)))


class Idefics2VisionEncoder(IdeficsVisionEncoder):
    full_patches = True
    pads = True   # the tower and the perceiver both mask padding patches out

    def __init__(self, config: dict):
        text = text_config(config)
        super().__init__(text["hidden_size"])
        cfg = VisionConfig.from_hf(config.get("vision_config") or {}, "idefics2_vision")
        perceiver = {**PERCEIVER_DEFAULTS, **(config.get("perceiver_config") or {})}
        if perceiver["hidden_size"] != text["hidden_size"]:   # as Idefics2Config does
            perceiver.update(hidden_size=text["hidden_size"], rms_norm_eps=text["rms_norm_eps"])
        self.vision_model = VisionTransformer(cfg)
        self.connector = Idefics2Connector(cfg.hidden_size, text, perceiver)

    def forward(self, pixel_values, pixel_mask=None):
        mask = self.patch_mask(pixel_mask)
        features = self.vision_model(pixel_values, mask)
        return self.connector(features, None if mask is None else mask.flatten(1))


ENCODERS = {"LlavaForConditionalGeneration": LlavaVisionEncoder,
            "Idefics3ForConditionalGeneration": Idefics3VisionEncoder,
            "Idefics2ForConditionalGeneration": Idefics2VisionEncoder}


def load_vision_encoder(config: dict, weights: dict[str, torch.Tensor], dtype=torch.float32) -> VisionEncoder:
    """The vision tower + connector of a VLM checkpoint (config.json as a dict, its full state dict with HF names
    in either layout). A missing or mis-shaped tensor is a ValueError naming it."""
    with torch.device("meta"):
        encoder = ENCODERS[architecture(config)](config)
    by_name = {canonical_name(k): v for k, v in weights.items()}
    state = {}
    for name, param in encoder.state_dict().items():
        if name not in by_name:
            raise ValueError(f"checkpoint has no tensor {name!r} (or its older-layout name)")
        if by_name[name].shape != param.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(by_name[name].shape)}, expected {tuple(param.shape)}")
        state[name] = by_name[name].to(dtype)
    encoder.load_state_dict(state, assign=True)
    return encoder.eval()


def split_text_config(config: dict, weights: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The VLM's text decoder as a standalone causal-LM checkpoint: its config.json dict (`architectures` the
    causal LM's, `tie_word_embeddings` as the VLM decides it) and its tensors under a causal LM's names."""
    arch, text, tie = architecture(config), text_config(config), tied_embeddings(config)
    if text["model_type"] not in CAUSAL_LM:
        raise ValueError(f"unsupported text model {text['model_type']!r}; supported: {list(CAUSAL_LM)}")
    text.update(architectures=[CAUSAL_LM[text["model_type"]]], tie_word_embeddings=tie)
    prefix, out = TEXT_PREFIX[arch], {}
    for name, tensor in weights.items():
        name = canonical_name(name)
        if name.startswith(prefix):
            out["model." + name[len(prefix):]] = tensor
        elif name.startswith("lm_head.") and not tie:
            out[name] = tensor
    if not tie and "lm_head.weight" not in out:
        raise ValueError("checkpoint has no tensor 'lm_head.weight' and the config does not tie it to the embeddings")
    return text, out
