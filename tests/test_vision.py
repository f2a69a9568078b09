"""lanner.vision: resize matches torch / OpenCV / PIL and a per-pixel reference; pos-embed resampling; CLI."""
import argparse
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lanner.vision import interpolate_pos_embed, resize
from lanner.vision.cli import add_parser

cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")

# (in_hw, out_hw): up, down, non-integer, and a different factor per axis.
SIZES = [((16, 16), (32, 32)), ((37, 53), (80, 61)), ((37, 53), (13, 20)), ((40, 30), (20, 15)),
         ((9, 50), (31, 7)), ((1, 5), (4, 9)), ((23, 23), (23, 23))]
SCALES = [2.0, 1.7, 0.5, 0.3, (0.4, 2.3), (3.0, 1.25)]


def rng():
    return np.random.default_rng(0)


def source(d, n_in, n_out, align, scale=None):
    """The documented source coordinate of output index d (input pixel i centred at i)."""
    if align == "corners":
        return d * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    ratio = n_in / n_out if scale is None else 1 / scale
    return (d + 0.5) * ratio - 0.5 if align == "half_pixel" else d * ratio


def per_pixel_bilinear(image, out_h, out_w, align, scale=(None, None)):
    """The textbook per-pixel loop, written correctly: clamp to the edge, rows are y, columns are x."""
    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w) + image.shape[2:])
    for y in range(out_h):
        sy = min(max(source(y, in_h, out_h, align, scale[0]), 0), in_h - 1)
        y0 = int(np.floor(sy))
        y1, ty = min(y0 + 1, in_h - 1), sy - y0
        for x in range(out_w):
            sx = min(max(source(x, in_w, out_w, align, scale[1]), 0), in_w - 1)
            x0 = int(np.floor(sx))
            x1, tx = min(x0 + 1, in_w - 1), sx - x0
            top = (1 - tx) * image[y0, x0] + tx * image[y0, x1]
            bottom = (1 - tx) * image[y1, x0] + tx * image[y1, x1]
            out[y, x] = (1 - ty) * top + ty * bottom
    return out


def torch_kwargs(size=None, scale=None):
    if size is not None:
        return {"size": size}
    return {"scale_factor": scale if isinstance(scale, tuple) else (scale, scale)}


# --- agreement with libraries ------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", SIZES)
def test_bilinear_matches_torch_interpolate_with_size(in_hw, out_hw, align_corners):
    x = torch.rand(2, 3, *in_hw, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=align_corners)
    got = resize(x, size=out_hw, align="corners" if align_corners else "half_pixel")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_bilinear_matches_torch_interpolate_with_scale_factor(scale, align_corners):
    x = torch.rand(1, 3, 21, 34, generator=torch.Generator().manual_seed(1))
    expected = F.interpolate(x, mode="bilinear", align_corners=align_corners, **torch_kwargs(scale=scale))
    got = resize(x, scale=scale, align="corners" if align_corners else "half_pixel")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", SIZES + [((100, 90), (7, 11))])
def test_antialias_matches_torch_interpolate_antialias(in_hw, out_hw):
    x = torch.rand(1, 3, *in_hw, generator=torch.Generator().manual_seed(2))
    expected = F.interpolate(x, size=out_hw, mode="bilinear", antialias=True)
    torch.testing.assert_close(resize(x, size=out_hw, antialias=True), expected, atol=1e-5, rtol=0)


def test_float64_agrees_with_torch_to_rounding_error():
    x = torch.rand(1, 2, 37, 53, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for kwargs in [{"size": (80, 61)}, {"scale": (0.4, 2.3)}]:
        expected = F.interpolate(x, mode="bilinear", antialias=True, **torch_kwargs(**kwargs))
        torch.testing.assert_close(resize(x, antialias=True, **kwargs), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("in_hw,out_hw", SIZES + [((64, 64), (32, 32))])
def test_uint8_matches_opencv_inter_linear_within_one_level(in_hw, out_hw):
    image = rng().integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    expected = cv2.resize(image, out_hw[::-1], interpolation=cv2.INTER_LINEAR)
    got = resize(image, size=out_hw)
    assert got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.reshape(got.shape)).max() <= 1


@pytest.mark.parametrize("in_hw,out_hw", SIZES + [((120, 90), (17, 40))])
def test_uint8_antialias_matches_pil_bilinear_within_one_level(in_hw, out_hw):
    image = rng().integers(0, 256, (*in_hw, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.BILINEAR))
    got = resize(image, size=out_hw, antialias=True)
    assert np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("align,torch_mode", [("asymmetric", "nearest"), ("half_pixel", "nearest-exact")])
def test_nearest_matches_torch_except_where_its_float32_scale_misses_an_exact_boundary(align, torch_mode):
    for n_in in range(1, 20):
        for n_out in range(1, 64):
            x = torch.arange(n_in, dtype=torch.float32).view(1, 1, 1, n_in)
            ours = resize(x, size=(1, n_out), mode="nearest", align=align)[0, 0, 0].long()
            theirs = F.interpolate(x, size=(1, n_out), mode=torch_mode)[0, 0, 0].long()
            # Exact integer arithmetic: src = num / den, and the sample picks pixel floor(src).
            d = torch.arange(n_out)
            num, den = ((2 * d + 1) * n_in, 2 * n_out) if align == "half_pixel" else (d * n_in, n_out)
            assert torch.equal(ours, torch.clamp(num // den, max=n_in - 1))
            differ = ours != theirs
            assert (num[differ] % den == 0).all() and (theirs[differ] == ours[differ] - 1).all()


def test_nearest_corners_takes_the_closest_source_pixel():
    row = np.arange(5.0)[None, :]  # HW
    assert resize(row, size=(1, 9), mode="nearest", align="corners").tolist() == [[0, 1, 1, 2, 2, 3, 3, 4, 4]]


def test_nearest_keeps_integer_values_without_rounding():
    labels = np.array([[0, 7], [200, 3]], dtype=np.uint8)
    assert resize(labels, scale=2, mode="nearest").tolist() == [[0, 0, 7, 7]] * 2 + [[200, 200, 3, 3]] * 2


# --- the per-pixel reference ---------------------------------------------------------------------

@pytest.mark.parametrize("align", ["asymmetric", "half_pixel", "corners"])
@pytest.mark.parametrize("in_hw,out_hw", [((4, 4), (8, 8)), ((5, 7), (9, 4)), ((6, 3), (2, 11)), ((1, 3), (3, 1))])
def test_bilinear_matches_per_pixel_reference_with_size(align, in_hw, out_hw):
    image = rng().random((*in_hw, 2))
    expected = per_pixel_bilinear(image, *out_hw, align)
    np.testing.assert_allclose(resize(image, size=out_hw, align=align), expected, atol=1e-12)


@pytest.mark.parametrize("scale", [2.0, 1.5, 0.6, (2.5, 0.75)])
def test_asymmetric_matches_the_exercise_formula_src_equals_dst_over_scale(scale):
    image = rng().random((6, 5, 3))
    scales = scale if isinstance(scale, tuple) else (scale, scale)
    out_hw = tuple(int(np.floor(n * s)) for n, s in zip(image.shape[:2], scales))
    expected = per_pixel_bilinear(image, *out_hw, "asymmetric", scales)
    np.testing.assert_allclose(resize(image, scale=scale, align="asymmetric"), expected, atol=1e-12)


def test_asymmetric_upscale_repeats_the_last_row_and_column_instead_of_reading_past_them():
    image = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = resize(image, scale=2, align="asymmetric")
    np.testing.assert_allclose(out, [[0, .5, 1, 1], [1, 1.5, 2, 2], [2, 2.5, 3, 3], [2, 2.5, 3, 3]])


# --- properties ----------------------------------------------------------------------------------

dims = st.integers(1, 12)
out_dims = st.integers(1, 20)
aligns = st.sampled_from(["half_pixel", "corners", "asymmetric"])
methods = st.sampled_from([("bilinear", False), ("bilinear", True), ("nearest", False)])


@settings(max_examples=40, deadline=None)
@given(h=dims, w=dims, out_h=out_dims, out_w=out_dims, align=aligns, method=methods,
       value=st.floats(-1e3, 1e3), channels=st.integers(1, 4))
def test_constant_image_stays_constant(h, w, out_h, out_w, align, method, value, channels):
    mode, antialias = method
    image = np.full((h, w, channels), value, dtype=np.float32)
    out = resize(image, size=(out_h, out_w), mode=mode, align=align, antialias=antialias)
    np.testing.assert_allclose(out, np.float32(value), rtol=1e-6, atol=1e-6)
    u8 = np.full((h, w, channels), int(abs(value)) % 256, dtype=np.uint8)
    assert (resize(u8, size=(out_h, out_w), mode=mode, align=align, antialias=antialias) == u8[0, 0, 0]).all()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 12), w=st.integers(2, 12), out_h=out_dims, out_w=out_dims, align=aligns,
       a=st.floats(-5, 5), b=st.floats(-5, 5), c=st.floats(-5, 5))
def test_linear_ramp_is_reproduced_exactly_inside_the_image(h, w, out_h, out_w, align, a, b, c):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = resize(a * ys + b * xs + c, size=(out_h, out_w), align=align)
    sy = np.array([source(i, h, out_h, align) for i in range(out_h)])
    sx = np.array([source(j, w, out_w, align) for j in range(out_w)])
    inside = ((sy >= 0) & (sy <= h - 1))[:, None] & ((sx >= 0) & (sx <= w - 1))[None, :]
    expected = a * sy[:, None] + b * sx[None, :] + c
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(h=dims, w=dims, align=aligns, method=methods,
       dtype=st.sampled_from([np.uint8, np.int16, np.float16, np.float32, np.float64]))
def test_scale_one_is_the_identity(h, w, align, method, dtype):
    mode, antialias = method
    image = (rng().random((h, w, 3)) * 100).astype(dtype)
    out = resize(image, scale=1, mode=mode, align=align, antialias=antialias)
    assert out.dtype == image.dtype and np.array_equal(out, image)


@settings(max_examples=30, deadline=None)
@given(h=dims, w=dims, scale_y=st.floats(0.1, 4), scale_x=st.floats(0.1, 4),
       mode=st.sampled_from(["bilinear", "nearest"]))
def test_scale_gives_floor_of_size_times_scale(h, w, scale_y, scale_x, mode):
    out_hw = (int(np.floor(h * scale_y)), int(np.floor(w * scale_x)))
    if min(out_hw) < 1:
        with pytest.raises(ValueError, match="scale"):
            resize(np.zeros((h, w)), scale=(scale_y, scale_x), mode=mode)
    else:
        assert resize(np.zeros((h, w)), scale=(scale_y, scale_x), mode=mode).shape == out_hw


# --- layouts, types, dtypes ---------------------------------------------------------------------

@pytest.mark.parametrize("make,layout,expected_shape", [
    (lambda: np.zeros((6, 8, 3), np.uint8), None, (12, 16, 3)),  # numpy 3-D: HWC
    (lambda: torch.zeros(3, 6, 8), None, (3, 12, 16)),  # torch 3-D: CHW
    (lambda: np.zeros((2, 3, 6, 8), np.float32), None, (2, 3, 12, 16)),  # 4-D: NCHW
    (lambda: torch.zeros(6, 8, dtype=torch.float64), None, (12, 16)),  # 2-D: HW
    (lambda: np.zeros((3, 6, 8), np.float32), "CHW", (3, 12, 16)),
    (lambda: torch.zeros(6, 8, 3, dtype=torch.uint8), "HWC", (12, 16, 3)),
    (lambda: torch.zeros(2, 6, 8, 3), "NHWC", (2, 12, 16, 3)),
])
def test_layout_rule_and_output_type_shape_dtype(make, layout, expected_shape):
    image = make()
    out = resize(image, scale=2, layout=layout)
    assert type(out) is type(image) and out.dtype == image.dtype and tuple(out.shape) == expected_shape


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32,
                                   np.float16, np.float32, np.float64])
def test_every_numeric_dtype_round_trips_and_integers_round_half_up(dtype):
    integer = np.issubdtype(dtype, np.integer)
    low, high = (max(np.iinfo(dtype).min, -1000), min(np.iinfo(dtype).max, 1000)) if integer else (-100, 100)
    image = rng().integers(low, high, (7, 9, 3)).astype(dtype)
    out = resize(image, scale=2)  # weights 1/4 and 3/4: exact in any float, so ties stay ties
    exact = resize(image.astype(np.float64), scale=2)
    assert out.dtype == dtype
    if integer:
        np.testing.assert_array_equal(out, np.floor(exact + 0.5))
    else:
        np.testing.assert_allclose(out, exact, atol=0.1 if dtype == np.float16 else 1e-4)


def test_bfloat16_tensor_keeps_its_dtype():
    x = torch.rand(3, 8, 8).to(torch.bfloat16)
    assert resize(x, scale=1.5).dtype == torch.bfloat16


def test_strided_inputs_give_the_same_result_as_contiguous_copies():
    image = rng().random((10, 12, 3)).astype(np.float32)
    views = [image[::-1], image[:, ::2], image.transpose(1, 0, 2), np.asfortranarray(image)]
    for view in views:
        np.testing.assert_array_equal(resize(view, size=(7, 9)), resize(np.ascontiguousarray(view), size=(7, 9)))
    read_only = image.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(resize(read_only, scale=2), resize(image, scale=2))


def test_channels_last_tensor_gives_same_values_and_keeps_its_memory_format():
    x = torch.rand(2, 3, 10, 14)
    out = resize(x.contiguous(memory_format=torch.channels_last), size=(15, 9))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, resize(x, size=(15, 9)), atol=0, rtol=0)


def test_results_are_fresh_tensors_not_reused_buffers():
    a, b = np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 20, np.uint8)
    first = resize(a, scale=2)
    resize(b, scale=2)
    assert (first == 10).all()


def test_concurrent_threads_get_the_same_results_as_sequential_calls():
    images = [rng().integers(0, 256, (30 + i, 40, 3), dtype=np.uint8) for i in range(6)]
    expected = [resize(im, scale=1.7) for im in images]
    results = [None] * len(images)

    def work(i):
        for _ in range(5):
            results[i] = resize(images[i], scale=1.7)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(r, e) for r, e in zip(results, expected))


def test_gradients_flow_through_resize():
    x = torch.rand(1, 2, 6, 6, requires_grad=True)
    resize(x, scale=1.5, antialias=True).sum().backward()
    expected = torch.rand(1, 2, 6, 6, requires_grad=True)
    F.interpolate(expected, scale_factor=1.5, mode="bilinear", antialias=True).sum().backward()
    torch.testing.assert_close(x.grad, expected.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_tensor_stays_on_device_and_matches_cpu():
    x = torch.rand(2, 3, 37, 53)
    for kwargs in [{"scale": 2}, {"size": (13, 20), "antialias": True}, {"size": (50, 9), "mode": "nearest"}]:
        out = resize(x.cuda(), **kwargs)
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), resize(x, **kwargs), atol=1e-6, rtol=0)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    ({"scale": 2, "mode": "area"}, "mode"),
    ({"scale": 2, "align": "center"}, "align"),
    ({"size": 4, "scale": 2}, "size and scale"),
    ({}, "size and scale"),
    ({"size": 0}, "size"),
    ({"size": (4, -1)}, "size"),
    ({"size": 2.5}, "size"),
    ({"scale": 0}, "scale"),
    ({"scale": -2}, "scale"),
    ({"scale": float("nan")}, "scale"),
    ({"scale": 0.01}, "scale"),
    ({"scale": 2, "layout": "WHC"}, "layout"),
    ({"scale": 2, "layout": "NCHW"}, "layout"),
    ({"scale": 2, "mode": "nearest", "antialias": True}, "antialias"),
])
def test_bad_arguments_raise_value_error_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        resize(np.zeros((8, 8, 3), np.float32), **kwargs)


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="image"):
        resize(np.zeros((0, 8, 3)), scale=2)
    with pytest.raises(ValueError, match="image"):
        resize(np.zeros(8), scale=2)
    with pytest.raises(TypeError, match="image"):
        resize([[1, 2], [3, 4]], scale=2)
    with pytest.raises(TypeError, match="nearest"):
        resize(np.zeros((4, 4), bool), scale=2)


# --- position embeddings -------------------------------------------------------------------------

def test_pos_embed_resamples_the_grid_and_keeps_the_class_token():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    out = interpolate_pos_embed(pos, (16, 20))
    assert out.shape == (1, 1 + 16 * 20, 32)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[0, 1:].reshape(14, 14, 32).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(16, 20), mode="bilinear")[0].permute(1, 2, 0).reshape(-1, 32)
    torch.testing.assert_close(out[0, 1:], expected, atol=1e-5, rtol=0)


def test_pos_embed_same_grid_is_identity_and_unbatched_numpy_works():
    pos = torch.randn(1 + 7 * 7, 16)
    assert torch.equal(interpolate_pos_embed(pos, 7), pos)
    out = interpolate_pos_embed(pos.numpy(), 3)
    assert isinstance(out, np.ndarray) and out.shape == (1 + 9, 16)
    np.testing.assert_array_equal(out[0], pos[0].numpy())


def test_pos_embed_keeps_several_prefix_tokens():
    pos = torch.randn(1, 2 + 4 * 4, 8)
    out = interpolate_pos_embed(pos, 6, num_prefix_tokens=2)
    assert out.shape == (1, 2 + 36, 8) and torch.equal(out[:, :2], pos[:, :2])


@pytest.mark.parametrize("shape,grid", [((1, 1 + 15, 8), 4), ((2, 1 + 16, 8), 4), ((8,), 4), ((1, 1 + 16, 8), 0)])
def test_pos_embed_rejects_bad_shapes(shape, grid):
    with pytest.raises(ValueError, match="pos_embed|new_grid"):
        interpolate_pos_embed(torch.zeros(shape), grid)


# --- command line --------------------------------------------------------------------------------

def run_cli(argv):
    parser = argparse.ArgumentParser(prog="lanner")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(rng().integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_resize_scales_an_image_file(image_file, tmp_path):
    out = tmp_path / "out.png"
    assert run_cli(["resize", str(image_file), str(out), "--scale", "2"]) == 0
    pixels = np.asarray(Image.open(out))
    assert pixels.shape == (40, 60, 3)
    np.testing.assert_array_equal(pixels, resize(np.asarray(Image.open(image_file)), scale=2))


def test_cli_size_is_width_by_height_and_options_pass_through(image_file, tmp_path):
    out = tmp_path / "out.png"
    argv = ["resize", str(image_file), str(out), "--size", "7x9", "--mode", "nearest", "--align", "asymmetric"]
    assert run_cli(argv) == 0
    assert Image.open(out).size == (7, 9)
    argv = ["resize", str(image_file), str(out), "--scale", "0.5x1.5", "--antialias"]
    assert run_cli(argv) == 0
    assert Image.open(out).size == (15, 30)


def test_cli_reports_errors_with_a_nonzero_status(image_file, tmp_path, capsys):
    assert run_cli(["resize", str(tmp_path / "missing.png"), str(tmp_path / "o.png"), "--scale", "2"]) == 1
    assert run_cli(["resize", str(image_file), str(tmp_path / "o.png"), "--scale", "0.001"]) == 1
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["resize", str(image_file), str(tmp_path / "o.png"), "--size", "7"])


def test_python_dash_m_lanner_vision_runs(image_file, tmp_path):
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "lanner.vision", str(image_file), str(out), "--scale", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (60, 40)


def test_scratch_buffers_made_in_inference_mode_serve_calls_outside_it():
    """The vision encoder resizes position embeddings under inference_mode; preprocessing runs outside it."""
    image = torch.rand(3, 20, 24)
    with torch.inference_mode():
        inside = resize(image, size=(13, 9), antialias=True)
    torch.testing.assert_close(resize(image, size=(13, 9), antialias=True), inside)
