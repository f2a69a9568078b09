"""Attention backends over the paged KV cache: time per (batch, context, q_len), one JSON line per result.

    python bench/attention.py                  # CPU: reference vs cpu fast path, fp32 and bf16 caches
    python bench/attention.py --device cuda    # GPU: triton kernels vs torch SDPA (flash), flash-attn, FlashInfer

Also measures memory copy bandwidth (a big tensor copy) and reports each decode step against the time
to read its KV once at that bandwidth. Bandwidth is counted STREAM-style, bytes read + bytes written
per second; `copy_gbps` in the bandwidth line is the same copy counted one way.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lanner.attention import get_backend  # noqa: E402
from lanner.attention.metadata import AttentionMetadata  # noqa: E402
from lanner.engine.memory import zeroed_kv_memory  # noqa: E402

MODEL_SHAPE = (9, 3, 64)  # SmolLM2-135M: query heads, kv heads, head dim (one layer)
CPU_CASES = [(1, 2048, 1), (8, 2048, 1), (32, 2048, 1), (32, 512, 1), (4, 16384, 1), (32, 2048, 5),
             (1, 512, 512), (4, 1024, 128)]
GPU_CASES = [(1, 4096, 1), (64, 4096, 1), (256, 1024, 1), (8, 32768, 1), (64, 4096, 5),
             (1, 4096, 4096), (8, 2048, 2048), (16, 4096, 512)]
GPU_SHAPES = [MODEL_SHAPE, (32, 8, 128)]  # and a Llama-3-8B layer


def emit(**fields):
    print(json.dumps(fields), flush=True)


def timed(fn, device, reps: int) -> float:
    """Seconds per call with cold caches: the minimum over reps on CPU (other processes only add time),
    the median on GPU. Touching a buffer bigger than the last-level cache before each call evicts the KV
    (on CPU by reading it, so no dirty lines are written back inside the timed call); on the GPU it
    also gives the host time to queue the launch, so launch overhead is not timed."""
    flush = torch.ones((256 if device == "cuda" else 64) << 18, device=device)
    fn()
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return sorted(start.elapsed_time(end) for start, end in events)[reps // 2] / 1e3
    times = []
    for _ in range(reps):
        flush.sum()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def copy_bandwidth(device) -> float:
    """Read + write bytes per second of a big tensor copy."""
    n = (1 << 30 if device == "cuda" else 256 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, 20 if device == "cuda" else 10)
    emit(bench="copy_bandwidth", device=device, bytes=4 * n, ms=t * 1e3, read_write_gbps=8 * n / t / 1e9,
         copy_gbps=4 * n / t / 1e9)
    return 8 * n / t


def make_case(batch, context, q_len, shape, dtype, device, block_size=16):
    """A decode/verify/prefill step: every sequence has `context` tokens of which the last q_len are new."""
    num_heads, num_kv_heads, head_dim = shape
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    caches = zeroed_kv_memory(shape, dtype) if device == "cpu" else torch.empty(shape, dtype=dtype, device=device)
    k_cache, v_cache = caches.normal_()   # on CPU the engine's KV memory
    tables = torch.randperm(num_blocks).view(batch, blocks_per_seq)  # scattered, as after churn
    meta = AttentionMetadata.build([q_len] * batch, [context] * batch, tables.tolist(), [-1] * (batch * q_len))
    q = torch.randn(batch * q_len, num_heads, head_dim, dtype=dtype, device=device)
    return q, k_cache, v_cache, meta.to(device)


def work(batch, context, q_len, shape, dtype):
    """(bytes of KV read once, attention FLOPs with the causal half of the new block skipped)."""
    num_heads, num_kv_heads, head_dim = shape
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
    keys_seen = q_len * (context - q_len) + q_len * (q_len + 1) // 2
    return kv_bytes, 4 * batch * keys_seen * num_heads * head_dim


def run_backend(name, case, device):
    q, k_cache, v_cache, meta = case
    if name in ("reference", "cpu", "triton"):
        backend = get_backend(name, device)
        return lambda: backend.attention(q, k_cache, v_cache, meta)
    return dense_baseline(name, case)


def dense_baseline(name, case):
    """Same shapes on a contiguous (non-paged) cache through torch SDPA (flash) or flash-attn."""
    q, k_cache, v_cache, meta = case
    batch, context = meta.num_seqs, meta.max_seqlen_k
    q_len = q.shape[0] // batch
    k = k_cache[meta.block_tables.long()].flatten(1, 2)[:, :context]  # [B, n, Hkv, D]
    v = v_cache[meta.block_tables.long()].flatten(1, 2)[:, :context]
    qb = q.view(batch, q_len, *q.shape[1:])
    if name == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        qt, kt, vt = (x.transpose(1, 2) for x in (qb, k, v))
        causal = q_len == context  # SDPA's causal mask is top-left aligned; only right for whole prompts

        def sdpa(kt=kt, vt=vt, gqa=True):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        try:
            sdpa()
            return sdpa
        except RuntimeError:  # flash without native GQA: give it the expanded heads, as users do
            group = qt.shape[1] // kt.shape[1]
            kt, vt = kt.repeat_interleave(group, 1), vt.repeat_interleave(group, 1)
            return lambda: sdpa(kt, vt, False)
    if name == "flash-attn":
        from flash_attn import flash_attn_func
        return lambda: flash_attn_func(qb, k, v, causal=True)
    raise ValueError(name)


def flashinfer_decode(case):
    """FlashInfer's paged decode on the same block tables (decode only)."""
    import flashinfer
    q, k_cache, v_cache, meta = case
    batch, block_size = meta.num_seqs, k_cache.shape[1]
    pages = -(-meta.seq_lens.long() // block_size)
    indptr = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = pages.cumsum(0)
    indices = torch.cat([meta.block_tables[i, :int(pages[i])] for i in range(batch)]).int()
    last = (meta.seq_lens - 1) % block_size + 1
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=q.device), "NHD")
    wrapper.plan(indptr, indices, last.int(), q.shape[1], k_cache.shape[2], q.shape[2], block_size,
                 q_data_type=q.dtype, kv_data_type=k_cache.dtype)
    return lambda: wrapper.run(q, (k_cache, v_cache))


def baselines(device, q_len):
    if device != "cuda":
        return []
    names = ["sdpa"]
    for module, name in (("flash_attn", "flash-attn"), ("flashinfer", "flashinfer")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            pass
    return [n for n in names if not (n == "flashinfer" and q_len != 1)]


def bench_case(batch, context, q_len, shape, dtype, device, backends, bandwidth, reps):
    case = make_case(batch, context, q_len, shape, dtype, device)
    kv_bytes, flops = work(batch, context, q_len, shape, dtype)
    read_s = kv_bytes / bandwidth
    times = {}
    for name in baselines(device, q_len) + backends:  # baselines first: rows then carry vs_sdpa
        row = dict(bench="attention", backend=name, device=device, dtype=str(dtype).removeprefix("torch."),
                   batch=batch, context=context, q_len=q_len, heads=list(shape), block_size=16)
        try:
            fn = flashinfer_decode(case) if name == "flashinfer" else run_backend(name, case, device)
            slow = name == "reference" and batch * context * q_len > 1 << 16
            t = timed(fn, device, max(2, reps // 4) if slow else reps)
        except Exception as e:  # a baseline that does not take these shapes is reported, not fatal
            emit(**row, error=f"{type(e).__name__}: {e}"[:300])
            continue
        times[name] = t
        row.update(ms=round(t * 1e3, 4), kv_gbps=round(kv_bytes / t / 1e9, 2), gflops=round(flops / t / 1e9, 2))
        if q_len == 1:
            row.update(kv_read_ms_at_copy_bw=round(read_s * 1e3, 4), ratio_to_kv_read=round(t / read_s, 3),
                       fraction_of_copy_bw=round(read_s / t, 3))
        if name != "reference" and "reference" in times:
            row["speedup_vs_reference"] = round(times["reference"] / t, 1)
        if name == "triton" and "sdpa" in times:
            row["vs_sdpa"] = round(times["sdpa"] / t, 3)
        emit(**row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backends", default=None, help="comma list; default reference,cpu (CPU) / triton (GPU)")
    parser.add_argument("--dtypes", default=None, help="comma list; default float32,bfloat16 (CPU) / bfloat16 (GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    backends = (args.backends or ("triton" if cuda else "reference,cpu")).split(",")
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16" if cuda else "float32,bfloat16")).split(",")]
    cases = GPU_CASES if cuda else CPU_CASES
    cases = cases[:3] + cases[-2:] if args.quick else cases
    reps = args.reps or (5 if args.quick else (50 if cuda else 20))
    emit(bench="machine", device=args.device, threads=torch.get_num_threads(), torch=torch.__version__,
         gpu=torch.cuda.get_device_name() if cuda else None)
    bandwidth = copy_bandwidth(args.device)
    for shape in GPU_SHAPES if cuda else [MODEL_SHAPE]:
        for dtype in dtypes:
            for batch, context, q_len in cases:
                bench_case(batch, context, q_len, shape, dtype, args.device, backends, bandwidth, reps)
                if cuda:
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
