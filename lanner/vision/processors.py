"""Image preprocessing equal to the HF image processors, and each image's token layout in the prompt.

One class per HF image-processor family, configured from what HF's save_pretrained writes
(preprocessor_config.json, or processor_config.json's "image_processor"). Pixels stay uint8
through every resize, as in HF's PIL backends, and every resize is lanner.vision.resize with
antialias, which on uint8 is PIL's resampler bit for bit; rescale and normalize repeat HF's
float64-then-float32 arithmetic, so pixel_values equal HF's exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lanner.vision.images import to_rgb
from lanner.vision.resize import resize

OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD = [0.5, 0.5, 0.5]
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL's filter ids, as HF saves `resample`
FAKE_TOKEN, GLOBAL_TOKEN = "<fake_token_around_image>", "<global-img>"


@dataclass
class ProcessedImage:
    pixel_values: torch.Tensor  # [tiles, 3, H, W] float32 (tiles = 1 for CLIP / SigLIP)
    pixel_attention_mask: torch.Tensor | None  # [tiles, H, W] bool for Idefics2/3 (False = padding), else None
    num_tokens: int  # image-token ids this image fills in the prompt: one per encoder output row
    placeholder: str  # the text that replaces one image placeholder in the prompt (HF's expansion)


def load_image_processor(model_dir: str, config: dict) -> ImageProcessor:
    """The image processor of a checkpoint directory; config is its config.json."""
    processor_config = _read_json(model_dir, "processor_config.json")
    image_config = processor_config.pop("image_processor", None) or _read_json(model_dir, "preprocessor_config.json")
    if not image_config:
        raise ValueError(f"{model_dir} has no image processor config "
                         "(preprocessor_config.json, or processor_config.json with an image_processor)")
    return _family(image_config, config)(image_config, processor_config, config)


class ImageProcessor:
    """HF's steps common to every family: RGB, uint8 resizes, rescale, normalize; `defaults` are HF's. Each
    family's __call__(PIL image) -> ProcessedImage."""

    image_token = "<image>"
    defaults: dict = {}

    def __init__(self, image_config: dict, processor_config: dict, config: dict):
        self.cfg = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                    **self.defaults, **image_config}
        if self.cfg["resample"] not in RESAMPLE:
            raise ValueError(f"resample filter {self.cfg['resample']} (PIL's BOX or HAMMING) is not supported")
        self.mode = RESAMPLE[self.cfg["resample"]]
        self.mean = torch.tensor(self.cfg["image_mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(self.cfg["image_std"], dtype=torch.float32).view(3, 1, 1)

    def expand(self, text: str, images: list[ProcessedImage]) -> str:
        """Replace each image placeholder in text, in order, with that image's placeholder text."""
        pieces = text.split(self.image_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"the prompt has {len(pieces) - 1} {self.image_token} placeholder(s) "
                             f"but {len(images)} image(s) were given")
        return pieces[0] + "".join(image.placeholder + piece for image, piece in zip(images, pieces[1:]))

    def _pixels(self, image):
        """HWC uint8 RGB pixels; HF composites transparency onto white."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image (lanner.vision.images.load_image makes one), "
                            f"got {type(image).__name__}")
        return np.asarray(to_rgb(image))

    def _resize(self, pixels, hw):
        """PIL's resize with the configured filter, on uint8 HWC pixels; same size is a no-op, as in PIL."""
        if pixels.shape[:2] == tuple(hw):
            return pixels
        return resize(pixels, size=tuple(hw), mode=self.mode, antialias=self.mode != "nearest", layout="HWC")

    def _to_tensor(self, tiles):
        """[T, H, W, 3] uint8 -> [T, 3, H, W] float32 with HF's arithmetic: float64 rescale, float32 normalize."""
        x = torch.from_numpy(tiles.transpose(0, 3, 1, 2).copy())
        x = x.double().mul_(self.cfg["rescale_factor"]).float() if self.cfg["do_rescale"] else x.float()
        return x.sub_(self.mean).div_(self.std) if self.cfg["do_normalize"] else x


class ClipImageProcessor(ImageProcessor):
    """CLIPImageProcessor / LlavaImageProcessor (LLaVA with a CLIP tower): shortest edge, centre crop."""

    defaults = {"resample": 3, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                "do_center_crop": True, "do_pad": False, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
    class_tokens = 1  # CLIP's encoder output has a class token before the patches

    def __init__(self, image_config, processor_config, config):
        super().__init__(image_config, processor_config, config)
        # Old configs give sizes as ints: a resize size is then the shortest edge, a crop is square.
        size, crop = self.cfg["size"], self.cfg.get("crop_size")
        self.size = {"shortest_edge": size} if isinstance(size, int) else size
        self.crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        # LlavaImageProcessor's do_pad pads to a square; CLIPImageProcessor's pads a batch (a no-op for one image).
        self.pad_to_square = self.cfg["do_pad"] and self.cfg.get("image_processor_type", "").startswith("Llava")
        # LlavaProcessor's count: (h/p)*(w/p) + num_additional_image_tokens, less one with the "default" strategy.
        vision = config.get("vision_config") or config
        self.image_token = processor_config.get("image_token", self.image_token)
        self.patch_size = processor_config.get("patch_size") or vision.get("patch_size")
        self.strategy = (processor_config.get("vision_feature_select_strategy")
                         or config.get("vision_feature_select_strategy", "default"))
        self.extra_tokens = processor_config.get("num_additional_image_tokens", self.class_tokens)
        if not self.patch_size:
            raise ValueError("patch_size is in neither processor_config.json nor the model's vision_config")

    def __call__(self, image):
        x = self._pixels(image)
        if self.pad_to_square:
            x = _pad_to_square(x, [int(m * 255) for m in self.cfg["image_mean"]])
        if self.cfg["do_resize"]:
            x = self._resize(x, _clip_size(*x.shape[:2], self.size))
        if self.cfg["do_center_crop"]:
            x = _center_crop(x, self.crop["height"], self.crop["width"])
        (h, w), p = x.shape[:2], self.patch_size
        n = (h // p) * (w // p) + self.extra_tokens - (self.strategy == "default")
        return ProcessedImage(self._to_tensor(x[None]), None, n, self.image_token * n)


class SiglipImageProcessor(ClipImageProcessor):
    """SiglipImageProcessor (LLaVA with a SigLIP tower): resize to a fixed size, no crop, no class token."""

    defaults = {"resample": 3, "size": {"height": 224, "width": 224}, "do_center_crop": False, "do_pad": False,
                "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD}
    class_tokens = 0


class Idefics3ImageProcessor(ImageProcessor):
    """Idefics3 / SmolVLM: longest edge to size, then tiles of max_image_size plus a global image."""

    defaults = {"resample": 1, "size": {"longest_edge": 4 * 364}, "max_image_size": {"longest_edge": 364},
                "do_image_splitting": True, "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD}

    def __init__(self, image_config, processor_config, config):
        super().__init__(image_config, processor_config, config)
        self.tile = self.cfg["max_image_size"]["longest_edge"]
        self.image_seq_len = processor_config.get("image_seq_len") or _idefics3_seq_len(config)

    def __call__(self, image):
        x = self._pixels(image)
        if self.cfg["do_resize"]:
            x = self._resize(x, _idefics3_size(*x.shape[:2], self.cfg["size"]["longest_edge"]))
        if self.cfg["do_image_splitting"]:
            tiles, rows, cols = self._split(self._resize(x, _multiples_of(*x.shape[:2], self.tile)))
        else:
            tiles, rows, cols = self._resize(x, (self.tile, self.tile))[None], 0, 0
        mask = torch.ones(tiles.shape[:3], dtype=torch.bool)  # one image's tiles are all full-size
        return ProcessedImage(self._to_tensor(tiles), mask, self.image_seq_len * len(tiles), self._layout(rows, cols))

    def _split(self, x):
        """(tiles row by row + the image resized to one tile, rows, cols); (x, 0, 0) when it fits one tile."""
        (h, w), t = x.shape[:2], self.tile
        if h <= t and w <= t:
            return x[None], 0, 0
        rows, cols = (h - t) // t + 1, (w - t) // t + 1
        grid = x[:rows * t, :cols * t].reshape(rows, t, cols, t, 3).swapaxes(1, 2).reshape(-1, t, t, 3)
        return np.concatenate([grid, self._resize(x, (t, t))[None]]), rows, cols

    def _layout(self, rows, cols):
        """Idefics3Processor's text: a row/col-tagged run per tile, a newline per row, then the global image."""
        image = self.image_token * self.image_seq_len
        whole = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}"
        if rows == cols == 0:
            return whole
        grid = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return f"{grid}\n{whole}"


class Idefics2ImageProcessor(ImageProcessor):
    """Idefics2: shortest/longest-edge bounds, optionally 4 quarter crops + the image, padded to the largest."""

    defaults = {"resample": 2, "size": {"shortest_edge": 378, "longest_edge": 980}, "do_image_splitting": False,
                "image_mean": IMAGENET_STANDARD, "image_std": IMAGENET_STANDARD}

    def __init__(self, image_config, processor_config, config):
        super().__init__(image_config, processor_config, config)
        self.image_seq_len = (processor_config.get("image_seq_len")
                              or (config.get("perceiver_config") or {}).get("resampler_n_latents", 64))

    def __call__(self, image):
        x = self._pixels(image)
        crops = _quarters(x) + [x] if self.cfg["do_image_splitting"] else [x]
        if self.cfg["do_resize"]:
            crops = [self._resize(c, _idefics2_size(*c.shape[:2], self.cfg["size"])) for c in crops]
        # HF pads every image of a batch to the batch's largest; alone, an image pads to its largest crop.
        h, w = max(c.shape[0] for c in crops), max(c.shape[1] for c in crops)
        pixels = torch.zeros(len(crops), 3, h, w, dtype=torch.float32)
        mask = torch.zeros(len(crops), h, w, dtype=torch.bool)
        for i, crop in enumerate(crops):
            pixels[i, :, :crop.shape[0], :crop.shape[1]] = self._to_tensor(crop[None])[0]
            mask[i, :crop.shape[0], :crop.shape[1]] = True
        one = f"{FAKE_TOKEN}{self.image_token * self.image_seq_len}{FAKE_TOKEN}"
        return ProcessedImage(pixels, mask, self.image_seq_len * len(crops), one * len(crops))

    def expand(self, text, images):
        """Idefics2Processor then merges adjacent fake tokens and spaces a fake token off following text."""
        text = super().expand(text, images).replace(FAKE_TOKEN * 2, FAKE_TOKEN)
        return re.sub(rf"{re.escape(FAKE_TOKEN)}(?=[^\s<])", f"{FAKE_TOKEN} ", text)


FAMILIES = {"CLIPImageProcessor": ClipImageProcessor, "LlavaImageProcessor": ClipImageProcessor,
            "SiglipImageProcessor": SiglipImageProcessor, "Idefics3ImageProcessor": Idefics3ImageProcessor,
            "SmolVLMImageProcessor": Idefics3ImageProcessor, "Idefics2ImageProcessor": Idefics2ImageProcessor}
MODEL_TYPES = {"idefics3": Idefics3ImageProcessor, "smolvlm": Idefics3ImageProcessor,
               "idefics2": Idefics2ImageProcessor}


def _family(image_config, config):
    name = image_config.get("image_processor_type", "").removesuffix("Fast").removesuffix("Pil")
    if name in FAMILIES:
        return FAMILIES[name]
    if not name and config.get("model_type") == "llava":
        tower = (config.get("vision_config") or {}).get("model_type", "")
        return SiglipImageProcessor if tower.startswith("siglip") else ClipImageProcessor
    if not name and config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    raise ValueError(f"unsupported image processor {name or config.get('model_type')!r}; "
                     f"supported: {', '.join(FAMILIES)}")


def _read_json(model_dir, name):
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        return {}
    with open(path) as file:
        return json.load(file)


# Output sizes, each with HF's own float expression and rounding.

def _clip_size(h, w, size):
    """{"height", "width"}, or {"shortest_edge"}: the short side to it, the long side floored."""
    if "shortest_edge" in size and "longest_edge" not in size:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size["shortest_edge"] * long / short)
        return (new_long, size["shortest_edge"]) if w <= h else (size["shortest_edge"], new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ValueError(f"unsupported image processor size {size}")


def _idefics2_size(h, w, size):
    """Shrink so the longest edge <= longest_edge (aspect kept, floored), then raise each edge to >= shortest_edge."""
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    aspect = w / h
    if w >= h and w > size["longest_edge"]:
        w = size["longest_edge"]
        h = int(w / aspect)
    elif h > w and h > size["longest_edge"]:
        h = size["longest_edge"]
        w = int(h * aspect)
    return max(h, size["shortest_edge"]), max(w, size["shortest_edge"])


def _idefics3_size(h, w, longest_edge):
    """Longest edge to longest_edge (up or down), the other floored then made even; all capped at 4096."""
    aspect = w / h
    if w >= h:
        w = longest_edge
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest_edge
        w = int(h * aspect)
        w += w % 2
    return _idefics2_size(max(h, 1), max(w, 1), {"shortest_edge": 1, "longest_edge": 4096})


def _multiples_of(h, w, tile):
    """Idefics3's resize_for_vision_encoder: the long side up to a multiple of tile, then the short side."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def _idefics3_seq_len(config):
    """Image tokens per tile: the encoder's patch grid, shrunk by the connector's pixel shuffle."""
    vision = config.get("vision_config") or {}
    if "image_size" not in vision or "patch_size" not in vision:
        return 169  # Idefics3Processor's default
    return int((vision["image_size"] // vision["patch_size"]) ** 2 / config.get("scale_factor", 2) ** 2)


def _pad_to_square(x, color):
    h, w = x.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=x.dtype)
    out[:] = color
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = x
    return out


def _center_crop(x, crop_h, crop_w):
    """The centred window; where the image is smaller, HF pads with zeros (the extra pixel at the start)."""
    h, w = x.shape[:2]
    if h < crop_h or w < crop_w:
        canvas = np.zeros((max(h, crop_h), max(w, crop_w), 3), dtype=x.dtype)
        top, left = math.ceil((canvas.shape[0] - h) / 2), math.ceil((canvas.shape[1] - w) / 2)
        canvas[top:top + h, left:left + w] = x
        x, (h, w) = canvas, canvas.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return x[top:top + crop_h, left:left + crop_w]


def _quarters(x):
    """Idefics2's split: top-left, top-right, bottom-left, bottom-right, cut at floor(h/2), floor(w/2)."""
    h, w = x.shape[0] // 2, x.shape[1] // 2
    return [x[:h, :w], x[:h, w:], x[h:, :w], x[h:, w:]]
