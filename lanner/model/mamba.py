"""Mamba and Mamba-2 language models: embeddings, pre-norm residual blocks around an SSM mixer, a final norm and
the LM head, with HF's tensor names (`backbone.*`, `lm_head.weight`). The mixers keep no KV: each sequence's conv
and SSM state lives in a state slot (lanner.engine.state_cache), which the step's `meta.ssm` names."""
import re

import torch
from torch import nn

from lanner.config import ModelConfig
from lanner.model.layers import Linear
from lanner.model.llama import place
from lanner.quant import head_format


def state_shapes(cfg: ModelConfig) -> tuple[tuple, tuple]:
    """Per slot and layer: the conv state's shape (channels, kernel - 1) and the SSM state's."""
    hf = cfg.ssm
    kernel, n = hf.get("conv_kernel", 4), hf.get("state_size", 16)
    inner = int(hf.get("expand", 2) * hf["hidden_size"])   # as the mixers and HF derive it
    if cfg.architecture == "MambaForCausalLM":
        return (inner, kernel - 1), (inner, n)
    return (inner + 2 * hf.get("n_groups", 1) * n, kernel - 1), (hf["num_heads"], hf["head_dim"], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's MambaRMSNorm: the statistics in fp32, the weight applied in the input's dtype."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class MambaBlock(nn.Module):
    def __init__(self, hf: dict, mixer: nn.Module):
        super().__init__()
        self.norm = nn.Parameter(torch.ones(hf["hidden_size"]))
        self.mixer, self.eps = mixer, hf.get("layer_norm_epsilon", 1e-5)

    def forward(self, x: torch.Tensor, ssm) -> torch.Tensor:
        return x + self.mixer(rms_norm(x, self.norm, self.eps), ssm)


class MambaForCausalLM(nn.Module):
    """MambaForCausalLM (selective scan) and Mamba2ForCausalLM (SSD): the same backbone, different mixers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from lanner.model.ssm import Mamba2Mixer, MambaMixer
        hf = cfg.ssm
        mixer = MambaMixer if cfg.architecture == "MambaForCausalLM" else Mamba2Mixer
        self.config, self.eps = cfg, hf.get("layer_norm_epsilon", 1e-5)
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MambaBlock(hf, mixer(hf)) for _ in range(cfg.num_layers))
        self.norm_f = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")

    @property
    def mixers(self) -> list[nn.Module]:
        return [layer.mixer for layer in self.layers]

    attention_layers = ()   # no layer keeps KV

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta, embeds=None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        if embeds is not None:
            x = x.index_copy(0, embeds[0], embeds[1].to(x.dtype))
        for layer in self.layers:
            x = layer(x, meta.ssm)
        return rms_norm(x, self.norm_f, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_weights(self, weights: dict) -> None:
        """HF names (`backbone.layers.{i}.norm.weight` ...) onto ours; a missing or misshapen tensor is refused."""
        params, modules = dict(self.named_parameters()), dict(self.named_modules())
        for name, tensor in weights.items():
            ours = re.sub(r"^(layers\.\d+\.norm|norm_f)\.weight$", r"\1", name.removeprefix("backbone."))
            if ours == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if ours not in params:
                raise ValueError(f"checkpoint weight {name!r} has no place in a {self.config.architecture}")
            if params[ours].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(params[ours].shape)}")
            module_name, _, attr = ours.rpartition(".")
            with torch.no_grad():
                place(modules[module_name], attr, tensor)
            params.pop(ours)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
            params.pop("lm_head.weight", None)
        if params:
            missing = list(params)
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def pack_weights(self, quantization: str = "none", dense_gemm: bool | None = None) -> None:
        """Every linear in its inference layout (the mixers' quantized at load if asked; the head stays exact)."""
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                head = name == "lm_head"
                module.pack(head_format(quantization) if head else quantization, dense_gemm, int8=not head)
