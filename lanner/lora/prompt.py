"""PEFT prompt tuning and P-tuning: num_virtual_tokens learned input embeddings that go before the prompt's token
embeddings. Unlike prefix tuning's given keys and values they are computed like prompt tokens: a request's first
num_virtual_tokens KV positions are fed these rows instead of token embeddings (lanner.engine.model_runner)."""
import hashlib
from dataclasses import dataclass

import torch

from lanner.config import ModelConfig
from lanner.lora.adapter import LoRARequest


@dataclass(eq=False)
class PromptAdapter:
    """A validated adapter: its virtual tokens' input embeddings (fp32), and a digest of them that keys its virtual
    positions in the prefix cache (two adapters never share those blocks, nor what follows them)."""
    name: str
    id: int
    embeddings: torch.Tensor   # [P, hidden]
    digest: str

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]


def load_prompt(request: LoRARequest, config: dict, tensors: dict[str, torch.Tensor],
                cfg: ModelConfig) -> PromptAdapter:
    """PEFT saves `prompt_embeddings` [P, token_dim]: for P_TUNING the prompt encoder's (MLP or LSTM) output,
    evaluated at save (get_prompt_embedding_to_save), so both types load alike. PEFT runs the base model on
    cat(prompt_embeddings, embed_tokens(ids)) at positions 0..P+n-1 (the embedding scale of Gemma applied to both)."""
    path, kind = request.lora_path, config.get("peft_type")
    where = f"{kind.lower().replace('_', '-')} adapter {path}"
    num_virtual_tokens = config.get("num_virtual_tokens")
    if not isinstance(num_virtual_tokens, int) or isinstance(num_virtual_tokens, bool) or num_virtual_tokens < 1:
        raise ValueError(f"{where}: num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                         f"(an encoder-decoder prompt); only decoder-only models are served")
    if config.get("token_dim", cfg.hidden_size) != cfg.hidden_size:
        raise ValueError(f"{where}: token_dim={config['token_dim']!r}, but the base model's hidden size is "
                         f"{cfg.hidden_size} (wrong base model?)")
    rows = tensors.get("prompt_embeddings")
    if rows is None:
        raise ValueError(f"{where} has no 'prompt_embeddings' tensor (found: {sorted(tensors)[:5]})")
    expected = (num_virtual_tokens, cfg.hidden_size)
    if tuple(rows.shape) != expected:
        raise ValueError(f"{where}: prompt_embeddings has shape {tuple(rows.shape)}, expected {expected} "
                         f"(num_virtual_tokens, hidden size; wrong base model?)")
    rows = rows.float().contiguous()
    if not torch.isfinite(rows).all():
        raise ValueError(f"{where}: prompt_embeddings holds NaN or infinite values")
    digest = hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    return PromptAdapter(request.lora_name, request.lora_int_id, rows, digest)
