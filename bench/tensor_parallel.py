"""Tensor parallelism on this machine: TTFT and decode tokens/s for each --tp-sizes on the default model, the bytes
each rank puts into collectives per token, the time spent in them, and gloo's all-reduce latency by message size
(the alpha and beta of the cost model in docs/tensor_parallel_section.md).

Each configuration runs in its own spawned process (TP workers are spawned from it). Random-token prompts (fixed
seed, a fresh prompt per repetition: no prefix hits), greedy, eos ignored, median of --reps. TP = 1 runs with
all threads and with 1 thread (what one rank of TP = 2 gets on 2 cores).

    python bench/tensor_parallel.py [--quick] [--tp-sizes 1,2] [--dtype float32] [--plot docs/img/tensor_parallel.png]

One JSON line per (tp, threads, case) and per all-reduce size; the CPU model and flags in every line.
"""
import argparse
import datetime
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def run_lanner(path, dtype, tp, threads, prompt_lens, batch_sizes, reps, n_out, seed):
    import torch
    if threads:
        torch.set_num_threads(threads)
    from lanner import LLM, SamplingParams
    started = time.perf_counter()
    llm = LLM(model=path, dtype=dtype, tensor_parallel_size=tp, kv_cache_memory=0.5)
    start_s = time.perf_counter() - started
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    llm.generate([common.random_prompt(rng, max(prompt_lens))], params, use_tqdm=False)   # warm-up
    records = []
    for batch in batch_sizes:
        for prompt_len in prompt_lens:
            samples, comm = [], counters(llm)
            for _ in range(reps):
                prompts = [common.random_prompt(rng, prompt_len) for _ in range(batch)]
                outs = llm.generate(prompts, params, use_tqdm=False)
                samples.append((statistics.median(o.metrics.ttft for o in outs),
                                max(o.metrics.decode_time for o in outs)))
            tokens = reps * batch * (prompt_len + n_out - 1)   # rows computed: the last token is never fed back
            record = {"system": "lanner", "tp": tp, "threads": threads or common.num_threads(), "dtype": dtype,
                      "batch": batch, "prompt_len": prompt_len, "output_len": n_out, "reps": reps,
                      "start_s": round(start_s, 2), "ttft_s": round(statistics.median(t for t, _ in samples), 4),
                      "decode_tok_per_s": round(statistics.median(batch * (n_out - 1) / d for _, d in samples), 2)}
            records.append(dict(record, **comm_fields(counters(llm), comm, tokens), **common.machine_fields()))
    return records


def counters(llm):
    comm = getattr(llm.engine.runner, "comm", None)
    if comm is None:
        return None
    return {k: dict(getattr(comm, k)) for k in ("bytes", "calls", "seconds")}


def comm_fields(after, before, tokens):
    """Per token computed: bytes rank 0 put into all-reduces and the gather, calls, and seconds in collectives."""
    if after is None:
        return {}
    delta = {k: {op: after[k].get(op, 0) - before[k].get(op, 0) for op in after[k]} for k in after}
    return {"allreduce_bytes_per_token": round(delta["bytes"].get("all_reduce", 0) / tokens, 1),
            "gather_bytes_per_token": round(delta["bytes"].get("gather", 0) / tokens, 1),
            "collective_calls": sum(delta["calls"].values()),
            "collective_s": round(sum(delta["seconds"].values()), 3)}


# ---- gloo all-reduce latency ---------------------------------------------------------------------
def allreduce_loop(group, sizes, reps) -> dict:
    """{elements: median seconds of one all-reduce} (the median: other work on the machine makes outliers)."""
    import torch
    out = {}
    for n in sizes:
        t = torch.ones(n)
        for _ in range(10):
            group.allreduce([t]).wait()
        times = []
        for _ in range(reps):
            began = time.perf_counter()
            group.allreduce([t]).wait()
            times.append(time.perf_counter() - began)
        out[n] = statistics.median(times)
    return out


def allreduce_peer(port, sizes, reps):
    import torch
    from lanner.distributed.collectives import make_group, worker_store
    torch.set_num_threads(1)
    allreduce_loop(make_group(worker_store(port, 2), 1, 2, "cpu"), sizes, reps)


def measure_allreduce(sizes, reps) -> dict:
    """{fp32 elements: seconds per all-reduce} on 2 ranks of 1 thread, the group lanner's TP makes."""
    import torch
    import torch.multiprocessing as mp
    from lanner.distributed.collectives import make_group, master_store
    torch.set_num_threads(1)
    store = master_store(2)
    peer = mp.get_context("spawn").Process(target=allreduce_peer, args=(store.port, sizes, reps))
    peer.start()
    result = allreduce_loop(make_group(store, 0, 2, "cpu"), sizes, reps)
    peer.join()
    return result


# ---- the cost model ------------------------------------------------------------------------------
# (name, layers, hidden, parameters in billions): decoders whose decode step reads every weight once
MODELS = [("SmolLM2-135M", 30, 576, 0.135), ("Llama-3.2-1B", 16, 2048, 1.24), ("Llama-3.1-8B", 32, 4096, 8.0),
          ("Qwen2.5-32B", 64, 5120, 32.8), ("Llama-3.1-70B", 80, 8192, 70.6), ("Llama-3.1-405B", 126, 16384, 405.0)]
# (label, ranks, weight bytes per parameter, memory bytes/s per rank, all-reduce latency s, link bytes/s,
#  activation bytes, whether the ranks add memory bandwidth): alpha = None takes the gloo latency measured here
SCENARIOS = [("CPU, ranks sharing one socket (this VM), gloo", 2, 0.625, 20e9, None, 2e9, 4, False),
             ("CPU, 2 sockets (one rank each), gloo", 2, 0.625, 100e9, None, 2e9, 4, True),
             ("8 x H100 NVLink, NCCL (assumed 10 us, 300 GB/s)", 8, 2, 3.35e12, 10e-6, 300e9, 2, True)]


def predicted_speedup(layers, hidden, params_b, ranks, weight_bytes, bandwidth, alpha, link, act_bytes, adds_bw):
    """Decode step at batch 1: the weights streamed once (split over ranks that bring their own memory bandwidth),
    plus 2 layers' + the embedding's all-reduces of one hidden row (ring: 2 (N-1) / N of it over the link)."""
    stream = params_b * 1e9 * weight_bytes / bandwidth
    comm = (2 * layers + 1) * (alpha + 2 * (ranks - 1) / ranks * hidden * act_bytes / link)
    return stream / ((stream / ranks if adds_bw else stream) + comm)


def model_records(alpha_here: float) -> list[dict]:
    records = []
    for label, ranks, weight_bytes, bandwidth, alpha, link, act_bytes, adds_bw in SCENARIOS:
        for name, layers, hidden, params_b in MODELS:
            speedup = predicted_speedup(layers, hidden, params_b, ranks, weight_bytes, bandwidth, alpha or alpha_here,
                                        link, act_bytes, adds_bw)
            records.append({"system": "model", "scenario": label, "tp": ranks, "model": name, "params_b": params_b,
                            "alpha_us": round((alpha or alpha_here) * 1e6, 1), "predicted_decode_speedup":
                            round(speedup, 3)})
    return records


# ---- the figure ----------------------------------------------------------------------------------
def plot(records, latencies, predictions, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.3))
    plot_measured(left, [r for r in records if r["batch"] == 1])
    sizes = sorted(latencies)
    middle.loglog([n * 4 for n in sizes], [latencies[n] * 1e6 for n in sizes], "o-", label="gloo all-reduce, 2 ranks")
    middle.axvline(576 * 4, color="gray", ls=":", label="one decode row of SmolLM2 (fp32)")
    middle.set_xlabel("message bytes")
    middle.set_ylabel("µs per all-reduce")
    middle.set_title("one all-reduce (61 per SmolLM2 step)")
    middle.legend(fontsize=8)
    for scenario in dict.fromkeys(p["scenario"] for p in predictions):
        points = [p for p in predictions if p["scenario"] == scenario]
        right.semilogx([p["params_b"] for p in points], [p["predicted_decode_speedup"] for p in points], "o-",
                       label=f"TP={points[0]['tp']}: {scenario}")
    right.axhline(1, color="gray", ls=":")
    right.set_xlabel("model parameters (billions)")
    right.set_ylabel("predicted decode speedup over TP=1, batch 1")
    right.set_title("when TP pays: weights streamed vs all-reduce latency")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_measured(ax, runs):
    labels = sorted({(r["tp"], r["threads"]) for r in runs})
    lens = sorted({r["prompt_len"] for r in runs})
    width = 0.8 / len(labels)
    for i, (tp, threads) in enumerate(labels):
        row = {r["prompt_len"]: r for r in runs if (r["tp"], r["threads"]) == (tp, threads)}
        xs = [j + i * width for j in range(len(lens) + 1)]
        ax.bar(xs, [row[n]["ttft_s"] * 1000 for n in lens] + [1000 / row[lens[0]]["decode_tok_per_s"]], width,
               label=f"TP={tp}, {threads} thread{'s' * (threads > 1)} per rank")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(lens) + 1)],
                  [f"TTFT, {n} tokens" for n in lens] + ["decode, per token"])
    ax.set_ylabel("ms (lower is better)")
    ax.set_title("SmolLM2-135M Q4_1 fp32, batch 1, this 2-core VM")
    ax.legend(fontsize=8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp-sizes", default="1,2")
    ap.add_argument("--prompt-lens", default="128,512")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()
    common.warn_if_busy()
    path = common.model_path(args.model)
    reps, n_out = (1, 16) if args.quick else (args.reps, args.output_len)
    lens = [int(n) for n in args.prompt_lens.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    configs = [(tp, None) for tp in map(int, args.tp_sizes.split(","))]
    if (1, None) in configs and os.cpu_count() > 1:
        configs.append((1, max(1, os.cpu_count() // max(tp for tp, _ in configs))))   # one rank's share
    records = []
    for tp, threads in configs:
        for record in common.run_isolated(run_lanner, path, args.dtype, tp, threads, lens, batches, reps, n_out,
                                          args.seed):
            records.append(record)
            common.emit(record, args.out)
    sizes = [576, 576 * 8, 576 * 64, 576 * 512, 576 * 4096]
    latencies = common.run_isolated(measure_allreduce, sizes, 20 if args.quick else 200)
    for n in sizes:
        common.emit({"system": "gloo", "op": "all_reduce", "ranks": 2, "bytes": n * 4,
                     "latency_us": round(latencies[n] * 1e6, 1), "at": datetime.date.today().isoformat(),
                     **common.machine_fields()}, args.out)
    predictions = model_records(latencies[sizes[0]])
    for record in predictions:
        common.emit(record, args.out)
    common.summary_table(records, ["tp", "threads", "batch", "prompt_len", "ttft_s", "decode_tok_per_s",
                                   "allreduce_bytes_per_token", "collective_calls", "collective_s"])
    if args.plot:
        plot(records, latencies, predictions, args.plot)


if __name__ == "__main__":
    main()
