"""Weights kept in GGML's block formats, as GGUF files store them, and the linears that multiply with them.

A GGUF model's weights are not dequantized at load: each stays as its rows of blocks (Q4_1 is 0.625 bytes
a weight, 6.4x fewer than fp32), and ggml.c multiplies with them directly. By default on int8 activations
(integer dot products, as llama.cpp): small steps (decode) dot each weight group with every activation row,
so the step streams the quantized bytes once; larger ones (prefill, big batches: compute-bound) run the same
kernel as a GEMM, tiles of rows against each group of packed weights while it is in L1; on a CPU with AMX, bf16
steps of more than 16 rows of the packed formats (Q4_0 .. Q8_0, Q4_K / Q5_K / Q6_K) run on the tile unit instead
(the packed blocks dequantized into bf16 tiles: the numerics of a dense bf16 copy, docs/quantization.md "AMX"). With
LANNER_EXACT_LINEARS=1 activations stay fp32 (exact: dequantize-then-matmul up to summation order) up to
SMALL_M rows, and larger steps run oneDNN's GEMM on a dense copy made at the first such step (bf16 steps on a CPU
with AMX: the tiles instead, the same numerics, and no copy; without AMX, with AVX512-BF16, a Q8_0 weight's: bf16
pairs of its integers, exact, and no copy), as do formats without an int8 path (and any weight given
dense_gemm_weights=True, the tiles and pairs then left out); without one, chunks of rows are dequantized into a
scratch buffer per call. The LM head (exact) takes the same routes.
HF models are quantized into the same formats at load with `quantization=` (q8_0, q4_0, q4_1, q5_0, q5_1), or kept
as BF16 rows (bf16).
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading

import numpy as np
import torch

from lanner import native
from lanner.engine.memory import weight_memory

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggml.c")
# GGML type ids with (elements, bytes) per block: what ggml.c multiplies with
BLOCKS = {"F32": (0, 32, 128), "F16": (1, 32, 64), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
          "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
          "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
          "Q6_K": (14, 256, 210), "IQ4_NL": (20, 32, 18), "IQ4_XS": (23, 256, 136), "BF16": (30, 32, 64),
          "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ2_S": (22, 256, 82), "IQ3_XXS": (18, 256, 98),
          "IQ3_S": (21, 256, 110), "IQ1_S": (19, 256, 50), "IQ1_M": (29, 256, 56)}
# the i-quants below 4 bits: values from lattice grids (ggml.c's iq_sub), decode rows multiplied row-major, bigger
# steps on groups of rows decoded into int8 once a call (decode_group) on int8 activations
LOW_IQ_FORMATS = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")
# formats picked to fit memory: no dense copy for big steps, which dequantize rows per call instead where no kernel
# takes them (a 7B Q3_K_M's fp32 copy would take 27 GB beside its 3.3 GB file)
COMPACT_FORMATS = ("Q2_K", "Q3_K") + LOW_IQ_FORMATS
# formats whose values each next one holds exactly (same block scale, and min; a wider integer): what fused parts of
# mixed formats are stored in
FORMAT_CHAINS = (("Q4_0", "Q5_0", "Q8_0"), ("Q4_1", "Q5_1"))
ZERO_POINTS = {"Q4_0": 8, "Q5_0": 16}   # a block's values are scale * (q - zero point) (+ min)
MIN_FORMATS = ("Q4_1", "Q5_1")
QUANTIZE_TO = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16")   # formats an HF model can be stored in at load
# formats whose linears multiply exact fp32 activations (no int8 path): the LM head takes them too
EXACT_FORMATS = ("bf16",)
# activation rows up to which the exact kernel multiplies directly: beyond 4 rows oneDNN's GEMM on a dense copy
# is faster (bench/quant.py); without a dense copy, the per-call dequantize pays off only past 16. The int8
# GEMM on packed weights beats oneDNN's fp32 2-5x and its native bf16 (AVX512-BF16) 1.1-1.3x: it takes every
# step, or those up to INT8_GEMM_ROWS where a dense copy is kept (dense_gemm_weights=True, and by default a bf16
# model's formats that ggml.c's AMX kernel does not take, where oneDNN runs bf16 on AMX tiles). The crossover with
# oneDNN's AMX bf16, the default model's 120 layer linears one after another (weights from L3, 2 threads, bf16 dense
# vs Q4_1): 16 rows 16.4 vs 10.4-11.3 ms, 48 even, 64 23.5-23.9 vs 27.0-29.3, 128 34.6-35.9 vs 50.7-77.2.
SMALL_M, SMALL_M_WITHOUT_DENSE, INT8_GEMM_ROWS, ALL_ROWS = 4, 16, 64, 1 << 62
# rows of fp32 activations up to which the exact kernel on the packed copy (each group's blocks reused from L1 by
# every 4 rows) beats oneDNN's fp32 GEMM on the dense copy, by weight format (2 threads: the default model's Q8_0 LM
# head 3.7 vs 7.0 ms at 16 rows, 7.1 vs 9.1 at 32, caches flushed; its Q4_1 layer shapes 1.2x at 16, even at 32; on
# AVX2 the Q8_0 head even at 48-64 rows, and a 64-request batch ran 1.05x faster with its 33-64-row decode steps in
# the one-call decode step, whose rows the head's limit sets). oneDNN's native bf16 wins from 4-8 rows.
EXACT_PACKED_ROWS = {(torch.float32, "Q8_0"): 64, (torch.float32, "Q4_0"): 32, (torch.float32, "Q4_1"): 32}
# ggml_matmul's flags (matmul.h): int8 activations; bf16 rows in and out (results in fp32 plus the bias, then
# rounded once, as y.to(bfloat16) rounds); bf16 steps on AMX tiles; silu(gate) * up of a gate | up linear; each
# row's argmax of the results (a greedy step's tokens: on the tiles no logit is written); exact bf16 rows past
# SMALL_M on bf16 pairs of the weights' integers (ggml_bf16_pairs)
MATMUL_INT8, MATMUL_BF16_IO, MATMUL_AMX_BF16, MATMUL_SILU_MUL, MATMUL_ARGMAX = 1, 2 | 4, 8, 16, 32
MATMUL_BF16_PAIRS = 64
MATMUL_X_BF16 = 2   # bf16 rows in (ggml_argmax's x_flags take it with MATMUL_BF16_PAIRS)
DEQUANT_CHUNK_ELEMENTS = 4 << 20   # weights dequantized at a time by the large-batch path
# rows dequantized on the calling thread alone (a decode step's embeddings): a parallel region costs more
FEW_ROWS = 16

_local = threading.local()


def int8_activations() -> bool:
    """Whether small steps run on int8 activations: LANNER_EXACT_LINEARS=1 keeps them fp32 (exact), and so
    does the portable (scalar) build, where the int8 path is slower than the fp32 one (bench/quant.py)."""
    return os.environ.get("LANNER_EXACT_LINEARS", "0") == "0" and native.isa() != "scalar"


@functools.lru_cache(maxsize=None)
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.ggml_matmul.argtypes = [i, p, p, i64, i64, i64, p, i64, i64, p, i64, p, i, i]
    lib.ggml_dequantize.argtypes = [i, p, i64, i64, p, i64, p, i, i]
    lib.ggml_pack.argtypes = [i, p, i64, i64, i64, p, i]
    lib.ggml_argmax.argtypes = [i, p, p, i64, i64, i64, p, i64, i64, i, p, i, p, i, p]
    lib.ggml_matmul.restype = lib.ggml_dequantize.restype = lib.ggml_pack.restype = ctypes.c_int
    lib.ggml_argmax.restype = ctypes.c_int
    lib.ggml_amx_bf16.argtypes = [i, i64, i64, i]
    lib.ggml_amx_bf16.restype = ctypes.c_int
    lib.ggml_bf16_pairs.argtypes = [i, i64, i64]
    lib.ggml_bf16_pairs.restype = ctypes.c_int
    lib.ggml_set_iq_grids.argtypes = [p] * 6
    grids = iq_grids()
    lib.ggml_set_iq_grids(*[g.ctypes.data for g in grids])   # (which copies them)
    return lib


def iq_grid(name: str) -> np.ndarray:
    """A low i-quant's lattice grid as value bytes [entries, 8 or 4] (IQ1's as int8 -1, 0, 1): llama.cpp's table as
    the gguf package ships it."""
    from gguf import quants
    cls = getattr(quants, name)
    cls.init_grid()
    return np.ascontiguousarray(cls.grid.reshape(cls.grid_shape).astype(np.int8))


def iq_grids() -> list[np.ndarray]:
    """The grids in ggml_set_iq_grids' order (IQ1_M shares IQ1_S's)."""
    return [iq_grid(name) for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S")]


def kernels():
    """The compiled ggml.c for the current ISA level, or None (no compiler, or LANNER_NATIVE=0)."""
    lib = native.library(SOURCE)
    return None if lib is None else _typed(lib)


def check(code: int, what: str) -> None:
    """A kernel's return code as the error it stands for (0: none)."""
    if code == 1:
        raise MemoryError(f"{what}: out of memory for a thread's row buffer")
    if code:
        raise ValueError(f"{what}: the kernel does not take this type or shape")


def common_format(names: list[str]) -> str | None:
    """The format of FORMAT_CHAINS that holds the values of every one of names exactly, or None."""
    for chain in FORMAT_CHAINS:
        if set(names) <= set(chain):
            return max(names, key=chain.index)
    return None if len(set(names)) > 1 else names[0]


def block_values(name: str, raw: np.ndarray) -> np.ndarray:
    """The integer values q [..., 32] (int16) of blocks raw [..., bytes] of a 32-value format of FORMAT_CHAINS."""
    if name == "Q8_0":
        return raw[..., 2:].view(np.int8).astype(np.int16)
    qs = raw[..., -16:]
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int16)
    if name in ("Q5_0", "Q5_1"):
        qh = raw[..., -20:-16].copy().view("<u4")
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)
    return q


def block_bytes(name: str, q: np.ndarray) -> np.ndarray:
    """block_values' inverse: the bytes after a block's scale (and min) for values q [..., 32]."""
    if name == "Q8_0":
        return q.astype(np.int8).view(np.uint8)
    qs = ((q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)).astype(np.uint8)
    if name not in ("Q5_0", "Q5_1"):
        return qs
    qh = (((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return np.concatenate([qh[..., None].astype("<u4").view(np.uint8), qs], axis=-1)


class GGMLTensor:
    """A 2-D weight [rows, cols] as rows of GGML blocks: data is uint8 [rows, row_bytes]."""

    def __init__(self, type_name: str, shape: tuple[int, int], data: torch.Tensor):
        self.type_name, self.shape, self.data = type_name, tuple(shape), data
        self.type_id, self.block, self.block_bytes = BLOCKS[type_name]
        self.data_ptr, self.row_bytes = data.data_ptr(), data.shape[-1]
        if shape[1] % self.block or data.shape != (shape[0], shape[1] // self.block * self.block_bytes):
            raise ValueError(f"{type_name} weight of shape {shape}: rows of {data.shape[-1]} bytes do not hold "
                             f"{shape[1]} values in blocks of {self.block}")

    @classmethod
    def from_numpy(cls, type_name: str, shape, raw: np.ndarray) -> "GGMLTensor":
        return cls(type_name, shape, torch.from_numpy(raw.reshape(shape[0], -1)))

    @classmethod
    def quantize(cls, weight: torch.Tensor, type_name: str) -> "GGMLTensor":
        """An fp32 weight [rows, cols] quantized into `type_name` (llama.cpp's reference rounding)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize
        raw = quantize(weight.detach().float().numpy(), GGMLQuantizationType[type_name])
        return cls.from_numpy(type_name, weight.shape, np.ascontiguousarray(raw).view(np.uint8))

    @staticmethod
    def cat(parts: list["GGMLTensor"]) -> "GGMLTensor | GGMLRows":
        """Row-wise concatenation (a fused qkv or gate_up weight): blocks never straddle rows. Parts of different
        formats go into the one among them that holds all their values exactly (common_format: llama.cpp's
        mixes put Q8_0 beside Q5_0 where a width is not a multiple of 256), or where none does (Q4_K beside Q6_K)
        stay parts, each in its own format (GGMLRows)."""
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("only weights of one width concatenate")
        runs = []   # consecutive parts that one format holds: one part of a GGMLRows each
        for p in parts:
            if runs and common_format([q.type_name for q in runs[-1]] + [p.type_name]):
                runs[-1].append(p)
            else:
                runs.append([p])
        joined = []
        for run in runs:
            target = common_format([p.type_name for p in run])
            data = torch.cat([p.to_format(target).data for p in run])
            joined.append(GGMLTensor(target, (data.shape[0], run[0].shape[1]), data))
        return joined[0] if len(joined) == 1 else GGMLRows(joined)

    def to_format(self, target: str) -> "GGMLTensor":
        """The same values in target, a format of common_format's chains that holds them all exactly."""
        if target == self.type_name:
            return self
        raw = self.data.numpy().reshape(self.shape[0], -1, self.block_bytes)
        scales = raw[..., :4 if self.type_name in MIN_FORMATS else 2]
        values = block_values(self.type_name, raw) - ZERO_POINTS.get(self.type_name, 0) + ZERO_POINTS.get(target, 0)
        blocks = np.concatenate([scales, block_bytes(target, values)], axis=-1)
        return GGMLTensor.from_numpy(target, self.shape, np.ascontiguousarray(blocks))

    def permute_rows(self, order: np.ndarray) -> "GGMLTensor":
        return GGMLTensor(self.type_name, self.shape, self.data[torch.from_numpy(order)].contiguous())

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` dequantized, [len(ids), cols] in dtype (fp32 or bf16): an embedding lookup."""
        ids = ids.to(torch.int64).contiguous()
        return self._dequantize(ids.data_ptr(), ids.numel(), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize(None, self.shape[0], dtype)

    def _dequantize(self, ids_ptr, rows: int, dtype: torch.dtype, out: torch.Tensor | None = None,
                    first_row: int = 0) -> torch.Tensor:
        lib = kernels()
        if lib is None:
            return self._dequantize_numpy(ids_ptr, rows, dtype, first_row)
        bf16 = dtype == torch.bfloat16
        out = torch.empty(rows, self.shape[1], dtype=torch.bfloat16 if bf16 else torch.float32) if out is None else out
        base = self.data.data_ptr() + first_row * self.data.shape[1]
        threads = 1 if rows <= FEW_ROWS else torch.get_num_threads()
        check(lib.ggml_dequantize(self.type_id, base, self.data.shape[1], self.shape[1], ids_ptr, rows,
                                   out.data_ptr(), int(bf16), threads), "dequantize")
        return out if bf16 or dtype == torch.float32 else out.to(dtype)

    def _dequantize_numpy(self, ids_ptr, rows, dtype, first_row):
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        data = self.data.numpy()
        if ids_ptr is not None:
            ids = np.ctypeslib.as_array(ctypes.cast(ids_ptr, ctypes.POINTER(ctypes.c_int64)), (rows,))
            data = data[ids]
        else:
            data = data[first_row:first_row + rows]
        w = dequantize(data, GGMLQuantizationType[self.type_name]).reshape(rows, self.shape[1])
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(dtype)


class GGMLRows:
    """One weight as row-wise parts in formats no one of them holds exactly (a fused qkv of llama.cpp's Q4_K_M:
    Q4_K q and k beside a Q6_K v): each part multiplies in its own format (GGMLParts)."""

    def __init__(self, parts: list[GGMLTensor]):
        self.parts = parts
        self.shape = (sum(p.shape[0] for p in parts), parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts])


def ggml_linear(weight: GGMLTensor | GGMLRows, bias: torch.Tensor | None = None, int8: bool = True,
                bf16: bool = False):
    """The linear that multiplies with weight: a GGMLLinear, or for parts (GGMLRows) a GGMLParts."""
    return (GGMLParts if isinstance(weight, GGMLRows) else GGMLLinear)(weight, bias, int8=int8, bf16=bf16)


class GGMLLinear:
    """x[..., in] -> x @ W^T + b for a GGMLTensor W [out, in], in x's dtype (fp32 or bf16)."""
    mode = "ggml"

    def __init__(self, weight: GGMLTensor, bias: torch.Tensor | None = None, dense: torch.Tensor | None = None,
                 int8: bool = True, dense_dtype: torch.dtype | None = None, bf16: bool = False):
        """dense: the same weight in oneDNN's packed layout, for the large-batch path (else dequantized per call,
        or the int8 GEMM); dense_dtype: make that copy, in this dtype, at the first step that takes it (start-up
        and memory pay only where big steps run); int8: whether it may run on int8 activations (never with
        LANNER_EXACT_LINEARS=1); bf16: its rows will be bf16 (a bf16 model's), so that an exact linear's rows past
        SMALL_M multiply bf16 pairs of its integers where this build makes them (ggml_bf16_pairs)."""
        self.weight, self.bias, self.dense = weight, None if bias is None else bias.detach(), dense
        self.bias_fp32 = None if bias is None else self.bias.float().contiguous()   # what the kernel adds
        self.dense_dtype = dense_dtype
        self.out_features, self.in_features = weight.shape
        self.chunk_rows = max(64, DEQUANT_CHUNK_ELEMENTS // self.in_features)
        self.lib = kernels()   # resolved once: the ISA level in force when the model was loaded
        self.int8 = int8 and int8_activations()
        # bf16 steps of more than amx_rows rows on AMX tiles (where this build and the CPU have them): the weights
        # rounded to bf16, fp32 sums -- a dense bf16 copy's numerics, so the exact path's steps past 4 rows take them
        # too (and no copy is made for them). (The rows of calls as this linear makes them: int8 or exact.)
        tiles = self.lib is not None and self.lib.ggml_amx_bf16(weight.type_id, *weight.shape, self.int8)
        self.packed = self._pack() if self.lib is not None else None
        self.amx_rows = tiles if self.packed is not None else 0
        # elsewhere an exact linear's bf16 rows past SMALL_M on bf16 pairs: exact at the int8 path's speed
        pairs = bf16 and not self.int8 and not tiles and self.packed is not None
        self.pairs = bool(pairs and self.lib.ggml_bf16_pairs(weight.type_id, *weight.shape))
        self._row_norms = None

    @property
    def parts(self) -> list["GGMLLinear"]:
        """The linears whose outputs make this one's, in order: itself (GGMLParts: one a part)."""
        return [self]

    @property
    def amx_bf16(self) -> bool:
        """Whether bf16 calls past amx_rows rows take the AMX tiles (0 rows: never)."""
        return self.amx_rows > 0

    @property
    def flags(self) -> int:
        """The ggml_matmul flags its calls may take (the dtypes' aside)."""
        return ((MATMUL_INT8 if self.int8 else 0) | (MATMUL_AMX_BF16 if self.amx_bf16 else 0)
                | (MATMUL_BF16_PAIRS if self.pairs else 0))

    @property
    def int8_packed(self) -> bool:
        """Whether calls on int8 activations read the packed copy: decode rows, and GEMMs of any size (no dense copy
        needed; up to INT8_GEMM_ROWS where one is asked for). The K-quants' too, though past 64 rows a dense copy's
        GEMM beats theirs (Q6_K at 512 rows: 783 vs 579 ms with VNNI): a 1B model's copy took 2.1 GB in bf16 beside
        its 0.67 GB Q4_K_M file, and a 7B one's would not fit this machine in fp32 (docs/quantization.md,
        "Session 38")."""
        return self.int8 and self.packed is not None

    def kernel_rows(self, dtype: torch.dtype) -> int:
        """The most activation rows of dtype a call multiplies on the kernel rather than on the dense copy (or,
        without either, on rows dequantized per call)."""
        if dtype == torch.bfloat16 and self.pairs:
            return ALL_ROWS
        if self.dense is not None or self.dense_dtype is not None:
            if self.int8_packed:
                return INT8_GEMM_ROWS
            if self.packed is None:
                return SMALL_M
            return EXACT_PACKED_ROWS.get((dtype, self.weight.type_name), SMALL_M)
        # the i-quants below 4 bits: past a decode's rows each group of rows is decoded into int8 once a call
        decoded = self.int8 and self.weight.type_name in LOW_IQ_FORMATS
        return ALL_ROWS if self.int8_packed or decoded else SMALL_M_WITHOUT_DENSE

    def on_tiles(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a call of this many rows of dtype multiplies on the AMX tiles."""
        return self.amx_bf16 and dtype == torch.bfloat16 and rows > self.amx_rows

    def takes(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether a call of this many rows of dtype runs on the kernel (small) rather than a dense copy (large)."""
        return rows <= self.kernel_rows(dtype) or self.on_tiles(rows, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        lib = self.lib
        small = lib is not None and self.takes(x2.shape[0], x2.dtype)
        y = self.small(x2, lib, self.int8, tiles=True) if small else self.large(x2)
        return y.view(*x.shape[:-1], self.out_features)

    def _pack(self) -> torch.Tensor | None:
        """The weight in the kernel's packed layout (ggml_pack: rows interleaved so one integer dot product, or
        one fp32 FMA on the exact path's decode rows, advances a vector's width of rows), or None where this build
        or format has none."""
        w = self.weight
        packed = weight_memory.take(w.data.nbytes).view(w.data.dtype).view(w.data.shape)
        return packed if self.lib.ggml_pack(w.type_id, w.data_ptr, w.row_bytes, *w.shape, packed.data_ptr(),
                                             torch.get_num_threads()) else None

    def packed_ptr(self):
        """What the kernel takes as `packed`: int8 and exact calls both read it."""
        return None if self.packed is None else self.packed.data_ptr()

    def small(self, x: torch.Tensor, lib, int8: bool = False, tiles: bool = False, silu: bool = False,
              argmax: bool = False) -> torch.Tensor:
        """The kernel path; int8: on int8 activations (else exact: dequantize-then-matmul up to order), and on AMX
        tiles past amx_rows bf16 rows; tiles: those rows on the tiles without int8 (a dense bf16 copy's numerics);
        silu: the rows are gate | up, and silu(gate) * up comes out (MATMUL_SILU_MUL; no bias); argmax: each row's
        argmax of what would come out, int64 [rows] (MATMUL_ARGMAX)."""
        xk = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()   # the kernel's dtypes
        m, (n, k), w = xk.shape[0], self.weight.shape, self.weight
        width = n // 2 if silu else n
        y = torch.empty(m, dtype=torch.int64) if argmax else torch.empty(m, width, dtype=xk.dtype)
        packed = self.packed_ptr() if lib is self.lib else None
        own = self.flags if lib is self.lib else 0
        flags = ((MATMUL_INT8 | own) if int8 else (own & MATMUL_AMX_BF16 if tiles else 0) | (own & MATMUL_BF16_PAIRS))
        flags |= (MATMUL_BF16_IO if xk.dtype == torch.bfloat16 else 0) | (MATMUL_SILU_MUL if silu else 0)
        flags |= MATMUL_ARGMAX if argmax else 0
        bias = None if self.bias_fp32 is None else self.bias_fp32.data_ptr()
        check(lib.ggml_matmul(w.type_id, w.data_ptr, packed, w.row_bytes, n, k, xk.data_ptr(), k, m, y.data_ptr(),
                              width, bias, torch.get_num_threads(), flags), "matmul")
        return y if argmax else y.to(x.dtype)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this gate | up linear's output for fp32 or bf16 rows x in one kernel call, bitwise the
        two calls' (on AMX tiles the output is never written: 1.2-1.5x the two calls at 24-2,048 bf16 rows); None
        where the kernel does not take these rows or dtype, or there is a bias."""
        x2 = x.reshape(-1, x.shape[-1])
        if (self.lib is None or self.bias is not None or x2.dtype not in (torch.float32, torch.bfloat16)
                or not self.takes(x2.shape[0], x2.dtype)):
            return None
        y = self.small(x2, self.lib, self.int8, tiles=True, silu=True)
        return y.view(*x.shape[:-1], y.shape[-1])

    def argmax(self, x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's first largest of self(x).float() (a NaN counting as largest), int64 [rows], for fp32 or bf16
        rows x [rows, in] that the kernel path takes (no bias): the exact kernel's tokens at about the int8 path's
        cost (ggml_argmax). scratch: fp32 room for [rows, out] (else allocated)."""
        xk, w = x.contiguous(), self.weight
        m, (n, k) = xk.shape[0], w.shape
        scratch = torch.empty(m, n) if scratch is None else scratch
        tokens = torch.empty(m, dtype=torch.int64)
        x_flags = (MATMUL_X_BF16 | (self.flags & MATMUL_BF16_PAIRS)) if xk.dtype == torch.bfloat16 else 0
        check(self.lib.ggml_argmax(w.type_id, w.data_ptr, self.packed_ptr(), w.row_bytes, n, k, xk.data_ptr(), k, m,
                                   x_flags, self.row_norms().data_ptr(),
                                   int(xk.dtype == torch.bfloat16), scratch.data_ptr(), torch.get_num_threads(),
                                   tokens.data_ptr()), "argmax")
        return tokens

    def row_norms(self) -> torch.Tensor:
        """Upper bounds of W's row norms, fp32 [out] (made at first use): ggml_argmax's error bounds."""
        if self._row_norms is None:
            n, step = self.out_features, self.chunk_rows
            # fp32 sums of K squares err by under K + 1 units of 2^-24, their square roots by about half that: a
            # margin of 2 (K + 2) units covers both and its own rounding (float64 sums took 55 ms for the default
            # model's head, at the first greedy step of <= 4 rows)
            norms = torch.cat([self._chunk(a, min(n, a + step), torch.float32).norm(dim=1) for a in range(0, n, step)])
            margin = 1 + 2 * (self.in_features + 2) * 2.0 ** -24
            self._row_norms = torch.nextafter(norms * margin, torch.tensor(float("inf")))
        return self._row_norms

    def large(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_dtype is not None:   # set only where oneDNN runs the dtype natively (Linear.pack)
            from lanner.model.layers import onednn_pack
            self.dense, self.dense_dtype = onednn_pack(self.weight.dequantize(self.dense_dtype)), None
        if self.dense is not None and x.dtype == self.dense.dtype:
            from lanner.model.layers import onednn_linear
            return onednn_linear(x, self.dense, None if self.bias is None else self.bias.to(x.dtype))
        dt, n, step = x.dtype, self.out_features, self.chunk_rows
        bias = None if self.bias is None else self.bias.to(dt)
        if self.weight.type_name == "BF16" and dt == torch.bfloat16:   # BF16 rows are the dense weight, as stored
            return torch.nn.functional.linear(x, self.weight.data.view(dt).view(n, self.in_features), bias)
        if n <= step:
            return torch.nn.functional.linear(x, self._chunk(0, n, dt), bias)
        y = torch.empty(x.shape[0], n, dtype=dt)
        for a in range(0, n, step):
            b = min(n, a + step)
            y[:, a:b] = torch.nn.functional.linear(x, self._chunk(a, b, dt), None if bias is None else bias[a:b])
        return y

    def _chunk(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows a..b of W dequantized into the per-thread scratch buffer (reused: a fresh multi-MiB buffer
        per call goes back to the OS and page-faults in again, which costs as much as the dequantize)."""
        dt = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        numel = (b - a) * self.in_features
        buf = getattr(_local, "buf", None)
        if buf is None or buf.dtype != dt or buf.numel() < numel:
            buf = _local.buf = torch.empty(numel, dtype=dt)
        out = buf[:numel].view(b - a, self.in_features)
        if self.lib is None:
            return self.weight._dequantize_numpy(None, b - a, dtype, a)
        w = self.weight._dequantize(None, b - a, dt, out=out, first_row=a)
        return w if w.dtype == dtype else w.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def nbytes(self) -> int:
        return self.weight.nbytes


class GGMLParts:
    """x[..., in] -> x @ W^T + b for W of parts in different formats (GGMLRows): one GGMLLinear a part, each
    computing its columns of the output (in the one-call decode step, straight into them: fused.c's
    matmul_parts). A gate | up of parts runs its silu apart (no silu_mul: Linear.silu_mul gives None)."""
    mode = "ggml"

    def __init__(self, weight: GGMLRows, bias: torch.Tensor | None = None, int8: bool = True, bf16: bool = False):
        self.weight, self.bias = weight, None if bias is None else bias.detach()
        self.out_features, self.in_features = weight.shape
        ends = np.cumsum([p.shape[0] for p in weight.parts]).tolist()
        self.parts = [GGMLLinear(p, None if bias is None else self.bias[end - p.shape[0]:end], int8=int8,
                                  bf16=bf16) for p, end in zip(weight.parts, ends)]
        self.lib = self.parts[0].lib

    def kernel_rows(self, dtype: torch.dtype) -> int:
        return min(p.kernel_rows(dtype) for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def nbytes(self) -> int:
        return self.weight.nbytes


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, type_name: str) -> GGMLLinear:
    """An HF weight stored at load in a GGML format (q8_0, q4_0, q4_1, q5_0, q5_1; bf16: BF16 rows, lossless for
    a bf16 checkpoint)."""
    if type_name.lower() not in QUANTIZE_TO:
        raise ValueError(f"cannot quantize into {type_name!r}; choose one of {QUANTIZE_TO}")
    if weight.shape[1] % 32:
        raise ValueError(f"{type_name} needs in_features divisible by 32, got a weight of shape {tuple(weight.shape)}")
    return GGMLLinear(GGMLTensor.quantize(weight, type_name.upper()), bias)
