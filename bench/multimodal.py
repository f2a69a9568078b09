"""Images in: lanner vs HF transformers' batched generate on an Idefics3 model with SmolVLM-256M's shapes (a SigLIP
tower of 93M parameters at 512 px, pixel shuffle by 4: 64 image tokens per tile; SmolLM2-135M as the text model),
random weights, built once by the installed transformers and saved as an HF directory with its processor.

Workload: --num-requests requests (default 32), each a random 384x384 or 512x512 picture and a short question, 64
output tokens, greedy, eos ignored. The processor keeps one 512-px tile per image (SmolVLM's own processor scales
images up to 2048 px first: 17 tiles, too slow for either system on 2 cores; --longest-edge 2048 does that). Both
systems start from PIL images, so preprocessing is timed on both sides. HF runs at batch sizes --hf-batch-sizes and
its best is the peer. Then time to first token of a request: a new image, the same image + prompt again (encoder
and prefix cache hits), and a different image with the same text.

With --workload chat it runs multi-turn conversations instead: --num-requests conversations, each about its own
512x512 picture, --turns turns; every turn is a new request with the whole history (as an OpenAI client
sends it), the earlier answers fixed strings so both systems see the same prompts. HF re-encodes every image
and re-prefills every history; lanner's encoder cache and prefix cache keep what the last turn computed.

With --costs it measures instead what one 512x512 image costs in each connector style at a real model's
shapes (random weights; the text side on the default model, SmolLM2-135M): its image tokens, the encoder's time,
and the time to prefill those tokens.

One JSON line per result on stdout (and --out), a summary on stderr, a plot with --plot.

    python bench/multimodal.py [--num-requests 32] [--dtypes float32,bfloat16] [--systems lanner,hf] [--plot PNG]
    python bench/multimodal.py --costs [--out FILE]
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


def chat_prompts(n: int, turns: int) -> list[list[tuple]]:
    """[turn][conversation] -> (image, prompt text): the history so far, its answers fixed strings."""
    pictures = [picture(500 + c, 512) for c in range(n)]
    out, histories = [], ["<|im_start|>"] * n
    for t in range(turns):
        row = []
        for c in range(n):
            question = QUESTIONS[(c + t) % len(QUESTIONS)]
            histories[c] += f"User:{'<image>' if t == 0 else ' '}{question}<end_of_utterance>\nAssistant:"
            row.append((pictures[c], histories[c]))
            histories[c] += f" This is answer {t} to conversation {c}.<end_of_utterance>\n"
        out.append(row)
    return out


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


def run_lanner_chat(path, dtype, n, n_out, turns):
    from lanner import LLM, SamplingParams
    llm = LLM(path, dtype=dtype)
    params = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    llm.generate([{"prompt": text_for("hi"), "multi_modal_data": {"image": picture(9999, 64)}}],
                 SamplingParams(max_tokens=2), use_tqdm=False)
    t0 = time.perf_counter()
    for row in chat_prompts(n, turns):
        llm.generate([{"prompt": text, "multi_modal_data": {"image": image}} for image, text in row], params,
                     use_tqdm=False)
    seconds = time.perf_counter() - t0
    return record("lanner", dtype, f"chat, {turns} turns", n * turns, seconds, n * turns * n_out,
                  images_encoded=llm.engine.runner.vision.num_encoded - 1,
                  prefix_cache_hit_rate=round(llm.engine.blocks.hit_rate(), 3), threads=common.num_threads(),
                  **common.memory_fields("cpu"))


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


def run_hf(path, dtype, n, n_out, batch_size, turns=0):
    """HF generate over padded batches; turns > 0: the chat workload, each turn's batch in order."""
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoProcessor
    model = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    work = [(image, text_for(q)) for image, q in workload(n)]

    def generate(batch, max_new):
        inputs = processor(text=[text for _, text in batch], images=[[im] for im, _ in batch],
                           return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, dtype))
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=0)
        assert out.shape[1] == inputs["input_ids"].shape[1] + max_new

    generate(work[:1], 2)   # warm-up
    t0 = time.perf_counter()
    if turns:
        for row in chat_prompts(n, turns):
            for i in range(0, n, batch_size):
                generate(row[i:i + batch_size], n_out)
        n *= turns
    else:
        for i in range(0, n, batch_size):
            generate(work[i:i + batch_size], n_out)
    seconds = time.perf_counter() - t0
    config = f"chat, {turns} turns, batch {batch_size}" if turns else f"generate, batch {batch_size}"
    return record("hf", dtype, config, n, seconds, n * n_out, threads=common.num_threads(),
                  **common.memory_fields("cpu"))


# Real models' vision shapes (config.json and the image processor's config), for --costs.
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
SIGLIP_SO400M = dict(model_type="idefics2_vision", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                     num_attention_heads=16, image_size=980, patch_size=14)
STYLES = {
    "LLaVA-1.5 (MLP projector)": (
        dict(architectures=["LlavaForConditionalGeneration"], vision_config=CLIP_L_336, vision_feature_layer=-2,
             vision_feature_select_strategy="default", text_config=dict(model_type="llama", hidden_size=4096)),
        dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 336},
             crop_size={"height": 336, "width": 336}), dict(patch_size=14)),
    "SmolVLM-256M (pixel shuffle), one 512 tile": (
        dict(architectures=["Idefics3ForConditionalGeneration"], vision_config=dict(SMOLVLM_VISION), scale_factor=4,
             text_config=dict(SMOLLM2_TEXT)),
        dict(image_processor_type="Idefics3ImageProcessor", size={"longest_edge": 512},
             max_image_size={"longest_edge": 512}), dict(image_seq_len=64)),
    "SmolVLM-256M (pixel shuffle), its 2048 px split": (
        dict(architectures=["Idefics3ForConditionalGeneration"], vision_config=dict(SMOLVLM_VISION), scale_factor=4,
             text_config=dict(SMOLLM2_TEXT)),
        dict(image_processor_type="Idefics3ImageProcessor", size={"longest_edge": 2048},
             max_image_size={"longest_edge": 512}), dict(image_seq_len=64)),
    "Idefics2-8B (perceiver resampler)": (
        dict(architectures=["Idefics2ForConditionalGeneration"], vision_config=SIGLIP_SO400M,
             perceiver_config=dict(hidden_size=4096, resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                                   resampler_head_dim=96, num_key_value_heads=4),
             text_config=dict(model_type="mistral", hidden_size=4096)),
        dict(image_processor_type="Idefics2ImageProcessor", size={"shortest_edge": 378, "longest_edge": 980}),
        dict(image_seq_len=64)),
}


def run_costs(dtype: str) -> list[dict]:
    """Per connector style: image tokens of a 512x512 picture, encoder seconds, prefill seconds of those tokens."""
    import torch

    from lanner import LLM, SamplingParams
    from lanner.vision.encoder import ENCODERS
    from lanner.vision.processors import _family
    llm = LLM(dtype=dtype)
    image, records = picture(7, 512), []
    for style, (config, image_config, processor_config) in STYLES.items():
        processor = _family(image_config, config)(image_config, processor_config, config)
        processed = processor(image)
        with torch.device("meta"):
            encoder = ENCODERS[config["architectures"][0]](config)
        encoder = encoder.to_empty(device="cpu").to(getattr(torch, dtype)).eval()
        for p in encoder.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        params = sum(p.numel() for p in encoder.parameters())
        encode = lambda: encoder.encode(processed.pixel_values.to(getattr(torch, dtype)), processed.pixel_attention_mask)
        encode()   # warm-up
        t0 = time.perf_counter()
        rows = encode()
        encoder_s = time.perf_counter() - t0
        prompt = [100 + i % 1000 for i in range(processed.num_tokens + 16)]
        llm.generate([prompt[::-1]], SamplingParams(max_tokens=1), use_tqdm=False)   # warm-up, no cache hit
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill_s = time.perf_counter() - t0
        records.append({"system": "lanner", "dtype": dtype, "config": style, "image": "512x512",
                        "tiles": int(processed.pixel_values.shape[0]), "image_tokens": processed.num_tokens,
                        "encoder_params_m": round(params / 1e6, 1), "encoder_s": round(encoder_s, 3),
                        "encoder_rows": int(rows.shape[0]), "prefill_s_smollm2": round(prefill_s, 3),
                        **common.machine_fields()})
        del encoder
    return records


def plot(records: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in records if "output_tok_per_s" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['system']}\n{r['dtype']}\n{r['config'].replace('generate, ', '').replace(' batching', '')}"
              for r in runs]
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


def plot_costs(records: list[dict], path: str) -> None:
    """Per connector style: image tokens (left) and seconds for the encoder and for prefilling its tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [r for r in records if r["dtype"] == records[0]["dtype"]]
    names = [r["config"].replace(" (", "\n(").replace("), ", ")\n") for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    left.barh(names, [r["image_tokens"] for r in records], color="tab:purple")
    left.set_xlabel("image tokens in the prompt (one 512x512 image)")
    left.invert_yaxis()
    enc, pre = [r["encoder_s"] for r in records], [r["prefill_s_smollm2"] for r in records]
    right.barh(names, enc, color="tab:orange", label="vision encoder + connector")
    right.barh(names, pre, left=enc, color="tab:blue", label="prefill of its tokens (SmolLM2-135M)")
    right.set_xlabel(f"seconds ({records[0]['dtype']}, {records[0]['cpu_count']} cores)")
    right.set_yticks([])
    right.invert_yaxis()
    right.legend(fontsize=8)
    fig.suptitle(f"What an image costs, by connector style (random weights at real shapes) on {records[0]['cpu']}",
                 fontsize=9)
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
    ap.add_argument("--costs", action="store_true", help="what one image costs in each connector style")
    ap.add_argument("--workload", default="images", choices=["images", "chat"])
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation (--workload chat)")
    args = ap.parse_args()
    common.apply_threads(args.threads)
    common.warn_if_busy()
    if args.costs:
        records = []
        for dtype in args.dtypes.split(","):
            records += common.run_isolated(run_costs, dtype)
        for rec in records:
            common.emit(rec, args.out)
        common.summary_table(records, ["config", "dtype", "tiles", "image_tokens", "encoder_params_m", "encoder_s",
                                       "prefill_s_smollm2"])
        if args.plot:
            plot_costs(records, args.plot)
        return
    path = smolvlm_like_dir(args.longest_edge)
    n, n_out, systems = args.num_requests, args.output_tokens, args.systems.split(",")
    turns = args.turns if args.workload == "chat" else 0
    records = []
    for dtype in args.dtypes.split(","):
        hf = []
        if "hf" in systems:
            for bs in map(int, args.hf_batch_sizes.split(",")):
                rec = common.run_isolated(run_hf, path, dtype, n, n_out, min(bs, n), turns)
                hf.append(rec["output_tok_per_s"])
                records.append(rec)
                common.emit(rec, args.out)
        if "lanner" in systems and turns:
            rec = common.run_isolated(run_lanner_chat, path, dtype, n, n_out, turns)
        elif "lanner" in systems:
            rec, ttfts = common.run_isolated(run_lanner, path, dtype, n, n_out)
            rec.update(ttfts)
        if "lanner" in systems:
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
