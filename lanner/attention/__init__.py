"""One attention interface over the paged KV cache; backends are chosen by name."""
import importlib

from lanner.attention.metadata import AttentionMetadata

BACKENDS = ("reference", "cpu", "triton")


def get_backend(name: str = "auto", device: str = "cpu"):
    """Module with store_kv(k, v, k_cache, v_cache, slot_mapping) and attention(q, k_cache, v_cache, meta)."""
    if name == "auto":
        name = "triton" if str(device).startswith("cuda") else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    module = {"reference": "lanner.attention.reference", "cpu": "lanner.attention.cpu",
              "triton": "lanner.attention.triton"}[name]
    return importlib.import_module(module)


__all__ = ["AttentionMetadata", "get_backend", "BACKENDS"]
