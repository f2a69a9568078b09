"""GGUF files -> HF-named torch weights, an HF-style config dict, tokenizer and chat template."""
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader
from gguf.quants import dequantize

SUPPORTED_TYPES = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k (its rotary pairs adjacent dims, HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader: GGUFReader) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHS)}")
    get = lambda key, default=None: field(reader, f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": [SUPPORTED_ARCHS[arch]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)), "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
    }
    if get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    return config


def tensor_to_torch(t, config: dict) -> torch.Tensor:
    if t.tensor_type not in SUPPORTED_TYPES:
        raise ValueError(f"tensor {t.name!r} has unsupported GGUF type {t.tensor_type.name}; "
                         f"supported: {sorted(q.name for q in SUPPORTED_TYPES)}")
    data = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    data = data.reshape([int(d) for d in reversed(t.shape)])   # GGUF lists the fastest dim first
    kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
    if kind == "attn_q":
        data = unpermute(data, config["num_attention_heads"])
    elif kind == "attn_k":
        data = unpermute(data, config["num_key_value_heads"])
    return torch.from_numpy(np.array(data, dtype=np.float32, order="C"))


def load_gguf(path: str) -> tuple[dict, dict[str, torch.Tensor], GGUFReader]:
    """(HF-style config, HF-named fp32 state dict, the reader for tokenizer metadata)."""
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on truncated/corrupt files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    config = read_config(reader)
    weights = {hf_name(t.name): tensor_to_torch(t, config) for t in reader.tensors
               if not t.name.startswith("rope_")}
    return config, weights, reader
