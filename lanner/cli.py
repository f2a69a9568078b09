"""`lanner generate | chat | pull | resize | ...`: the command line."""
import argparse
import atexit
import os
import sys
import threading

from lanner.config import QUANTIZATION_ALIASES, QUANTIZATIONS, EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--model", default=None, help="GGUF file, HF model directory or hub id (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 where the CPU has native bf16 matmul (AVX512-BF16/AMX), else float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--kv-cache-memory", type=float, default=d.kv_cache_memory, help="GiB for the paged KV cache (and SSM state slots: all of it in a Mamba, half in a hybrid)")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--prefault-kv-cache", action="store_true",
                   help="fault the KV pool's pages in at start-up, as vLLM's zeroed pool is, not in the steps that "
                        "first write them: a slower start (0.7-1.4 s a GiB on a VM), no page faults in the steps")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype K and V are stored in (auto: the model's); bfloat16 halves an fp32 model's KV bytes")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--num-scheduler-steps", type=int, default=d.num_scheduler_steps,
                   help="greedy decode steps a batch may run in one call, its tokens then streamed together (1: one "
                        "step per call)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--attention-backend", default=d.attention_backend, choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="serve a PEFT LoRA adapter under NAME (repeatable); enables LoRA")
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="distinct adapters in one batch")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank)
    p.add_argument("--dense-gemm-weights", action=argparse.BooleanOptionalAction, default=d.dense_gemm_weights,
                   help="also hold a GGUF model's weights as a dense oneDNN copy for prefill and big batches (by "
                        "default only those the int8 GEMM does not take, and a bf16 model's where oneDNN runs bf16 on AMX); "
                        "--no-dense-gemm-weights: blocks only, "
                        "dequantized per step where the int8 GEMM does not run (less memory, slower)")
    p.add_argument("--quantization", default=d.quantization, choices=list(QUANTIZATIONS) + list(QUANTIZATION_ALIASES),
                   help="an HF model's linears quantized at load into a GGML block format (int8 = q8_0, "
                        "int4 = q4_1) or nf4 as in QLoRA; auto: bf16 rows where they hold bf16 values (a bf16 "
                        "checkpoint), else as loaded; a GGUF model keeps its file's formats")
    p.add_argument("--limit-images-per-prompt", type=int, default=4,
                   help="images one prompt may carry (vision-language models)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="let file:// image URLs read images from inside DIR (refused otherwise)")
    p.add_argument("--speculative", default=None, metavar="SPEC",
                   help="speculative decoding: ngram:K (prompt lookup), draft:PATH:K (a draft model) or "
                        "eagle[:PATH]:K (a trained draft head; default: the one shipped for the model)")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size, metavar="N",
                   help="split every layer over N processes (Megatron-style; torch.distributed, gloo on CPU)")


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
                kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
                kv_cache_dtype=args.kv_cache_dtype, prefault_kv_cache=args.prefault_kv_cache,
                max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                num_scheduler_steps=args.num_scheduler_steps, enable_prefix_caching=not args.no_prefix_caching,
                attention_backend=args.attention_backend,
                device=args.device, speculative=args.speculative,
                quantization=args.quantization, dense_gemm_weights=args.dense_gemm_weights, enable_lora=bool(args.lora), max_loras=args.max_loras,
                max_lora_rank=args.max_lora_rank, limit_mm_per_prompt={"image": args.limit_images_per_prompt},
                allowed_local_media_path=args.allowed_local_media_path,
                tensor_parallel_size=args.tensor_parallel_size)


def lora_requests(specs: list[str]) -> dict:
    """{name: LoRARequest} from repeated --lora NAME=PATH, ids 1, 2, ... in order."""
    from lanner.lora.adapter import LoRARequest
    requests = {}
    for i, spec in enumerate(specs, start=1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {spec!r}")
        requests[name] = LoRARequest(name, i, path)
    return requests


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--adapter", default=None, help="name of a --lora adapter to answer with")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None)
    held = p.add_mutually_exclusive_group()   # structured output, as llama.cpp's --json-schema / --grammar
    held.add_argument("--json-schema", default=None, metavar="SCHEMA", help="JSON schema (text or @file) the output follows")
    held.add_argument("--json", action="store_true", help="the output is a JSON object")
    held.add_argument("--regex", default=None, help="regex the output matches")
    held.add_argument("--choice", action="append", default=None, help="one of these strings (repeat the flag)")
    held.add_argument("--grammar", default=None, metavar="GRAMMAR", help="Lark or GBNF grammar (text or @file)")


def sampling_params(args):
    from lanner import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop, structured_outputs=structured_outputs(args))


def structured_outputs(args) -> dict | None:
    """--json-schema / --json / --regex / --choice / --grammar as SamplingParams.structured_outputs."""
    given = {"json": text_or_file(args.json_schema), "json_object": args.json or None, "regex": args.regex,
             "choice": args.choice, "grammar": text_or_file(args.grammar)}
    return {k: v for k, v in given.items() if v is not None} or None


def text_or_file(value: str | None) -> str | None:
    """The argument's text, or the contents of the file it names as @path."""
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:]) as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {value[1:]}: {e.strerror}") from None


def make_llm(args):
    from lanner import LLM
    llm = LLM(args.model, **engine_kwargs(args))
    print(f"lanner: {llm.engine.model_path} ({llm.engine.model_config.architecture}, "
          f"{llm.engine.runner.dtype}, attention={llm.engine.runner.backend.__name__.rsplit('.', 1)[-1]})",
          file=sys.stderr)
    return llm


def chosen_adapter(args):
    loras = lora_requests(args.lora)
    if args.adapter is not None and args.adapter not in loras:
        raise ValueError(f"unknown adapter {args.adapter!r}; loaded: {sorted(loras)}")
    return loras.get(args.adapter)


def image_file(path: str) -> bytes:
    """An image file the user named on the command line (trusted, unlike a server request's file:// URL)."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read image file {path}: {e.strerror}") from None


def cmd_generate(args) -> int:
    llm, adapter = make_llm(args), chosen_adapter(args)
    images = [{"type": "image", "image": image_file(path)} for path in args.image]
    if args.raw:
        prompt = ({"prompt": args.prompt, "multi_modal_data": {"image": [i["image"] for i in images]}} if images
                  else args.prompt)
    else:
        prompt = llm.chat_prompt([{"role": "user", "content": [*images, {"type": "text", "text": args.prompt}]}])
    for text in llm.stream(prompt, sampling_params(args), lora_request=adapter):
        print(text, end="", flush=True)
    print()
    return 0


def cmd_chat(args) -> int:
    llm, adapter = make_llm(args), chosen_adapter(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("lanner chat: type a message; /image PATH attaches an image to the next one; /reset clears the history, "
          "/exit or Ctrl-D quits.", file=sys.stderr)
    images = []
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            messages, images = (messages[:1] if args.system else []), []
            continue
        if user.startswith("/image "):
            try:
                images.append({"type": "image", "image": image_file(user[len("/image "):].strip())})
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": [*images, {"type": "text", "text": user}] if images else user})
        images, reply = [], ""
        try:
            stream = llm.stream(llm.chat_prompt(messages), sampling_params(args), adapter)
            for text in stream:
                reply += text
                print(text, end="", flush=True)
        except ValueError as e:   # a bad image or a prompt too long: say so, forget the message, keep chatting
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_pull(args) -> int:
    from lanner.model.loader import pull_default_model
    print(pull_default_model())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lanner", description="A fast, readable LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply to one prompt, streamed")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image for a vision-language model (repeat for more; with --raw, the prompt places "
                          "each with the model's image placeholder)")
    chat = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    chat.add_argument("--system", default=None, help="system prompt")
    for p in (gen, chat):
        add_engine_args(p)
        add_sampling_args(p)
    gen.set_defaults(func=cmd_generate)
    chat.set_defaults(func=cmd_chat)
    sub.add_parser("pull", help="fetch the default model into the cache").set_defaults(func=cmd_pull)
    try:
        from lanner.vision import cli as vision_cli
        vision_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from lanner.profiling import cli as profiling_cli
        profiling_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from lanner.server import cli as server_cli
        server_cli.add_parser(sub)
    except ImportError:
        pass
    try:
        from lanner.lora import cli as lora_cli
        lora_cli.add_parser(sub)
    except ImportError:
        pass
    from lanner.spec import cli as spec_cli
    spec_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:
        print(f"lanner: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The `lanner` command: main(), then the exit handlers (logs flushed, temporary files removed), then the
    process ends without Python tearing down torch's modules and tensors one by one, which took 0.3-0.5 s of
    every `lanner generate` (the OS frees the memory at once). Normally where other threads are still running."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
