"""PEFT methods side by side on the code-word task of docs/finetune.md: training, held-out accuracy, serving cost.

    python bench/adapters.py train --dir adapters/ [--methods lora,prefix] --out train.jsonl
        trains each method's adapter with finetune() (HYPER below, bf16 base), then serves the 8 held-out questions
        greedily with lanner: one JSON line per method (trainable params, val loss before/after, pass rate, wall
        and CPU seconds)
    python bench/adapters.py serve --dir adapters/ --out serve.jsonl
        serving cost on the default model: TTFT of one request per method (median of --repeats), and output tokens/s
        of 16 requests, all base, half base and half one method's adapter, and every method mixed (medians of
        interleaved rounds)
    python bench/adapters.py plot train.jsonl serve.jsonl --png docs/img/peft_methods.png
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
from common import emit, machine_fields, make_workload, model_path, warn_if_busy

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_finetune import CODE, HELD_OUT, TRAIN_QUESTIONS  # noqa: E402 (the task's data, defined once)

COMMON = dict(batch_size=6, val_fraction=1 / 6, eval_every=1, patience=3, dtype="bfloat16", seed=0, progress=False)
HYPER = {   # per method: its options and the training loop's, found by a small search (docs/finetune.md)
    "lora": dict(lr=3e-3, epochs=1, lora_r=8, lora_alpha=16, lora_dropout=0.0),
    "prefix": dict(lr=3e-2, epochs=4, num_virtual_tokens=20),
    "prompt": dict(lr=3e-2, epochs=4, num_virtual_tokens=20, prompt_init="text",
                   prompt_init_text="Whatever the question, answer only with the code word."),
    "ptuning": dict(lr=1e-2, epochs=4, num_virtual_tokens=20, encoder_hidden_size=576),
    "ia3": dict(lr=3e-2, epochs=4),
    "adaption-prompt": dict(lr=5e-2, epochs=6, adapter_len=10, adapter_layers=8),
}


def training_data() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": CODE}]}
            for q in TRAIN_QUESTIONS]


def passes(llm, request) -> int:
    """Held-out questions answered exactly with the code word (greedy, served by lanner)."""
    from lanner import SamplingParams
    chats = [[{"role": "user", "content": q}] for q in HELD_OUT]
    outs = llm.chat(chats, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False, lora_request=request)
    return sum(o.outputs[0].text.strip() == CODE for o in outs)


def train(args) -> None:
    from lanner import LLM, LoRARequest
    from lanner.lora.finetune import finetune
    llm = LLM(model_path(None), dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    emit({"bench": "adapters-train", "method": "base", "held_out_pass": passes(llm, None), **machine_fields()}, args.out)
    for i, method in enumerate(args.methods.split(",")):
        out = os.path.join(args.dir, method)
        wall, cpu = time.perf_counter(), time.process_time()
        result = finetune(None, training_data(), out, method=method, **{**COMMON, **HYPER[method]})
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        val = [loss for _, loss in result["val_losses"]]
        emit({"bench": "adapters-train", "method": method, "trainable_params": result["trainable_params"],
              "base_params": result["base_params"], "val_loss_before": round(val[0], 4),
              "val_loss_after": round(result["best_val_loss"], 4), "steps": result["steps"],
              "best_step": result["best_step"], "held_out_pass": passes(llm, LoRARequest(method, i + 1, out)),
              "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "options": HYPER[method], **machine_fields()},
             args.out)


def ttft(llm, prompt: list[int], request, repeats: int) -> float:
    from lanner import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=1)
    times = [llm.generate([prompt], params, use_tqdm=False, lora_request=request)[0].metrics.ttft
             for _ in range(repeats + 1)]
    return statistics.median(times[1:])   # the first run warms the adapter's slot up


def throughput(llm, work, requests) -> float:
    """Output tokens per second of the whole batch."""
    from lanner import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in work]
    start = time.perf_counter()
    outs = llm.generate([p for p, _ in work], params, use_tqdm=False, lora_request=requests)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)


def serve(args) -> None:
    from lanner import LLM, LoRARequest
    warn_if_busy()
    methods = args.methods.split(",")
    llm = LLM(model_path(None), dtype=args.dtype, enable_lora=True, max_loras=4, max_lora_rank=8,
              enable_prefix_caching=False)   # a prompt adapter's virtual tokens are computed for every request
    requests = {None: None, **{m: LoRARequest(m, i + 1, os.path.join(args.dir, m)) for i, m in enumerate(methods)}}
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": HELD_OUT[0]}], add_generation_prompt=True)
    prompt = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    work = make_workload(args.num_requests, (16, 64), (args.output_tokens, args.output_tokens), seed=0)
    batches = {None: [None] * len(work)}   # all base; half base and half one method's adapter; every method mixed
    batches.update({m: [None if i % 2 == 0 else requests[m] for i in range(len(work))] for m in methods})
    batches["all-mixed"] = [list(requests.values())[i % len(requests)] for i in range(len(work))]
    throughput(llm, work[:len(methods)], [requests[m] for m in methods])   # warm up: every adapter loaded
    rates = {name: [] for name in batches}
    for _ in range(args.repeats):   # interleaved rounds: a busy machine's drift hits every setting alike
        for name, batch in batches.items():
            rates[name].append(throughput(llm, work, batch))
    for name in batches:
        record = {"bench": "adapters-serve", "method": name or "base", "dtype": args.dtype,
                  "prompt_tokens": len(prompt), "num_requests": len(work), "output_tokens": args.output_tokens}
        if name != "all-mixed":
            record["ttft_ms"] = round(1000 * ttft(llm, prompt, requests[name], args.repeats), 2)
        rate, base = statistics.median(rates[name]), statistics.median(rates[None])
        record.update(output_tok_per_s=round(rate, 1), ratio_vs_base=round(rate / base, 3),
                      threads=torch.get_num_threads(), **machine_fields())
        emit(record, args.out)


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for path in args.files for line in open(path) if line.strip()]
    trained = {r["method"]: r for r in rows if r["bench"] == "adapters-train" and "trainable_params" in r}
    served = {r["method"]: r for r in rows if r["bench"] == "adapters-serve"}
    methods = [m for m in HYPER if m in trained]
    panels = [("held-out pass (of 8)", [trained[m]["held_out_pass"] for m in methods], False),
              ("trainable parameters", [trained[m]["trainable_params"] for m in methods], True),
              ("training CPU seconds", [trained[m]["cpu_s"] for m in methods], False),
              ("TTFT ms (1 request)", [served[m]["ttft_ms"] for m in methods], False),
              ("tok/s, 8 base + 8 adapter\n(vs all base)", [served[m]["ratio_vs_base"] for m in methods], False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), dpi=100)
    for ax, (title, values, log) in zip(axes, panels):
        ax.barh(methods, values, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
        if log:
            ax.set_xscale("log")
        if ax is not axes[0]:
            ax.set_yticklabels([])
        if "vs all base" in title:
            ax.axvline(1.0, color="gray", ls=":", lw=1)
        if "TTFT" in title and "base" in served:
            ax.axvline(served["base"]["ttft_ms"], color="gray", ls=":", lw=1)
    fig.suptitle("PEFT methods on the code-word task (SmolLM2-135M, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("train", "serve"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True, help="where the adapters are (train: are written), one per method")
        p.add_argument("--methods", default=",".join(HYPER))
        p.add_argument("--out", default=None, help="also append the JSON lines to this file")
        p.add_argument("--threads", type=int, default=None)
    serve_parser = sub.choices["serve"]
    serve_parser.add_argument("--dtype", default="bfloat16")
    serve_parser.add_argument("--repeats", type=int, default=5)
    serve_parser.add_argument("--num-requests", type=int, default=16)
    serve_parser.add_argument("--output-tokens", type=int, default=32)
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+", help="JSON lines of train and serve")
    p.add_argument("--png", default="docs/img/peft_methods.png")
    args = ap.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    {"train": train, "serve": serve, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
