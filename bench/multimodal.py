"""Images in: lanner vs HF transformers' batched generate on an Idefics3 model with SmolVLM-256M's shapes (a SigLIP
tower of 93M parameters at 512 px, pixel shuffle by 4: 64 image tokens per tile; SmolLM2-135M as the text model),
random weights, built once by the installed transformers and saved as an HF directory with its processor.

Workload: --num-requests requests (default 32), each a random 384x384 or 512x512 picture and a short question, 64
output tokens, greedy, eos ignored. The processor keeps one 512-px tile per image (SmolVLM's own processor scales
images up to 2048 px first: 17 tiles, too slow for either system on 2 cores; --longest-edge 2048 does that). Both
systems start from PIL images, so preprocessing is timed on both sides. HF runs at batch sizes --hf-batch-sizes and
its best is the peer. Then time to first token of a request: a new image, the same image + prompt again (encoder
and prefix cache hits), and a different image with the same text.

One JSON line per result on stdout (and --out), a summary on stderr, a plot with --plot.

    python bench/multimodal.py [--num-requests 32] [--dtypes float32,bfloat16] [--systems lanner,hf] [--plot PNG]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

QUESTIONS = ["What is in this image?", "Describe the picture in one sentence.", "Which colors do you see?",
             "Is there a person in the photo?", "What is the main object?", "Where was this taken?",
             "Count the shapes in the image.", "What mood does this image have?"]
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SMOLVLM_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=512, patch_size=16)
SMOLLM2_TEXT = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)


def smolvlm_like_dir(longest_edge: int) -> str:
    """The random SmolVLM-shaped Idefics3 directory (built on first use, then reused)."""
    import torch
    import transformers
    from transformers import AutoTokenizer
    path = os.path.expanduser(f"~/.cache/lanner/bench/smolvlm-shaped-{longest_edge}")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    gguf = common.model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    config = transformers.Idefics3Config(vision_config=SMOLVLM_VISION, scale_factor=4, tie_word_embeddings=True,
                                         text_config=dict(SMOLLM2_TEXT, vocab_size=len(tokenizer)),
                                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                         architectures=["Idefics3ForConditionalGeneration"])
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    image_processor = transformers.Idefics3ImageProcessorPil(size={"longest_edge": longest_edge},
                                                             max_image_size={"longest_edge": 512})
    processor = transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=64)
    for part in (model, processor, tokenizer):
        part.save_pretrained(path)
    return path


def picture(seed: int, side: int):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([np.sin(7 * x + seed), np.cos(5 * y - seed), np.sin(9 * x * y + seed)], -1)
    return Image.fromarray(np.clip(127 + 100 * base + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8))


def workload(n: int) -> list[tuple]:
    """[(image, question)]: alternating 384 and 512 px sides."""
    return [(picture(i, 384 if i % 2 else 512), QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]


def text_for(question: str) -> str:
    return f"<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"


def record(system, dtype, config, n, seconds, n_out, **extra):
    return {"system": system, "dtype": dtype, "config": config, "num_requests": n, "output_tokens": n_out,
            "seconds": round(seconds, 2), "output_tok_per_s": round(n_out / seconds, 2),
            "requests_per_s": round(n / seconds, 3), **extra}


def run_lanner(path, dtype, n, n_out):
    from lanner import LLM, SamplingParams
    llm = LLM(path, dtype=dtype)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    prompts = [{"prompt": text_for(q), "multi_modal_data": {"image": image}} for image, q in workload(n)]
    llm.generate([{"prompt": text_for("hi"), "multi_modal_data": {"image": picture(9999, 64)}}],
                 SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up: first GEMMs, kernels built
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == n_out for o in outs)
    image_tokens = outs[0].prompt_token_ids.count(llm.engine.runner.vision.image_token_id)
    rec = record("lanner", dtype, "continuous batching", n, seconds, n * n_out, image_tokens_per_image=image_tokens,
                 prompt_tokens=sum(len(o.prompt_token_ids) for o in outs), threads=common.num_threads(),
                 **common.memory_fields("cpu"))
    return rec, ttft(llm, params)


def ttft(llm, params) -> dict:
    """Seconds to the first token: a new image, the same image + text again, another image with the same text."""
    from lanner import SamplingParams
    first = SamplingParams(temperature=0, max_tokens=1)
    image, other = picture(1000, 512), picture(1001, 512)
    question = "Tell me what you see in this picture, in detail."

    def once(img):
        t0 = time.perf_counter()
        out = llm.generate({"prompt": text_for(question), "multi_modal_data": {"image": img}}, first, use_tqdm=False)
        return time.perf_counter() - t0, out[0].metrics.num_cached_tokens

    (new, _), (repeat, cached), (different, cached_other) = once(image), once(image), once(other)
    return {"ttft_new_image_s": round(new, 4), "ttft_repeat_s": round(repeat, 4),
            "ttft_different_image_s": round(different, 4), "repeat_speedup": round(new / repeat, 1),
            "repeat_cached_tokens": cached, "different_image_cached_tokens": cached_other}


def run_hf(path, dtype, n, n_out, batch_size):
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoProcessor
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    work = workload(n)

    def generate(batch, max_new):
        inputs = processor(text=[text_for(q) for _, q in batch], images=[[im] for im, _ in batch],
                           return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == inputs["input_ids"].shape[1] + max_new

    generate(work[:1], 2)   # warm-up
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        generate(work[i:i + batch_size], n_out)
    seconds = time.perf_counter() - t0
    return record("hf", dtype, f"generate, batch {batch_size}", n, seconds, n * n_out,
                  threads=common.num_threads(), **common.memory_fields("cpu"))


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in records if "output_tok_per_s" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['system']}\n{r['dtype']}\n{r['config']}" for r in runs]
    left.bar(range(len(runs)), [r["output_tok_per_s"] for r in runs],
             color=["tab:blue" if r["system"] == "lanner" else "tab:gray" for r in runs])
    left.set_xticks(range(len(runs)), labels, fontsize=7)
    left.set_ylabel("output tokens / s")
    left.set_title(f"{runs[0]['num_requests']} image requests, {runs[0]['output_tokens'] // runs[0]['num_requests']}"
                   " tokens out")
    ttfts = [r for r in runs if "ttft_new_image_s" in r]
    if ttfts:
        t = ttfts[0]
        keys = ["ttft_new_image_s", "ttft_repeat_s", "ttft_different_image_s"]
        right.bar(range(3), [t[k] * 1000 for k in keys], color=["tab:blue", "tab:green", "tab:orange"])
        right.set_xticks(range(3), ["new image", "same image + text\n(cache hits)", "other image,\nsame text"])
        right.set_ylabel("time to first token (ms)")
        right.set_title(f"lanner {t['dtype']}: repeat {t['repeat_speedup']}x faster")
    fig.suptitle(f"SmolVLM-shaped Idefics3 (random weights) on {common.cpu_fields()['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--systems", default="lanner,hf")
    ap.add_argument("--hf-batch-sizes", default="8,32")
    ap.add_argument("--longest-edge", type=int, default=512, help="the processor's size: 2048 is SmolVLM's own")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, metavar="PNG")
    args = ap.parse_args()
    common.apply_threads(args.threads)
    common.warn_if_busy()
    path = smolvlm_like_dir(args.longest_edge)
    n, n_out, systems = args.num_requests, args.output_tokens, args.systems.split(",")
    records = []
    for dtype in args.dtypes.split(","):
        hf = []
        if "hf" in systems:
            for bs in map(int, args.hf_batch_sizes.split(",")):
                rec = common.run_isolated(run_hf, path, dtype, n, n_out, min(bs, n))
                hf.append(rec["output_tok_per_s"])
                records.append(rec)
                common.emit(rec, args.out)
        if "lanner" in systems:
            rec, ttfts = common.run_isolated(run_lanner, path, dtype, n, n_out)
            rec.update(ttfts)
            if hf:
                rec["speedup_vs_best_hf"] = round(rec["output_tok_per_s"] / max(hf), 2)
            records.append(rec)
            common.emit(rec, args.out)
    common.summary_table(records, ["system", "dtype", "config", "num_requests", "seconds", "output_tok_per_s",
                                   "speedup_vs_best_hf", "ttft_new_image_s", "ttft_repeat_s", "repeat_speedup",
                                   "peak_rss_mb"])
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
