"""EAGLE acceptance with a LoRA adapter: does the head keep up when an adapter changes what the model says?

The head reads the target's hidden states with the request's adapter applied, so it sees the adapted model, but
it was trained on the base model's answers. Three runs on the same prompts (greedy, batch 1, k drafts):
base model + shipped head; adapter + shipped head; adapter + its own head (`lanner finetune --with-draft`,
ADAPTER/draft_head, which the engine picks up for that adapter's requests).

    python bench/eagle_adapters.py --adapter DIR [--prompts N] [--max-tokens 96] [--k 4]

One JSON line per run: mean accepted length (tokens per verify step), tokens/s, the head used.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HELD_OUT = [   # open chat, in neither the head's nor the adapter's training prompts
    "Plan a relaxed three-day trip to Lisbon for two friends.",
    "How do I make a good first impression at a job interview?",
    "Describe the taste of a mango to someone who has never had one.",
    "What should I think about before adopting a cat?",
    "Why do leaves change color in autumn?",
    "What makes a good team leader?",
]


def run(llm, prompts, params, lora) -> dict:
    e = llm.engine
    before = (e.num_accepted_tokens, e.num_verify_steps, e.num_generated_tokens)
    start = time.perf_counter()
    for p in prompts:   # batch 1
        llm.generate(p, params, use_tqdm=False, lora_request=lora)
    seconds = time.perf_counter() - start
    accepted, steps, tokens = (a - b for a, b in zip((e.num_accepted_tokens, e.num_verify_steps,
                                                      e.num_generated_tokens), before))
    return {"mean_accepted_length": round((accepted + steps) / max(1, steps), 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="a LoRA adapter dir (with draft_head/ for the third run)")
    ap.add_argument("--prompts", type=int, default=len(HELD_OUT))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from lanner import LLM, LoRARequest, SamplingParams
    from lanner.spec.eagle import ADAPTER_HEAD
    common.warn_if_busy()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    spec = {"method": "eagle", "num_speculative_tokens": args.k}
    runs = [("base model", None, False), ("adapter, shipped head", args.adapter, False)]
    if os.path.isdir(os.path.join(args.adapter, ADAPTER_HEAD)):
        runs.append(("adapter, its own head", args.adapter, True))
    with tempfile.TemporaryDirectory() as tmp:
        without_head = os.path.join(tmp, "adapter")   # the same adapter, its head hidden
        shutil.copytree(args.adapter, without_head, ignore=shutil.ignore_patterns(ADAPTER_HEAD))
        llm = LLM(dtype="float32", enable_lora=True, enable_prefix_caching=False, speculative=spec)
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": t}])
                   for t in HELD_OUT[:args.prompts]]
        for i, (name, adapter, own_head) in enumerate(runs):
            lora = None if adapter is None else LoRARequest(f"a{i}", i, adapter if own_head else without_head)
            record = {"bench": "eagle_adapters", "run": name, "k": args.k, "prompts": len(prompts),
                      **run(llm, prompts, params, lora), "threads": common.num_threads(), **common.machine_fields()}
            common.emit(record, args.out)


if __name__ == "__main__":
    main()
