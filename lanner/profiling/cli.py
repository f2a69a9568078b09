"""`lanner profile`: where an engine step's time goes, prefill vs decode, by component, against a roofline."""
import argparse
import os
import sys
import time

EPILOG = """\
Each case is one engine step: prefill = B prompts of C tokens prefilled in one step; decode = B sequences
with C tokens of KV cached decoding one token each. Every case alternates plain steps (timed whole) with
instrumented steps (every component timed); each is the mean of the middle half of --repeats runs. Prefill batch sizes are separate
(--prefill-batch-sizes) because a prefill of B prompts costs about B times one prompt and is the slow part.
Writes profile.json, cases.csv, components.csv, breakdown.png and roofline.png to --out."""


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def phase_list(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    if not phases or any(p not in ("prefill", "decode") for p in phases):
        raise argparse.ArgumentTypeError(f"phases are prefill and/or decode, got {text!r}")
    return phases


def add_parser(subparsers):
    p = subparsers.add_parser("profile", help="time prefill and decode steps by component, with a roofline",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file, HF model directory or hub id (default: the default model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "cpu", "triton"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 64], help="decode batch sizes (default 1,8,64)")
    p.add_argument("--prefill-batch-sizes", type=int_list, default=[1, 2], help="prefill batch sizes (default 1,2)")
    p.add_argument("--context-lengths", type=int_list, default=[128, 512, 2048], help="default 128,512,2048")
    p.add_argument("--phases", type=phase_list, default=["prefill", "decode"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each kind per case (summarized by the mean of the middle half)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind per case")
    p.add_argument("--min-case-time", type=float, default=5.0,
                   help="keep repeating a case beyond --repeats until it has run this many seconds (default 5)")
    p.add_argument("--case-budget", type=float, default=30.0,
                   help="seconds per case after which no further repeats start (at least 3 are done; default 30)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the requests")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="profile", help="output directory (default ./profile)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only redraw the table, CSVs and plots from an earlier profile.json")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from lanner.profiling import report
    if args.replot:
        results, machine, meta = report.load_results(args.replot)
        return finish(results, machine, meta, args)
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    warn_if_shared(args.device)
    from lanner.engine.engine import LLMEngine
    from lanner.profiling.machine import measure_machine
    from lanner.profiling.profile import Profiler, cases_for, describe_engine, engine_config_for, resolve_backend
    cases = []
    if "prefill" in args.phases:
        cases += cases_for(["prefill"], args.prefill_batch_sizes, args.context_lengths)
    if "decode" in args.phases:
        cases += cases_for(["decode"], args.batch_sizes, args.context_lengths)
    backend = resolve_backend(args.attention_backend, args.device)
    engine = LLMEngine(engine_config_for(cases, args.block_size, model=args.model, dtype=args.dtype,
                                         attention_backend=backend, device=args.device))
    meta = describe_engine(engine)
    print(f"lanner profile: {meta['model']} ({meta['dtype']}, attention={meta['attention_backend']}, "
          f"{meta['device']}, {meta['threads']} threads); measuring the machine ...", file=sys.stderr)
    machine = measure_machine(engine.runner.dtype, args.device)
    profiler = Profiler(engine, args.repeats, args.warmup, args.case_budget, args.min_case_time, args.temperature)
    start = time.perf_counter()

    def progress(r):
        print(f"  {r.phase:<7} B={r.batch:<3} C={r.context:<5} step {r.step_ms:9.1f} ms, components sum to "
              f"{r.coverage:.1%} of it  [{time.perf_counter() - start:.0f} s]", file=sys.stderr)
    results = profiler.run(cases, progress)
    meta.update(repeats=args.repeats, warmup=args.warmup, temperature=args.temperature,
                wall_seconds=round(time.perf_counter() - start, 1))
    return finish(results, machine, meta, args)


def warn_if_shared(device: str) -> None:
    """Multi-threaded CPU kernels wait on each other's preempted threads when other jobs share the cores."""
    import torch
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if str(device) == "cpu" and torch.get_num_threads() > 1 and load > cores:
        print(f"lanner profile: warning: load average {load:.1f} on {cores} cores; with "
              f"{torch.get_num_threads()} threads each step waits on preempted threads. "
              f"--threads 1 gives steadier numbers on a shared machine.", file=sys.stderr)


def finish(results, machine, meta, args) -> int:
    from lanner.profiling import report
    print(report.table(results, machine))
    paths = report.write_outputs(results, machine, args.out, meta, plots=not args.no_plots)
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths.values()), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lanner")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(["profile"] + sys.argv[1:]))
