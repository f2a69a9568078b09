"""GGML block-format kernels equal dequantize-then-matmul (exact path) or the same on activations quantized
to int8 blocks (int8 path), for every format and every ISA path this CPU runs."""
import ctypes
import os
from unittest import mock

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from lanner import native
from lanner.quant import ggml
from lanner.quant.ggml import BLOCKS, LOW_IQ_FORMATS, GGMLLinear, GGMLTensor

FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "F16",
           "BF16", "F32", *LOW_IQ_FORMATS]
INT8_FORMATS = FORMATS[:5]   # the row-major int8 kernel's (and LOW_IQ_FORMATS'); the others multiply fp32 activations unless packed
PACKED_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]   # repacked for the int8 kernel, the tiles, exact rows
K_PACKED = ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]   # int8 on whole packed groups only
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0], "IQ4_XS": [0],
                 **{name: [0] for name in LOW_IQ_FORMATS if name != "IQ1_M"}}   # where a block keeps its f16 scales


@pytest.fixture(params=native.supported_isas())
def isa(request):
    with mock.patch.dict(os.environ, {"LANNER_ISA": request.param}):
        yield request.param


@pytest.fixture(params=["native"] + native.supported_isas())
def level(request):
    """Every build this CPU runs: -march=native too (the forced avx512 level has no VNNI)."""
    env = {"LANNER_ISA": "" if request.param == "native" else request.param, "LANNER_EXACT_LINEARS": "0"}
    with mock.patch.dict(os.environ, env):
        yield request.param


def random_weight(type_name: str, rows: int, cols: int, seed: int = 0) -> GGMLTensor:
    """Random blocks of a format: random quant bits, small finite scales (random bytes would make NaNs)."""
    rng = np.random.default_rng(seed)
    _, block, nbytes = BLOCKS[type_name]
    if type_name in ("F16", "BF16", "F32"):
        w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
        raw = {"F32": w, "F16": w.half(), "BF16": w.bfloat16()}[type_name].contiguous().view(torch.uint8)
        return GGMLTensor(type_name, (rows, cols), raw.reshape(rows, -1))
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS.get(type_name, []):
        scales = (rng.standard_normal((rows, cols // block)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    if type_name == "IQ1_M":   # its f16 scale's nibbles are the top ones of its 4 scale words (bytes 48-55)
        bits = (rng.standard_normal((rows, cols // block)) * 0.05).astype(np.float16).view(np.uint16)
        for k in range(4):
            raw[:, :, 49 + 2 * k] = (raw[:, :, 49 + 2 * k] & 15) | ((bits >> 4 * k & 15) << 4).astype(np.uint8)
    return GGMLTensor.from_numpy(type_name, (rows, cols), raw)


def reference(w: GGMLTensor) -> torch.Tensor:
    if w.type_name in ("F16", "BF16", "F32"):
        dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[w.type_name]
        return w.data.view(dt).reshape(w.shape).float()
    data = dequantize(w.data.numpy(), GGMLQuantizationType[w.type_name])
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(w.shape)


@pytest.mark.parametrize("type_name", FORMATS)
def test_dequantize_equals_gguf_reference_on_every_isa(isa, type_name):
    w = random_weight(type_name, 37, 512)
    assert torch.equal(w.dequantize(), reference(w))
    ids = torch.tensor([36, 0, 5, 5])
    assert torch.equal(w.rows(ids), reference(w)[ids])
    assert torch.equal(w.rows(ids, torch.bfloat16), reference(w)[ids].bfloat16())


@pytest.mark.parametrize("type_name", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 17, 300])
@pytest.mark.parametrize("rows", [45, 48])   # rows not a multiple of the threads' tasks either; whole groups alone
def test_matmul_equals_dequantize_then_matmul_on_every_isa(isa, type_name, m, rows):
    cols = 256 if BLOCKS[type_name][1] == 256 else 96
    w = random_weight(type_name, rows, cols, seed=m)
    x = torch.randn(m, cols)
    want = x.double() @ reference(w).double().T
    with mock.patch.dict(os.environ, {"LANNER_EXACT_LINEARS": "1"}):
        lin = GGMLLinear(w)
        got = lin(x)
    assert got.dtype == torch.float32 and got.shape == (m, rows)
    if type_name in K_PACKED and rows == 48 and isa != "scalar":   # the exact packed kernel (whole groups only)
        assert lin.packed is not None
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    kernel = lin.small(x, lin.lib)   # the kernel at any size (packed formats: 4 rows at a time on each group)
    torch.testing.assert_close(kernel.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x's values as the kernel's int8 activations hold them: blocks of 32, scale amax / 127, rounded half
    away from zero (the rounding itself in float64: float32's x + 0.5 can round up)."""
    xb = x.numpy().reshape(x.shape[0], -1, 32)
    d = np.abs(xb).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    v = (xb * inv).astype(np.float64)
    return torch.from_numpy((np.sign(v) * np.floor(np.abs(v) + 0.5) * d).reshape(x.shape))


@pytest.mark.parametrize("type_name", FORMATS)
# decode rows (Q2_K's from 4 and Q6_K's and Q3_K's from 5 a block at a time, on their packed blocks up to 6-8 rows, Q2_K's
# up to 16-32); a GEMM's tiles of rows, the last one partial (130: two groups a tile)
@pytest.mark.parametrize("m", [1, 3, 4, 6, 8, 19, 130])
@pytest.mark.parametrize("rows, cols", [(45, 192), (48, 96)])   # rows past the packed groups; a K of 3 blocks
def test_int8_activations_equal_their_reference_on_every_level(level, type_name, m, rows, cols):
    cols = 512 if BLOCKS[type_name][1] == 256 else cols
    w = random_weight(type_name, rows, cols, seed=m)
    seeded = torch.Generator().manual_seed(m)   # the same x whichever tests ran before
    x = torch.randn(m, cols, generator=seeded) * torch.linspace(0.1, 3, cols)   # blocks of different scales
    lin = GGMLLinear(w)
    assert lin.int8 == (level != "scalar")   # the portable build's int8 path is the slower one
    packs = type_name in PACKED_FORMATS or (type_name in K_PACKED and rows % 16 == 0)   # K-quants: whole groups only
    assert (lin.packed is not None) == (lin.int8 and packs)
    got = lin.small(x, lin.lib, int8=True).double()
    exact = x.double() @ reference(w).double().T
    # row-major int8 takes whole vectors of blocks (2 on AVX-512): a K of 3 blocks runs exact there unless packed
    whole = cols % 64 == 0 or native.isa() != "avx512" or lin.packed is not None
    int8 = (type_name in INT8_FORMATS + list(LOW_IQ_FORMATS) and whole) or (type_name in K_PACKED and lin.packed is not None)
    want = int8_blocks(x) @ reference(w).double().T if int8 else exact
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert (got - exact).norm() < 0.02 * exact.norm()   # int8 rounding: 0.4-0.8 % measured


@pytest.mark.parametrize("type_name", LOW_IQ_FORMATS)
def test_low_iq_prefill_steps_run_on_the_kernel(level, type_name):
    """A prefill-sized step of a low i-quant takes the kernel (each group of rows decoded into int8 once a call), not
    a per-call dequantize: its results are the int8 path's, rows past the last whole group included."""
    w = random_weight(type_name, 45, 512, seed=5)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(5))
    lin = GGMLLinear(w)
    assert lin.takes(40, torch.float32) == lin.int8   # the portable build: exact, rows dequantized per call
    want = (int8_blocks(x) if lin.int8 else x.double()) @ reference(w).double().T
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("type_name", INT8_FORMATS)
@pytest.mark.parametrize("m", [3, 19])   # quantized before the threads start; by them
def test_int8_rows_of_many_blocks_and_non_finite_rows(level, type_name, m):
    """Rows of 18 blocks (quantized a vector's width of blocks at a time: a whole 16 or 8 and a partial rest),
    two of them holding a NaN and an infinity: those come out all NaN (their block scale is NaN), the others as
    their reference."""
    w = random_weight(type_name, 48, 576, seed=m)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)) * torch.linspace(0.1, 3, 576)
    x[1, 300], x[2, 575] = float("nan"), float("inf")
    lin = GGMLLinear(w)
    got = lin.small(x, lin.lib, int8=True).double()
    assert got[1:3].isnan().all()
    finite = x[[0] + list(range(3, m))]
    want = int8_blocks(finite) @ reference(w).double().T
    torch.testing.assert_close(got[[0] + list(range(3, m))], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def near_copies(w: GGMLTensor, seed: int) -> GGMLTensor:
    """Every row w's first with four quant bits flipped, none at a block's first value (where the test's
    activations put their outliers): logits so close that int8 activations misorder them."""
    rng, (_, block, nbytes) = np.random.default_rng(seed), BLOCKS[w.type_name]
    # the bytes whose lowest bit is a value's, but not that of the first of 32 values: after a block's first value
    # (its byte's low bits), or a K-quant's value bytes but those whose low nibbles hold the first of 32
    flippable = {"Q4_0": range(3, 18), "Q4_1": range(5, 20), "Q5_0": range(7, 22), "Q5_1": range(9, 24),
                 "Q8_0": range(3, 34), "Q4_K": [b for b in range(16, 144) if (b - 16) % 32],
                 "Q5_K": [b for b in range(48, 176) if (b - 48) % 32], "Q6_K": [b for b in range(128) if b % 32],
                 "Q3_K": [b for b in range(32, 96) if (b - 32) % 32], "Q2_K": [b for b in range(16, 80) if (b - 16) % 32],
                 "IQ4_NL": range(3, 18), "IQ4_XS": [b for b in range(8, 136) if (b - 8) % 16]}
    bytes_at = np.array(flippable[w.type_name])
    raw = w.data.clone()
    raw[:] = raw[0]
    for row in range(1, w.shape[0]):
        for _ in range(4):
            raw[row, rng.integers(w.shape[1] // block) * nbytes + rng.choice(bytes_at)] ^= 1
    return GGMLTensor(w.type_name, w.shape, raw)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1", "Q6_K"])
def test_row_norms_bound_the_rows_norms_from_above_and_tightly(type_name):
    """ggml_argmax's error bounds rest on row_norms being at least each dequantized row's norm (here its float64
    value), and a loose bound would send every row to the exact recheck."""
    w = random_weight(type_name, 300, 2048 if type_name == "Q6_K" else 1056, seed=3)
    w.data[7] = 0   # a zero row's bound: the least positive float
    exact = w.dequantize(torch.float32).double().norm(dim=1)
    bound = GGMLLinear(w, int8=False).row_norms().double()
    assert (bound >= exact).all() and 0 < bound[7] < 1e-40
    assert (bound <= exact * (1 + 1e-3) + 1e-40).all()


@pytest.mark.parametrize("type_name", PACKED_FORMATS + K_PACKED)
@pytest.mark.parametrize("m", [1, 3, 6, 19])   # tiles of rows, the last one partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2048, 2044])   # 2044: not whole packed groups, the exact path's argmax
def test_argmax_is_the_exact_paths_argmax_on_every_level(level, type_name, m, dtype, rows):
    """ggml_argmax (greedy tokens from the int8 path, the exact one recomputing what could win) gives the tokens
    that the exact path's outputs (rounded to bf16 for bf16 rows; Q8_0's bf16 pairs past 4 rows) give, ties to the
    first index, a NaN counting as largest: on logits the int8 path misorders, exact ties, rows of equal logits
    (zeros: every one a candidate) and non-finite rows."""
    cols = 256 if type_name in K_PACKED else 96
    seeded = torch.Generator().manual_seed(m)
    x = torch.randn(m, cols, generator=seeded)
    x[:, ::32] = 300   # coarse int8 steps in every block
    w = near_copies(random_weight(type_name, rows, cols, seed=m), seed=m)
    lin = GGMLLinear(w, int8=False)
    best = int(lin.small(x, lin.lib)[0].argmax())
    w.data[best + 1 if best + 1 < rows else best - 1] = w.data[best]   # an exact tie in its group
    w.data[(best + 21) % rows] = w.data[best]   # and in another
    # bf16 rows past 4 of a Q8_0 head on pairs (where the build has them): the candidates recomputed on the pairs
    lin = GGMLLinear(w, int8=False, bf16=dtype == torch.bfloat16)
    if m > 1:
        x[-1] = 0 if m < 6 else 1e-30   # every logit equal (or all but): every row a candidate
    if m > 3:
        x[1, 7], x[2, 9] = float("nan"), float("inf")
    x = x.to(dtype)
    want = lin.small(x, lin.lib).float().numpy().argmax(axis=1)   # the exact path, in x's dtype
    assert lin.argmax(x).tolist() == want.tolist()
    bounded = lin.packed is not None
    if bounded and rows == 2048 and m > 1 and dtype == torch.float32:   # int8 alone misorders
        assert (lin.small(x, lin.lib, int8=True).float().numpy().argmax(axis=1) != want).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_rows_is_no_work(level, dtype):
    """A step with no rows (speculative decoding can make one): nothing to quantize or write."""
    lin = GGMLLinear(random_weight("Q4_1", 16, 64), torch.randn(16))
    assert lin(torch.randn(0, 64, dtype=dtype)).shape == (0, 16)
    assert lin.small(torch.randn(0, 64, dtype=dtype), lin.lib).shape == (0, 16)   # the exact path too


def test_bf16_activations_and_bias():
    w = random_weight("Q4_1", 64, 128)
    bias = torch.randn(64)
    x = torch.randn(2, 5, 128).bfloat16()
    for m in (2, 40):   # the kernel and the dequantize + GEMM paths
        xs = x.reshape(-1, 128)[:m]
        got = GGMLLinear(w, bias)(xs)
        assert got.dtype == torch.bfloat16
        want = xs.float() @ reference(w).T + bias
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("m", [1, 19])
def test_bf16_rows_in_and_out_equal_fp32_then_rounded_on_every_level(level, type_name, int8, m):
    """The kernel reads bf16 rows and writes bf16 results (bias added first) itself: bitwise what its fp32
    call gives, plus the bias, rounded by torch -- on the packed groups and on the rows after them (45)."""
    cols = 512 if BLOCKS[type_name][1] == 256 else 192
    lin = GGMLLinear(random_weight(type_name, 45, cols, seed=m), torch.randn(45))
    x = (torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    got = lin.small(x, lin.lib, int8=int8)
    fp32 = GGMLLinear(lin.weight).small(x.float(), lin.lib, int8=int8)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (fp32 + lin.bias).bfloat16())


@pytest.mark.parametrize("type_name", PACKED_FORMATS + K_PACKED)
# past AMX_BF16_ROWS, A tiles of fewer rows (a_tile_rows): a partial pair alone (17: 2 x 9), whole pairs of 12 and
# 10 rows (24, 40), a last partial pair (33, 47, 50); past 64 rows whole tiles: a last 6 rows alone (70); two chunks
# of rows (480 a chunk here; K-quants 400), the second of 40 or of 8 (one A tile that makes the B tiles itself)
@pytest.mark.parametrize("m", [17, 24, 33, 40, 47, 50, 70, 520, 488])
def test_bf16_rows_past_16_on_amx_tiles_equal_bf16_weights_times_them(type_name, m):
    """Where this build and CPU have AMX, a bf16 call of more than 16 rows multiplies the weights rounded to bf16
    with the rows on the tiles, fp32 sums: a dense bf16 copy's GEMM up to summation order (a bias added before the
    result's rounding); 16 rows or fewer stay on the int8 kernel."""
    cols = 1280 if type_name in K_PACKED else 1056   # 33 blocks; a K-quant's 5 super-blocks
    with mock.patch.dict(os.environ, {"LANNER_ISA": "", "LANNER_EXACT_LINEARS": "0"}):   # the native build
        lin = GGMLLinear(random_weight(type_name, 96, cols, seed=m), torch.randn(96))   # 3 pairs of groups
        plain = GGMLLinear(lin.weight, lin.bias)
    plain.amx_rows = 0   # no tiles
    if not {"amx_tile", "amx_bf16", "avx512_bf16", "avx512vbmi"} <= native.cpu_flags():
        pytest.skip("this CPU has no AMX bf16 tiles")
    assert lin.amx_bf16   # the native build has the kernel and the process was granted the tiles
    x = (torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3).bfloat16()
    got = lin.small(x, lin.lib, int8=True)
    want = x.float() @ reference(lin.weight).bfloat16().float().T + lin.bias
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3 * want.abs().max().item())
    # rounded to bf16, all but a few on a tie of summation order (measured 99.97-100 %; the weights unrounded: 57 %)
    assert (got == want.bfloat16()).float().mean() > 0.99
    assert torch.equal(lin.small(x[:16], lin.lib, int8=True), plain.small(x[:16], plain.lib, int8=True))


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q6_K", "Q4_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [True, False])
# 1-16 rows on the int8 kernel (without it, past 4 bf16 rows the tiles: 5 rows one A tile alone), the exact one up to
# 4; past 16 bf16 rows the tiles' pairs (a gate group and its up group) of fewer rows: 17 a partial pair of 2 x 9,
# 47 a pair of 2 x 12 and a partial one; 300 nine pairs of 16-row tiles and 12 rows alone
@pytest.mark.parametrize("m", [1, 5, 17, 47, 300])
@pytest.mark.parametrize("rows", [96, 72])   # gate and up of 48 rows (the tiles' pairs), of 36 (rows past the groups)
def test_silu_mul_in_the_matmul_equals_the_two_calls_on_every_level(level, type_name, dtype, int8, m, rows):
    """MATMUL_SILU_MUL (a gate | up linear's silu(gate) * up from one call; on the AMX tiles and, in whole groups, the
    int8 GEMM's tiles (a gate group beside its up group: one tile from PAIR_ROWS rows, two below) gate | up is never
    written) is bitwise the matmul then fused.silu_mul, on every path and level; with a bias it is refused."""
    from lanner.model import fused
    cols = 512 if BLOCKS[type_name][1] == 256 else 192
    lin = GGMLLinear(random_weight(type_name, rows, cols, seed=m), None, None, int8)
    x = (torch.randn(m, cols, generator=torch.Generator().manual_seed(m)) * 3).to(dtype)
    fused.library.cache_clear()   # fused.c at this level too (a process builds it once, at its own level)
    try:
        with torch.no_grad():
            want = fused.silu_mul(lin.small(x, lin.lib, int8=int8, tiles=True))
    finally:
        fused.library.cache_clear()
    assert torch.equal(lin.small(x, lin.lib, int8=int8, tiles=True, silu=True), want)
    assert lin.silu_mul(x.half()) is None   # fp16 rows: the two calls (their fp16 roundings)
    biased = GGMLLinear(lin.weight, torch.randn(rows), None, int8)
    with pytest.raises(ValueError, match="does not take"):
        biased.small(x, biased.lib, int8=int8, silu=True)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [True, False])
# up to 16 rows the int8 or exact kernel, then the results' argmax; past them (bf16) the tiles' pairs, each row's
# argmax kept by each thread: 17 a partial pair, 47 a pair and a partial one, 300 nine pairs of 16-row tiles and 12
# rows alone
@pytest.mark.parametrize("m", [3, 17, 47, 300])
@pytest.mark.parametrize("biased", [False, True])
def test_argmax_in_the_matmul_is_the_argmax_of_its_results_on_every_level(level, type_name, dtype, int8, m, biased):
    """MATMUL_ARGMAX (a greedy step's tokens; on the tiles no logit is written) gives numpy's argmax of the results
    the call would write (rounded to bf16 for bf16 rows): the first largest, a NaN counting as largest, on exact
    ties in a group and half the outputs apart, rows of equal results and rows of NaN."""
    cols, rows = (512 if BLOCKS[type_name][1] == 256 else 192), 96
    seeded = torch.Generator().manual_seed(m)
    w = random_weight(type_name, rows, cols, seed=m)
    top = int(reference(w).norm(dim=1).argmax())   # the row whose own direction makes it the largest result
    copies = [top, top ^ 1, (top + 48) % rows]   # exact ties in its group, and half the outputs away
    w.data[copies[1:]] = w.data[top].clone()
    bias = torch.randn(rows, generator=seeded)
    bias[copies] = bias[top].item()
    # (a bf16 model's exact rows past 4 take bf16 pairs where the build has them)
    lin = GGMLLinear(w, bias if biased else None, None, int8, bf16=dtype == torch.bfloat16)
    x = (torch.randn(m, cols, generator=seeded) * 3)
    x[0] = 0   # every result the bias (or 0)
    x[1, 7] = float("nan")   # every result NaN
    x[2] = reference(w)[top]
    x = x.to(dtype)
    want = lin.small(x, lin.lib, int8=int8, tiles=True).float().numpy().argmax(axis=1)
    assert want[0] == (lin.bias.float().numpy().argmax() if biased else 0) and want[1] == 0
    assert want[2] == min(copies)
    assert lin.small(x, lin.lib, int8=int8, tiles=True, argmax=True).tolist() == want.tolist()


def fp32_results(lin: GGMLLinear, x: torch.Tensor, flags: int) -> torch.Tensor:
    """ggml_matmul's fp32 results for rows x (fp32, or bf16 with MATMUL_X_BF16 = 2 in flags)."""
    w, (n, k), m = lin.weight, lin.weight.shape, x.shape[0]
    y = torch.empty(m, n)
    ggml.check(lin.lib.ggml_matmul(w.type_id, w.data_ptr, lin.packed_ptr(), w.row_bytes, n, k, x.data_ptr(), k, m,
                                   y.data_ptr(), n, None, torch.get_num_threads(), flags), "matmul")
    return y


def test_exact_bf16_rows_past_4_take_bf16_pairs_of_the_integers():
    """A bf16 model's exact Q8_0 linear (the LM head) where the build has AVX512-BF16 and no AMX: more than 4 rows
    multiply bf16 pairs of the blocks' integers, scaled per block -- dequantize-then-matmul up to summation order,
    every row's results the same whatever rows share its call (a burst's argmax is a single step's) -- and no dense
    copy is ever made; up to 4 rows take the exact kernel."""
    with mock.patch.dict(os.environ, {"LANNER_ISA": "", "LANNER_EXACT_LINEARS": "0"}):   # the native build
        lin = GGMLLinear(random_weight("Q8_0", 96, 1056, seed=5), None, None, int8=False, bf16=True)
    if not lin.pairs:
        pytest.skip("this build or CPU has no AVX512-BF16 (or takes the AMX tiles)")
    lin.dense_dtype = None   # (Linear.pack drops it for pairs)
    assert lin.kernel_rows(torch.bfloat16) == ggml.ALL_ROWS and lin.flags & ggml.MATMUL_BF16_PAIRS
    x = (torch.randn(70, 1056, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    exact = x.double() @ reference(lin.weight).double().T
    pairs = 2 | ggml.MATMUL_BF16_PAIRS
    for rows in (5, 8, 9, 17, 47, 70):   # one tile of 8 rows, partial, several with a partial last one
        got = fp32_results(lin, x[:rows], pairs)
        torch.testing.assert_close(got.double(), exact[:rows], rtol=0, atol=2e-6 * exact.abs().max().item())
        assert torch.equal(got, fp32_results(lin, x[:rows].flip(0), pairs).flip(0))   # rows beside it: no matter
        assert torch.equal(lin(x[:rows]), got.bfloat16())
    assert lin.dense is None
    assert torch.equal(fp32_results(lin, x[:4], pairs), fp32_results(lin, x[:4], 2))   # 4 rows: the exact kernel


def test_a_bf16_heads_pairs_replace_its_dense_copy_unless_one_is_asked_for():
    """Linear.pack of a bf16 model's exact Q8_0 linear: the pairs take its big steps and no dense copy is kept;
    dense_gemm=True keeps the copy, which then takes them (as it leaves the AMX tiles out)."""
    from lanner.model.layers import Linear
    packed = {}
    with mock.patch.dict(os.environ, {"LANNER_ISA": "", "LANNER_EXACT_LINEARS": "0"}):   # the native build
        for dense_gemm in (None, True):
            lin = Linear(1056, 96, bias=False, device="meta", dtype=torch.bfloat16)
            lin.ggml = random_weight("Q8_0", 96, 1056, seed=5)
            lin.pack(dense_gemm=dense_gemm, int8=False)
            packed[dense_gemm] = lin.quantized
    if not packed[None].pairs:
        pytest.skip("this build or CPU has no AVX512-BF16 (or takes the AMX tiles)")
    assert packed[None].dense_dtype is None and packed[None].takes(64, torch.bfloat16)
    assert not packed[True].pairs and packed[True].dense_dtype == torch.bfloat16
    assert not packed[True].takes(64, torch.bfloat16)   # the copy's


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("nan_rows", [(), (80,), (40, 80)])
def test_argmax_on_the_tiles_over_chunks_and_threads_with_nan_weights(type_name, nan_rows):
    """MATMUL_ARGMAX on the AMX tiles over two chunks of rows (2,800 rows of K = 192), each thread's running argmax
    merged: with a bias, and NaN results arriving after larger finite ones, in the second thread's pair of groups
    (outputs 64-95) alone or in the first's too -- numpy's argmax of the results the call would write."""
    with mock.patch.dict(os.environ, {"LANNER_ISA": "", "LANNER_EXACT_LINEARS": "0"}):   # the native build
        w = random_weight(type_name, 96, 192, seed=7)
        for row in nan_rows:   # a NaN scale in the row's first block
            w.data[row, SCALE_OFFSETS[type_name][0]:SCALE_OFFSETS[type_name][0] + 2] = torch.tensor(
                [0x00, 0x7E], dtype=torch.uint8)
        lin = GGMLLinear(w, torch.randn(96, generator=torch.Generator().manual_seed(7)), None, int8=True)
    if not lin.amx_bf16:
        pytest.skip("this build or CPU has no AMX bf16 tiles")
    x = (torch.randn(2800, 192, generator=torch.Generator().manual_seed(7)) * 3).bfloat16()
    want = lin.small(x, lin.lib, int8=True, tiles=True).float().numpy().argmax(axis=1)
    assert (want == nan_rows[0]).all() if nan_rows else len(set(want.tolist())) > 10
    assert lin.small(x, lin.lib, int8=True, tiles=True, argmax=True).tolist() == want.tolist()


@pytest.mark.parametrize("type_name", PACKED_FORMATS)
def test_exact_bf16_rows_past_4_take_the_tiles_not_a_dense_copy(type_name):
    """An exact linear of a bf16 model (the LM head) on AMX: more than 4 rows multiply on the tiles, the numerics
    of the dense bf16 copy they would otherwise take, and the copy is never made; up to 4 rows take the exact
    kernel."""
    with mock.patch.dict(os.environ, {"LANNER_ISA": ""}):   # the native build
        lin = GGMLLinear(random_weight(type_name, 96, 1056, seed=5), None, None, int8=False)
    if not lin.amx_bf16:
        pytest.skip("this build or CPU has no AMX bf16 tiles")
    lin.dense_dtype = torch.bfloat16   # as Linear.pack sets it for a bf16 model's head
    x = (torch.randn(40, 1056, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    want = x.float() @ reference(lin.weight).bfloat16().float().T
    for rows in (40, 16, 5):
        assert (lin(x[:rows]) == want[:rows].bfloat16()).float().mean() > 0.99
    assert lin.dense is None
    exact = x[:4].float() @ reference(lin.weight).T
    assert torch.equal(lin(x[:4]), lin.small(x[:4], lin.lib))   # the exact kernel
    torch.testing.assert_close(lin(x[:4]).float(), exact, rtol=2 ** -7, atol=1e-3 * exact.abs().max().item())


def test_quantize_at_load_round_trips_through_gguf_reference():
    weight = torch.randn(40, 64)
    for name in ggml.QUANTIZE_TO:
        lin = ggml.quantize_linear(weight, None, name)
        deq = lin.dequantize()
        assert torch.equal(deq, reference(lin.weight))
        assert (deq - weight).abs().max() < {"q8_0": 0.02, "q5_0": 0.2, "q5_1": 0.2, "bf16": 0.02}.get(name, 0.5)
    assert torch.equal(ggml.quantize_linear(weight.bfloat16().float(), None, "bf16").dequantize(),
                       weight.bfloat16().float())   # lossless for a bf16 checkpoint


@pytest.mark.parametrize("names, fused", [(["Q8_0", "Q8_0"], "Q8_0"), (["Q5_0", "Q5_0", "Q8_0"], "Q8_0"),
                                          (["Q4_0", "Q5_0"], "Q5_0"), (["Q4_0", "Q8_0"], "Q8_0"),
                                          (["Q4_1", "Q5_1", "Q4_1"], "Q5_1")])
def test_fused_rows_keep_their_values(names, fused):
    """Parts of mixed formats (a GGUF's q, k in Q5_0 and v in Q8_0) go into the one that holds them all, bitwise."""
    parts = [random_weight(name, 8 + i, 64, seed=i) for i, name in enumerate(names)]
    cat = GGMLTensor.cat(parts)
    assert cat.type_name == fused
    assert torch.equal(cat.dequantize(), torch.cat([reference(p) for p in parts]))


@pytest.mark.parametrize("names, formats", [(["Q4_K", "Q4_K", "Q6_K"], ["Q4_K", "Q6_K"]),
                                            (["Q5_0", "Q8_0", "Q4_1"], ["Q8_0", "Q4_1"]),
                                            (["F16", "Q8_0", "BF16"], ["F16", "Q8_0", "BF16"])])
def test_rows_of_formats_none_holds_exactly_stay_parts(names, formats):
    """Fused parts with no format that holds them all (llama.cpp's Q4_K_M: Q4_K q, k beside a Q6_K v) keep their own
    formats, consecutive parts one format holds joined in it; a linear of them (GGMLParts) is the reference's, with
    its bias, in fp32 and bf16, int8 or exact, from 1 row to the GEMM's."""
    parts = [random_weight(name, 16 * (i + 1), 256, seed=i) for i, name in enumerate(names)]
    cat = GGMLTensor.cat(parts)
    assert isinstance(cat, ggml.GGMLRows) and [p.type_name for p in cat.parts] == formats
    want_w = torch.cat([reference(p) for p in parts])
    assert torch.equal(cat.dequantize(), want_w)
    bias = torch.randn(cat.shape[0])
    for int8 in (False, True):
        lin = ggml.ggml_linear(cat, bias, int8=int8)
        assert isinstance(lin, ggml.GGMLParts) and lin.out_features == cat.shape[0] == 96
        for m, dtype in [(1, torch.float32), (3, torch.bfloat16), (70, torch.float32)]:
            x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
            want = x.float() @ want_w.T + bias
            got = lin(x)
            assert got.dtype == dtype and got.shape == want.shape
            exact = not int8 and dtype == torch.float32
            torch.testing.assert_close(got.float(), want, rtol=1e-4 if exact else 0.05,
                                       atol=(1e-4 if exact else 0.05) * want.abs().max().item())


def test_rows_of_different_widths_are_not_fused():
    with pytest.raises(ValueError, match="one width"):
        GGMLTensor.cat([random_weight("Q8_0", 8, 64), random_weight("Q8_0", 4, 96)])


def test_a_block_that_does_not_fit_the_row_is_refused():
    with pytest.raises(ValueError, match="blocks of 32"):
        GGMLTensor("Q4_0", (2, 48), torch.zeros(2, 27, dtype=torch.uint8))


def test_forced_isa_the_cpu_lacks_names_the_missing_feature():
    with mock.patch.object(native, "cpu_flags", lambda: frozenset({"sse2"})), \
            mock.patch.dict(os.environ, {"LANNER_ISA": "avx2"}):
        with pytest.raises(ValueError, match="lacks avx2"):
            native.isa()


def test_a_kernel_is_rebuilt_when_a_header_it_includes_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LANNER_HOME", str(tmp_path / "home"))
    (tmp_path / "k.h").write_text("static int answer(void) { return 1; }\n")
    source = tmp_path / "k.c"
    source.write_text('#include "k.h"\nint value(void) { return answer(); }\n')
    first = native._build(str(source), native.isa_flags())
    (tmp_path / "k.h").write_text("static int answer(void) { return 2; }\n")
    second = native._build(str(source), native.isa_flags())
    assert first != second
    assert ctypes.CDLL(second).value() == 2
