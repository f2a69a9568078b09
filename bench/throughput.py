"""Offline throughput: lanner vs HF transformers generate (and llama-cpp-python if installed), same weights.

By default 64 requests, random-token prompts of 16-256 tokens, outputs of 16-128 tokens, greedy, eos ignored,
fixed seed, on the default model. One JSON line per system and configuration on stdout (and --out); a summary
table on stderr. Output tokens/s counts only the requested output tokens (padding and over-generation in
padded batches are not counted). The HF peers are slow, so they run on the first --hf-requests requests only
(a rate is comparable; lanner also runs that same subset so its speedup is apples to apples).

    python bench/throughput.py [--quick] [--dtypes float32,bfloat16] [--systems lanner,hf,llamacpp]
"""
import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

WARMUP = ([random.Random(-1).randint(*common.VOCAB_RANGE) for _ in range(8)], 4)


def record(system, dtype, config, work, seconds, **extra):
    n_out = sum(n for _, n in work)
    return {"system": system, "dtype": dtype, "config": config, "num_requests": len(work),
            "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": n_out, "seconds": round(seconds, 3),
            "output_tok_per_s": round(n_out / seconds, 2),
            "total_tok_per_s": round((n_out + sum(len(p) for p, _ in work)) / seconds, 2), **extra}


def run_lanner(path, dtype, device, options: dict, work, subset_note):
    from lanner import LLM, SamplingParams
    llm = LLM(model=path, dtype=dtype, device=device, **options)
    backend = getattr(getattr(llm.engine.runner, "backend", None), "__name__", "?").rsplit(".", 1)[-1]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate([WARMUP[0]], SamplingParams(temperature=0, max_tokens=WARMUP[1], ignore_eos=True), use_tqdm=False)
    common.sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    common.sync(device)
    seconds = time.perf_counter() - t0
    for out, (_, n) in zip(outs, work):
        assert len(out.outputs[0].token_ids) == n, f"lanner produced {len(out.outputs[0].token_ids)} tokens, asked {n}"
    config = f"{backend},seqs={options['max_num_seqs']},tokens={options['max_num_batched_tokens']}"
    if options["quantization"] != "none":
        config += f",{options['quantization']}"
    return record("lanner", dtype, config, work, seconds, requests=subset_note, options=options, device=device,
                  threads=common.num_threads(), **common.memory_fields(device))


def run_hf(path, dtype, device, work, batch_size, subset_note):
    model = common.load_hf(path, dtype, device)
    common.hf_generate(model, [WARMUP[0]] * min(batch_size, 2), WARMUP[1], device)
    seconds, generated = 0.0, 0
    for i in range(0, len(work), batch_size):
        chunk = work[i:i + batch_size]
        n_new = max(n for _, n in chunk)
        t0 = time.perf_counter()
        common.hf_generate(model, [p for p, _ in chunk], n_new, device)
        seconds += time.perf_counter() - t0
        generated += n_new * len(chunk)
    config = "batch1" if batch_size == 1 else f"padded{batch_size}"
    return record("hf", dtype, config, work, seconds, requests=subset_note, generated_tokens_incl_wasted=generated,
                  device=device, threads=common.num_threads(), **common.memory_fields(device))


def run_llama_cpp(path, device, work, subset_note):
    llm = common.load_llama_cpp(path, max(len(p) + n for p, n in work) + 16, device)
    common.llama_cpp_generate(llm, *WARMUP)
    seconds = 0.0
    for prompt, n in work:
        times = common.llama_cpp_generate(llm, prompt, n)
        assert len(times) == n
        seconds += times[-1]
    return record("llamacpp", "native-gguf", "sequential,n_batch=512", work, seconds, requests=subset_note,
                  device=device, threads=common.num_threads(), **common.memory_fields(device))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.common_args(ap)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=16, help="the HF peers run on the first N requests")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--llamacpp-requests", type=int, default=None, help="default: all requests")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", type=float, default=2.0)
    args = ap.parse_args()
    common.apply_threads(args.threads)
    common.warn_if_busy()
    prompt_range, output_range = ((16, 128), (8, 16)) if args.quick else ((16, 256), (16, 128))
    num_requests = 8 if args.quick else args.num_requests
    work = common.make_workload(num_requests, prompt_range, output_range, args.seed)
    path = common.model_path(args.model)
    systems, dtypes = args.systems.split(","), args.dtypes.split(",")
    n_hf = min(args.hf_requests, num_requests)
    hf_note = f"first {n_hf} of {num_requests}"
    all_note = f"all {num_requests}"
    options = {"attention_backend": args.attention_backend, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens, "kv_cache_memory": args.kv_cache_memory,
               "quantization": args.quantization}
    print(f"workload: {num_requests} requests, prompts {prompt_range}, outputs {output_range}, seed {args.seed}; "
          f"{sum(n for _, n in work)} output tokens; model {path}", file=sys.stderr)
    records = []

    def out(rec):
        records.append(rec)
        common.emit(rec, args.out)

    llama_rate = None
    if "llamacpp" in systems:
        if common.have_llama_cpp():
            n = min(args.llamacpp_requests or num_requests, num_requests)
            rec = common.run_isolated(run_llama_cpp, path, args.device, work[:n], f"first {n} of {num_requests}")
            llama_rate = rec["output_tok_per_s"]
            out(rec)
        else:
            out({"system": "llamacpp", "note": "skipped: llama_cpp (llama-cpp-python) is not installed"})
    for dtype in dtypes:
        hf_rates = []
        if "hf" in systems:
            for bs in (1, args.hf_batch_size):
                rec = common.run_isolated(run_hf, path, dtype, args.device, work[:n_hf], bs, hf_note)
                hf_rates.append(rec["output_tok_per_s"])
                out(rec)
        if "lanner" in systems:
            subsets = [(work[:n_hf], hf_note)] if hf_rates and n_hf < num_requests else []
            for sub, note in subsets + [(work, all_note)]:
                rec = common.run_isolated(run_lanner, path, dtype, args.device, options, sub, note)
                if hf_rates:
                    rec["speedup_vs_best_hf"] = round(rec["output_tok_per_s"] / max(hf_rates), 2)
                if llama_rate:
                    rec["speedup_vs_llamacpp"] = round(rec["output_tok_per_s"] / llama_rate, 2)
                out(rec)
    common.summary_table(records, ["system", "dtype", "config", "requests", "output_tokens", "seconds",
                                   "output_tok_per_s", "peak_rss_mb", "speedup_vs_best_hf", "speedup_vs_llamacpp"])


if __name__ == "__main__":
    main()
