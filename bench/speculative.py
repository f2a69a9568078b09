"""Speculative decoding on the default model: tokens/s with and without speculation, acceptance, greedy identity.

Two prompt sets, chat template applied: input-grounded tasks (rewrite, extract or edit a passage or code that is
in the prompt: the answer copies much of its input, n-gram lookup's best case) and open chat questions (little
to copy). For each set and batch size every method (none, ngram = ngram:4, ngram-nobackoff, draft = a truncated
draft model, eagle = the draft head shipped for the model; METHOD@N backs off above N running sequences) runs on its own LLM in one process, interleaved per
unit (a prompt at batch 1, the whole batch of B requests, the prompt set cycled, otherwise), greedy, prefix
caching off so no method inherits another's cache; each unit keeps its fastest of --repeats runs.

    python bench/speculative.py [--quick] [--batch-sizes 1,16,64] [--max-tokens 128] [--threads 1]
                                [--methods none,ngram,eagle,draft,ngram-nobackoff] [--eagle DIR] [--draft-layers 6] [--repeats 1]

One JSON line per (prompts, batch, method): tokens/s, speedup over no speculation from the same run, mean
accepted length (tokens emitted per verify step of the requests that speculated), greedy_identical.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GROUNDED = [
    "Rename the variable `x` to `total` in this Python function and show the whole function.\n\n"
    "```python\ndef sum_prices(items):\n    x = 0\n    for item in items:\n        if item.price > 0:\n"
    "            x += item.price * item.quantity\n    return x\n```",

    "Fix the spelling mistakes in this text and write out the corrected text.\n\n"
    "Yesterday we whent to the beech with our freinds. The whether was sunny and warm, so we swam in the "
    "see for hours. Later we ate sandwitches and watched the sunset before driving home.",

    "Add a docstring to this function and return the complete function.\n\n"
    "```python\ndef celsius_to_fahrenheit(celsius):\n    fahrenheit = celsius * 9 / 5 + 32\n"
    "    return round(fahrenheit, 1)\n```",

    "Change the meeting time in this note from 3 pm to 4 pm and write the whole note again.\n\n"
    "Hi everyone, the project review is moved to Thursday at 3 pm in room 204. Please bring your "
    "progress reports and a list of open questions. Coffee and snacks will be provided. See you there!",

    "Correct the grammar in this paragraph and write the corrected paragraph.\n\n"
    "My brother have two dogs and one cat. Every morning he take the dogs for a walk in the park near his "
    "house. The cat don't like the dogs, so she stay on the roof until they comes back.",

    "Here is a recipe. Write out the ingredients list only.\n\n"
    "Pancakes. Ingredients: 1 cup flour, 2 tablespoons sugar, 1 teaspoon baking powder, 1 egg, 1 cup milk, "
    "2 tablespoons melted butter. Steps: mix the dry ingredients, whisk in the egg, milk and butter, and cook "
    "on a hot pan until golden.",
]
OPEN = [
    "Tell me a short story about a dragon who is afraid of the dark.",
    "What are some good habits for learning a new language?",
    "Explain why the sky is blue in simple words.",
    "Write a short poem about the sea.",
    "Give me three ideas for a child's birthday party.",
    "What is the difference between a virus and a bacterium?",
    # fresh ones, in no training set (lanner.spec.chat_prompts is templates x topics)
    "Plan a relaxed three-day trip to Lisbon for two friends.",
    "How do I make a good first impression at a job interview?",
    "Describe the taste of a mango to someone who has never had one.",
    "What should I think about before adopting a cat?",
    "Write a limerick about a forgetful robot.",
    "Why do leaves change color in autumn?",
]
NO_BACKOFF = 10**6


def method_options(method: str, k: int, draft_path: str | None, max_batch_size: int | None,
                   eagle_path: str | None = None) -> dict | None:
    """none | ngram | ngram-nobackoff | draft | eagle, optionally @N: back off above N running sequences."""
    name, _, at = method.partition("@")
    if name == "none":
        return None
    if name == "ngram-nobackoff":
        name, at = "ngram", str(NO_BACKOFF)
    if name not in ("ngram", "draft", "eagle", "eagle+ngram"):
        raise ValueError(f"unknown method {method!r}")
    path = {"draft": draft_path, "eagle": eagle_path, "eagle+ngram": eagle_path}.get(name)
    spec = {"method": name, "num_speculative_tokens": k} | ({"model": path} if path else {})
    limit = int(at) if at else max_batch_size
    return spec | ({"max_batch_size": limit} if limit is not None else {})


def replace_draft_budget(rule: str) -> None:
    """fixed: k every step; floor1: the engine's adaptive k, but at least 1 (never past max_tokens either way)."""
    from lanner.engine.engine import LLMEngine

    def budget(self, seq, cheap=False):
        left = self.max_model_len - len(seq.token_ids) - 1
        if seq.params.max_tokens is not None:
            left = min(left, seq.params.max_tokens - seq.num_output_tokens - 1)
        k = self.spec.num_speculative_tokens if rule == "fixed" else max(1, seq.spec_k)
        return max(0, min(k, self.spec.num_speculative_tokens, left))
    LLMEngine.draft_budget = budget


def chat_prompts(tokenizer, texts: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


def count_forwards(llm) -> None:
    """llm.target_forwards / target_seconds: packed target forwards so far (every engine step that ran the model
    is one) and their time; llm.draft_seconds: time spent proposing drafts (a draft model's or head's forwards)."""
    runner, engine = llm.engine.runner, llm.engine
    llm.target_forwards, llm.target_seconds, llm.draft_seconds = 0, 0.0, 0.0
    run, propose = runner.run, engine.propose_drafts

    def counted(scheduled):
        start = time.perf_counter()
        out = run(scheduled)
        llm.target_forwards += 1
        llm.target_seconds += time.perf_counter() - start
        return out

    def timed():
        start = time.perf_counter()
        propose()
        llm.draft_seconds += time.perf_counter() - start
    runner.run, engine.propose_drafts = counted, timed


def counters(llm) -> list:
    e = llm.engine
    return [e.num_drafted_tokens, e.num_accepted_tokens, e.num_verify_steps, llm.target_forwards,
            getattr(e.proposer, "num_forwards", 0), llm.target_seconds, llm.draft_seconds]


def run_unit(llm, prompts: list[str], params):
    """(output token ids, seconds, [drafted, accepted, verify steps, target forwards, draft forwards, target
    seconds, drafting seconds] of this run)."""
    before = counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return [o.outputs[0].token_ids for o in outs], seconds, [a - b for a, b in zip(counters(llm), before)]


def bench_workload(llms: dict, name: str, prompts: list[str], batch: int, args, params) -> list[dict]:
    """Batch 1: each prompt alone is a unit; batch B: the B requests together. Every unit runs under every method
    back to back (a load spike hits them alike); each (unit, method) keeps its fastest of --repeats runs."""
    units = [[p] for p in prompts] if batch == 1 else [prompts]
    best: dict[tuple[int, str], tuple] = {}
    for _ in range(args.repeats):
        for u, unit in enumerate(units):
            for method, llm in llms.items():
                result = run_unit(llm, unit, params)
                if (u, method) not in best or result[1] < best[u, method][1]:
                    best[u, method] = result
    totals = {}
    for method in llms:
        ids = [i for u in range(len(units)) for i in best[u, method][0]]
        seconds = sum(best[u, method][1] for u in range(len(units)))
        counts = [sum(c) for c in zip(*(best[u, method][2] for u in range(len(units))))]
        totals[method] = (ids, seconds, counts)
    base_ids, base_s, _ = totals["none"]
    base_rate = sum(map(len, base_ids)) / base_s
    records = []
    for method, (ids, seconds, (drafted, accepted, steps, forwards, draft_forwards, target_s, draft_s)) in totals.items():
        spec, tokens = llms[method].engine.spec, sum(map(len, ids))
        records.append({
            "bench": "speculative", "prompts": name, "batch": batch, "method": method,
            "k": spec.num_speculative_tokens if spec else 0,
            "max_batch_size": None if spec is None else spec.max_batch_size,
            "requests": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "speedup": round(tokens / seconds / base_rate, 3),
            "mean_accepted_length": round((accepted + steps) / steps, 3) if steps else None,
            "drafted": drafted, "accepted": accepted, "verify_steps": steps, "target_forwards": forwards,
            "draft_forwards": draft_forwards, "greedy_identical": ids == base_ids,
            "ms_per_target_forward": round(1000 * target_s / max(1, forwards), 3),
            "ms_drafting_per_verify_step": round(1000 * draft_s / steps, 3) if steps else None,
            "max_tokens": args.max_tokens, "dtype": args.dtype, "draft_budget": args.draft_budget,
            "repeats": args.repeats, "threads": common.num_threads(), **common.machine_fields()})
    return records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF or HF directory (default: the default model)")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16, 3 prompts per set, 48 tokens")
    ap.add_argument("--batch-sizes", default=None, help="default 1,16,64 (quick: 1,16)")
    ap.add_argument("--methods", default="none,ngram,eagle",
                    help="none, ngram, ngram-nobackoff, draft, eagle, eagle+ngram; METHOD@N backs off above N running sequences")
    ap.add_argument("--eagle", default=None, help="EAGLE head dir (default: the head shipped for the model)")
    ap.add_argument("--prompt-sets", default="grounded,open")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=None, help="back-off threshold for 'ngram' and 'draft'")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128 (quick: 48)")
    ap.add_argument("--draft", default=None, help="draft model dir (default: the truncated default model)")
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--draft-budget", choices=["engine", "fixed", "floor1"], default="engine",
                    help="engine: LLMEngine.draft_budget as is; fixed: always k drafts; floor1: the engine's adaptive "
                         "k but never 0 (no idle steps after a rejection): to measure what the adaptive rule does")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    import torch

    from lanner import LLM, SamplingParams
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draft_budget != "engine":
        replace_draft_budget(args.draft_budget)
    common.warn_if_busy()
    args.max_tokens = args.max_tokens or (48 if args.quick else 128)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,16" if args.quick else "1,16,64")).split(",")]
    methods = ["none"] + [m for m in args.methods.split(",") if m != "none"]
    draft_path = args.draft
    if any(m.startswith("draft") for m in methods) and draft_path is None:
        from lanner.spec.make_draft import default_draft_path
        draft_path = default_draft_path(args.draft_layers)
    llms = {}
    for m in methods:
        spec = method_options(m, args.k, draft_path, args.max_batch_size, args.eagle)
        llms[m] = LLM(args.model, dtype=args.dtype, kv_cache_memory=1.0, enable_prefix_caching=False, speculative=spec)
        count_forwards(llms[m])
    tokenizer = llms["none"].tokenizer
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for llm in llms.values():   # warm-up: first-call allocations and kernel selection
        llm.generate(chat_prompts(tokenizer, OPEN[:2]), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    sets = {"grounded": GROUNDED, "open": OPEN}
    records = []
    for name in args.prompt_sets.split(","):
        texts = sets[name][:3] if args.quick else sets[name]
        prompts = chat_prompts(tokenizer, texts)
        for batch in batch_sizes:
            workload = prompts if batch == 1 else [prompts[i % len(prompts)] for i in range(batch)]
            for record in bench_workload(llms, name, workload, batch, args, params):
                common.emit(record, args.out)
                records.append(record)
    common.summary_table(records, ["prompts", "batch", "method", "tokens_per_s", "speedup", "mean_accepted_length",
                                   "target_forwards", "draft_forwards", "greedy_identical"])


if __name__ == "__main__":
    main()
