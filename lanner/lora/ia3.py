"""PEFT IA3 adapters: learned vectors that rescale a module's output, or a feed-forward module's input."""
import re
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig
from lanner.lora.adapter import FUSED, SUBMODULES, LoRARequest, module_name, submodule_sizes

KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.ia3_l(?:\.default)?$")


@dataclass
class IA3Adapter:
    """A validated adapter: per (layer, PEFT module) its fp32 vector and whether it scales the module's input
    (a feed-forward module) rather than its output."""
    name: str
    id: int
    vectors: dict[tuple[int, str], tuple[torch.Tensor, bool]]


def load_ia3(request: LoRARequest, config: dict, tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> IA3Adapter:
    feedforward_modules = config.get("feedforward_modules") or []
    vectors = {}
    for key, vector in tensors.items():
        layer, module = target(key, request.lora_path)
        scales_input = is_feedforward(feedforward_modules, module_name(layer, module))
        check_vector(layer, module, vector, scales_input, cfg, request.lora_path)
        vectors[(layer, module)] = (vector.float().flatten(), scales_input)
    if not vectors:
        raise ValueError(f"IA3 adapter {request.lora_path} holds no IA3 vectors")
    return IA3Adapter(request.lora_name, request.lora_int_id, vectors)


def target(key: str, path: str) -> tuple[int, str]:
    match = KEY.match(key)
    if not match or match.group(2) not in SUBMODULES:
        raise ValueError(f"IA3 tensor {key!r} in {path} targets a module this model does not have")
    return int(match.group(1)), match.group(2)


def is_feedforward(feedforward_modules: list[str] | str, name: str) -> bool:
    """PEFT's rule: a regex string must match the whole module name, a list entry its end."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(module) for module in feedforward_modules)


def check_vector(layer: int, module: str, vector: torch.Tensor, scales_input: bool, cfg: ModelConfig,
                 path: str) -> None:
    d_in, d_out = submodule_sizes(cfg)[module]
    where = f"IA3 adapter {path}: layers.{layer}.{module}"
    if layer >= cfg.num_layers:
        raise ValueError(f"{where}: the base model has only {cfg.num_layers} layers (wrong base model?)")
    fused_with = FUSED[SUBMODULES[module][0]]
    if scales_input and len(fused_with) > 1:
        # the fused linear multiplies one input for all its modules: scaling it would scale theirs too
        raise ValueError(f"{where} is a feed-forward (input-scaling) target, but lanner fuses {'/'.join(fused_with)} "
                         f"into one matmul over a shared input; only o_proj and down_proj can scale their input")
    expected = (1, d_in) if scales_input else (d_out, 1)
    if tuple(vector.shape) != expected:
        raise ValueError(f"{where}.ia3_l has shape {tuple(vector.shape)}, expected {expected} "
                         f"({'feed-forward: scales the input' if scales_input else 'scales the output'}; wrong base model?)")
