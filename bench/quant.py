"""GGML block-format kernels (lanner/quant/ggml.c) against PyTorch's dense linear on the default model's
shapes: effective weight bandwidth per format, rows M and ISA path. JSON lines, then a table.

    python bench/quant.py [--formats Q4_1,Q8_0,Q4_K,Q6_K] [--rows 1,4,16] [--isas native,avx512,avx2] [--threads 2]

One decode step's linears (30 layers of qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, plus the
49152x576 LM head) are multiplied in turn, so the weights stream from memory as in a real step (96 MB in
Q4_1; 536 MB dense fp32, which is what lanner multiplied with before it kept GGUF blocks). K-quants take widths rounded up to 256. `read_gb_s` is a
torch.sum over as many bytes as the weights, in the same run: the machine's read bandwidth for that size (from
the L3 where they fit), the roof for GEMV. Paths: `int8`, the
kernel on int8 activations (the default of up to 4 rows); `kernel`, the exact one on fp32 activations;
`gemm`, dequantize + PyTorch GEMM; `bf16`, a bf16 model's calls (int8 activations; on a CPU with AMX, past 16 rows
of Q4_0 / Q4_1 / Q8_0 the tiles: `amx_tiles`). Against `--dense bfloat16` (oneDNN, AMX too where it has it):

    python bench/quant.py --formats Q4_1 --paths int8,bf16 --rows 16,33,64,512,2048 --isas native

The isa `native` is the -march=native build (AVX512-VNNI where the CPU
has it; the forced avx512 level has none).

    python bench/quant.py --logits

instead runs the default model over a text sample one token a step (decode steps: the small-M path) on
the int8 and the exact path, the int8 path again in one forward (a prefill: the int8 GEMM), and HF in one
forward on the dequantized weights: perplexity of each, and the int8 paths' logit error against the exact one.
"""
import argparse
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import common  # noqa: E402
from test_ggml import random_weight  # noqa: E402

from lanner import native  # noqa: E402
from lanner.quant import ggml  # noqa: E402

STEP_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


timed, read_bandwidth = common.best_time, common.read_bandwidth


def bench_format(fmt: str, rows: int, reps: int, path: str = "kernel") -> dict:
    block = ggml.BLOCKS[fmt][1]   # K-quants' 256-value blocks need widths of 768 where the model has 576
    linears = [ggml.GGMLLinear(random_weight(fmt, n, -(-k // block) * block, i)) for i, (n, k) in enumerate(STEP_SHAPES)]
    dtype = torch.bfloat16 if path == "bf16" else torch.float32
    xs = {lin.in_features: torch.randn(rows, lin.in_features, dtype=dtype) for lin in linears}
    nbytes = sum(lin.nbytes() for lin in linears)
    calls = {"int8": lambda lin, x: lin.small(x, lin.lib, int8=True), "kernel": lambda lin, x: lin.small(x, lin.lib),
             "gemm": lambda lin, x: lin.large(x), "bf16": lambda lin, x: lin.small(x, lin.lib, int8=True)}
    call = calls[path]
    seconds = timed(lambda: [call(lin, xs[lin.in_features]) for lin in linears], reps)
    # a bf16 call past amx_rows multiplies on AMX tiles where the build and CPU have them (the int8 kernel else)
    tiles = path == "bf16" and all(lin.on_tiles(rows, torch.bfloat16) for lin in linears)
    return {"format": fmt, "path": path, "rows": rows, "ms": round(seconds * 1e3, 2), "weight_mb": round(nbytes / 1e6, 1),
            "weight_gb_s": round(nbytes / seconds / 1e9, 2), "amx_tiles": tiles}


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


SAMPLE = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe built "
          "two-wheeled machines that riders pushed along with their feet. Pedals came decades later, first on the "
          "front wheel, which grew larger and larger until the high-wheeler made riding both fast and dangerous. "
          "The safety bicycle of the 1880s, with two wheels of equal size and a chain driving the rear one, settled "
          "the shape that most bicycles still have. Pneumatic tyres followed soon after, and cycling became a "
          "craze: clubs formed, roads were paved, and women found in the bicycle a new kind of freedom. Today "
          "there are more bicycles in the world than cars, and cities from Copenhagen to Bogota build lanes for "
          "them, because a bicycle moves a person further on the energy of a meal than any other machine.")


def logit_error() -> dict:
    from conftest import hf_model_from, make_llm
    from test_quant import prefill_logits, stepwise_logits
    from lanner.model.loader import load_model_files, pull_default_model
    path = pull_default_model()
    logits = {}
    for name, exact in (("exact", "1"), ("int8", "0")):
        with mock.patch.dict(os.environ, {"LANNER_EXACT_LINEARS": exact}):
            llm = make_llm(path)
            ids = llm.tokenizer.encode(SAMPLE)
            logits[name] = stepwise_logits(llm, ids)
            if name == "int8":
                logits["int8_prefill"] = prefill_logits(llm, ids)   # one forward: the int8 GEMM
            del llm
    config, weights, _, _ = load_model_files(path, dense=True)
    with torch.no_grad():
        logits["hf"] = hf_model_from(config, weights)(torch.tensor([ids])).logits[0].float()
    target = torch.tensor(ids[1:])
    ppl = {k: torch.nn.functional.cross_entropy(v[:-1], target).exp().item() for k, v in logits.items()}
    errors = {}
    for name in ("int8", "int8_prefill"):
        diff = (logits[name] - logits["exact"]).abs()
        errors.update({f"{name}_vs_exact_mean_abs": round(diff.mean().item(), 4),
                       f"{name}_vs_exact_max_abs": round(diff.max().item(), 3),
                       f"{name}_top1_agree": round((logits[name].argmax(-1) == logits["exact"].argmax(-1))
                                                   .float().mean().item(), 4)})
    return {"tokens": len(ids), **{f"ppl_{k}": round(v, 4) for k, v in ppl.items()}, **errors,
            "logit_std": round(logits["exact"].std().item(), 3),
            "exact_vs_hf_max_abs": round((logits["exact"] - logits["hf"]).abs().max().item(), 5)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", default="Q4_0,Q4_1,Q8_0,Q4_K,Q5_K,Q6_K")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--isas", default=",".join(["native"] + native.supported_isas()[:2]))
    p.add_argument("--dense", default="float32,bfloat16", help="PyTorch dtypes to compare with ('' for none)")
    p.add_argument("--paths", default="int8,kernel,gemm",
                   help="int8 / kernel: ggml_matmul on int8 / fp32 activations; gemm: dequantize + PyTorch GEMM; "
                        "bf16: a bf16 model's calls (int8 activations, or AMX tiles past 16 rows where the CPU has them)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--logits", action="store_true", help="the int8 path's perplexity and logit error instead")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.logits:
        common.emit(logit_error(), args.out)
        return
    common.warn_if_busy()
    records = []
    for rows in [int(r) for r in args.rows.split(",")]:
        for isa in args.isas.split(","):
            with mock.patch.dict(os.environ, {"LANNER_ISA": "" if isa == "native" else isa}):
                for fmt in args.formats.split(","):
                    for path in args.paths.split(","):
                        records.append(dict(bench_format(fmt, rows, args.reps, path), isa=isa))
        for dtype in filter(None, args.dense.split(",")):
            records.append(dict(bench_dense(getattr(torch, dtype), rows, args.reps), isa=native.isa()))
    roofs = {}   # the read bandwidth for each size of weights: a model that fits in the L3 reads from it
    for r in records:
        if r["weight_mb"] not in roofs:
            roofs[r["weight_mb"]] = read_bandwidth(r["weight_mb"])
        roof = roofs[r["weight_mb"]]
        r.update(read_gb_s=round(roof, 1), of_read_bw=round(r["weight_gb_s"] / roof, 2),
                 threads=torch.get_num_threads(), **common.machine_fields())
        common.emit(r, args.out)
    common.summary_table(records, ["format", "path", "isa", "rows", "ms", "weight_mb", "weight_gb_s", "of_read_bw"])


if __name__ == "__main__":
    main()
