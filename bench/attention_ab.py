"""A/B of paged_attention.c variants on decode steps, timed from C (bench/attention_ab.c): the working tree's
kernel against the same file at git revisions or other paths, built as lanner.native builds it, run in
alternation so that a shared host's drift hits every variant alike. JSON lines, then a table.

    python bench/attention_ab.py [--against HEAD~1,/tmp/variant/paged_attention.c] [--cases 1x128,1x1024,64x200]
                                 [--kv-cache-dtype float32|bfloat16|float16]

A case BxC is B sequences with C cached tokens decoding one token each, through --layers layers' caches in turn with
3 MB of other memory read between calls, each layer its own (as a step's linears read theirs), so the KV comes from
memory as in a real step.
Each pair is one run of every variant (median of --rounds rounds of the layers); a variant's figure is the median
of its --pairs runs, and `ratio` is the first variant's median time over this one's (above 1: faster).
Python loops over the ctypes function add ~5 us a call (its 25 arguments converted each time), which swamps
decode-sized calls (a 128-token context's layer is ~10 us on 2 Zen 3 cores); here a call costs what it costs
inside fused.c's decode step: kernels with paged_attention_team run every layer's call in one parallel region, as
the step does (older ones a region a call).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join("lanner", "attention", "paged_attention.c")
HEADERS = (os.path.join("lanner", "vec16.h"), os.path.join("lanner", "amx.h"))
KV_TYPES = {"float32": 0, "bfloat16": 1, "float16": 2}   # vec16.h's ELEM_*


def checkout(rev: str, into: str) -> str:
    """The kernel and its headers at git revision rev, laid out under `into` as in the repo: the kernel's path."""
    for path in (KERNEL, *HEADERS):
        os.makedirs(os.path.join(into, os.path.dirname(path)), exist_ok=True)
        with open(os.path.join(into, path), "wb") as f:
            f.write(subprocess.run(["git", "-C", REPO, "show", f"{rev}:{path}"], check=True,
                                   capture_output=True).stdout)
    return os.path.join(into, KERNEL)


def build(kernel: str, binary: str) -> None:
    from lanner import native
    flags = [f for f in native.COMMON_FLAGS if f not in ("-shared", "-fPIC")] + native.isa_flags()
    with open(kernel) as f:   # the step's one region, where the kernel has its team function (session 42 on)
        team = int("paged_attention_team" in f.read())
    subprocess.run([native.compiler(), *flags, f"-DTEAM={team}", f'-DKERNEL="{os.path.abspath(kernel)}"',
                    os.path.join(REPO, "bench", "attention_ab.c"), "-o", binary, "-lm"], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", default="HEAD", help="git revisions or kernel paths, comma-separated")
    ap.add_argument("--cases", default="1x128,1x1024,64x200")
    ap.add_argument("--shape", default="9,3,64", help="query heads, KV heads, head size (default: the default model)")
    ap.add_argument("--kv-cache-dtype", default="float32", choices=list(KV_TYPES))
    ap.add_argument("--layers", type=int, default=30, help="layers' caches a round goes through (default 30)")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.apply_threads(args.threads)
    threads = common.num_threads()
    heads, kv_heads, head_dim = (int(x) for x in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("working tree", os.path.join(REPO, KERNEL))]
        for i, other in enumerate(a for a in args.against.split(",") if a):
            variants.append((other, other if os.path.exists(other) else checkout(other, os.path.join(tmp, str(i)))))
        binaries = []
        for i, (_, kernel) in enumerate(variants):
            binaries.append(os.path.join(tmp, f"ab{i}"))
            build(kernel, binaries[-1])
        records = []
        for case in args.cases.split(","):
            batch, context = (int(x) for x in case.split("x"))
            layers = max(1, min(args.layers, args.layers * 64 // batch))   # big batches: fewer layers' caches
            times = {name: [] for name, _ in variants}
            sums = {}
            for _ in range(args.pairs):
                for (name, _), binary in zip(variants, binaries):
                    out = subprocess.run([binary, str(batch), str(context), str(layers), str(threads),
                                          str(args.rounds), str(heads), str(kv_heads), str(head_dim),
                                          str(KV_TYPES[args.kv_cache_dtype])],
                                         check=True, capture_output=True, text=True).stdout.split()
                    times[name].append(float(out[0]))
                    sums[name] = float(out[2])
            first = statistics.median(times[variants[0][0]])
            for name, _ in variants:
                record = {"case": case, "variant": name, "shape": args.shape, "kv_cache_dtype": args.kv_cache_dtype,
                          "threads": threads,
                          "us_per_call": round(statistics.median(times[name]), 2),
                          "us_all": [round(t, 2) for t in times[name]],
                          "ratio": round(first / statistics.median(times[name]), 3),
                          "same_output": abs(sums[name] - sums[variants[0][0]]) <= 1e-3 * (1 + abs(sums[name])),
                          **common.machine_fields()}
                records.append(record)
                common.emit(record, args.out)
    common.summary_table(records, ["case", "variant", "us_per_call", "ratio", "same_output"])


if __name__ == "__main__":
    main()
