"""Single-stream latency: time to first token and decode tokens/s, lanner vs HF transformers (batch 1) vs
llama-cpp-python (if installed), on the same weights.

Random-token prompts of 128 and 1,024 tokens (fixed seed; a fresh prompt per repetition, so no prefix cache
hit), 128 output tokens, greedy, eos ignored; median of 3 repetitions. For every system TTFT runs from the
call/arrival to the first token, and decode tok/s = (n_out - 1) / (last token time - first token time).
lanner reads them from RequestOutput.metrics; HF timestamps tokens with a streamer inside one generate call;
llama-cpp-python timestamps the tokens its generator yields.

    python bench/latency.py [--quick] [--dtypes float32,bfloat16] [--systems lanner,hf,llamacpp]
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def cases_for(prompt_lens, reps, seed):
    """{prompt_len: [prompt per repetition]}, plus two warm-up prompts (short, and as long as the longest)."""
    rng = random.Random(seed)
    cases = {n: [common.random_prompt(rng, n) for _ in range(reps)] for n in prompt_lens}
    return cases, [common.random_prompt(rng, 8), common.random_prompt(rng, max(prompt_lens))]


def summarize(system, dtype, config, prompt_len, n_out, samples, device):
    """samples: [(ttft seconds, decode seconds for the n_out - 1 tokens after the first)]."""
    ttfts = [t for t, _ in samples]
    rates = [(n_out - 1) / d for _, d in samples]
    return {"system": system, "dtype": dtype, "config": config, "prompt_len": prompt_len, "output_len": n_out,
            "reps": len(samples), "ttft_s": round(statistics.median(ttfts), 4),
            "decode_tok_per_s": round(statistics.median(rates), 2), "ttft_s_all": [round(t, 4) for t in ttfts],
            "decode_tok_per_s_all": [round(r, 2) for r in rates], "device": device,
            "threads": common.num_threads()}


def run_lanner(path, dtype, device, options, cases, warmups, n_out):
    from lanner import LLM, SamplingParams
    llm = LLM(model=path, dtype=dtype, device=device, **options)
    backend = getattr(getattr(llm.engine.runner, "backend", None), "__name__", "?").rsplit(".", 1)[-1]
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    for w in warmups:
        llm.generate([w], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    weight_mb = step_weight_bytes(llm.engine.runner.model) / 1e6
    records = []
    for prompt_len, prompts in cases.items():
        samples, reads = [], []
        for prompt in prompts:
            # the machine's read bandwidth next to each repetition: on a shared host it moved 52 -> 88 GB/s
            # between seconds, so one reading against minutes of decoding gave a ratio by chance
            reads.append(common.read_bandwidth(weight_mb))
            m = llm.generate([prompt], params, use_tqdm=False)[0].metrics
            assert m.num_output_tokens == n_out
            samples.append((m.ttft, m.decode_time))
        quantization = llm.engine.runner.quantization   # what auto resolved to
        config = backend if quantization == "none" else f"{backend},{quantization}"
        r = summarize("lanner", dtype, config, prompt_len, n_out, samples, device)
        # the weights a batch-1 step streams, per second, against the read bandwidth: median of the repetitions;
        # and with the KV its attention reads too (the mean context of the decode), which long prompts add
        gb_s = [weight_mb * (n_out - 1) / d / 1e3 for _, d in samples]
        kv_mb = step_kv_bytes(llm.engine.runner, prompt_len + n_out / 2) / 1e6
        r.update(options=options, weight_mb=round(weight_mb, 1), weight_gb_s=round(statistics.median(gb_s), 1),
                 read_gb_s=round(statistics.median(reads), 1), read_gb_s_all=[round(b, 1) for b in reads],
                 of_read_bandwidth=round(statistics.median(g / b for g, b in zip(gb_s, reads)), 3),
                 kv_mb=round(kv_mb, 1), of_read_bandwidth_with_kv=round(
                     statistics.median(g * (1 + kv_mb / weight_mb) / b for g, b in zip(gb_s, reads)), 3))
        records.append(r)
    return [dict(r, **common.memory_fields(device)) for r in records]


def step_weight_bytes(model) -> float:
    """Bytes of weights a decode step reads: every linear's, in its format (the embedding rows it looks up aside)."""
    from lanner.model.layers import Linear
    from lanner.profiling.profile import bytes_per_weight
    return sum(bytes_per_weight(m) * m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear))


def step_kv_bytes(runner, context: float) -> float:
    """Bytes of K and V a batch-1 decode step reads at this context: every attention layer's (no sliding windows)."""
    cfg = runner.model_cfg
    return len(runner.model.attention_layers) * 2 * context * cfg.num_kv_heads * cfg.head_dim * runner.kv_dtype.itemsize


class TimingStreamer:
    """HF generate calls put() once with the prompt, then once per new token."""
    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(path, dtype, device, cases, warmups, n_out):
    model = common.load_hf(path, dtype, device)
    for w in warmups:
        common.hf_generate(model, [w], 2, device)
    records = []
    for prompt_len, prompts in cases.items():
        samples = []
        for prompt in prompts:
            streamer = TimingStreamer()
            t0 = time.perf_counter()
            common.hf_generate(model, [prompt], n_out, device, streamer=streamer)
            tokens = streamer.times[1:]
            assert len(tokens) == n_out, f"streamer saw {len(tokens)} tokens"
            samples.append((tokens[0] - t0, tokens[-1] - tokens[0]))
        records.append(summarize("hf", dtype, "batch1,generate", prompt_len, n_out, samples, device))
    return [dict(r, **common.memory_fields(device)) for r in records]


def run_llama_cpp(path, device, cases, warmups, n_out):
    llm = common.load_llama_cpp(path, max(cases) + n_out + 16, device)
    for w in warmups:
        common.llama_cpp_generate(llm, w, 2)
    records = []
    for prompt_len, prompts in cases.items():
        samples = []
        for prompt in prompts:
            times = common.llama_cpp_generate(llm, prompt, n_out)
            samples.append((times[0], times[-1] - times[0]))
        records.append(summarize("llamacpp", "native-gguf", "n_batch=512", prompt_len, n_out, samples, device))
    return [dict(r, **common.memory_fields(device)) for r in records]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_args(ap)
    ap.add_argument("--prompt-lens", default="128,1024")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=float, default=2.0)
    args = ap.parse_args()
    common.apply_threads(args.threads)
    common.warn_if_busy()
    reps, n_out = (1, 32) if args.quick else (args.reps, args.output_len)
    cases, warmups = cases_for([int(n) for n in args.prompt_lens.split(",")], reps, args.seed)
    path = common.model_path(args.model)
    systems, dtypes = args.systems.split(","), args.dtypes.split(",")
    options = {"attention_backend": args.attention_backend, "kv_cache_memory": args.kv_cache_memory,
               "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype}
    records = []

    def out(rec):
        records.append(rec)
        common.emit(rec, args.out)

    peer = {}   # (system, dtype or None, prompt_len) -> record
    if "llamacpp" in systems:
        if common.have_llama_cpp():
            try:
                for rec in common.run_isolated(run_llama_cpp, path, args.device, cases, warmups, n_out):
                    peer["llamacpp", None, rec["prompt_len"]] = rec
                    out(rec)
            except common.Crashed as e:
                out({"system": "llamacpp", "note": f"crashed: {e}; {common.LLAMA_CPP_BUILD}"})
        else:
            out({"system": "llamacpp", "note": "skipped: llama_cpp (llama-cpp-python) is not installed"})
    for dtype in dtypes:
        if "hf" in systems:
            for rec in common.run_isolated(run_hf, path, dtype, args.device, cases, warmups, n_out):
                peer["hf", dtype, rec["prompt_len"]] = rec
                out(rec)
        if "lanner" in systems:
            for rec in common.run_isolated(run_lanner, path, dtype, args.device, options, cases, warmups, n_out):
                for name, key in (("hf", ("hf", dtype)), ("llamacpp", ("llamacpp", None))):
                    if (p := peer.get((*key, rec["prompt_len"]))):
                        rec[f"ttft_speedup_vs_{name}"] = round(p["ttft_s"] / rec["ttft_s"], 2)
                        rec[f"decode_speedup_vs_{name}"] = round(rec["decode_tok_per_s"] / p["decode_tok_per_s"], 2)
                out(rec)
    common.summary_table(records, ["system", "dtype", "prompt_len", "output_len", "reps", "ttft_s",
                                   "decode_tok_per_s", "peak_rss_mb", "ttft_speedup_vs_hf", "decode_speedup_vs_hf",
                                   "decode_speedup_vs_llamacpp", "of_read_bandwidth", "of_read_bandwidth_with_kv"])


if __name__ == "__main__":
    main()
