"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) running on the paged KV cache."""
import torch
from torch import nn

from lanner.attention import AttentionMetadata
from lanner.config import ModelConfig
from lanner.model.layers import Linear, RMSNorm, RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary, self.backend = rotary, backend
        self.k_cache = self.v_cache = None   # [num_blocks, block_size, Hkv, D], set by the runner

    def forward(self, x: torch.Tensor, rope, meta: AttentionMetadata) -> torch.Tensor:
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk, = self.rotary(rope, qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim))  # q, k at once
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        self.backend.store_kv(k, v.view_as(k), self.k_cache, self.v_cache, meta.slot_mapping)
        out = self.backend.attention(q, self.k_cache, self.v_cache, meta)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = rotary   # one table, shared by every layer's attention
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.table(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta)
        return self.norm(x, residual)[0]

    def pack_weights(self, quantization: str = "none") -> None:
        """Inference layouts for every linear; the LM head stays unquantized (it shares the embedding)."""
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                module.pack("none" if name == "lm_head" else quantization)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up; refuse missing or misshapen tensors."""
        params = dict(self.named_parameters())
        for name, tensor in fuse_hf_weights(weights, self.config.num_layers).items():
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in params:
                continue   # e.g. rotary inv_freq buffers some checkpoints carry
            if params[name].shape != tensor.shape:
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(params[name].shape)}")
            params[name].data.copy_(tensor)
            params.pop(name)
        missing = [n for n in params if not (n == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def fuse_hf_weights(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    fused = {k: v for k, v in weights.items() if ".q_proj." not in k and ".k_proj." not in k
             and ".v_proj." not in k and ".gate_proj." not in k and ".up_proj." not in k}
    for i in range(num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for kind in ("weight", "bias"):
            parts = [weights.get(f"{attn}.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                fused[f"{attn}.qkv_proj.{kind}"] = torch.cat(parts)
        gate, up = weights.get(f"{mlp}.gate_proj.weight"), weights.get(f"{mlp}.up_proj.weight")
        if gate is not None and up is not None:
            fused[f"{mlp}.gate_up_proj.weight"] = torch.cat([gate, up])
    return fused
