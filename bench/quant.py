"""GGML block-format kernels (lanner/quant/ggml.c) against PyTorch's dense linear on the default model's
shapes: effective weight bandwidth per format, rows M and ISA path. JSON lines, then a table.

    python bench/quant.py [--formats Q4_1,Q8_0,Q4_K,Q6_K] [--rows 1,4,16] [--isas avx512,avx2] [--threads 2]

One decode step's linears (30 layers of qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, plus the
49152x576 LM head) are multiplied in turn, so the weights stream from memory as in a real step (96 MB in
Q4_1; 536 MB dense fp32, which is what lanner multiplied with before it kept GGUF blocks). K-quants take widths rounded up to 256. `read_gb_s` is a
torch.sum over 400 MB in the same run: the machine's read bandwidth, the roof for GEMV.
"""
import argparse
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import common  # noqa: E402
from test_ggml import random_weight  # noqa: E402

from lanner import native  # noqa: E402
from lanner.quant import ggml  # noqa: E402

STEP_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth() -> float:
    x = torch.ones(100_000_000)
    return x.numel() * 4 / timed(lambda: x.sum(), 5) / 1e9


def bench_format(fmt: str, rows: int, reps: int, path: str = "kernel") -> dict:
    block = ggml.BLOCKS[fmt][1]   # K-quants' 256-value blocks need widths of 768 where the model has 576
    linears = [ggml.GGMLLinear(random_weight(fmt, n, -(-k // block) * block, i)) for i, (n, k) in enumerate(STEP_SHAPES)]
    xs = {lin.in_features: torch.randn(rows, lin.in_features) for lin in linears}
    nbytes = sum(lin.nbytes() for lin in linears)
    call = (lambda lin, x: lin.small(x, lin.lib)) if path == "kernel" else (lambda lin, x: lin.large(x))
    seconds = timed(lambda: [call(lin, xs[lin.in_features]) for lin in linears], reps)
    return {"format": fmt, "path": path, "rows": rows, "ms": round(seconds * 1e3, 2), "weight_mb": round(nbytes / 1e6, 1),
            "weight_gb_s": round(nbytes / seconds / 1e9, 2)}


def bench_dense(dtype: torch.dtype, rows: int, reps: int) -> dict:
    from lanner.model.layers import Linear
    linears = []
    for n, k in STEP_SHAPES:
        lin = Linear(k, n, bias=False)
        torch.nn.init.normal_(lin.weight, std=0.02)
        lin = lin.to(dtype)
        lin.pack()
        linears.append(lin)
    xs = {k: torch.randn(rows, k, dtype=dtype) for k in (576, 1536)}
    nbytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
    with torch.inference_mode():
        seconds = timed(lambda: [lin(xs[lin.in_features]) for lin in linears], reps)
    return {"format": f"dense_{str(dtype).removeprefix('torch.')}", "path": "onednn", "rows": rows, "ms": round(seconds * 1e3, 2),
            "weight_mb": round(nbytes / 1e6, 1), "weight_gb_s": round(nbytes / seconds / 1e9, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--isas", default=",".join(native.supported_isas()[:2]))
    p.add_argument("--dense", default="float32,bfloat16", help="PyTorch dtypes to compare with ('' for none)")
    p.add_argument("--paths", default="kernel,gemm", help="kernel: ggml_matmul; gemm: dequantize + PyTorch GEMM")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common.warn_if_busy()
    roof = read_bandwidth()
    records = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for isa in args.isas.split(","):
            with mock.patch.dict(os.environ, {"LANNER_ISA": isa}):
                for fmt in args.formats.split(","):
                    for path in args.paths.split(","):
                        records.append(dict(bench_format(fmt, rows, args.reps, path), isa=isa))
        for dtype in filter(None, args.dense.split(",")):
            records.append(dict(bench_dense(getattr(torch, dtype), rows, args.reps), isa=native.isa()))
    for r in records:
        r.update(read_gb_s=round(roof, 1), of_read_bw=round(r["weight_gb_s"] / roof, 2),
                 threads=torch.get_num_threads(), **common.machine_fields())
        common.emit(r, args.out)
    common.summary_table(records, ["format", "path", "isa", "rows", "ms", "weight_mb", "weight_gb_s", "of_read_bw"])


if __name__ == "__main__":
    main()
