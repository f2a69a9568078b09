"""GGUF files -> an HF-style config dict, HF-named weights, and the metadata for the tokenizer.

The file is memory-mapped and read by our own parser: numeric arrays come out of the map with one numpy
call, and string arrays (the vocabulary and merges, ~100k strings) in a tight loop over a bytes object
(the gguf package builds a numpy view per element, seconds for one vocabulary). Weights in a block
format ggml.c multiplies with stay as they are in the file (GGMLTensor); the rest are dequantized.
"""
import struct

import numpy as np
import torch

from lanner.quant.ggml import BLOCKS, GGMLTensor, kernels

SUPPORTED_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DEQUANTIZED_AT_LOAD = ("Q2_K", "Q3_K")   # formats read through the gguf package's dequantize
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class TensorInfo:
    def __init__(self, name: str, shape: tuple, type_id: int, offset: int):
        self.name, self.shape, self.type_id, self.offset = name, shape, type_id, offset   # shape: fastest first

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class GGUFFile:
    """The metadata (`fields`) and tensor table of a GGUF file, over a memory map of it."""

    def __init__(self, path: str):
        self.map = np.fromfile(path, dtype=np.uint8)   # one sequential read: faster than faulting in a map
        self.pos = 0
        if bytes(self.map[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", self.map, 4)
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        self.pos = 24
        self.fields = {}
        for _ in range(n_fields):
            key = self.string()
            self.fields[key] = self.value(self.scalar("<I"))
        self.tensors = []
        for _ in range(n_tensors):
            name = self.string()
            dims = struct.unpack_from(f"<{self.scalar('<I')}Q", self.map, self.pos)
            self.pos += 8 * len(dims)
            type_id, offset = self.scalar("<I"), self.scalar("<Q")
            self.tensors.append(TensorInfo(name, dims, type_id, offset))
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def scalar(self, fmt: str):
        value, = struct.unpack_from(fmt, self.map, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return bytes(self.map[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            return self.scalar(SCALARS[kind])
        kind, count = self.scalar("<I"), self.scalar("<Q")
        if kind == STRING:
            return self.strings(count)
        if kind == ARRAY:
            return [self.value(ARRAY) for _ in range(count)]
        dtype = np.dtype(SCALARS[kind])
        values = np.frombuffer(self.map, dtype, count, self.pos)
        self.pos += dtype.itemsize * count
        return values.tolist()

    def strings(self, count: int) -> list[str]:
        raw, unpack = memoryview(self.map), struct.Struct("<Q").unpack_from
        out, at = [], self.pos
        for _ in range(count):
            n, = unpack(raw, at)
            at += 8 + n
            out.append(str(raw[at - n:at], "utf-8", "replace"))
        self.pos = at
        return out

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, [rows, row_bytes] (a view of the map)."""
        from gguf.constants import GGML_QUANT_SIZES
        from gguf import GGMLQuantizationType
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
        cols, rows = t.shape[0], int(np.prod(t.shape[1:], dtype=np.int64))
        start = self.data_start + t.offset
        size = rows * cols // block * nbytes
        if start + size > len(self.map):
            raise ValueError(f"tensor {t.name!r} runs past the end of the file (truncated?)")
        return self.map[start:start + size].reshape(rows, -1)


def field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{TOP_NAMES[parts[0]]}.{parts[1]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k (its rotary pairs adjacent dims, HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader: GGUFFile) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHS)}")
    get = lambda key, default=None: field(reader, f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"])
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


def row_order(t: TensorInfo, config: dict) -> np.ndarray | None:
    """The HF row order of an attn_q / attn_k weight (None for every other tensor)."""
    kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
    heads = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}.get(kind)
    return None if heads is None else unpermute(np.arange(t.shape[-1]), config[heads])


def load_tensor(reader: GGUFFile, t: TensorInfo, config: dict, dense: bool):
    """A GGMLTensor for a matrix ggml.c multiplies with (unless dense), else an fp32 torch tensor."""
    name = t.type_name
    if name not in BLOCKS and name not in DEQUANTIZED_AT_LOAD:
        raise ValueError(f"tensor {t.name!r} has unsupported GGUF type {name}; "
                         f"supported: {sorted(set(BLOCKS) | set(DEQUANTIZED_AT_LOAD))}")
    raw, order = reader.raw(t), row_order(t, config)
    shape = tuple(int(d) for d in reversed(t.shape))      # GGUF lists the fastest dim first
    if len(shape) == 2 and name in BLOCKS and name != "F32" and shape[1] % 32 == 0 and not dense:
        weight = GGMLTensor.from_numpy(name, shape, raw)
        return weight if order is None else weight.permute_rows(order)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    data = dequantize(raw, GGMLQuantizationType[name]).reshape(shape)
    if order is not None:
        data = data[order]
    return torch.from_numpy(np.array(data, dtype=np.float32, order="C"))


def load_gguf(path: str, dense: bool = False) -> tuple[dict, dict, GGUFFile]:
    """(HF-style config, HF-named weights, the file for tokenizer metadata). Matrices stay in their block
    format as GGMLTensors where ggml.c can multiply with them; `dense` (or no kernels) gives fp32 throughout."""
    try:
        reader = GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    config = read_config(reader)
    dense = dense or kernels() is None
    weights = {hf_name(t.name): load_tensor(reader, t, config, dense) for t in reader.tensors
               if not t.name.startswith("rope_")}
    return config, weights, reader
