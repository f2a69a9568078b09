"""Throughput with LoRA adapters: the 64-request workload with 0, 1, 4 and 8 distinct adapters in the batch, or
(--single-stream) one request at a time, base and with the first adapter: its decode tok/s after a 128-token prompt.

Adapters are random rank-16 PEFT-format adapters on all linear layers of the default model (non-zero B, so
every delta is really computed). One JSON line per setting, with the ratio to the base-only run.

    python bench/lora.py [--quick] [--threads 1] [--adapters 0,1,4,8]
    python bench/lora.py --adapters 0,8 --adapter-dirs DIR,DIR,...   # given PEFT adapters of any kind instead
    python bench/lora.py --single-stream --dtype float32 [--adapter-dirs DIR]
"""
import argparse
import json
import os
import tempfile
import time

import torch
from common import make_workload, memory_fields, model_path

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(path: str, cfg, rank: int, seed: int) -> None:
    """A PEFT adapter directory, written directly (no PEFT needed), with random A and B."""
    from safetensors.torch import save_file

    from lanner.lora.adapter import submodule_sizes
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for module, (d_in, d_out) in submodule_sizes(cfg).items():
            prefix = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                   "bias": "none", "task_type": "CAUSAL_LM"}, f)


def run(llm, work, loras) -> tuple[float, int]:
    from lanner import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False, lora_request=loras)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def single_stream(llm, request, reps: int = 3) -> float:
    """Median decode tok/s of one request at a time: a random 128-token prompt, 128 greedy tokens."""
    import random
    import statistics

    from common import random_prompt

    from lanner import SamplingParams
    rng, params = random.Random(0), SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    rates = []
    for _ in range(reps):
        out = llm.generate([random_prompt(rng, 128)], params, use_tqdm=False, lora_request=request)[0]
        rates.append((len(out.outputs[0].token_ids) - 1) / out.metrics.decode_time)
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", default="0,1,4,8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="16 requests, short outputs")
    ap.add_argument("--single-stream", action="store_true", help="one request at a time, base and one adapter")
    ap.add_argument("--adapter-dirs", default="",
                    help="comma-separated PEFT adapter directories (LoRA, IA3, prefix, prompt, LLaMA-Adapter, ...) "
                         "used instead of random LoRAs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lanner import LLM, LoRARequest
    n = 16 if args.quick else args.num_requests
    work = make_workload(n, (16, 256), (8, 16) if args.quick else (16, 128), seed=0)
    llm = LLM(model_path(None), dtype=args.dtype, enable_lora=True, max_loras=8, max_lora_rank=args.rank,
              enable_prefix_caching=False)
    with tempfile.TemporaryDirectory() as tmp:
        counts = [1] if args.single_stream else [int(c) for c in args.adapters.split(",")]
        given = [d for d in args.adapter_dirs.split(",") if d]
        if given and max(counts) > len(given):
            raise SystemExit(f"--adapters asks for {max(counts)} distinct adapters, --adapter-dirs gives {len(given)}")
        requests = [LoRARequest(f"a{i}", i + 1, given[i] if given else os.path.join(tmp, f"a{i}"))
                    for i in range(max(counts))]
        for i, r in enumerate(requests[:0 if given else None]):
            write_adapter(r.lora_path, llm.engine.model_config, args.rank, seed=i)
        run(llm, work[:2], [requests[0] if requests else None, None])   # warm up
        if args.single_stream:
            base = single_stream(llm, None)
            for request in (None, requests[0]):
                rate = base if request is None else single_stream(llm, request)
                print(json.dumps({"bench": "lora_single_stream", "adapter": request and request.lora_path,
                                  "dtype": args.dtype, "decode_tok_per_s": round(rate, 2),
                                  "ratio_vs_base": round(rate / base, 3), "threads": torch.get_num_threads(),
                                  **memory_fields("cpu")}), flush=True)
            return
        base = None
        for count in counts:
            loras = [requests[i % count] if count else None for i in range(n)]
            seconds, tokens = run(llm, work, loras)
            rate = tokens / seconds
            base = base or (rate if count == 0 else None)
            print(json.dumps({"bench": "lora", "distinct_adapters": count,
                              "adapters": [r.lora_path for r in requests[:count]] if given else f"random LoRA r{args.rank}",
                              "dtype": args.dtype,
                              "num_requests": n, "output_tokens": tokens, "seconds": round(seconds, 3),
                              "output_tok_per_s": round(rate, 2),
                              "ratio_vs_base": round(rate / base, 3) if base else None,
                              "threads": torch.get_num_threads(), **memory_fields("cpu")}), flush=True)


if __name__ == "__main__":
    main()
