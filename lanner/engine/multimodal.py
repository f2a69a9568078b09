"""Images in the packed step. A prompt's image placeholders are expanded into image tokens (the processor's layout);
each image token's row gets a row of the image's encoder features instead of a token embedding, through the same
(rows, values) embeds a prompt adapter's virtual tokens use. The encoder runs once per distinct image, batched
across the step's requests, its output kept in an LRU cache by the image's content hash; the prefix cache keys an
image token by that hash, so the same image + prompt hits and a different image never does."""
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

def is_vision_model(config: dict) -> bool:
    from lanner.vision.encoder import VISION_ARCHITECTURES
    return (config.get("architectures") or [None])[0] in VISION_ARCHITECTURES


def split_prompt(prompt) -> tuple[str | list[int], list]:
    """vLLM's prompt shapes: text, token ids, or {"prompt": text, "multi_modal_data": {"image": one or a list}}
    (or "prompt_token_ids" in place of "prompt"); returns the prompt and its images."""
    if not isinstance(prompt, dict):
        return prompt, []
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
    data = prompt.get("multi_modal_data") or {}
    unknown |= {f"multi_modal_data.{k}" for k in set(data) - {"image"}}
    if unknown:
        raise ValueError(f"unknown prompt field(s) {sorted(unknown)}: a prompt dict takes prompt or "
                         f"prompt_token_ids, and multi_modal_data with images under 'image'")
    text = prompt.get("prompt", prompt.get("prompt_token_ids"))
    if text is None:
        raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids'")
    images = data.get("image", [])
    return text, list(images) if isinstance(images, (list, tuple)) else [images]


@dataclass
class ImageInput:
    """One image of a request: its pixels until encoded, then its encoder output (a few MB of pixels become
    num_tokens rows, kept for a recompute after preemption even when the shared cache has dropped them)."""
    digest: str
    num_tokens: int
    pixels: "lanner.vision.processors.ProcessedImage | None"
    features: torch.Tensor | None = None


@dataclass
class ImagePrompt:
    """A request's images and where their features go: feature_row[i] is the row of the images' concatenated
    features that token i of the prompt takes, -1 for a text token."""
    images: list[ImageInput]
    feature_row: torch.Tensor

    def locate(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature rows -> (the image each belongs to, the row within that image)."""
        offsets = torch.tensor([0] + [i.num_tokens for i in self.images]).cumsum(0)[:-1]
        image_of = torch.searchsorted(offsets, rows, right=True) - 1
        return image_of, rows - offsets[image_of]

    def keys(self, start: int, end: int, token_ids: list[int]) -> tuple:
        """Tokens start..end-1 as the prefix cache keys them: an image token as (its image's digest, its row)."""
        tokens, rows = token_ids[start:end], self.feature_row[start:end].tolist()
        if max(rows, default=-1) < 0:
            return tuple(tokens)
        rows += [-1] * (len(tokens) - len(rows))   # output tokens are text
        image_of, local = (t.tolist() for t in self.locate(torch.tensor(rows).clamp(min=0)))
        return tuple(t if r < 0 else (self.images[k].digest, j)
                     for t, r, k, j in zip(tokens, rows, image_of, local))


class VisionPath:
    """The image processor, the vision encoder (tower + connector) and the encoder-output cache of one model."""

    def __init__(self, model_dir: str, config: dict, weights: dict, tokenizer, dtype: torch.dtype,
                 max_images_per_prompt: int, cache_bytes: int = 512 << 20):
        from lanner.vision.encoder import image_token_id, load_vision_encoder
        from lanner.vision.processors import load_image_processor
        self.processor = load_image_processor(model_dir, config)
        self.encoder = load_vision_encoder(config, weights, dtype).eval()
        self.image_token_id = image_token_id(config)
        self.tokenizer, self.max_images = tokenizer, max_images_per_prompt
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_bytes, self.cached_bytes = cache_bytes, 0
        self.num_encoded = 0   # images run through the encoder (cache misses), for tests and stats

    @staticmethod
    def split(config: dict, weights: dict) -> tuple[dict, dict]:
        """The text model's config and weights, as a causal LM's."""
        from lanner.vision.encoder import split_text_config
        return split_text_config(config, weights)

    def prompt(self, text: str, images: list, allowed_local_media_path: str | None = None
               ) -> tuple[list[int], ImagePrompt]:
        """Token ids of text with each image placeholder expanded, and where each image's features go."""
        from lanner.vision.images import image_digest, load_image
        if not isinstance(text, str):
            raise ValueError("a prompt with images must be text with image placeholders, not token ids")
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images in one prompt, but the limit is {self.max_images} "
                             f"(limit_mm_per_prompt)")
        loaded = [load_image(image, allowed_local_media_path) for image in images]
        processed = [self.processor(image) for image in loaded]
        inputs = [ImageInput(image_digest(image), p.num_tokens, p) for image, p in zip(loaded, processed)]
        expanded = self.processor.expand(text, processed)
        token_ids = self.tokenizer.encode(expanded)
        is_image = torch.tensor(token_ids) == self.image_token_id
        expected = sum(i.num_tokens for i in inputs)
        if int(is_image.sum()) != expected:
            raise ValueError(f"the prompt holds {int(is_image.sum())} image tokens after expansion, but its "
                             f"{len(inputs)} image(s) fill {expected}: write image tokens only as placeholders")
        feature_row = torch.full((len(token_ids),), -1, dtype=torch.long)
        feature_row[is_image] = torch.arange(expected)
        return token_ids, ImagePrompt(inputs, feature_row)

    def features(self, images: list[ImageInput]) -> None:
        """Give each image its encoder output: from the cache, or encoded (all misses in one batch)."""
        for image in images:
            if image.features is None and image.digest in self.cache:
                image.features = self.cache[image.digest]
                self.cache.move_to_end(image.digest)
        missing = list({i.digest: i for i in images if i.features is None}.values())
        if missing:
            with torch.inference_mode():
                outs = self.encoder.encode_batch([(i.pixels.pixel_values, i.pixels.pixel_attention_mask)
                                                  for i in missing])
            outs = [o.clone() for o in outs]   # views of the batch's output would keep all of it alive
            self.num_encoded += len(missing)
            for image, features in zip(missing, outs):
                self.remember(image.digest, features)
            found = dict(zip((i.digest for i in missing), outs))
            for image in images:
                image.features = found.get(image.digest, image.features)
        for image in images:
            image.pixels = None

    def remember(self, digest: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.cache_bytes:
            return
        self.cache[digest] = features
        self.cached_bytes += size
        while self.cached_bytes > self.cache_bytes:
            _, old = self.cache.popitem(last=False)
            self.cached_bytes -= old.numel() * old.element_size()

    def embeds(self, chunks: list[tuple[ImagePrompt, int, int, int]]) -> tuple[list[int], list[torch.Tensor]]:
        """chunks: (image prompt, first packed row, first token index, tokens) of each sequence computed this
        step; returns the packed rows that take image features and their values. Only the images with tokens in
        this step are looked up (encoded on a miss), all of them in one encoder batch."""
        needed = []   # (packed rows, image prompt, image index, feature rows of that image)
        for prompt, row0, start, num in chunks:
            feature_row = prompt.feature_row[start:start + num]
            taken = (feature_row >= 0).nonzero().flatten()
            if len(taken) == 0:
                continue
            image_of, local = prompt.locate(feature_row[taken])
            for k in image_of.unique().tolist():
                mine = image_of == k
                needed.append((taken[mine] + row0, prompt.images[k], local[mine]))
        if not needed:
            return [], []
        self.features([image for _, image, _ in needed])
        rows = [r for r, _, _ in needed]
        values = [image.features[local] for _, image, local in needed]
        return torch.cat(rows).tolist(), values


def template_takes_parts(template: str | None) -> bool:
    """Whether a chat template reads a message's content as a list of typed parts (as VLMs' templates do) rather
    than as one string."""
    pattern = r"""\[\s*['"]type['"]\s*\]|\.type\b|selectattr\(\s*['"]type['"]"""
    return bool(template) and re.search(pattern, template) is not None


def chat_parts(messages: list[dict], takes_parts: bool, placeholder: str = "<image>") -> tuple[list[dict], list]:
    """OpenAI-style messages -> (messages for the chat template, the images in order). Content parts of type
    text, image_url ({"url": ...} or the URL), image or image_pil; for a template that reads content as a string,
    the parts are joined in order with the model's image placeholder where each image is; for one that reads
    parts, string content becomes one text part."""
    images, out = [], []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = [chat_part(part, images, f"messages[{i}].content[{j}]") for j, part in enumerate(content)]
            content = parts if takes_parts else "".join(p.get("text", placeholder) for p in parts)
        elif isinstance(content, str) and takes_parts:   # such a template iterates the content: never a string
            content = [{"type": "text", "text": content}]
        out.append({**message, "content": content})
    return out, images


def chat_part(part: dict, images: list, where: str) -> dict:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text") or ""}
    if kind in ("image_url", "image", "image_pil"):
        source = part.get(kind)
        source = source.get("url") if isinstance(source, dict) else source
        if source is None:
            raise ValueError(f"{where}: a {kind} part without its image")
        images.append(source)
        return {"type": "image"}
    raise ValueError(f"{where}: unsupported content part type {kind!r} (text, image_url, image, image_pil)")
