"""lanner.vision.processors equal the HF image processors (PIL backends) and processors' prompt layouts;
load_image turns user input into RGB with clear errors; resize's bicubic / lanczos / antialias are PIL's."""
import base64
import copy
import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lanner.vision import resize
from lanner.vision.images import image_digest, load_image
from lanner.vision.processors import load_image_processor

transformers = pytest.importorskip("transformers")
from transformers import (CLIPImageProcessorPil, Idefics2ImageProcessorPil, Idefics2Processor,  # noqa: E402
                          Idefics3ImageProcessorPil, Idefics3Processor, LlavaImageProcessorPil, LlavaProcessor,
                          SiglipImageProcessorPil)
from vlm_models import vlm_tokenizer  # noqa: E402

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def picture(w, h, mode="RGB", seed=0):
    """Colour waves, noise, and a saturated box whose hard edges make bicubic and lanczos overshoot."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([128 + 90 * np.sin(x / (3 + 2 * c) + c) * np.cos(y / (4 + c)) for c in range(3)], -1)
    rgb += rng.normal(0, 12, rgb.shape)
    rgb[h // 4: h // 2 + 1, w // 3: 2 * w // 3 + 1] = (255, 0, 255)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    if mode == "P":  # a palette image with a transparent colour
        image = image.convert("P")
        image.info["transparency"] = 0
    return image.convert(mode) if mode in ("L", "RGB") else image


# Odd sizes, landscape and portrait, smaller and larger than every target, grayscale, alpha, palette.
IMAGES = {"landscape": picture(37, 23), "portrait": picture(19, 45, seed=1), "large": picture(150, 97, seed=2),
          "gray": picture(64, 64, "L", seed=3), "rgba": picture(83, 121, "RGBA", seed=4),
          "palette": picture(41, 29, "P", seed=5), "tiny": picture(13, 13, seed=6), "thin": picture(7, 90, seed=7)}

# Small sizes keep the test fast; each family also in its other shapes (padding, splitting, one tile).
FAMILIES = {
    "clip": (lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
             lambda ip, tok: LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="default",
                                            num_additional_image_tokens=1)),
    "llava-pad-crop-larger": (
        lambda: LlavaImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 32, "width": 28}, do_pad=True),
        lambda ip, tok: LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="full",
                                       num_additional_image_tokens=1)),
    "siglip": (lambda: SiglipImageProcessorPil(size={"height": 24, "width": 40}),
               lambda ip, tok: LlavaProcessor(ip, tok, patch_size=8, vision_feature_select_strategy="full")),
    "idefics3": (lambda: Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}),
                 lambda ip, tok: Idefics3Processor(ip, tok, image_seq_len=4)),
    "idefics3-one-tile": (
        lambda: Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}),
        lambda ip, tok: Idefics3Processor(ip, tok, image_seq_len=4)),
    "idefics3-no-split": (
        lambda: Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                          do_image_splitting=False),
        lambda ip, tok: Idefics3Processor(ip, tok, image_seq_len=4)),
    "idefics2": (lambda: Idefics2ImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 48}),
                 lambda ip, tok: Idefics2Processor(ip, tok, image_seq_len=4)),
    "idefics2-split": (
        lambda: Idefics2ImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 48}, do_image_splitting=True),
        lambda ip, tok: Idefics2Processor(ip, tok, image_seq_len=4)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(HF image processor, HF processor, ours read from what the HF processor's save_pretrained wrote)."""
    make_image_processor, make_processor = FAMILIES[request.param]
    image_processor = make_image_processor()
    processor = make_processor(image_processor, copy.deepcopy(vlm_tokenizer()))  # processors add tokens
    path = tmp_path_factory.mktemp(request.param)
    processor.save_pretrained(path)
    return image_processor, processor, load_image_processor(str(path), {})


# --- pixel values and prompts against HF --------------------------------------------------------

def test_pixel_values_and_masks_equal_hf_image_processor_exactly(family):
    """PIL's resampler is reproduced bit for bit and rescale / normalize use HF's arithmetic, so the
    tolerance is zero: identical shapes, values and masks."""
    image_processor, _, ours = family
    for name, image in IMAGES.items():
        expected = image_processor(image, return_tensors="pt")
        got = ours(image)
        pixel_values = expected["pixel_values"]
        pixel_values = pixel_values[0] if pixel_values.ndim == 5 else pixel_values  # Idefics: [batch, tiles, ...]
        assert got.pixel_values.dtype == torch.float32
        torch.testing.assert_close(got.pixel_values, pixel_values, atol=0, rtol=0, msg=name)
        if "pixel_attention_mask" in expected:
            assert torch.equal(got.pixel_attention_mask, expected["pixel_attention_mask"][0].bool()), name
        else:
            assert got.pixel_attention_mask is None


def test_expanded_prompt_tokenizes_to_hf_processor_input_ids(family):
    _, processor, ours = family
    tokenizer = processor.tokenizer
    text = "User: <image><image>Compare them.\n<image> and <image>?<end_of_utterance>\nAssistant:"
    images = [IMAGES["landscape"], IMAGES["large"], IMAGES["rgba"], IMAGES["thin"]]
    expected = processor(text=text, images=images)["input_ids"][0]
    processed = [ours(image) for image in images]
    assert tokenizer(ours.expand(text, processed))["input_ids"] == expected
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sum(p.num_tokens for p in processed) == expected.count(image_token_id)
    for image, p in zip(images, processed):  # placeholder: HF's expansion of one image alone
        alone = processor(text="<image>", images=[image])["input_ids"][0]
        assert alone.count(image_token_id) == p.num_tokens


def test_expand_needs_one_image_per_placeholder(family):
    ours = family[2]
    image = ours(IMAGES["tiny"])
    with pytest.raises(ValueError, match="2 <image> placeholder.*1 image"):
        ours.expand("<image> and <image>", [image])
    with pytest.raises(ValueError, match="0 <image> placeholder.*1 image"):
        ours.expand("no placeholder", [image])


def test_token_counts_fall_back_to_config_json_as_hf_models_do(tmp_path):
    """Without processor_config.json (an image processor saved alone), LLaVA's patch size and feature strategy
    come from config.json, with the CLIP tower's class token; Idefics3's image_seq_len from its pixel shuffle,
    Idefics2's from its perceiver."""
    def ours(image_processor, config):
        path = tmp_path / type(image_processor).__name__
        image_processor.save_pretrained(path)
        assert os.listdir(path) == ["preprocessor_config.json"]
        return load_image_processor(str(path), config)

    clip = ours(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                {"model_type": "llava", "vision_feature_select_strategy": "default",
                 "vision_config": {"model_type": "clip_vision_model", "patch_size": 8}})
    assert clip(IMAGES["large"]).num_tokens == 16  # 17 encoder rows less the class token
    siglip = ours(SiglipImageProcessorPil(size={"height": 24, "width": 40}),
                  {"model_type": "llava", "vision_feature_select_strategy": "full",
                   "vision_config": {"model_type": "siglip_vision_model", "patch_size": 8}})
    assert siglip(IMAGES["large"]).num_tokens == 15
    idefics3 = ours(Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}),
                    {"model_type": "idefics3", "scale_factor": 2, "vision_config": {"image_size": 32, "patch_size": 8}})
    assert idefics3(IMAGES["large"]).num_tokens == 4
    idefics2 = ours(Idefics2ImageProcessorPil(),
                    {"model_type": "idefics2", "perceiver_config": {"resampler_n_latents": 3}})
    fake = "<fake_token_around_image>"
    assert idefics2(IMAGES["large"]).placeholder == fake + "<image>" * 3 + fake


def test_unknown_or_missing_image_processor_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no image processor config"):
        load_image_processor(str(tmp_path), {})
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ViTImageProcessor"}))
    with pytest.raises(ValueError, match="unsupported image processor 'ViTImageProcessor'"):
        load_image_processor(str(tmp_path), {})


# --- resize: bicubic, lanczos and antialias are PIL's ---------------------------------------------

SIZES = [((37, 53), (80, 61)), ((37, 53), (13, 20)), ((120, 90), (17, 40)), ((9, 50), (31, 7)), ((1, 5), (4, 9)),
         ((64, 64), (32, 32)), ((40, 30), (40, 17)), ((23, 23), (23, 23))]


@pytest.mark.parametrize("mode", list(PIL_FILTERS))
@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_antialias_is_pils_resampler_bit_for_bit(mode, channels):
    """Noise is the hard case: every pass overshoots and PIL clips and rounds between its passes."""
    rng = np.random.default_rng(0)
    for in_hw, out_hw in SIZES:
        image = rng.integers(0, 256, (*in_hw, 3), dtype=np.uint8)
        image = image[..., 0] if channels == 1 else image
        expected = np.asarray(Image.fromarray(image).resize(out_hw[::-1], PIL_FILTERS[mode]))
        np.testing.assert_array_equal(resize(image, size=out_hw, mode=mode, antialias=True), expected)
        if channels == 3:  # a CHW tensor is resampled plane by plane: the same pixels
            planes = resize(torch.from_numpy(image).permute(2, 0, 1), size=out_hw, mode=mode, antialias=True)
            np.testing.assert_array_equal(planes.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("mode", list(PIL_FILTERS))
def test_float_kernels_are_pils_kernels(mode):
    """PIL's float ("F") images have no intermediate rounding: they agree to float32 precision."""
    rng = np.random.default_rng(1)
    for in_hw, out_hw in SIZES:
        image = (rng.random(in_hw) * 255).astype(np.float32)
        expected = np.asarray(Image.fromarray(image, mode="F").resize(out_hw[::-1], PIL_FILTERS[mode]))
        np.testing.assert_allclose(resize(image.astype(np.float64), size=out_hw, mode=mode, antialias=True),
                                   expected, atol=1e-4)


def test_bicubic_antialias_matches_torch_interpolate_antialias():
    """torch's antialiased bicubic uses PIL's a = -0.5 kernel too."""
    x = torch.rand(1, 3, 37, 53, dtype=torch.float64)
    for out_hw in [(80, 61), (13, 20), (17, 40)]:
        expected = F.interpolate(x, size=out_hw, mode="bicubic", antialias=True)
        torch.testing.assert_close(resize(x, size=out_hw, mode="bicubic", antialias=True), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["bicubic", "lanczos"])
@pytest.mark.parametrize("antialias", [False, True])
def test_constant_images_stay_constant_and_the_same_size_is_the_identity(mode, antialias):
    image = np.random.default_rng(2).integers(0, 256, (9, 14, 3)).astype(np.uint8)
    for dtype in (np.uint8, np.float64):
        for out_hw in [(4, 30), (20, 5), (1, 1)]:
            out = resize(np.full((9, 14, 3), 77, dtype), size=out_hw, mode=mode, antialias=antialias)
            np.testing.assert_allclose(out, 77, atol=1e-9)
        np.testing.assert_allclose(resize(image.astype(dtype), size=(9, 14), mode=mode, antialias=antialias), image,
                                   atol=1e-9)


@pytest.mark.parametrize("mode", ["bicubic", "lanczos"])
@pytest.mark.parametrize("antialias", [False, True])
def test_overshoot_is_clipped_for_integer_images_only(mode, antialias):
    step = np.repeat(np.array([[0, 0, 255, 255]], np.uint8), 4, axis=0)
    floats = resize(step.astype(np.float64), size=(4, 11), mode=mode, antialias=antialias)
    assert floats.min() < -1 and floats.max() > 256
    ints = resize(step, size=(4, 11), mode=mode, antialias=antialias)
    assert np.abs(ints - np.clip(floats, 0, 255)).max() <= 0.5 + 1e-3  # clipped, not wrapped around


# --- load_image --------------------------------------------------------------------------------

def encoded(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def data_url(data, mime="image/png"):
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_claiming(width, height):
    """A 1x1 PNG whose header claims width x height: decoding it would fail, so only a header check stops it."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_every_source_kind_loads_to_the_same_rgb_image(tmp_path):
    image = IMAGES["landscape"]
    (tmp_path / "a.png").write_bytes(encoded(image))
    sources = [image, encoded(image), data_url(encoded(image)), str(tmp_path / "a.png"), tmp_path / "a.png",
               f"file://{tmp_path}/a.png"]
    for source in sources:
        loaded = load_image(source, allowed_local_media_path=str(tmp_path))
        assert loaded.mode == "RGB" and image_digest(loaded) == image_digest(image)


def test_other_modes_become_rgb_with_transparency_on_white():
    assert load_image(IMAGES["gray"]).mode == "RGB"
    clear = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert load_image(encoded(clear)).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (3, 2), (0, 128))
    assert load_image(half).getpixel((1, 1)) == (127, 127, 127)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert load_image(encoded(IMAGES["landscape"], "JPEG", exif=exif)).size == (23, 37)


def test_remote_urls_are_refused():
    for url in ["https://example.com/cat.png", "http://example.com/cat.png", "HTTPS://EXAMPLE.COM/X.PNG"]:
        with pytest.raises(ValueError, match="remote image URLs are not supported"):
            load_image(url)
    with pytest.raises(ValueError, match="unsupported image URL scheme 'ftp'"):
        load_image("ftp://example.com/cat.png")


def test_local_files_only_inside_the_allowed_directory(tmp_path):
    allowed, outside = tmp_path / "media", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    png = encoded(IMAGES["tiny"])
    (allowed / "ok.png").write_bytes(png)
    (outside / "secret.png").write_bytes(png)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (tmp_path / "media-evil").mkdir()  # a sibling sharing the allowed directory's name as a prefix
    (tmp_path / "media-evil" / "x.png").write_bytes(png)
    for source in [f"file://{allowed}/ok.png", str(allowed / "ok.png")]:
        with pytest.raises(ValueError, match="disabled.*allowed_local_media_path"):
            load_image(source)
        assert load_image(source, allowed_local_media_path=str(allowed)).size == (13, 13)
    for source in [f"file://{allowed}/../private/secret.png", f"file://{allowed}/link.png",
                   str(outside / "secret.png"), f"file://{tmp_path}/media-evil/x.png"]:
        with pytest.raises(ValueError, match="outside the allowed local media path"):
            load_image(source, allowed_local_media_path=str(allowed))
    with pytest.raises(ValueError, match="cannot read image file"):
        load_image(f"file://{allowed}/missing.png", allowed_local_media_path=str(allowed))
    with pytest.raises(ValueError, match="absolute local path"):
        load_image("file://host/share/a.png", allowed_local_media_path=str(allowed))


BAD_INPUTS = {
    "not-an-image": (b"not an image at all", "unsupported or unrecognised image format"),
    "empty": (b"", "empty"),
    "truncated-png": (encoded(IMAGES["large"])[:300], "corrupt or truncated image"),
    "truncated-jpeg-header": (encoded(IMAGES["large"], "JPEG")[:400], "corrupt or truncated image"),
    "truncated-jpeg-data": (encoded(IMAGES["large"], "JPEG")[:-200], "corrupt or truncated image"),
    "corrupt-gif-header": (data_url(b"GIF89a broken"), "unrecognised image format"),
    "not-image-media-type": (data_url(b"x", mime="text/plain"), "media type 'text/plain'"),
    "bad-base64": ("data:image/png;base64,not*base64!", "invalid base64"),
    "not-base64": ("data:image/png," + "x" * 10, "base64-encoded"),
    "no-comma": ("data:image/png;base64", "malformed data URL"),
}


@pytest.mark.parametrize("source,message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_a_value_error_naming_the_problem(source, message):
    with pytest.raises(ValueError, match=message):
        load_image(source)


def test_decompression_bombs_are_refused_from_the_header_before_decoding():
    with pytest.raises(ValueError, match="too large: 10000x8000 is over the limit of 67108864 pixels"):
        load_image(png_claiming(10000, 8000))  # 80 MP: over our 64 MP, under PIL's own warning
    with pytest.raises(ValueError, match="too large"):
        load_image(png_claiming(30000, 30000))  # past PIL's DecompressionBombError too
    with pytest.raises(ValueError, match="too large: 150x97"):
        load_image(encoded(IMAGES["large"]), max_pixels=10000)
    with pytest.raises(ValueError, match="too large"):
        load_image(IMAGES["large"], max_pixels=10000)
    with pytest.raises(ValueError, match="PIL image, bytes, a path or a URL"):
        load_image(np.zeros((4, 4, 3), np.uint8))


@pytest.mark.parametrize("size", [(1, 600), (2000, 5), (1, 1)])
def test_slivers_are_refused_before_a_processor_scales_them_up(size):
    """A 1 x 65536 image is small, but a shortest-edge resize to 336 would make it 22 gigapixels."""
    with pytest.raises(ValueError, match="too thin"):
        load_image(Image.new("RGB", size))


def test_image_digest_is_a_content_hash():
    image = IMAGES["landscape"]
    assert image_digest(load_image(encoded(image))) == image_digest(image) == image_digest(image.copy())
    changed = image.copy()
    changed.putpixel((0, 0), (1, 2, 3))
    assert image_digest(changed) != image_digest(image)
    flat = Image.new("RGB", (6, 1))
    assert image_digest(flat) != image_digest(flat.resize((1, 6))) != image_digest(flat.convert("L"))
    assert len(image_digest(image)) == 64
