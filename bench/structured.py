"""Structured output: what a token mask costs, and what constraining every request costs in throughput.

1. `mask`: per-token mask time on our vocabulary, llguidance (lanner's engine) vs xgrammar (when installed),
   walking each grammar along the same valid outputs (the default model's constrained greedy answers):
   mean, p50, p99, max in microseconds, and grammar compile time.
2. `throughput`: lanner generating for `--streams` concurrent requests with every request held to a JSON
   schema vs none: output tokens/s of both, their ratio, and the constrained run's p99 mask time per step
   (all constrained rows' masks of one step, computed in one call beside the forward pass).

    python bench/structured.py --out structured.jsonl
One JSON line per result, each with the CPU model and flags.
"""
import argparse
import json
import statistics
import time

from common import emit, machine_fields, model_path, warn_if_busy

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "email": {"type": "string"}}, "required": ["name", "age"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}, "required": ["sku", "qty"]}},
        "status": {"enum": ["new", "paid", "shipped"]}}, "required": ["id", "items", "status"]},
    "event": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "day": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "online": {"type": "boolean"}}, "required": ["title", "day", "online"]},
}
ASK = "<|im_start|>user\nDescribe one {} as JSON.<|im_end|>\n<|im_start|>assistant\n"


def percentiles(times_us: list[float]) -> dict:
    ordered = sorted(times_us)
    return {"mean_us": round(statistics.fmean(ordered), 1), "p50_us": round(ordered[len(ordered) // 2], 1),
            "p99_us": round(ordered[int(len(ordered) * 0.99)], 1), "max_us": round(ordered[-1], 1)}


def answers(llm, max_tokens: int) -> dict[str, list[int]]:
    from lanner import SamplingParams
    out = {}
    for name, schema in SCHEMAS.items():
        params = SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs={"json": schema})
        out[name] = llm.generate([ASK.format(name)], params, use_tqdm=False)[0].outputs[0].token_ids
    return out


def time_llguidance(llm, schema: dict, tokens: list[int]) -> dict:
    from lanner.structured import StructuredOutputs
    grammars = llm.engine.grammars
    start = time.perf_counter()
    grammars.compile_text(StructuredOutputs(json=schema).grammar_text)   # uncached, as a new schema pays
    compile_ms = (time.perf_counter() - start) * 1e3
    matcher = grammars.matcher(StructuredOutputs(json=schema))
    bits_only, with_unpack = [], []   # llguidance's bitmask alone (as xgrammar's is timed), then through lanner
    for token in tokens:
        start = time.perf_counter()
        matcher.matcher.compute_bitmask()
        bits_only.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        grammars.masks([(matcher, [])])
        with_unpack.append((time.perf_counter() - start) * 1e6)
        matcher.consume(token)
    return {"compile_ms": round(compile_ms, 2), **percentiles(bits_only),
            "lanner_masks_call_p50_us": percentiles(with_unpack)["p50_us"]}


def time_xgrammar(compiler, vocab_size: int, schema: dict, tokens: list[int]) -> dict:
    import xgrammar
    start = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=False,
                                                                       separators=(",", ":")))
    compile_ms = (time.perf_counter() - start) * 1e3
    bitmask, times = xgrammar.allocate_token_bitmask(1, vocab_size), []
    for token in tokens:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        times.append((time.perf_counter() - start) * 1e6)
        assert matcher.accept_token(token), "xgrammar refused a token llguidance allowed"
    return {"compile_ms": round(compile_ms, 2), **percentiles(times)}


def xgrammar_compiler(llm):
    try:
        import transformers
        import xgrammar
    except ImportError:
        return None
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=llm.tokenizer.tokenizer)
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=llm.engine.model_config.vocab_size,
                                                   stop_token_ids=sorted(llm.tokenizer.stop_token_ids))
    return xgrammar.GrammarCompiler(info)


def bench_masks(llm, args) -> None:
    outputs, compiler = answers(llm, args.max_tokens), xgrammar_compiler(llm)
    for name, tokens in outputs.items():
        body = tokens[:-1] if tokens and tokens[-1] in llm.tokenizer.stop_token_ids else tokens
        systems = {"llguidance": lambda: time_llguidance(llm, SCHEMAS[name], body)}
        if compiler is not None:
            systems["xgrammar"] = lambda: time_xgrammar(compiler, llm.engine.model_config.vocab_size,
                                                        SCHEMAS[name], body)
        for system, run in systems.items():
            emit({"bench": "structured_mask", "system": system, "schema": name, "tokens": len(body), **run(),
                  **machine_fields()}, args.out)


def timed_masks(grammars, stats: list[float]):
    """grammars.masks, adding each call's seconds (one call: all constrained rows of a step) to stats."""
    original = grammars.masks

    def masks(rows):
        start = time.perf_counter()
        try:
            return original(rows)
        finally:
            stats.append(time.perf_counter() - start)
    return masks


def run_streams(llm, constrained: bool, args) -> tuple[float, int]:
    from lanner import SamplingParams
    names = list(SCHEMAS)
    prompts = [ASK.format(names[i % len(names)]) for i in range(args.streams)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens, ignore_eos=False,
                             structured_outputs={"json": SCHEMAS[names[i % len(names)]]} if constrained else None)
              for i in range(args.streams)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_throughput(llm, args) -> None:
    run_streams(llm, True, args)   # warm-up: kernels built, grammars compiled and cached
    seconds, tokens = run_streams(llm, False, args)
    free_tps = tokens / seconds
    grammars, step_masks = llm.engine.grammars, []
    grammars.masks = timed_masks(grammars, step_masks)
    try:
        seconds, tokens = run_streams(llm, True, args)
    finally:
        del grammars.masks
    constrained_tps, per_step = tokens / seconds, sorted(step_masks)
    emit({"bench": "structured_throughput", "streams": args.streams, "max_tokens": args.max_tokens,
          "unconstrained_tok_s": round(free_tps, 1), "constrained_tok_s": round(constrained_tps, 1),
          "ratio": round(constrained_tps / free_tps, 3), "mask_share_of_time": round(sum(per_step) / seconds, 3),
          "mask_ms_per_step_p50": round(per_step[len(per_step) // 2] * 1e3, 2),
          "mask_ms_per_step_p99": round(per_step[int(len(per_step) * 0.99)] * 1e3, 2),
          **machine_fields()}, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parts", default="mask,throughput")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warn_if_busy()
    from lanner import LLM
    llm = LLM(model_path(args.model))
    if "mask" in args.parts:
        bench_masks(llm, args)
    if "throughput" in args.parts:
        bench_throughput(llm, args)


if __name__ == "__main__":
    main()
