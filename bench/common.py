"""Shared helpers for the benchmarks: workloads, peers (HF transformers, llama-cpp-python), isolation, output.

Every system runs in its own spawned process (run_isolated), so peak_rss_mb is that system's own peak and
no system inherits another's warm caches, threads or allocator state.
"""
import json
import multiprocessing
import os
import random
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

VOCAB_RANGE = (100, 49000)     # random prompt ids: clear of the special tokens at the start of the 49152 vocab


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randint(*VOCAB_RANGE) for _ in range(length)]


def make_workload(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  seed: int = 0) -> list[tuple[list[int], int]]:
    """[(prompt token ids, number of output tokens)], the same for every system given the same seed."""
    rng = random.Random(seed)
    work = []
    for _ in range(num_requests):
        prompt_len, n_out = rng.randint(*prompt_range), rng.randint(*output_range)
        work.append((random_prompt(rng, prompt_len), n_out))
    return work


def model_path(model: str | None) -> str:
    if model:
        return os.path.expanduser(model)
    from lanner.model.loader import pull_default_model
    return pull_default_model()


# ---- measurement ------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def memory_fields(device: str) -> dict:
    out = {"peak_rss_mb": peak_rss_mb(), **machine_fields()}
    if device.startswith("cuda"):
        import torch
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / (1 << 20), 1)
    return out


def machine_fields() -> dict:
    """Load average (1 min), cores, CPU model and kernel ISA: a run says what it ran on in its own lines."""
    return {"load_avg_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), **cpu_fields()}


def cpu_fields() -> dict:
    from lanner import native
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    simd = sorted(f for f in native.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"cpu": model, "cpu_flags": " ".join(simd), "kernel_isa": native.isa()}


def best_time(fn, reps: int) -> float:
    """The best of reps after a warm-up call: on a shared machine the least disturbed by other load."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_bandwidth(megabytes: float = 400) -> float:
    """GB/s of a torch.sum over `megabytes` read again and again: the machine's read bandwidth for a buffer that
    size, the roof for a step streaming that many bytes of weights. Give the weights' size (capped at 400 MB, which
    reads from memory): where they fit in the last-level cache (a 480 MB L3 held the default model's 96 MB), 400 MB
    read 25 GB/s and 96 MB 53."""
    import torch
    x = torch.ones(int(min(megabytes, 400) * 1e6 / 4))
    return x.numel() * 4 / best_time(lambda: x.sum(), 5) / 1e9


def warn_if_busy() -> None:
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other work is running, timings are noisy "
              f"and slow (compare ratios from the same run only)", file=sys.stderr)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def num_threads() -> int:
    import torch
    return torch.get_num_threads()


def _call_with_stdout_on_stderr(fn, args):
    os.dup2(2, 1)            # whatever a system prints (even from C) stays out of the JSON lines on stdout
    sys.stdout = sys.stderr
    return fn(*args)


class Crashed(RuntimeError):
    """A system's process died (a crash in native code, or the OOM killer)."""


# what a llama-cpp-python that crashes should be rebuilt with
LLAMA_CPP_BUILD = "rebuild llama-cpp-python with `bash bench/llama_cpp_build.sh` (its native build crashed on CPUs with AMX)"


def run_isolated(fn, *args):
    """fn(*args) in a fresh spawned process; returns its result (fn must be a module-level function). Raises
    Crashed when that process dies, so that a peer's crash ends its own runs only."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_call_with_stdout_on_stderr, fn, args).result()
        except BrokenProcessPool as e:
            raise Crashed(f"{fn.__name__}: its process died (a crash in native code, or out of memory)") from e


# ---- peers ------------------------------------------------------------------------------------------
def load_hf(path: str, dtype: str, device: str):
    """HF transformers model on the same weights: transformers dequantizes the same GGUF file."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.to(dtype=getattr(torch, dtype), device=device).eval()


def hf_generate(model, batch: list[list[int]], n_out: int, device: str, streamer=None):
    """Greedy generate of exactly n_out tokens for every row (left-padded with id 0; eos held off)."""
    import torch
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_out, min_new_tokens=n_out,
                             do_sample=False, pad_token_id=0, streamer=streamer)
    sync(device)
    assert out.shape[1] == width + n_out, f"HF produced {out.shape[1] - width} tokens, asked {n_out}"
    return out


def have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def load_llama_cpp(path: str, n_ctx: int, device: str):
    from llama_cpp import Llama
    return Llama(model_path=path, n_threads=num_threads(), n_ctx=n_ctx, n_batch=512, verbose=False,
                 n_gpu_layers=-1 if device.startswith("cuda") else 0)


def llama_cpp_generate(llm, prompt: list[int], n_out: int) -> list[float]:
    """Greedy, exactly n_out tokens, eos ignored (Llama.generate never stops by itself). Returns the time of
    each token, from the call. reset() first: no reuse of the previous request's KV cache."""
    llm.reset()
    t0, times = time.perf_counter(), []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter() - t0)
        if len(times) == n_out:
            break
    return times


def vllm_python() -> str:
    """The python of the vLLM venv that bench/vllm_venv.sh makes (it may not exist)."""
    from lanner.cache import cache_dir
    venv = os.environ.get("LANNER_VLLM_VENV") or os.path.join(cache_dir(), "vllm-venv")
    return os.path.join(venv, "bin", "python")


def hf_dir_for(path: str) -> str:
    """A GGUF file as a dense HF directory (fp32 safetensors, config, tokenizer) for peers that cannot read GGUF
    (vLLM): lanner's own dequantized weights put into the transformers model, built once and cached beside the
    vLLM venv. The peer so runs exactly the weights lanner runs."""
    from lanner.cache import cache_dir
    base = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cache_dir(), "hf-models", f"{base}-{os.path.getsize(path)}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import shutil
    import transformers
    from lanner.model.loader import load_model_files
    config, weights, _, _ = load_model_files(path, dense=True)
    arch = config["architectures"][0]
    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
               "MistralForCausalLM": transformers.MistralConfig}[arch]
    hf_cfg = cfg_cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, arch)(hf_cfg).float().eval()
    missing, _ = model.load_state_dict(weights, strict=False)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings)
               and "rotary_emb" not in k]
    assert not missing, f"weights missing from {path}: {missing[:5]}"
    partial = out + ".part"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path)) \
        .save_pretrained(partial)
    os.replace(partial, out)      # a half-written directory is never taken for a model
    return out


# ---- output -----------------------------------------------------------------------------------------
def emit(record: dict, out_file: str | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out_file:
        with open(out_file, "a") as f:
            f.write(line + "\n")


def summary_table(records: list[dict], columns: list[str]) -> None:
    """A fixed-width table of the records on stderr (missing fields blank)."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return "" if v is None else str(v)
    rows = [[cell(r.get(c)) for c in columns] for r in records if "note" not in r]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=sys.stderr)
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=sys.stderr)
    for r in records:
        if "note" in r:
            print(f"note: {r['system']}: {r['note']}", file=sys.stderr)


def apply_threads(threads: int | None) -> None:
    """Spawned workers inherit the environment: torch and llama.cpp (via num_threads) then use this count."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def common_args(parser) -> None:
    parser.add_argument("--model", default=None, help="GGUF path (default: the default model)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--systems", default="lanner,hf,llamacpp")
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--quantization", default="auto",
                        help="an HF model's linears at load: auto|none|q8_0|q4_0|q4_1|q5_0|q5_1|bf16|nf4 (auto: the "
                             "engine's default, bf16 rows where they hold bf16 values)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="lanner's KV cache (auto: the model's dtype; float16 halves an fp32 model's KV bytes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for every system (sets OMP_NUM_THREADS for the workers)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")


def wait_for_server(proc, port: int, timeout_s: float):
    """proc once its server on port answers /health; killed, with an error, if it dies or takes too long."""
    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not come up")
        time.sleep(0.2)
