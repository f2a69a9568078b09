"""The seed's question measured: a transformer's decode step grows with the context, a state-space model's does not.

Three random-weight models of about the same size, saved once as HF directories by the installed transformers:
a Llama with SmolLM2-135M's shapes, a Mamba with mamba-130m's (hidden 768, 24 layers, state 16), and a Bamba
hybrid (Mamba-2 layers, attention in 3 of 24 as Bamba-9B has it in 3 of 32). For each context length lanner
prefills a random-token prompt (prefill = time to first token, cold) and decodes --decode-tokens tokens; then
--rounds more times the same prompts in turn, each resuming from the prefix cache (KV blocks, state checkpoints)
and decoding again, so that a noisy moment of a shared machine hits one round of one context, not a whole
context: decode ms/token = median over the rounds of decode time / (tokens - 1). Last, each model's time to
first token for a repeated 1,000-token prompt (the second resumes from the cache).

One JSON line per result on stdout (and --out), a plot with --plot.

    python bench/ssm.py [--contexts 128,1024,4096,16384] [--dtype float32] [--plot docs/img/ssm_vs_transformer.png]
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODELS = {
    "transformer (Llama, SmolLM2-135M shapes)": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=32768, rope_theta=100000.0, tie_word_embeddings=True)),
    "Mamba (mamba-130m shapes)": ("MambaForCausalLM", "MambaConfig", dict(
        hidden_size=768, num_hidden_layers=24, state_size=16, conv_kernel=4, expand=2, vocab_size=50280,
        tie_word_embeddings=True)),
    "hybrid (Bamba: Mamba-2 + 3 attention layers)": ("BambaForCausalLM", "BambaConfig", dict(
        hidden_size=768, intermediate_size=1536, num_hidden_layers=24, attn_layer_indices=[7, 15, 23],
        num_attention_heads=12, num_key_value_heads=4, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1,
        mamba_d_state=64, mamba_expand=2, vocab_size=50280, max_position_embeddings=32768, tie_word_embeddings=True)),
}


def model_dir(name: str) -> str:
    import torch
    import transformers
    arch, config_class, shape = MODELS[name]
    path = os.path.expanduser(f"~/.cache/lanner/bench/{arch}-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        config = getattr(transformers, config_class)(**shape)
        config.architectures = [arch]
        torch.manual_seed(0)
        getattr(transformers, arch)(config).save_pretrained(path)
        from transformers import AutoTokenizer
        gguf = common.model_path(None)   # any byte-level tokenizer will do for random token ids
        AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(path)
    return path


def run(name, dtype, contexts, n_decode, repeat_len, rounds):
    from lanner import LLM, SamplingParams
    path = model_dir(name)
    llm = LLM(path, dtype=dtype, max_model_len=max(contexts) + n_decode + 8, max_num_batched_tokens=2048,
              kv_cache_memory=3.0)
    params = SamplingParams(temperature=0, max_tokens=n_decode, ignore_eos=True)
    rng = random.Random(0)
    llm.generate([[rng.randint(100, 40000) for _ in range(64)]], params, use_tqdm=False)   # warm-up
    prompts = {n: [rng.randint(100, 40000) for _ in range(n)] for n in contexts}
    prefill, decode = {}, {n: [] for n in contexts}
    for r in range(1 + rounds):
        for n in contexts:
            m = llm.generate([prompts[n]], params, use_tqdm=False)[0].metrics
            prefill.setdefault(n, m.ttft)
            if r or not rounds:
                decode[n].append(1000 * m.decode_time / (n_decode - 1))
    records = [{"model": name, "dtype": dtype, "context": n, "prefill_s": round(prefill[n], 3),
                "decode_ms_per_token": round(statistics.median(decode[n]), 2),
                "decode_ms_per_round": [round(t, 2) for t in decode[n]], **common.machine_fields()} for n in contexts]
    prompt = [rng.randint(100, 40000) for _ in range(repeat_len)]
    first = SamplingParams(temperature=0, max_tokens=1)
    ttfts = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = llm.generate([prompt], first, use_tqdm=False)[0]
        ttfts.append(time.perf_counter() - t0)
    records.append({"model": name, "dtype": dtype, "repeated_prompt": repeat_len, "ttft_first_s": round(ttfts[0], 4),
                    "ttft_repeat_s": round(ttfts[1], 4), "repeat_speedup": round(ttfts[0] / ttfts[1], 1),
                    "repeat_cached_tokens": out.metrics.num_cached_tokens})
    return records


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in MODELS:
        rows = [r for r in records if r["model"] == name and "context" in r]
        left.plot([r["context"] for r in rows], [r["decode_ms_per_token"] for r in rows], "o-", label=name)
        right.plot([r["context"] for r in rows], [r["prefill_s"] for r in rows], "o-", label=name)
    for ax, label in ((left, "decode step (ms / token)"), (right, "prefill of the context (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_ylim(bottom=0)
    fig.suptitle(f"Decode cost vs context: attention reads all of it, an SSM a fixed state ({common.cpu_fields()['cpu']}, "
                 f"{records[0]['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="128,1024,4096,16384")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds per context after the cold one")
    ap.add_argument("--repeat-len", type=int, default=1000)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, metavar="PNG")
    args = ap.parse_args()
    common.apply_threads(args.threads)
    common.warn_if_busy()
    contexts = [int(c) for c in args.contexts.split(",")]
    records = []
    for name in MODELS:
        records += common.run_isolated(run, name, args.dtype, contexts, args.decode_tokens, args.repeat_len,
                                       args.rounds)
    for rec in records:
        common.emit(rec, args.out)
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
