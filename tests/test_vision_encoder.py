"""The vision side of each supported VLM against HF transformers on tiny random checkpoints that the installed
transformers builds and saves: `encode` gives exactly the rows HF puts in place of an image's <image> tokens,
batching changes nothing, either checkpoint layout loads, and the text decoder splits off as a causal LM."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from vlm_models import save_tiny_vlm

from lanner.vision.encoder import canonical_name, image_token_id, load_vision_encoder, split_text_config

transformers = pytest.importorskip("transformers")
KINDS = ("llava-clip", "llava-siglip", "idefics3", "idefics2")
TOL = 1e-5
SIZES = [(32, 32), (50, 37), (20, 64)]   # (width, height): square, landscape, tall


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    """(kind, HF model, saved dir, config dict, saved weights, HF processor)."""
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny_vlm(path, request.param)
    config = json.loads((path / "config.json").read_text())
    processor = transformers.AutoProcessor.from_pretrained(path)
    return request.param, model, path, config, load_file(path / "model.safetensors"), processor


def image(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def hf_batch(kind, processor, images):
    """The HF image processor's output for images as separate prompts: (pixel_values, pixel_attention_mask)."""
    nested = images if kind.startswith("llava") else [[im] for im in images]
    out = processor.image_processor(nested, return_tensors="pt")
    return out["pixel_values"], out.get("pixel_attention_mask")


def per_image(kind, pixel_values, mask):
    """Split a processed batch into the (tiles, mask) inputs of encode(), one per image."""
    if kind.startswith("llava"):
        return [(pv[None], None) for pv in pixel_values]
    return [(pixel_values[i], None if mask is None else mask[i]) for i in range(len(pixel_values))]


def hf_image_features(kind, model, pixel_values, mask):
    with torch.no_grad():
        if kind.startswith("llava"):
            return model.model.get_image_features(pixel_values=pixel_values).pooler_output
        return model.model.get_image_features(pixel_values, mask).pooler_output


def test_encode_gives_the_rows_hf_puts_in_place_of_the_image_tokens(tiny):
    """Images processed in one batch (Idefics: padded with all-zero tiles and masked pixels), each encoded alone."""
    kind, model, _, config, weights, processor = tiny
    encoder = load_vision_encoder(config, weights)
    pixel_values, mask = hf_batch(kind, processor, [image(w, h, seed) for seed, (w, h) in enumerate(SIZES)])
    expected = hf_image_features(kind, model, pixel_values, mask)
    for (tiles, tile_mask), want in zip(per_image(kind, pixel_values, mask), expected):
        got = encoder.encode(tiles, tile_mask)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_encode_gives_one_row_per_image_token_of_the_prompt(tiny):
    kind, _, _, config, weights, processor = tiny
    encoder = load_vision_encoder(config, weights)
    for w, h in SIZES:
        inputs = processor(text="<image>", images=[image(w, h)], return_tensors="pt")
        rows = encoder.encode(*per_image(kind, inputs["pixel_values"], inputs.get("pixel_attention_mask"))[0])
        assert rows.shape == ((inputs["input_ids"] == image_token_id(config)).sum(), encoder.text_hidden_size)


def test_encode_batch_equals_encode_one_by_one(tiny):
    """Different sizes in one call: tiles of a size share a tower pass (Idefics2 pads and masks them all into
    one); LLaVA also at a size it was not trained on, its position embeddings resampled."""
    kind, _, _, config, weights, processor = tiny
    encoder = load_vision_encoder(config, weights)
    images = [per_image(kind, *hf_batch(kind, processor, [image(w, h, seed)]))[0] for seed, (w, h) in enumerate(SIZES)]
    if kind.startswith("llava"):
        images.insert(1, (torch.randn(1, 3, 48, 40), None))
    batched = encoder.encode_batch(images)
    for (tiles, mask), got in zip(images, batched):
        torch.testing.assert_close(got, encoder.encode(tiles, mask), rtol=0, atol=TOL)
    if kind.startswith("llava"):
        assert batched[1].shape[0] == 6 * 5   # a 6 x 5 patch grid ("default" drops CLIP's class row)


def older_layout(kind: str, name: str) -> str:
    """transformers>=5 names -> those of checkpoints saved before it (llava-1.5-hf); Idefics2/3 kept theirs."""
    if not kind.startswith("llava"):
        return name
    name = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", name)
    name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
    name = re.sub(r"^lm_head\.", "language_model.lm_head.", name)
    return re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)


def test_both_checkpoint_layouts_load_as_transformers_maps_them(tiny, tmp_path):
    """In-memory transformers>=5 names, the saved file, and older names (which HF itself loads) give the same."""
    kind, model, _, config, weights, processor = tiny
    current = model.state_dict()
    older = {older_layout(kind, k): v.clone() for k, v in current.items()}
    save_file(older, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    tiles, mask = per_image(kind, *hf_batch(kind, processor, [image(50, 37)]))[0]
    want = load_vision_encoder(config, weights).encode(tiles, mask)
    for layout in (current, older):
        torch.testing.assert_close(load_vision_encoder(config, layout).encode(tiles, mask), want, rtol=0, atol=0)


def test_a_missing_or_misshaped_tensor_is_a_value_error_naming_it(tiny):
    _, _, _, config, weights, _ = tiny
    name = next(k for k in weights if k.endswith("encoder.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(ValueError, match=re.escape(canonical_name(name))):
        load_vision_encoder(config, {k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        load_vision_encoder(config, {**weights, name: weights[name][:-1]})


@pytest.mark.parametrize("layout", ["saved", "in-memory"])
def test_split_text_config_is_a_causal_lm_with_the_vlm_text_logits(tiny, layout, tmp_path):
    """The split loads strictly into transformers' causal LM of the text architecture and reproduces the VLM's
    text-only logits, tied embeddings included (llava-siglip ties at the top level only)."""
    kind, model, _, config, weights, _ = tiny
    text_config, text_weights = split_text_config(config, weights if layout == "saved" else model.state_dict())
    assert text_config["architectures"] == ["MistralForCausalLM" if kind == "idefics2" else "LlamaForCausalLM"]
    assert text_config["tie_word_embeddings"] == (kind == "llava-siglip")
    (tmp_path / "config.json").write_text(json.dumps(text_config))
    save_file({k: v.contiguous() for k, v in text_weights.items()}, tmp_path / "model.safetensors")
    lm, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(lm).__name__ == text_config["architectures"][0] and not any(info.values()), info
    ids = torch.tensor([[1, 5, 300, 42, 7, 900, 12]])
    with torch.no_grad():
        torch.testing.assert_close(lm.float().eval()(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=TOL)
