"""PEFT adapters (LoRA; IA3 in lanner.lora.ia3, prefix tuning in lanner.lora.prefix, prompt tuning and P-tuning in
lanner.lora.prompt, LLaMA-Adapter in lanner.lora.adaption): load, validate against the base model, map onto our fused linears."""
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig

# PEFT module name -> (our fused module, which slice of its output)
SUBMODULES = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
              "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
              "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
              "down_proj": ("mlp.down_proj", 0)}
ALL_LINEAR = tuple(SUBMODULES)
# our fused linear -> the PEFT modules it holds, in output order
FUSED = {fused: tuple(name for name, (f, _) in SUBMODULES.items() if f == fused) for fused, _ in SUBMODULES.values()}
PEFT_TYPES = ("LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "ADAPTION_PROMPT")
VISION_KEY = re.compile(r"vision_(?:tower|model)\.|multi_modal_projector\.|connector\.")
KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's shape: a name, a positive integer id (unique per adapter) and a PEFT directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be a positive integer, got {self.lora_int_id!r}")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scale of B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def submodule_sizes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each PEFT-named linear."""
    q, kv, h, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def output_slices(cfg: ModelConfig) -> dict[str, slice]:
    """Each PEFT module's columns in its fused linear's output."""
    sizes, slices = submodule_sizes(cfg), {}
    for subs in FUSED.values():
        start = 0
        for sub in subs:
            slices[sub] = slice(start, start + sizes[sub][1])
            start = slices[sub].stop
    return slices


@dataclass
class LoRAAdapter:
    """A validated adapter: per (layer, PEFT module) the pair (A [r, in], B [out, r] * scaling)."""
    name: str
    id: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())


def read_config(path: str) -> dict:
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter directory {path} does not exist")
    if not os.path.exists(config_path):
        raise ValueError(f"LoRA adapter {path} has no adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    refuse = [("use_dora", lambda v: v, "DoRA adapters are not supported"),
              ("bias", lambda v: v not in (None, "none"), "only bias='none' is supported"),
              ("modules_to_save", lambda v: v, "modules_to_save (full extra modules) is not supported"),
              ("fan_in_fan_out", lambda v: v, "fan_in_fan_out is not supported for Llama-family models")]
    for key, bad, why in refuse:
        if bad(config.get(key)):
            raise ValueError(f"LoRA adapter {path}: {why} ({key}={config.get(key)!r})")
    if config.get("peft_type", "LORA") not in PEFT_TYPES:
        raise ValueError(f"LoRA adapter {path}: peft_type {config.get('peft_type')!r} is not supported "
                         f"(supported: {', '.join(PEFT_TYPES)})")
    return config


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: the first pattern key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def module_name(layer: int, module: str) -> str:
    """The module's name in the HF model, as PEFT's patterns (alpha_pattern, feedforward_modules) see it."""
    block = "mlp" if SUBMODULES[module][0].startswith("mlp.") else "self_attn"
    return f"model.layers.{layer}.{block}.{module}"


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise ValueError(f"LoRA adapter {path} has no adapter_model.safetensors (pickled .bin is refused)")
    from safetensors.torch import load_file
    try:
        return load_file(file)
    except Exception as e:
        raise ValueError(f"cannot read LoRA weights {file}: {e}") from e


def adapter_digest(path: str) -> str:
    """What an adapter's files hold, hashed: it keys the prefix cache's blocks of its requests, so an id reused for
    another adapter (or files changed under a removed one) never hits blocks computed with the old weights."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_adapter(request: LoRARequest, cfg: ModelConfig, max_rank: int):
    """A validated LoRAAdapter, IA3Adapter, PrefixAdapter, PromptAdapter or AdaptionPromptAdapter:
    adapter_config.json's peft_type says which."""
    config = read_config(request.lora_path)
    tensors = read_tensors(request.lora_path)
    if config.get("peft_type") == "IA3":
        from lanner.lora.ia3 import load_ia3
        return load_ia3(request, config, tensors, cfg)
    if config.get("peft_type") == "PREFIX_TUNING":
        from lanner.lora.prefix import load_prefix
        return load_prefix(request, config, tensors, cfg)
    if config.get("peft_type") == "ADAPTION_PROMPT":
        from lanner.lora.adaption import load_adaption_prompt
        return load_adaption_prompt(request, config, tensors, cfg)
    if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING"):
        from lanner.lora.prompt import load_prompt
        return load_prompt(request, config, tensors, cfg)
    return load_lora(request, config, tensors, cfg, max_rank)


def load_lora(request: LoRARequest, config: dict, tensors: dict, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    file = os.path.join(request.lora_path, "adapter_model.safetensors")
    pairs = group_pairs(tensors, file)
    sizes = submodule_sizes(cfg)
    weights = {}
    for (layer, module), (a, b) in pairs.items():
        check_pair(layer, module, a, b, sizes, cfg, max_rank, request.lora_path)
        rank = a.shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, module_name(layer, module), config.get("lora_alpha", 8))
        weights[(layer, module)] = (a.float(), b.float() * lora_scaling(rank, alpha, config.get("use_rslora", False)))
    if not weights:
        raise ValueError(f"LoRA adapter {request.lora_path} holds no LoRA weights for this model")
    return LoRAAdapter(request.lora_name, request.lora_int_id, weights)


def group_pairs(tensors: dict[str, torch.Tensor], file: str) -> dict[tuple[int, str], tuple]:
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = None if VISION_KEY.search(key) else KEY.match(key)   # a VLM's adapter: its text layers only
        if not match or match.group(2) not in SUBMODULES:
            raise ValueError(f"LoRA tensor {key!r} in {file} targets a module this model does not have")
        found.setdefault((int(match.group(1)), match.group(2)), {})[match.group(3)] = tensor
    for (layer, module), pair in found.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA weights for layers.{layer}.{module} in {file} lack lora_{'A' if 'A' not in pair else 'B'}")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def check_pair(layer, module, a, b, sizes, cfg, max_rank, path) -> None:
    d_in, d_out = sizes[module]
    where = f"LoRA adapter {path}: layers.{layer}.{module}"
    if layer >= cfg.num_layers:
        raise ValueError(f"{where}: the base model has only {cfg.num_layers} layers (wrong base model?)")
    if a.ndim != 2 or a.shape[1] != d_in:
        raise ValueError(f"{where}.lora_A has shape {tuple(a.shape)}, expected (r, {d_in}) (wrong base model?)")
    if b.ndim != 2 or b.shape != (d_out, a.shape[0]):
        raise ValueError(f"{where}.lora_B has shape {tuple(b.shape)}, expected ({d_out}, {a.shape[0]})")
    if a.shape[0] > max_rank:
        raise ValueError(f"{where} has rank {a.shape[0]} > max_lora_rank {max_rank}")
