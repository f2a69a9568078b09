"""Weight-only quantization (lanner/quant): kernel timings, accuracy, and end-to-end speed. JSON lines.

    python bench/quant.py                              # all three parts
    python bench/quant.py --parts kernels --threads 1  # just the per-shape GEMM timings, one thread
    python bench/quant.py --parts accuracy,speed --quick

kernels   every linear shape of the default model (SmolLM2-135M: 576->960 qkv, 576->576 o, 576->3072 gate_up,
          1536->576 down) at M = 1, 2, 4, 8, 16, 32, 64, 128 rows, bf16 activations: the oneDNN-packed bf16
          linear (what quantization=none runs) vs the native int8 / int4 kernels (`*_kernel`), the dequantize
          + GEMM path (`*_dequant`), and the dispatching linear lanner runs (`int8`, `int4`: the kernel up to
          SMALL_M rows, dequantize above). Two regimes: `hot` reuses one weight (it sits in L2/L3), `stream`
          cycles through copies of the weight totalling 80 MB, 2.5x the last-level cache (memory-bound, like a
          decode step of the whole model; M = 1, 4, 16, 64). Plus a `model_pass` line per M: all 30 layers'
          four linears in order, the weights of a real decode step. Fastest call of many (see best_time).
accuracy  perplexity of the default model on PASSAGE (below) for quantization none / int8 / int4 in bf16,
          via prompt_logprobs, and greedy continuations of a few prompts compared with none's.
speed     single-stream decode tok/s and a 64-request batch's output tok/s per quantization (short runs).
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py
from common import emit  # noqa: E402

from lanner.quant.linear import quantize_linear  # noqa: E402

SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)]  # (name, in, out)
NUM_LAYERS = 30
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128]
STREAM_M = (1, 4, 16, 64)     # the streamed (cold-weight) regime is timed at these
STREAM_BYTES = 80 << 20       # copies of each weight, > 2x a 32 MiB L3

# ~400 tokens of plain English, written for this benchmark
PASSAGE = """\
The old lighthouse at the end of the harbor has not guided a ship in more than forty years, yet the town
still paints it every spring. On a Saturday in April, volunteers carry ladders, brushes and buckets of white
paint down the narrow stone pier, and children follow them with sandwiches and bottles of lemonade. Nobody
remembers exactly when the tradition began. Some say a retired captain started it, because he could not bear
to watch the tower fade into the gray of the sea. Others claim the first painters were students from the
school on the hill, who needed a project for their history class and chose the building that appeared on
every postcard sold in the harbor shops.

Whatever its origin, the day has become a small festival. The bakery opens early and sells round loaves
shaped like life rings. A band of three fiddlers plays near the fish market, and the ferry to the islands
offers half-price tickets to anyone with paint on their sleeves. By noon the lower half of the tower is
bright again, and the volunteers stop to eat on the rocks while gulls circle above them, hoping for crumbs.

In the afternoon the work becomes harder. The upper gallery can only be reached by a steep iron staircase
inside the tower, and the wind at the top is strong enough to pull a brush out of a careless hand. Only
experienced climbers are allowed up there, and they wear harnesses clipped to the railing. They paint slowly,
checking every few minutes that the wet surface is not collecting sand blown in from the beach.

When the last coat is finished, usually just before sunset, the whole town gathers on the pier. The mayor
gives a short speech, which everyone agrees should be shorter, and then the lamp room is lit for a single
hour. The old lens no longer turns, but the light still spreads across the water, warm and steady. For that
hour people stop talking. They watch the beam reach the boats at anchor and the dark line of the islands
beyond them, and many of them think about the sailors who once trusted that light to bring them home.
Then the lamp is switched off, the ladders are carried back up the hill, and the lighthouse waits another
year for its new coat of paint.
"""

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors:\n1.",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "The three laws of motion are",
]




def machine() -> dict:
    return {"threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def warn_if_busy() -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: timings are noisy; compare ratios from the "
              f"same run", file=sys.stderr)


# ---- kernels ----------------------------------------------------------------------------------------
def best_time(fn, min_s: float = 0.05, min_calls: int = 20) -> float:
    """Seconds per call: the fastest single call of at least min_calls within min_s. On a shared machine a
    longer window almost always contains a preemption, so the minimum of single calls is the steady figure."""
    fn()
    fn()
    best, n, t_end = math.inf, 0, time.perf_counter() + min_s
    while n < min_calls or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        n += 1
    return best


def make_systems(w: torch.Tensor, copies: int = 1, only=None) -> dict:
    """name -> ([callable x -> y] over `copies` independent copies of the weight, weight bytes of one copy)."""
    import copy
    q8, q4 = quantize_linear(w, None, "int8"), quantize_linear(w, None, "int4")
    q4_64 = quantize_linear(w, None, "int4", group_size=64)
    makers = {
        "bf16": (lambda: (lambda x, p=torch.ops.mkldnn._reorder_linear_weight(w.clone(), 1):
                          torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")), w.numel() * 2),
        "int8_kernel": (lambda: copy.deepcopy(q8).kernel, q8.nbytes()),
        "int8_dequant": (lambda: copy.deepcopy(q8).dequant_matmul, q8.nbytes()),
        "int8": (lambda: copy.deepcopy(q8), q8.nbytes()),
        "int4_kernel": (lambda: copy.deepcopy(q4).kernel, q4.nbytes()),
        "int4_dequant": (lambda: copy.deepcopy(q4).dequant_matmul, q4.nbytes()),
        "int4": (lambda: copy.deepcopy(q4), q4.nbytes()),
        "int4_g64_kernel": (lambda: copy.deepcopy(q4_64).kernel, q4_64.nbytes()),
    }
    return {s: ([make() for _ in range(copies)], nbytes) for s, (make, nbytes) in makers.items()
            if only is None or s in only}


def run_kernels(args) -> None:
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    m_values = [1, 16, 64] if args.quick else M_VALUES
    stream_systems = ["bf16", "int8_kernel", "int8_dequant", "int4_kernel", "int4_dequant"]
    for name, k, n in SHAPES:
        w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
        systems = make_systems(w)
        # stream copies: enough that even the int4 copies overflow the last-level cache a few times over
        copies = max(2, math.ceil(STREAM_BYTES / systems["int4"][1]))
        streamed = {} if args.quick else make_systems(w, copies, stream_systems)
        for m in m_values:
            x = torch.randn(m, k, generator=gen).to(dtype)
            base = {}
            for s, ([fn], nbytes) in systems.items():
                hot = best_time(lambda: fn(x))
                rec = {"part": "kernels", "shape": name, "in": k, "out": n, "m": m, "system": s,
                       "weight_bytes": nbytes, "hot_us": round(hot * 1e6, 1)}
                if s in streamed and m in STREAM_M:
                    fns = streamed[s][0]
                    cold = best_time(lambda: [f(x) for f in fns], min_s=0, min_calls=3) / len(fns)
                    rec["stream_us"] = round(cold * 1e6, 1)
                    rec["stream_gbps"] = round(nbytes / cold / 1e9, 2)
                base.setdefault("bf16", rec)
                rec["hot_speedup_vs_bf16"] = round(base["bf16"]["hot_us"] / rec["hot_us"], 2)
                if "stream_us" in rec:
                    rec["stream_speedup_vs_bf16"] = round(base["bf16"]["stream_us"] / rec["stream_us"], 2)
                emit({**rec, **machine()}, args.out)
        del streamed
    # a whole decode step's linears: 30 layers x 4 shapes, each weight read once per pass
    systems = ["bf16", "int8", "int4"]
    layers = {s: [] for s in systems}
    for _ in range(NUM_LAYERS):
        for name, k, n in SHAPES:
            made = make_systems((torch.randn(n, k, generator=gen) * 0.05).to(dtype), only=systems)
            for s in systems:
                layers[s].append((k, made[s][0][0], made[s][1]))
    for m in m_values:
        xs = {k: torch.randn(m, k, generator=gen).to(dtype) for _, k, _ in SHAPES}
        base = None
        for s in systems:
            t = best_time(lambda: [fn(xs[k]) for k, fn, _ in layers[s]], min_s=0, min_calls=5)
            base = base or t
            nbytes = sum(b for _, _, b in layers[s])
            emit({"part": "kernels", "shape": "model_pass", "layers": NUM_LAYERS, "m": m, "system": s,
                  "weight_mb": round(nbytes / 1e6, 1), "ms": round(t * 1e3, 2), "gbps": round(nbytes / t / 1e9, 2),
                  "speedup_vs_bf16": round(base / t, 2), **machine()}, args.out)



# ---- accuracy ---------------------------------------------------------------------------------------
def perplexity(llm, token_ids: list[int]) -> tuple[float, float]:
    """(perplexity, mean negative log-likelihood) of token_ids[1:] given their prefixes."""
    from lanner import SamplingParams
    out = llm.generate([token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       use_tqdm=False)[0]
    nll = -sum(out.prompt_logprobs[i][token_ids[i]] for i in range(1, len(token_ids))) / (len(token_ids) - 1)
    return math.exp(nll), nll


def greedy(llm, prompts, max_tokens: int) -> list[list[int]]:
    from lanner import SamplingParams
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def compare(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Positions that differ, and where each continuation first leaves the reference."""
    differ = sum(a != b for r, g in zip(ref, got) for a, b in zip(r, g))
    first = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None) for r, g in zip(ref, got)]
    return {"tokens_compared": sum(len(r) for r in ref), "tokens_differ": differ,
            "prompts_identical": sum(f is None for f in first), "first_divergence": first}


def accuracy_worker(quantization: str, max_tokens: int, threads) -> dict:
    from lanner import LLM
    if threads:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        llm = LLM(dtype="bfloat16", quantization=quantization, kv_cache_memory=0.25)
        ids = llm.tokenizer.encode(PASSAGE)
        t0 = time.perf_counter()
        ppl, nll = perplexity(llm, ids)
        seconds = time.perf_counter() - t0
        return {"ppl": ppl, "nll": nll, "tokens": len(ids), "prefill_s": seconds,
                "greedy": greedy(llm, PROMPTS, max_tokens)}


def run_accuracy(args, quants) -> None:
    import common
    max_tokens = 16 if args.quick else 48
    ref = None
    for q in quants:
        r = common.run_isolated(accuracy_worker, q, max_tokens, args.threads)
        ref = ref or r
        emit({"part": "accuracy", "quantization": q, "dtype": "bfloat16", "passage_tokens": r["tokens"],
              "perplexity": round(r["ppl"], 4), "nll": round(r["nll"], 5),
              "ppl_vs_none": round(r["ppl"] / ref["ppl"], 4), "prefill_s": round(r["prefill_s"], 3),
              "greedy_max_tokens": max_tokens, **compare(ref["greedy"], r["greedy"]), **machine()}, args.out)


# ---- speed ------------------------------------------------------------------------------------------
def speed_worker(quantization: str, single_out: int, reps: int, batch: int, batch_out: int, threads) -> dict:
    import random
    import common
    from lanner import LLM, SamplingParams
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(dtype="bfloat16", quantization=quantization)
    rng = random.Random(0)
    warm = common.random_prompt(rng, 64)
    llm.generate([warm], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    rates = []
    for _ in range(reps):
        params = SamplingParams(temperature=0, max_tokens=single_out, ignore_eos=True)
        m = llm.generate([common.random_prompt(rng, 64)], params, use_tqdm=False)[0].metrics
        rates.append((single_out - 1) / m.decode_time)
    prompts = [common.random_prompt(rng, rng.randint(32, 128)) for _ in range(batch)]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=batch_out, ignore_eos=True), use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == batch_out for o in outs)
    return {"decode_tok_per_s_all": [round(r, 2) for r in rates], "batch_seconds": seconds,
            "batch_output_tok_per_s": batch * batch_out / seconds, "batch_prompt_tokens": sum(map(len, prompts)),
            "peak_rss_mb": common.peak_rss_mb(), "threads": torch.get_num_threads()}


def run_speed(args, quants) -> None:
    import statistics
    import common
    single_out, reps, batch, batch_out = (32, 2, 64, 16) if args.quick else (128, 5, 64, 64)
    base = None
    for q in quants:
        r = common.run_isolated(speed_worker, q, single_out, reps, batch, batch_out, args.threads)
        decode = statistics.median(r["decode_tok_per_s_all"])
        base = base or (decode, r["batch_output_tok_per_s"])
        emit({"part": "speed", "quantization": q, "dtype": "bfloat16", "single_output_tokens": single_out,
              "decode_tok_per_s": round(decode, 2), "decode_speedup_vs_none": round(decode / base[0], 2),
              "decode_tok_per_s_all": r["decode_tok_per_s_all"], "batch_requests": batch,
              "batch_output_tokens_each": batch_out, "batch_prompt_tokens": r["batch_prompt_tokens"],
              "batch_seconds": round(r["batch_seconds"], 3),
              "batch_output_tok_per_s": round(r["batch_output_tok_per_s"], 2),
              "batch_speedup_vs_none": round(r["batch_output_tok_per_s"] / base[1], 2),
              "peak_rss_mb": r["peak_rss_mb"], **machine(), "threads": r["threads"]}, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,accuracy,speed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quantizations", default="none,int8,int4")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_busy()
    parts = args.parts.split(",")
    with torch.inference_mode():
        if "kernels" in parts:
            run_kernels(args)
    quants = args.quantizations.split(",")
    if "accuracy" in parts:
        run_accuracy(args, quants)
    if "speed" in parts:
        run_speed(args, quants)


if __name__ == "__main__":
    main()
