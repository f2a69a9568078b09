"""Timing proxies: time an engine step's components without changing the model code.

`instrument(engine, timer)` swaps timed wrappers in for the forward of the model's modules, the attention
backend's functions, the sampler, the scheduler and the runner, and puts the originals back on exit.
Times are exclusive: a wrapped call's time excludes the wrapped calls inside it, so a component named
for a parent (say `attn_glue`, the Attention module) is only its own Python glue, and the exclusive
times of one instrumented step add up to that step exactly. What the wrappers themselves cost lands in
the parents' glue; comparing the sum with a step timed without wrappers shows how much that is.
"""
import time
from collections import defaultdict
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from lanner.model import fused
from lanner.model.decode_step import STEP_PARTS

# component -> what it is; the engine's step is the outermost timed call ("engine_other" = its own code).
COMPONENTS = {
    "schedule": "Scheduler.schedule",
    "prepare_inputs": "ModelRunner.prepare: packed inputs + AttentionMetadata",
    "embedding": "embed_tokens",
    "norms": "input / post-attention / final RMSNorm (with the residual add; q/k head norms in the one-call step)",
    "qkv_proj": "fused QKV projection",
    "rotary": "rotary embedding of q and k (and the KV store, where fused.rope_store does both)",
    "kv_store": "backend.store_kv: new K/V into the paged cache (0 where fused.rope_store stores them)",
    "attention": "backend.attention: the attention core over the paged cache",
    "o_proj": "attention output projection",
    "gate_up_proj": "fused gate/up projection (and silu(gate) * up where one GGML kernel call does both)",
    "mlp_act": "silu(gate) * up (the MLP's own code), where the projection does not",
    "down_proj": "MLP down projection",
    "attn_glue": "Attention.forward's own code (split, views)",
    "ssm_in_proj": "SSM mixer input projection (Mamba-2: x, z, B, C and dt in one)",
    "ssm_conv": "SSM causal conv1d, continuing each sequence's conv state",
    "ssm_dt_bc_proj": "Mamba-1's input-dependent dt, B, C (x_proj, dt_proj)",
    "ssm_scan": "selective scan (Mamba-1) / SSD (Mamba-2) from each sequence's state slot, D skip, gate",
    "ssm_out_proj": "SSM mixer output projection",
    "ssm_glue": "the SSM mixer's own code (splits, casts)",
    "model_glue": "model / decoder-layer forward's own code",
    "lm_head": "compute_logits: LM head on the sampled rows",
    "runner_glue": "ModelRunner.run's own code (device moves, row gather, logits to CPU)",
    "sampling": "Sampler: next tokens from the logits",
    "engine_other": "LLMEngine.step's own code (counters, append, detokenize, outputs)",
}


def device_sync(device) -> callable:
    """A function that waits for queued device work (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


class Timer:
    """Exclusive seconds per component over the timed calls (nested calls subtract from their parent)."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack = [0.0]   # per open call: time spent in its timed children

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self._stack[:] = [0.0]   # in place: the wrappers hold this list

    def wrap(self, fn, name: str):
        stack, seconds, calls, sync, clock = self._stack, self.seconds, self.calls, self.sync, time.perf_counter

        def timed(*args, **kwargs):
            sync()
            stack.append(0.0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                elapsed = clock() - start
                seconds[name] += elapsed - stack.pop()
                stack[-1] += elapsed
                calls[name] += 1
        timed.__wrapped__ = fn
        return timed

    def add(self, name: str, seconds: float) -> None:
        """seconds of a part timed elsewhere (inside native code) within the open timed call: its parent's exclusive
        time loses them."""
        self.seconds[name] += seconds
        self._stack[-1] += seconds
        self.calls[name] += 1

    def total(self) -> float:
        return sum(self.seconds.values())


class _TimedSampler:
    """The engine's sampler with its __call__ timed; every other attribute passes through."""

    def __init__(self, sampler, timer: Timer):
        self._sampler, self._call = sampler, timer.wrap(sampler.__call__, "sampling")

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sampler, name)


class _TimedDecodeStep:
    """The model's DecodeStep, its steps timed by part in C (decode_layers' timings) into the timer; every other
    attribute passes through."""

    def __init__(self, step, timer: Timer):
        self._step, self._timer = step, timer

    def __call__(self, *args, **kwargs):
        step = self._step
        step.timings = torch.zeros(len(STEP_PARTS), dtype=torch.float64)
        try:
            return step(*args, **kwargs)
        finally:
            for name, seconds in zip(STEP_PARTS, step.timings.tolist()):
                if seconds:   # (a part the step did not run: no call)
                    self._timer.add(name, seconds)
            step.timings = None

    def __getattr__(self, name):
        return getattr(self._step, name)


@contextmanager
def instrument(engine, timer: Timer):
    """Within the block, every call of the step's components is timed into timer."""
    undo = []

    def patch(obj, attr, value):
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, value)
        undo.append(lambda: setattr(obj, attr, old) if had else delattr(obj, attr))

    def time_forward(module, name):
        patch(module, "forward", timer.wrap(module.forward, name))

    runner, model = engine.runner, engine.runner.model
    patch(engine.scheduler, "schedule", timer.wrap(engine.scheduler.schedule, "schedule"))
    patch(runner, "prepare", timer.wrap(runner.prepare, "prepare_inputs"))
    patch(runner, "run", timer.wrap(runner.run, "runner_glue"))
    patch(engine, "sampler", _TimedSampler(engine.sampler, timer))
    time_forward(model, "model_glue")
    patch(model, "compute_logits", timer.wrap(model.compute_logits, "lm_head"))
    if engine.model_config.ssm:
        from lanner.model import ssm
        patch(ssm, "causal_conv", timer.wrap(ssm.causal_conv, "ssm_conv"))
    if engine.model_config.num_kv_layers:
        instrument_transformer(model, timer, patch, time_forward)
    else:
        instrument_ssm(model, timer, patch, time_forward)
    try:
        yield timer
    finally:
        for fn in reversed(undo):
            fn()


def instrument_transformer(model, timer: Timer, patch, time_forward) -> None:
    time_forward(model.embed_tokens, "embedding")
    if model.decode_step is not None:   # a step it runs is timed by part inside (decode_layers)
        patch(model, "decode_step", _TimedDecodeStep(model.decode_step, timer))
    time_forward(model.norm, "norms")
    patch(fused, "rope_store", timer.wrap(fused.rope_store, "rotary"))
    rotaries = {}
    for layer in model.layers:
        mlp = layer.mlp
        time_forward(layer, "model_glue")
        time_forward(layer.input_layernorm, "norms")
        time_forward(layer.post_attention_layernorm, "norms")
        time_forward(mlp, "mlp_act")
        time_forward(mlp.gate_up_proj, "gate_up_proj")
        patch(mlp.gate_up_proj, "silu_mul", timer.wrap(mlp.gate_up_proj.silu_mul, "gate_up_proj"))
        time_forward(mlp.down_proj, "down_proj")
        if layer.mamba is not None:   # a hybrid's SSM layer
            instrument_mixer(layer.mamba, timer, patch, time_forward)
            continue
        attn = layer.self_attn
        time_forward(attn, "attn_glue")
        time_forward(attn.qkv_proj, "qkv_proj")
        time_forward(attn.o_proj, "o_proj")
        if id(attn.rotary) not in rotaries:   # one RotaryEmbedding is shared by all layers
            rotaries[id(attn.rotary)] = attn.rotary
            time_forward(attn.rotary, "rotary")
        backend = attn.backend
        patch(attn, "backend", SimpleNamespace(
            store_kv=timer.wrap(backend.store_kv, "kv_store"), attention=timer.wrap(backend.attention, "attention"),
            __name__=getattr(backend, "__name__", "backend")))


def instrument_ssm(model, timer: Timer, patch, time_forward) -> None:
    """A Mamba model: its block norms (and the conv, patched by the caller) are module-level functions, timed where
    the code looks them up."""
    from lanner.model import mamba
    time_forward(model.embeddings, "embedding")
    patch(mamba, "rms_norm", timer.wrap(mamba.rms_norm, "norms"))
    for layer in model.layers:
        time_forward(layer, "model_glue")
        instrument_mixer(layer.mixer, timer, patch, time_forward)


def instrument_mixer(mixer, timer: Timer, patch, time_forward) -> None:
    time_forward(mixer, "ssm_glue")
    time_forward(mixer.in_proj, "ssm_in_proj")
    time_forward(mixer.out_proj, "ssm_out_proj")
    patch(mixer, "scan", timer.wrap(mixer.scan, "ssm_scan"))
    for name in ("x_proj", "dt_proj"):
        if hasattr(mixer, name):
            time_forward(getattr(mixer, name), "ssm_dt_bc_proj")
    if hasattr(mixer, "norm"):
        time_forward(mixer.norm, "norms")
