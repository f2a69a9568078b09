"""GGUF files -> an HF-style config dict, HF-named weights, and the metadata for the tokenizer.

The file is memory-mapped and read by our own parser: numeric arrays come out of the map with one numpy
call, and string arrays (the vocabulary and merges, ~100k strings) in a tight loop over a bytes object
(the gguf package builds a numpy view per element, seconds for one vocabulary). Weights in a block
format ggml.c multiplies with stay as they are in the file (GGMLTensor); the rest are dequantized.

Files are read as llama.cpp's convert_hf_to_gguf.py writes them, and turned back into what the HF
checkpoint holds: the config keys the installed transformers writes in config.json for that architecture,
and the weights in HF's names and conventions (q/k rows un-permuted for the llama and granitehybrid architectures
only, Gemma norms minus the 1 the converter adds, Phi-3's fused qkv and gate+up kept fused).

Mamba and Mamba-2 (llama.cpp's conversion/mamba.py): the shape is in {arch}.ssm.* (conv_kernel, inner_size,
state_size, time_step_rank: Mamba-2's head count; group_count) and the attention keys are zeros. The converter
stores A = -exp(A_log) (read back as log(-A)), conv1d weights as [channels, kernel] (HF: [channels, 1, kernel]),
Mamba-2's A and D as [heads, 1], its gated norm as [groups, inner / groups] and its dt_bias as ssm_dt.bias; A and D
have no .weight suffix (blk.N.ssm_a, blk.N.ssm_d), as llama.cpp names them. The embedding is dequantized (Mamba's
is a plain nn.Embedding); the mixers' projections and the LM head may stay in blocks. transformers derives the
inner size as expand * hidden_size, so an inner size not a multiple of the hidden size is refused, as is Falcon
Mamba's dt/B/C norm (ssm.dt_b_c_rms).

Bamba (llama.cpp's conversion/granite.py writes it as the Granite hybrid, granitehybrid): Llama's keys and tensors in
the attention layers, Mamba-2's ssm.* keys and tensors in the others (read as Mamba-2's, in Bamba's names: mamba.*);
attention.head_count_kv has one count per layer, 0 marking an SSM layer (attn_layer_indices are the others). The
converter permutes q/k rows over the whole head as for llama, though only the first rope.dimension_count of it (the
checkpoint's attn_rotary_emb) rotates; we undo that. (llama.cpp then ropes adjacent rows there: HF's dims j and
j + head_dim / 2, not HF's pairs, so its Bamba attends otherwise than HF's.) Matrices, the embedding too, may stay in
blocks. BambaConfig fixes the rotary at half the head and has no Granite multipliers, experts or rope-less attention:
other rotary dims (the converter writes the whole head for a checkpoint without attn_rotary_emb), embedding, residual,
logit or attention scales that are not neutral, experts and rope.scaling.finetuned = false are refused.
"""
import math
import struct

import numpy as np
import torch

from lanner.model.layers import longrope_attention_factor
from lanner.quant.ggml import BLOCKS, GGMLTensor, kernels

ARCHITECTURES = {   # GGUF general.architecture -> (HF architecture, HF model_type)
    "llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"), "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"), "phi3": ("Phi3ForCausalLM", "phi3"),
}
SSM_ARCHITECTURES = {"mamba": ("MambaForCausalLM", "mamba"), "mamba2": ("Mamba2ForCausalLM", "mamba2")}
HYBRID_ARCHITECTURES = {"granitehybrid": ("BambaForCausalLM", "bamba")}   # llama.cpp converts Bamba as Granite's hybrid
ARCHITECTURES.update(SSM_ARCHITECTURES)
ARCHITECTURES.update(HYBRID_ARCHITECTURES)
MISTRAL = ("MistralForCausalLM", "mistral")   # the converter writes Mistral as llama; its name tells them apart
FLOATS = {0: ("F32", np.float32), 1: ("F16", np.float16), 30: ("BF16", np.uint16)}
# GGML type id -> (name, values a block, bytes a block) for the types read here: no import of the gguf package
# (70 ms) on the way to a model of these
GGML_TYPES = {type_id: (name, block, nbytes) for name, (type_id, block, nbytes) in BLOCKS.items()}
GGML_TYPES.update({type_id: (name, 1, np.dtype(dtype).itemsize) for type_id, (name, dtype) in FLOATS.items()})
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GEMMA_LAYER_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                     "post_ffw_norm": "post_feedforward_layernorm"}
BAMBA_LAYER_NAMES = {"ffn_gate": "feed_forward.gate_proj", "ffn_up": "feed_forward.up_proj",
                     "ffn_down": "feed_forward.down_proj", "ffn_norm": "pre_ff_layernorm"}
ARCH_LAYER_NAMES = {"gemma2": GEMMA_LAYER_NAMES, "gemma3": GEMMA_LAYER_NAMES, "granitehybrid": BAMBA_LAYER_NAMES,
                    "phi3": {"ffn_up": "mlp.gate_up_proj"}}   # Phi-3's ffn_up holds the gate rows, then up's
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ARCH_TOP_NAMES = {"granitehybrid": {"output_norm": "model.final_layernorm"}}
SSM_LAYER_NAMES = {   # GGUF name past blk.N. -> HF name past backbone.layers.N.
    "attn_norm.weight": "norm.weight", "ssm_in.weight": "mixer.in_proj.weight", "ssm_in.bias": "mixer.in_proj.bias",
    "ssm_conv1d.weight": "mixer.conv1d.weight", "ssm_conv1d.bias": "mixer.conv1d.bias",
    "ssm_x.weight": "mixer.x_proj.weight", "ssm_dt.weight": "mixer.dt_proj.weight",
    "ssm_dt.bias": "mixer.dt_proj.bias", "ssm_a": "mixer.A_log", "ssm_d": "mixer.D",
    "ssm_out.weight": "mixer.out_proj.weight", "ssm_out.bias": "mixer.out_proj.bias",
}
MAMBA2_LAYER_NAMES = {**SSM_LAYER_NAMES, "ssm_dt.bias": "mixer.dt_bias", "ssm_norm.weight": "mixer.norm.weight"}
BAMBA_MIXER_NAMES = {kind: name.replace("mixer.", "mamba.") for kind, name in MAMBA2_LAYER_NAMES.items()
                     if name.startswith("mixer.")}   # blk.N.ssm_* -> model.layers.N.mamba.*
SSM_TOP_NAMES = {"token_embd.weight": "backbone.embeddings.weight", "output_norm.weight": "backbone.norm_f.weight",
                 "output.weight": "lm_head.weight"}
# the matrices Mamba's Linears multiply (GGML blocks kept); its embedding is a plain nn.Embedding, dense
SSM_BLOCK_TENSORS = ("ssm_in.weight", "ssm_x.weight", "ssm_dt.weight", "ssm_out.weight", "output.weight")
PERMUTED_QK = ("llama", "granitehybrid")   # the converters that permute q/k rows (LlamaModel's undo_permute)
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")   # config, not weights
GEMMA3_SWA_PERIOD = 6   # llama.cpp's Gemma 3 default: every 6th layer full attention
LLAMA3_ASSUMED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class TensorInfo:
    def __init__(self, name: str, shape: tuple, type_id: int, offset: int):
        self.name, self.shape, self.type_id, self.offset = name, shape, type_id, offset   # shape: fastest first

    @property
    def type_name(self) -> str:
        if self.type_id in GGML_TYPES:
            return GGML_TYPES[self.type_id][0]
        from gguf import GGMLQuantizationType   # a type no path here reads: its name for the error
        try:
            return GGMLQuantizationType(self.type_id).name
        except ValueError:
            return f"type {self.type_id}"


class GGUFFile:
    """The metadata (`fields`) and tensor table of a GGUF file, over a memory map of it."""

    def __init__(self, path: str):
        # copy-on-write (never written): the page cache's pages mapped where read, 10 ms for the default model's
        # 98 MB where reading them into fresh memory took 115 ms
        self.map = np.memmap(path, dtype=np.uint8, mode="c")
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
        """count strings: their offsets walked one by one, their bytes then decoded at once, joined by NULs (each
        length's first byte zeroed, its other 7 dropped): 4x faster on a 49k vocabulary than a str() each."""
        raw, unpack = memoryview(self.map), struct.Struct("<Q").unpack_from
        starts, at = [], self.pos
        for _ in range(count):
            starts.append(at)
            at += 8 + unpack(raw, at)[0]
        region, heads = np.array(self.map[self.pos:at]), np.array(starts, dtype=np.int64) - self.pos
        self.pos = at
        region[heads] = 0
        keep = np.ones(len(region), dtype=bool)
        keep[(heads[:, None] + np.arange(1, 8)).ravel()] = False
        out = region[keep][1:].tobytes().decode("utf-8", "replace").split("\0") if count else []
        if len(out) == count:
            return out
        return [str(raw[a + 8:b], "utf-8", "replace") for a, b in zip(starts, starts[1:] + [at])]   # a NUL in one

    def raw(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, [rows, row_bytes] (a view of the map)."""
        _, block, nbytes = GGML_TYPES[t.type_id]
        cols, rows = t.shape[0], int(np.prod(t.shape[1:], dtype=np.int64))
        start = self.data_start + t.offset
        size = rows * cols // block * nbytes
        if start + size > len(self.map):
            raise ValueError(f"tensor {t.name!r} runs past the end of the file (truncated?)")
        return self.map[start:start + size].reshape(rows, -1)


def field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def f32(value) -> float:
    """A float32 metadata value as the shortest decimal that reads back as it (1e-06, not 9.99999997e-07):
    what the HF config held, the same number in float32 math."""
    return float(str(np.float32(value)))


def hf_name(gguf_name: str, arch: str) -> str:
    if arch in SSM_ARCHITECTURES:
        return ssm_hf_name(gguf_name, arch)
    parts = gguf_name.split(".")
    if arch in HYBRID_ARCHITECTURES and parts[0] == "blk" and parts[2].startswith("ssm_"):
        return mixer_hf_name(gguf_name, arch)
    if parts[0] == "blk":
        names, kind, prefix = {**LAYER_NAMES, **ARCH_LAYER_NAMES.get(arch, {})}, parts[2], f"model.layers.{parts[1]}."
    else:
        names, kind, prefix = {**TOP_NAMES, **ARCH_TOP_NAMES.get(arch, {})}, parts[0], ""
    if kind not in names:
        raise ValueError(f"unsupported tensor {gguf_name!r} in a {arch} GGUF")
    return f"{prefix}{names[kind]}.{parts[-1]}"


def ssm_hf_name(gguf_name: str, arch: str) -> str:
    block, _, rest = gguf_name.partition(".")
    layer, _, kind = rest.partition(".")
    names = MAMBA2_LAYER_NAMES if arch == "mamba2" else SSM_LAYER_NAMES
    if block == "blk" and kind in names:
        return f"backbone.layers.{layer}.{names[kind]}"
    if gguf_name in SSM_TOP_NAMES:
        return SSM_TOP_NAMES[gguf_name]
    raise ValueError(f"unsupported tensor {gguf_name!r} in a {arch} GGUF")


def mixer_hf_name(gguf_name: str, arch: str) -> str:
    """A hybrid's SSM layer tensor: Mamba-2's GGUF names, HF Bamba's (mamba.* in place of mixer.*)."""
    _, layer, kind = gguf_name.split(".", 2)
    if kind not in BAMBA_MIXER_NAMES:
        raise ValueError(f"unsupported tensor {gguf_name!r} in a {arch} GGUF")
    return f"model.layers.{layer}.{BAMBA_MIXER_NAMES[kind]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k (its rotary pairs adjacent dims, HF pairs halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_values(reader: GGUFFile, name: str) -> np.ndarray | None:
    """A small tensor's values (None when the file has none of that name)."""
    t = next((t for t in reader.tensors if t.name == name), None)
    return None if t is None else dequantized(reader.raw(t), t.type_id).reshape(-1)


def dequantized(raw: np.ndarray, type_id: int) -> np.ndarray:
    """A tensor's bytes [rows, row_bytes] as fp32 values [rows, cols]: float types converted here, block formats
    by the gguf package."""
    if type_id in FLOATS:
        values = raw.view(FLOATS[type_id][1])
        return (values.astype(np.uint32) << 16).view(np.float32) if type_id == 30 else values.astype(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(raw, GGMLQuantizationType(type_id))


def read_config(reader: GGUFFile) -> dict:
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    meta = lambda key, default=None: field(reader, f"{arch}.{key}", default)
    if arch in SSM_ARCHITECTURES:
        return ssm_config(reader, meta, arch)
    if arch in HYBRID_ARCHITECTURES:
        return bamba_config(reader, meta, arch)
    refuse_what_we_cannot_represent(meta, arch)
    mistral = arch == "llama" and "mistral" in str(field(reader, "general.name", "")).lower()
    hf_arch, model_type = MISTRAL if mistral else ARCHITECTURES[arch]
    heads, hidden = int(meta("attention.head_count")), int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    names = {t.name for t in reader.tensors}
    config = {
        "hidden_size": hidden, "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "rms_norm_eps": f32(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": rope_parameters(reader, meta, arch, head_dim, int(meta("context_length", 4096))),
        **file_keys(reader, hf_arch, model_type, names),
    }
    return {**config, **ARCH_KEYS[model_type](meta, config, head_dim, names)}


def file_keys(reader: GGUFFile, hf_arch: str, model_type: str, names: set) -> dict:
    """The config keys every architecture reads the same way: names, vocabulary, tied head, special tokens."""
    return {"architectures": [hf_arch], "model_type": model_type, "vocab_size": vocab_size(reader),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
            "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id")}


def ssm_config(reader: GGUFFile, meta, arch: str) -> dict:
    """MambaConfig's / Mamba2Config's keys (transformers writes no max_position_embeddings for them, and the
    converter's context_length is a placeholder)."""
    number = lambda key: required(meta, arch, key)
    hidden, inner = number("embedding_length"), number("ssm.inner_size")
    check_inner_size(arch, inner, hidden)
    if meta("ssm.dt_b_c_rms"):
        raise ValueError(f"{arch}.ssm.dt_b_c_rms (Falcon Mamba's RMS norm of dt, B and C) is not supported")
    hf_arch, model_type = SSM_ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    config = {
        "hidden_size": hidden, "expand": inner // hidden, "num_hidden_layers": number("block_count"),
        "state_size": number("ssm.state_size"), "conv_kernel": number("ssm.conv_kernel"),
        "layer_norm_epsilon": f32(meta("attention.layer_norm_rms_epsilon", 1e-5)), "hidden_act": "silu",
        "use_bias": "blk.0.ssm_in.bias" in names, "use_conv_bias": "blk.0.ssm_conv1d.bias" in names,
        **file_keys(reader, hf_arch, model_type, names),
    }
    rank = number("ssm.time_step_rank")
    config.update(mamba_keys(inner, rank) if arch == "mamba" else mamba2_keys(meta, config, inner, rank, arch))
    rows = 2 * inner if arch == "mamba" else mamba2_in_proj_rows(inner, config)
    check_in_proj(reader, rows, hidden, arch)
    return config


def check_inner_size(arch: str, inner: int, hidden: int) -> None:
    if inner % hidden:
        raise ValueError(f"{arch}.ssm.inner_size {inner} is not a multiple of {arch}.embedding_length {hidden}: "
                         f"transformers derives the inner size as expand * hidden_size")


def required(meta, arch: str, key: str) -> int:
    value = meta(key)
    if value is None:
        raise ValueError(f"the {arch} GGUF has no {arch}.{key}")
    return int(value)


def mamba_keys(inner: int, rank: int) -> dict:
    return {"intermediate_size": inner, "time_step_rank": rank}


def mamba2_keys(meta, config: dict, inner: int, heads: int, arch: str) -> dict:
    """llama.cpp's Mamba-2 time_step_rank is the head count; transformers' (unused by Mamba-2) is its "auto"."""
    groups = int(meta("ssm.group_count", 1))
    if heads <= 0 or inner % heads or heads % groups:
        raise ValueError(f"{arch}: {heads} heads ({arch}.ssm.time_step_rank) must divide inner_size {inner}, and "
                         f"{groups} groups ({arch}.ssm.group_count) the heads")
    return {"num_heads": heads, "head_dim": inner // heads, "n_groups": groups,
            "time_step_rank": math.ceil(config["hidden_size"] / 16)}


def mamba2_in_proj_rows(inner: int, mixer: dict) -> int:
    """Mamba-2's in_proj rows: z, x, B, C and dt."""
    return 2 * inner + 2 * mixer["n_groups"] * mixer["state_size"] + mixer["num_heads"]


def check_in_proj(reader: GGUFFile, rows: int, hidden: int, arch: str) -> None:
    """The metadata and the tensors agree (in_proj's rows: x and z, or z, x, B, C and dt), in the first SSM layer."""
    in_proj = next((t for t in reader.tensors if t.name.endswith(".ssm_in.weight")), None)
    if in_proj is None:
        raise ValueError(f"the {arch} GGUF has no blk.N.ssm_in.weight")
    shape = tuple(int(d) for d in reversed(in_proj.shape))
    if shape != (rows, hidden):
        raise ValueError(f"{in_proj.name} has shape {shape}; the {arch}.ssm.* metadata says ({rows}, {hidden})")


def bamba_config(reader: GGUFFile, meta, arch: str) -> dict:
    """BambaConfig's keys from llama.cpp's Granite hybrid: the attention layers are those with KV heads, the Mamba-2
    mixers' shape is in {arch}.ssm.* as for mamba2. What BambaConfig cannot express is refused: Granite's
    multipliers, experts, attention without rope, a rotary fraction other than the 0.5 it fixes."""
    refuse_what_we_cannot_represent(meta, arch)
    number = lambda key: required(meta, arch, key)
    hidden, heads, layers = number("embedding_length"), number("attention.head_count"), number("block_count")
    head_dim = bamba_head_dim(meta, arch, hidden, heads)
    refuse_granite_scales(meta, arch, head_dim)
    kv_heads = layer_kv_heads(meta, arch, layers)
    attention = [i for i, n in enumerate(kv_heads) if n]
    hf_arch, model_type = HYBRID_ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    config = {
        "hidden_size": hidden, "intermediate_size": number("feed_forward_length"), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads[attention[0]] if attention else heads,
        "attn_layer_indices": attention or None, "max_position_embeddings": int(meta("context_length", 262144)),
        "rms_norm_eps": f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_parameters": bamba_rope_parameters(reader, meta, arch, head_dim), "hidden_act": "silu",
        "attention_bias": any(name.endswith(".attn_q.bias") for name in names),
        "mlp_bias": "blk.0.ffn_up.bias" in names, **file_keys(reader, hf_arch, model_type, names),
    }
    return {**config, **bamba_mixer_keys(reader, meta, config, arch)}


def bamba_head_dim(meta, arch: str, hidden: int, heads: int) -> int:
    """Bamba's head size is hidden_size / heads (the Granite converter writes no key_length)."""
    head_dim = hidden // heads
    if int(meta("attention.key_length", head_dim)) != head_dim:
        raise ValueError(f"{arch}.attention.key_length {meta('attention.key_length')} is not embedding_length / "
                         f"head_count ({head_dim}): BambaForCausalLM has no other head size")
    return head_dim


def refuse_granite_scales(meta, arch: str, head_dim: int) -> None:
    """Granite's multipliers: absent in a Bamba conversion, and neutral ones (1, or 0 which llama.cpp skips) are
    fine; BambaForCausalLM has no place for others, nor for a shared expert."""
    for key in ("embedding_scale", "residual_scale", "logit_scale"):
        if meta(key) not in (None, 0.0, 1.0):
            raise ValueError(f"{arch}.{key} = {f32(meta(key))}: Granite's multipliers are not supported "
                             f"(BambaForCausalLM has none)")
    scale = meta("attention.scale")
    if scale and not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6):
        raise ValueError(f"{arch}.attention.scale = {f32(scale)}: BambaForCausalLM scales attention by "
                         f"1 / sqrt(head_dim) = {head_dim ** -0.5:.6g}, no other")
    if meta("expert_shared_feed_forward_length"):
        raise ValueError(f"a shared expert ({arch}.expert_shared_feed_forward_length) is not supported")


def layer_kv_heads(meta, arch: str, layers: int) -> list[int]:
    """The KV head count of every layer (0: an SSM layer); one count for all attention layers, as BambaConfig has."""
    kv = meta("attention.head_count_kv")
    kv = [int(n) for n in kv] if isinstance(kv, list) else [required(meta, arch, "attention.head_count_kv")] * layers
    if len(kv) != layers or len({n for n in kv if n}) > 1:
        raise ValueError(f"{arch}.attention.head_count_kv {kv}: want one count per layer ({layers}), 0 for an SSM "
                         f"layer and the same for every attention layer")
    return kv


def bamba_rope_parameters(reader: GGUFFile, meta, arch: str, head_dim: int) -> dict:
    """BambaConfig fixes partial_rotary_factor at 0.5: the file's rotary dims must be half the head. (The converter
    writes the checkpoint's attn_rotary_emb, or the whole head when it has none.)"""
    if meta("rope.scaling.finetuned", True) is False:
        raise ValueError(f"{arch}.rope.scaling.finetuned is false: attention without rope (Granite 4's hybrids) "
                         f"is not supported")
    rotary = int(meta("rope.dimension_count", head_dim))
    if 2 * rotary != head_dim:
        raise ValueError(f"{arch}.rope.dimension_count {rotary} is not half of head_dim {head_dim}: "
                         f"BambaForCausalLM rotates half of each head (partial_rotary_factor 0.5), no other part")
    if meta("rope.scaling.type", "none") != "none" or any(t.name in ROPE_TENSORS for t in reader.tensors):
        raise ValueError(f"rope scaling in a {arch} GGUF is not supported")
    return {"rope_theta": f32(meta("rope.freq_base", 10000.0)), "rope_type": "default", "partial_rotary_factor": 0.5}


def bamba_mixer_keys(reader: GGUFFile, meta, config: dict, arch: str) -> dict:
    """BambaConfig's mamba_* keys: Mamba-2's from the same ssm.* metadata, checked against the first SSM layer."""
    number = lambda key: required(meta, arch, key)
    hidden, inner = config["hidden_size"], number("ssm.inner_size")
    check_inner_size(arch, inner, hidden)
    mixer = {**mamba2_keys(meta, config, inner, number("ssm.time_step_rank"), arch),
             "state_size": number("ssm.state_size")}
    ssm_layers = [i for i in range(config["num_hidden_layers"]) if i not in (config["attn_layer_indices"] or ())]
    names = {t.name for t in reader.tensors}
    if ssm_layers:
        check_in_proj(reader, mamba2_in_proj_rows(inner, mixer), hidden, arch)
    first = f"blk.{ssm_layers[0] if ssm_layers else 0}"
    return {"mamba_n_heads": mixer["num_heads"], "mamba_d_head": mixer["head_dim"], "mamba_n_groups": mixer["n_groups"],
            "mamba_d_state": mixer["state_size"], "mamba_d_conv": number("ssm.conv_kernel"),
            "mamba_expand": inner // hidden, "mamba_conv_bias": f"{first}.ssm_conv1d.bias" in names,
            "mamba_proj_bias": f"{first}.ssm_in.bias" in names}


def vocab_size(reader: GGUFFile) -> int:
    """The embedding's rows: what the weights hold (the Gemma 3 converter drops padding rows)."""
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ValueError("the GGUF has no token_embd.weight")
    return int(embedding.shape[1])


def refuse_what_we_cannot_represent(meta, arch: str) -> None:
    if meta("expert_count"):
        raise ValueError(f"mixture-of-experts GGUF ({arch}.expert_count = {meta('expert_count')}) is not supported")
    if meta("attention.causal") is False:
        raise ValueError(f"non-causal attention ({arch}.attention.causal = false) is not supported")
    if meta("attention.value_length", meta("attention.key_length")) != meta("attention.key_length"):
        raise ValueError(f"{arch}.attention.value_length {meta('attention.value_length')} differs from "
                         f"key_length {meta('attention.key_length')}: not supported")


def rope_parameters(reader: GGUFFile, meta, arch: str, head_dim: int, context: int) -> dict:
    """transformers' rope_parameters: one dict, or for Gemma 3 one per layer type."""
    params = {"rope_theta": f32(meta("rope.freq_base", 10000.0)), "rope_type": "default"}
    params.update(rope_scaling(reader, meta, params["rope_theta"], head_dim, context))
    rotary = int(meta("rope.dimension_count", head_dim))
    if arch == "phi3":
        params["partial_rotary_factor"] = rotary / head_dim
    elif rotary != head_dim:
        raise ValueError(f"partial rotary ({arch}.rope.dimension_count {rotary} < head_dim {head_dim}) "
                         f"is not supported for {arch}")
    if arch == "gemma3":
        local = {"rope_theta": f32(meta("rope.freq_base_swa", 10000.0)), "rope_type": "default"}
        return {"full_attention": params, "sliding_attention": local}
    return params


def rope_scaling(reader: GGUFFile, meta, theta: float, head_dim: int, context: int) -> dict:
    """The scaling keys of rope_parameters, from the scaling metadata or the rope factor tensors."""
    freqs, long = tensor_values(reader, "rope_freqs.weight"), tensor_values(reader, "rope_factors_long.weight")
    if freqs is not None:
        return llama3_scaling(freqs, theta, head_dim)
    if long is not None:
        return longrope_scaling(meta, long, tensor_values(reader, "rope_factors_short.weight"), context)
    kind = meta("rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": f32(meta("rope.scaling.factor"))}
    if kind == "yarn":
        return yarn_scaling(meta)
    if kind != "none":
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: none, linear, yarn, llama3 "
                         f"(rope_freqs), longrope (rope_factors_long/short)")
    return {}


def llama3_scaling(freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    """llama.cpp keeps Llama 3 rope scaling as per-frequency divisors only. They fix the factor (the largest)
    but not low_freq_factor, high_freq_factor and original_max_position_embeddings apart: take the values the
    converter assumes (Llama 3.1 to 3.3's) and check that they give these divisors."""
    params = {"rope_type": "llama3", "factor": f32(freqs.max()), **LLAMA3_ASSUMED}
    if not np.allclose(llama3_divisors(params, theta, head_dim), freqs, rtol=1e-5, atol=0):
        raise ValueError(f"rope_freqs.weight is not llama3 rope scaling with {LLAMA3_ASSUMED}: not supported")
    return params


def llama3_divisors(params: dict, theta: float, head_dim: int) -> np.ndarray:
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    original, factor = params["original_max_position_embeddings"], params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth)))


def longrope_scaling(meta, long: np.ndarray, short: np.ndarray, context: int) -> dict:
    original = int(meta("rope.scaling.original_context_length", context))
    params = {"rope_type": "longrope", "original_max_position_embeddings": original,
              "long_factor": [f32(x) for x in long], "short_factor": [f32(x) for x in short]}
    default = longrope_attention_factor(context / original, original)   # what transformers assumes unset
    attention_factor = meta("rope.scaling.attn_factor", default)
    if not math.isclose(attention_factor, default, rel_tol=1e-6):
        params["attention_factor"] = f32(attention_factor)
    return params


def yarn_scaling(meta) -> dict:
    params = {"rope_type": "yarn", "factor": f32(meta("rope.scaling.factor")),
              "original_max_position_embeddings": int(meta("rope.scaling.original_context_length"))}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("yarn_attn_factor", "attention_factor")):
        if meta(f"rope.scaling.{key}") is not None:
            params[name] = f32(meta(f"rope.scaling.{key}"))
    return params


def sliding_window(meta) -> int | None:
    return int(meta("attention.sliding_window", 0)) or None


def llama_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    return {"head_dim": head_dim, "hidden_act": "silu", "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_up.bias" in names}


def mistral_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    return {"head_dim": head_dim, "hidden_act": "silu", "sliding_window": sliding_window(meta)}


def qwen2_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    """llama.cpp runs Qwen 2/3 with full attention in every layer (the converter writes no window)."""
    return {"hidden_act": "silu", "layer_types": ["full_attention"] * config["num_hidden_layers"],
            "sliding_window": None, "use_sliding_window": False}


def qwen3_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    return {**qwen2_keys(meta, config, head_dim, names), "head_dim": head_dim,
            "attention_bias": "blk.0.attn_q.bias" in names}


def gemma2_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    """llama.cpp's Gemma 2: a window on even layers (4096 unless given), softcaps 50 / 30 unless given."""
    sliding = [i % 2 == 0 for i in range(config["num_hidden_layers"])]
    return {**gemma_keys(config, head_dim, "gemma2", sliding),
            "sliding_window": int(meta("attention.sliding_window", 4096)),
            "attn_logit_softcapping": f32(meta("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": f32(meta("final_logit_softcapping", 30.0))}


def gemma3_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    window, softcap = sliding_window(meta), meta("final_logit_softcapping")
    sliding = gemma3_sliding_layers(meta, config["num_hidden_layers"], window)
    return {**gemma_keys(config, head_dim, "gemma3", sliding), "sliding_window": window, "attn_logit_softcapping": None,
            "final_logit_softcapping": f32(softcap) if softcap else None}


def gemma3_sliding_layers(meta, n_layers: int, window: int | None) -> list[bool]:
    """The file's per-layer pattern, or period, else llama.cpp's: every 6th layer full; none without a window."""
    if window is None:
        return [False] * n_layers
    pattern = meta("attention.sliding_window_pattern", GEMMA3_SWA_PERIOD)
    if isinstance(pattern, list):
        return [bool(x) for x in pattern[:n_layers]]
    return [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]


def gemma_keys(config: dict, head_dim: int, arch: str, sliding: list[bool]) -> dict:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    return {"head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
            "query_pre_attn_scalar": llama_cpp_query_pre_attn_scalar(arch, config["num_hidden_layers"], hidden,
                                                                     heads, head_dim),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding]}


def llama_cpp_query_pre_attn_scalar(arch: str, n_layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The file has no attention scale: llama.cpp divides by sqrt(head_dim), by sqrt(hidden / heads) for the
    27B models (the ones whose HF configs say so), which it knows by their layer count."""
    return hidden // heads if n_layers == {"gemma2": 46, "gemma3": 62}[arch] else head_dim


def phi3_keys(meta, config: dict, head_dim: int, names: set) -> dict:
    original = int(meta("rope.scaling.original_context_length", config["max_position_embeddings"]))
    return {"hidden_act": "silu", "original_max_position_embeddings": original,
            "sliding_window": sliding_window(meta)}


ARCH_KEYS = {"llama": llama_keys, "mistral": mistral_keys, "qwen2": qwen2_keys, "qwen3": qwen3_keys,
             "gemma2": gemma2_keys, "gemma3_text": gemma3_keys, "phi3": phi3_keys}


def row_order(t: TensorInfo, arch: str, config: dict) -> np.ndarray | None:
    """The HF row order of an attn_q / attn_k tensor the converter permuted (None for every other tensor). The Granite
    hybrid's converter permutes the whole head even where only part of it rotates, as for llama."""
    kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
    heads = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}.get(kind)
    return None if heads is None or arch not in PERMUTED_QK else unpermute(np.arange(t.shape[-1]), config[heads])


def load_tensor(reader: GGUFFile, t: TensorInfo, arch: str, config: dict, dense: bool):
    """A GGMLTensor for a matrix ggml.c multiplies with (unless dense), else an fp32 torch tensor."""
    name = t.type_name
    if name not in BLOCKS:
        raise ValueError(f"tensor {t.name!r} has unsupported GGUF type {name}; supported: {sorted(BLOCKS)}")
    raw, order = reader.raw(t), row_order(t, arch, config)
    shape = tuple(int(d) for d in reversed(t.shape))      # GGUF lists the fastest dim first
    mamba = arch in SSM_ARCHITECTURES or ".ssm_" in t.name
    # Mamba's embedding is a plain nn.Embedding; a mixer's conv, A, D and norm are no matrices ggml.c multiplies
    dense = dense or (mamba and not t.name.endswith(SSM_BLOCK_TENSORS))
    if len(shape) == 2 and name != "F32" and shape[1] % 32 == 0 and not dense:
        weight = GGMLTensor.from_numpy(name, shape, raw)
        return weight if order is None else weight.permute_rows(order)
    data = dequantized(raw, t.type_id).reshape(shape)
    if order is not None:
        data = data[order]
    if arch.startswith("gemma") and t.name.endswith("norm.weight"):
        data = data - 1   # the converter stores Gemma's 1 + w (llama.cpp scales by the weight itself)
    if mamba:
        data = mamba_hf_layout(t.name, data, arch)
    return torch.from_numpy(np.array(data, dtype=np.float32, order="C"))


def mamba_hf_layout(name: str, data: np.ndarray, arch: str) -> np.ndarray:
    """Undo the converter's Mamba transforms: A back to A_log, conv weights to [C, 1, K], Mamba-2's [H, 1] vectors
    and per-group norm flat (a hybrid's mixers are Mamba-2's)."""
    if name.endswith(".ssm_a"):
        if not (data < 0).all():
            raise ValueError(f"{name} holds values that are not negative: the converter stores A = -exp(A_log)")
        data = np.log(-data.astype(np.float64))
    if name.endswith("ssm_conv1d.weight"):
        return data[:, None, :]
    if arch != "mamba" and name.endswith((".ssm_a", ".ssm_d", ".ssm_norm.weight")):
        return data.reshape(-1)
    return data


def load_gguf(path: str, dense: bool = False) -> tuple[dict, dict, GGUFFile]:
    """(HF-style config, HF-named weights, the file for tokenizer metadata). Matrices stay in their block
    format as GGMLTensors where ggml.c can multiply with them; `dense` (or no kernels) gives fp32 throughout."""
    try:
        reader = GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, KeyError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    config = read_config(reader)
    arch = reader.fields["general.architecture"]
    dense = dense or kernels() is None
    weights = {hf_name(t.name, arch): load_tensor(reader, t, arch, config, dense) for t in reader.tensors
               if t.name not in ROPE_TENSORS}
    return config, weights, reader
