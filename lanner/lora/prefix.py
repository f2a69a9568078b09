"""PEFT prefix tuning: per layer, num_virtual_tokens learned keys and values that every request of the adapter
attends to before its own tokens. They are written once into KV blocks of the paged pool and pinned there while
the adapter is loaded; a request's block table starts with them (lanner.engine.kv_cache.PinnedPrefix)."""
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig
from lanner.engine.kv_cache import BlockManager, PinnedPrefix
from lanner.lora.adapter import LoRARequest


@dataclass
class PrefixAdapter:
    """A validated adapter: its virtual tokens' keys and values, as attention reads them (PEFT hands them to the
    model as a KV cache, so the keys get no rotary)."""
    name: str
    id: int
    kv: torch.Tensor                     # [layers, 2 (key, value), P, kv heads, head dim], fp32
    pinned: PinnedPrefix | None = None   # its blocks in the KV pool while loaded

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[2]


def load_prefix(request: LoRARequest, config: dict, tensors: dict[str, torch.Tensor],
                cfg: ModelConfig) -> PrefixAdapter:
    """PEFT saves `prompt_embeddings` [P, layers * 2 * token_dim]: the prefix encoder's output (with
    prefix_projection, its MLP already evaluated at save), laid out per virtual token as (layer, key|value, head,
    dim), which PEFT's get_prompt views as past_key_values."""
    path = request.lora_path
    num_virtual_tokens = check_config(config, cfg, path)
    rows = tensors.get("prompt_embeddings")
    if rows is None:
        raise ValueError(f"prefix-tuning adapter {path} has no 'prompt_embeddings' tensor "
                         f"(found: {sorted(tensors)[:5]})")
    expected = (num_virtual_tokens, cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim)
    if tuple(rows.shape) != expected:
        raise ValueError(f"prefix-tuning adapter {path}: prompt_embeddings has shape {tuple(rows.shape)}, expected "
                         f"{expected} (num_virtual_tokens, num_layers * 2 * token_dim)")
    kv = rows.float().view(num_virtual_tokens, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim)
    return PrefixAdapter(request.lora_name, request.lora_int_id, kv.permute(1, 2, 0, 3, 4).contiguous())


def check_config(config: dict, cfg: ModelConfig, path: str) -> int:
    """The adapter's num_virtual_tokens, once its config fits the base model (PEFT sizes a prefix by the key/value
    heads: token_dim = num_key_value_heads * head_dim)."""
    where = f"prefix-tuning adapter {path}"
    num_virtual_tokens = config.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"{where}: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                         f"(an encoder-decoder prefix); only decoder-only models are served")
    expected = {"num_layers": cfg.num_layers, "num_attention_heads": cfg.num_kv_heads,
                "token_dim": cfg.num_kv_heads * cfg.head_dim}
    for key, value in expected.items():
        if config.get(key) != value:
            raise ValueError(f"{where}: {key}={config.get(key)!r}, but the base model needs {value} "
                             f"({cfg.num_layers} layers, {cfg.num_kv_heads} key/value heads of {cfg.head_dim}; "
                             f"wrong base model?)")
    return num_virtual_tokens


class PrefixPool:
    """Writes an adapter's virtual tokens once into blocks of the paged KV pool (in the cache's dtype) and pins them
    there; unpinning gives them back once no request of the adapter holds them either."""

    def __init__(self, blocks: BlockManager, kv_cache: torch.Tensor):
        # kv_cache: [layers, 2, num_blocks, block_size, Hkv, D]; a draft head's layer after the model's
        self.blocks, self.kv_cache = blocks, kv_cache

    def pin(self, adapter: PrefixAdapter) -> None:
        adapter.pinned = self.blocks.pin_prefix(adapter.num_virtual_tokens)
        block_ids = adapter.pinned.blocks
        layers, _, num_tokens, heads, dim = adapter.kv.shape
        padded = adapter.kv.new_zeros(layers, 2, len(block_ids) * self.blocks.block_size, heads, dim)
        padded[:, :, :num_tokens] = adapter.kv
        self.kv_cache[:layers, :, torch.tensor(block_ids, device=self.kv_cache.device)] = \
            padded.view(layers, 2, len(block_ids), -1, heads, dim).to(self.kv_cache.device, self.kv_cache.dtype)

    def unpin(self, adapter: PrefixAdapter) -> None:
        self.blocks.drop_prefix(adapter.pinned)
        adapter.pinned = None
