"""Controlled prefill and decode steps of a real engine, timed whole and by component.

For each case (phase, batch B, context C) the profiler alternates two kinds of run of the same step:
  plain:        engine.step() with nothing wrapped, timed as a whole: the step time;
  instrumented: the same step with timing proxies on every component (timing.instrument).
Alternating them keeps both exposed to the same machine load. Each kind is summarized by the mean of the
middle half of its runs (sorted by step time): a median-like statistic that stays additive, so the
component times are averages over whole instrumented runs and add up to the typical instrumented step.
Warm-up steps come first (they also build the kernels for the case's shapes).

The setups, chosen so that a case measures exactly one kind of step:
  prefill: B fresh requests with random C-token prompts, all prefilled in the one step (the token budget
           max_num_batched_tokens is raised to B * C for it); they are aborted after the step.
  decode:  B sequences that already have C tokens of KV "computed": their blocks are allocated, the
           cache holds random values (attention's cost depends only on shapes), num_computed_tokens = C,
           and one output token waits. After each step the new token is rolled back, so every repeat
           decodes at exactly context C.
Prefix caching is off, so no prompt is served from the cache.
"""
import itertools
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from lanner.engine.sequence import Status
from lanner.profiling.flops import PHASES, check_phase, component_costs, num_tokens
from lanner.profiling.timing import COMPONENTS, Timer, device_sync, instrument
from lanner.sampling_params import SamplingParams

LONG_STEP_S = 2.0
MAX_REPEATS = 200
MODEL_COMPONENTS = ("embedding", "norms", "qkv_proj", "rotary", "kv_store", "attention", "o_proj",
                    "gate_up_proj", "mlp_act", "down_proj", "lm_head", "ssm_in_proj", "ssm_conv", "ssm_dt_bc_proj",
                    "ssm_scan", "ssm_out_proj")


@dataclass
class Case:
    phase: str
    batch: int
    context: int

    def __post_init__(self):
        check_phase(self.phase)
        if self.batch < 1 or self.context < 1:
            raise ValueError(f"batch and context must be >= 1, got {self.batch}, {self.context}")

    @property
    def tokens(self) -> int:
        return num_tokens(self.phase, self.batch, self.context)


@dataclass
class CaseResult:
    phase: str
    batch: int
    context: int
    tokens: int
    step_ms: float                       # typical plain (unwrapped) step: mean of the middle half of the runs
    instrumented_ms: float               # typical instrumented step, the same way
    components_ms: dict[str, float]      # mean exclusive time per component over those same middle runs
    step_samples_ms: list[float] = field(default_factory=list)
    costs: dict[str, dict] = field(default_factory=dict)   # component -> {"flops", "bytes"}

    @property
    def measured_ms(self) -> float:
        """Every measured component, engine parts included: compare with step_ms."""
        return sum(self.components_ms.values())

    @property
    def coverage(self) -> float:
        return self.measured_ms / self.step_ms

    @property
    def model_ms(self) -> float:
        return sum(self.components_ms.get(c, 0.0) for c in MODEL_COMPONENTS)

    @property
    def overhead_ms(self) -> float:
        """Engine overhead: the plain step minus the model components and sampling measured inside it."""
        return self.step_ms - self.model_ms - self.components_ms.get("sampling", 0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "measured_ms": self.measured_ms, "coverage": self.coverage,
                "model_ms": self.model_ms, "overhead_ms": self.overhead_ms}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def middle(runs: list) -> list:
    """The middle half (rounded up) of sorted runs: a mean over them is robust to a noisy neighbour's spikes."""
    keep = -(-len(runs) // 2)
    start = (len(runs) - keep) // 2
    return runs[start:start + keep]


def cases_for(phases, batch_sizes, context_lengths) -> list[Case]:
    return [Case(p, b, c) for p in phases for b in batch_sizes for c in context_lengths]


def engine_config_for(cases: list[Case], block_size: int = 16, **engine_kwargs):
    """An EngineConfig whose KV pool, max_model_len and token budget fit every case."""
    from lanner.config import EngineConfig
    max_ctx = max(c.context for c in cases)
    max_len = max_ctx + 16                        # room for the decode token (and a few spare)
    max_batch = max(c.batch for c in cases)
    blocks = max_batch * -(-max_len // block_size) + 1
    budget = max([c.batch * c.context for c in cases if c.phase == "prefill"] + [max_batch, 2048])
    return EngineConfig(max_model_len=max_len, block_size=block_size, num_kv_blocks=blocks,
                        max_num_batched_tokens=budget, max_num_seqs=max(max_batch, 1),
                        enable_prefix_caching=False, **engine_kwargs)


def resolve_backend(name: str, device: str) -> str:
    """The backend name to use: "auto" falls back to "reference" when the fast backend cannot be imported."""
    from lanner.attention import get_backend
    try:
        get_backend(name, device)
        return name
    except ImportError as e:
        if name != "auto":
            raise
        print(f"lanner profile: attention backend for {device} unavailable ({e}); using reference", file=sys.stderr)
        return "reference"


class Profiler:
    def __init__(self, engine, repeats: int = 5, warmup: int = 1, case_budget_s: float | None = None,
                 min_case_s: float = 0.0, temperature: float = 1.0, seed: int = 0):
        """repeats pairs of (plain, instrumented) steps per case; more while a case has run under min_case_s
        (short steps are cheap to repeat and noisier), fewer (but at least 3) once it has run case_budget_s."""
        if repeats < 1 or warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        self.engine, self.repeats, self.warmup = engine, repeats, warmup
        self.case_budget_s, self.min_case_s = case_budget_s, min_case_s
        self.params = SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True)
        self.rng = random.Random(seed)
        self.sync = device_sync(engine.cfg.device)
        self.timer = Timer(self.sync)
        self.kv_filled = False

    # ---- setup ------------------------------------------------------------------------------------
    def random_tokens(self, n: int) -> list[int]:
        vocab = self.engine.model_config.vocab_size
        low = min(100, vocab // 4)   # clear of the special tokens at the start of most vocabularies
        return [self.rng.randrange(low, vocab) for _ in range(n)]

    def add(self, context: int):
        rid = self.engine.add_request(self.random_tokens(context), self.params)
        return self.engine.requests[rid].seqs[0]

    def decode_batch(self, batch: int, context: int) -> list:
        """batch running sequences with `context` tokens of KV in the cache and one token to decode."""
        engine = self.engine
        if not self.kv_filled:   # attention's (and a scan's) cost depends only on shapes: random KV and states
            engine.runner.kv_cache.normal_()
            for mixer in getattr(engine.runner.model, "mixers", []):
                mixer.conv_state.normal_()
                mixer.ssm_state.normal_(0, 0.1)
            self.kv_filled = True
        seqs = []
        for _ in range(batch):
            seq = self.add(context)
            engine.scheduler.waiting.remove(seq)
            engine.blocks.allocate(seq, context + 1)
            if engine.runner.states is not None and not engine.runner.states.acquire(seq):
                raise RuntimeError(f"no state slot for decode batch {batch}: raise --kv-cache-memory")
            seq.status = Status.RUNNING
            engine.scheduler.running.append(seq)
            seq.token_ids += self.random_tokens(1)
            seq.num_computed_tokens = context
            seqs.append(seq)
        return seqs

    def release(self, seqs) -> None:
        for seq in seqs:
            self.engine.abort_request(seq.request_id)

    # ---- one step of a case -------------------------------------------------------------------------
    def step(self, case: Case, instrumented: bool) -> tuple[float, dict[str, float]]:
        """(seconds, {component: seconds}) of one step of the case, set up and torn down around it."""
        if case.phase == "prefill":
            seqs = [self.add(case.context) for _ in range(case.batch)]
            seconds, parts = self.timed_step(instrumented)
            if any(s.num_computed_tokens != case.context for s in seqs):
                raise RuntimeError(f"prefill of {case} was not done in one step; raise the token budget")
            self.release(seqs)
            return seconds, parts
        seqs = self.decoding
        saved = [(len(s.token_ids), s.num_computed_tokens, s.text, s.prefix_offset, s.read_offset) for s in seqs]
        seconds, parts = self.timed_step(instrumented)
        for s, (n, computed, text, prefix, read) in zip(seqs, saved):
            if s.is_finished or s.num_computed_tokens != computed + 1:
                raise RuntimeError(f"decode step of {case} did not decode every sequence once")
            del s.token_ids[n:]
            s.num_computed_tokens, s.text, s.prefix_offset, s.read_offset = computed, text, prefix, read
        return seconds, parts

    def timed_step(self, instrumented: bool) -> tuple[float, dict[str, float]]:
        self.sync()
        if not instrumented:
            start = time.perf_counter()
            self.engine.step()
            self.sync()
            return time.perf_counter() - start, {}
        with instrument(self.engine, self.timer) as timer:
            timer.reset()
            timer.wrap(self.engine.step, "engine_other")()
        return timer.total(), dict(timer.seconds)

    # ---- a case -------------------------------------------------------------------------------------
    def run_case(self, case: Case) -> CaseResult:
        engine = self.engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the profiler needs an idle engine")
        cfg = engine.cfg
        saved = cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.num_scheduler_steps
        cfg.max_num_batched_tokens = max(cfg.max_num_batched_tokens, case.tokens)
        cfg.max_num_seqs = max(cfg.max_num_seqs, case.batch)
        cfg.num_scheduler_steps = 1   # one step a call: a burst runs several decode steps in one
        self.decoding = self.decode_batch(case.batch, case.context) if case.phase == "decode" else []
        try:
            return self.measure(case)
        finally:
            self.release(self.decoding)
            cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.num_scheduler_steps = saved

    def measure(self, case: Case) -> CaseResult:
        for _ in range(self.warmup):
            if self.step(case, False)[0] > LONG_STEP_S:
                break   # a first call's one-off costs (kernel selection, allocation) are lost in a step this long
            self.step(case, True)
        plain, parts, start = [], [], time.perf_counter()
        for r in itertools.count():
            elapsed = time.perf_counter() - start
            over_budget = self.case_budget_s is not None and r >= min(3, self.repeats) and elapsed > self.case_budget_s
            if over_budget or (r >= self.repeats and (elapsed >= self.min_case_s or r >= MAX_REPEATS)):
                break
            plain.append(self.step(case, False)[0])
            parts.append(self.step(case, True))
        names = sorted(set(COMPONENTS) | {n for _, p in parts for n in p})   # a fused-away component: 0
        typical = middle(sorted(parts, key=lambda tp: tp[0]))   # whole runs, so their parts still add up
        mean_ms = lambda xs: 1e3 * sum(xs) / len(xs)
        dtype_bytes = self.engine.runner.dtype.itemsize
        costs = component_costs(self.engine.model_config, case.phase, case.batch, case.context, dtype_bytes,
                                weight_bytes(self.engine.runner.model))
        return CaseResult(case.phase, case.batch, case.context, case.tokens, mean_ms(middle(sorted(plain))),
                          mean_ms([t for t, _ in typical]),
                          {n: mean_ms([p.get(n, 0.0) for _, p in typical]) for n in names},
                          [1e3 * t for t in plain], {n: asdict(c) for n, c in costs.items()})

    def run(self, cases: list[Case], progress=None) -> list[CaseResult]:
        results = []
        for case in cases:
            result = self.run_case(case)
            if progress:
                progress(result)
            results.append(result)
        return results


def describe_engine(engine) -> dict:
    m = engine.model_config
    return {"model": engine.model_path, "architecture": m.architecture, "num_layers": m.num_layers,
            "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_heads": m.num_heads,
            "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "vocab_size": m.vocab_size,
            "dtype": str(engine.runner.dtype).removeprefix("torch."),
            "attention_backend": engine.runner.backend.__name__.rsplit(".", 1)[-1],
            "device": engine.cfg.device, "block_size": engine.cfg.block_size, "threads": torch.get_num_threads()}


__all__ = ["Case", "CaseResult", "Profiler", "PHASES", "cases_for", "engine_config_for", "resolve_backend",
           "describe_engine", "MODEL_COMPONENTS"]


def weight_bytes(model) -> dict[str, float]:
    """Bytes per weight of each linear component (GGML blocks: 0.625 for Q4_1) for the byte counts."""
    linears = {"lm_head": model.lm_head}
    if model.mixers:
        mixer = model.mixers[0]
        linears.update(ssm_in_proj=mixer.in_proj, ssm_out_proj=mixer.out_proj)
    if model.config.num_kv_layers:
        attn, mlp = model.attention_layers[0], model.layers[0].mlp
        linears.update(qkv_proj=attn.qkv_proj, o_proj=attn.o_proj, gate_up_proj=mlp.gate_up_proj,
                       down_proj=mlp.down_proj)
    return {name: bytes_per_weight(lin) for name, lin in linears.items()}


def bytes_per_weight(lin) -> float:
    nbytes = getattr(lin.quantized, "nbytes", None)
    return nbytes() / (lin.in_features * lin.out_features) if nbytes else lin.weight.element_size()

