"""A test helper: an HF checkpoint -> the GGUF file llama.cpp's convert_hf_to_gguf.py would write for it.

The conventions follow the converter (llama.cpp conversion/base.py, llama.py, qwen.py, gemma.py, phi.py):
tensor names through the gguf package's tensor map (as the converter maps them); q/k rows permuted only
for the llama architecture (its rotary pairs adjacent dims, the others' pair halves); Mistral written as
llama; Gemma norm weights stored as 1 + w; Phi-3's fused attn_qkv and gate+up ffn_up kept fused; Llama 3
rope scaling as a rope_freqs tensor and Phi-3 longrope as rope_factors_long/short. Mamba and Mamba-2 as
conversion/mamba.py writes them: no attention keys but the ssm.* ones, A stored as -exp(A_log), conv1d weights
squeezed to [channels, kernel], Mamba-2's A and D as [heads, 1], its gated norm as [groups, inner / groups] and
its dt_bias as ssm_dt.bias. Bamba as conversion/granite.py's GraniteHybridModel writes it (arch granitehybrid):
Llama's keys (rope.dimension_count the checkpoint's attn_rotary_emb, else the whole head), Mamba-2's ssm.* keys from
the mamba_* ones, attention.head_count_kv one per layer (0 marks an SSM layer), rope.scaling.finetuned true (rope on),
Granite's multipliers only where the config has them; the SSM layers' tensors as Mamba-2's, the attention layers' q/k
rows permuted over the whole head as for llama, though only half of it rotates. Tensor types as the converter picks
them: vectors, norms, conv1d weights and tensors not named .weight (A, D, biases) F32; a matrix whose rows are not
whole blocks of the asked type F16. The tokenizer is copied from another GGUF, so a tiny model's vocab_size must equal
that tokenizer's.
"""
import json
import math
import os
import tempfile
from itertools import cycle
from pathlib import Path

import numpy as np
from gguf import (MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFValueType, GGUFWriter, RopeScalingType,
                  get_tensor_name_map)
from gguf.quants import QuantError, quantize

from lanner.model.gguf import GEMMA3_SWA_PERIOD, GGUFFile, llama_cpp_query_pre_attn_scalar
from lanner.model.layers import longrope_attention_factor
from lanner.quant.ggml import iq_grid

GGUF_ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
              "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
              "Phi3ForCausalLM": "phi3", "MambaForCausalLM": "mamba", "Mamba2ForCausalLM": "mamba2",
              "BambaForCausalLM": "granitehybrid"}
SSM_ARCHS = ("mamba", "mamba2")
PERMUTED_QK = ("llama", "granitehybrid")   # LlamaModel.permute: GraniteHybridModel sets undo_permute
GRANITE_OPTIONAL_KEYS = {   # config key -> the GGUFWriter method the Granite hybrid's converter writes it with, if set
    "attention_multiplier": "add_attention_scale", "embedding_multiplier": "add_embedding_scale",
    "residual_multiplier": "add_residual_scale", "logits_scaling": "add_logit_scale",
    "num_local_experts": "add_expert_count", "num_experts_per_tok": "add_expert_used_count",
    "shared_intermediate_size": "add_expert_shared_feed_forward_length"}
MAMBA_CONTEXT_LENGTH = 2 ** 20   # the converter's placeholder: a state-space model has no context limit


def write_gguf(model, path, tokenizer_source_gguf: str, dtype="F32") -> None:
    """Write `model` (a save_pretrained directory, or a transformers model) as a GGUF at `path`. `dtype`: the
    type of every matrix, a list of types the matrices cycle through, or a function of a matrix's GGUF name that
    gives its type; vectors stay F32 as the converter keeps them. general.name is the directory's name, as the
    converter derives it."""
    if not isinstance(model, (str, os.PathLike)):
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / (Path(model.name_or_path).name or type(model).__name__)
            model.save_pretrained(directory)
            return write_gguf(directory, path, tokenizer_source_gguf, dtype)
    config, weights = read_checkpoint(Path(model))
    arch = GGUF_ARCHS[config["architectures"][0]]
    writer = GGUFWriter(str(path), arch)
    writer.add_name(Path(model).name)
    add_hparams(writer, arch, config)
    copy_tokenizer(writer, tokenizer_source_gguf)
    matrix_types = cycle([dtype] if isinstance(dtype, str) else [] if callable(dtype) else dtype)
    for name, data in gguf_tensors(arch, config, weights):
        type_name = (dtype(name) if callable(dtype) else next(matrix_types)) if quantizable(name, data) else "F32"
        add_tensor(writer, name, data, type_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_checkpoint(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file
    config = json.loads((path / "config.json").read_text())
    weights = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update({name: data.astype(np.float32) for name, data in load_file(file).items()})
    return config, weights


def rope_settings(config: dict) -> dict:
    """The full-attention rope parameters (Gemma 3 keeps one dict per layer type)."""
    params = config["rope_parameters"]
    return params.get("full_attention", params)


def add_hparams(writer: GGUFWriter, arch: str, config: dict) -> None:
    if arch in SSM_ARCHS:
        return add_ssm_hparams(writer, arch, config)
    if arch == "granitehybrid":
        return add_granite_hybrid_hparams(writer, config)
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    if config.get("head_dim") and arch != "phi3":
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch != "phi3":   # the Phi-3 converter writes its own rope keys, not the generic ones
        add_rope_scaling(writer, rope_settings(config))
    ARCH_HPARAMS.get(arch, lambda writer, config: None)(writer, config)


def add_ssm_hparams(writer: GGUFWriter, arch: str, config: dict) -> None:
    """The converter's keys for Mamba / Mamba-2: head count and feed-forward length 0 (llama.cpp requires the
    keys), Mamba-2's time_step_rank is its head count, and only an inner size of 2 * hidden_size is taken."""
    hidden, inner = config["hidden_size"], mamba_inner_size(config)
    writer.add_context_length(MAMBA_CONTEXT_LENGTH)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_ssm_conv_kernel(config.get("conv_kernel", 4))
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(config["state_size"])
    writer.add_layer_norm_rms_eps(config.get("layer_norm_epsilon", 1e-5))
    if arch == "mamba":
        writer.add_ssm_time_step_rank(config.get("time_step_rank") or -(-hidden // 16))
        writer.add_ssm_dt_b_c_rms(False)
    else:
        writer.add_ssm_time_step_rank(inner // config.get("head_dim", 64))
        writer.add_ssm_group_count(config.get("n_groups", 1))


def add_granite_hybrid_hparams(writer: GGUFWriter, config: dict) -> None:
    """The converter's keys for Bamba: Llama's (no head_dim: Granite drops it; the rotary dims are the checkpoint's
    attn_rotary_emb, else the whole head), the Granite multipliers and expert counts the config has, the mixers'
    ssm.* keys, and one KV head count per layer, 0 for an SSM layer."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    attention = set(config.get("attn_layer_indices") or ())
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    add_rope_scaling(writer, rope_settings(config))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("attn_rotary_emb") or hidden // heads)
    for key, add in GRANITE_OPTIONAL_KEYS.items():
        if config.get(key):
            getattr(writer, add)(config[key])
    add_granite_hybrid_mixer_hparams(writer, config)
    writer.add_head_count_kv([config["num_key_value_heads"] if i in attention else 0
                              for i in range(config["num_hidden_layers"])])
    writer.add_rope_scaling_finetuned(True)   # the converter's switch for rope: on for Bamba


def add_granite_hybrid_mixer_hparams(writer: GGUFWriter, config: dict) -> None:
    """Mamba-2's ssm.* keys from Bamba's mamba_* ones: time_step_rank is the head count."""
    inner = config["mamba_expand"] * config["hidden_size"]
    if config.get("hidden_act", "silu") != "silu" or inner % (config.get("mamba_d_head") or 64):
        raise ValueError("the converter takes silu and an SSM inner size that is a multiple of mamba_d_head only")
    writer.add_ssm_conv_kernel(config["mamba_d_conv"])
    writer.add_ssm_state_size(config["mamba_d_state"])
    writer.add_ssm_group_count(config["mamba_n_groups"])
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_time_step_rank(config["mamba_n_heads"])


def mamba_inner_size(config: dict) -> int:
    """The converter reads intermediate_size (which Mamba-2's config.json lacks: 2 * hidden_size assumed) and
    stops on any other expansion."""
    hidden = config["hidden_size"]
    inner = config.get("intermediate_size") or 2 * hidden
    if inner != 2 * hidden or inner != int(config.get("expand", 2) * hidden):
        raise ValueError(f"the converter takes Mamba models of inner size 2 * hidden_size only, not {inner}")
    return inner


def add_rope_scaling(writer: GGUFWriter, rope: dict) -> None:
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind not in ("default", "llama3"):   # llama3 travels as the rope_freqs tensor
        raise ValueError(f"the converter does not write rope type {kind!r}")


def llama_hparams(writer: GGUFWriter, config: dict) -> None:
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def gemma2_hparams(writer: GGUFWriter, config: dict) -> None:
    check_attention_scale(config, "gemma2")
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def gemma3_hparams(writer: GGUFWriter, config: dict) -> None:
    check_attention_scale(config, "gemma3")
    writer.add_rope_freq_base_swa(config["rope_parameters"]["sliding_attention"]["rope_theta"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])
    sliding = [kind == "sliding_attention" for kind in config["layer_types"]]
    if sliding != [i % GEMMA3_SWA_PERIOD < GEMMA3_SWA_PERIOD - 1 for i in range(len(sliding))]:
        # the converter writes no pattern (llama.cpp assumes every 6th layer full); llama.cpp reads this key
        writer.add_sliding_window_pattern(sliding)


def check_attention_scale(config: dict, arch: str) -> None:
    """llama.cpp derives Gemma's attention scale from the shape; a file cannot carry another one."""
    want = llama_cpp_query_pre_attn_scalar(arch, config["num_hidden_layers"], config["hidden_size"],
                                           config["num_attention_heads"], config["head_dim"])
    if config["query_pre_attn_scalar"] != want:
        raise ValueError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']}: llama.cpp uses {want} here")


def phi3_hparams(writer: GGUFWriter, config: dict) -> None:
    rope = config["rope_parameters"]
    writer.add_rope_dimension_count(rotary_dim(config))
    writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope.get("rope_type") == "longrope":
        original = config["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config["max_position_embeddings"] / original,
                                                                       original))


ARCH_HPARAMS = {"llama": llama_hparams, "gemma2": gemma2_hparams, "gemma3": gemma3_hparams, "phi3": phi3_hparams}


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rotary_dim(config: dict) -> int:
    return int(config["rope_parameters"].get("partial_rotary_factor", 1.0) * head_dim(config))


def copy_tokenizer(writer: GGUFWriter, source: str) -> None:
    for key, value in GGUFFile(source).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, value, value_type(value))


def value_type(value) -> GGUFValueType:
    if isinstance(value, int) and not isinstance(value, bool):
        return GGUFValueType.UINT32   # token ids: llama.cpp checks the stored type
    return GGUFValueType.get_type(value)


def gguf_tensors(arch: str, config: dict, weights: dict[str, np.ndarray]):
    """(GGUF name, data in the converter's layout) of every tensor, rope factor tensors included."""
    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    names = get_tensor_name_map(model_arch, config["num_hidden_layers"])
    for name, data in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch in SSM_ARCHS or ".mamba." in name:
            name, data = mamba_layout(arch, config, name, data)
        else:
            data = transformer_layout(arch, config, name, data)
        yield names.get_name(name, try_suffixes=(".weight", ".bias")), data
    if arch not in SSM_ARCHS:
        yield from rope_tensors(config)


def transformer_layout(arch: str, config: dict, name: str, data: np.ndarray) -> np.ndarray:
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if arch in PERMUTED_QK and ".q_proj." in name:
        return permute(data, heads)
    if arch in PERMUTED_QK and ".k_proj." in name:
        return permute(data, kv_heads)
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        return data + 1   # Gemma's RMSNorm scales by 1 + w; llama.cpp's by w
    return data


def mamba_layout(arch: str, config: dict, name: str, data: np.ndarray) -> tuple[str, np.ndarray]:
    """(the name the tensor map knows, the data as the converter stores it) of one Mamba / Mamba-2 tensor (Bamba's
    mixers are Mamba-2's)."""
    mamba2 = arch != "mamba"
    if name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    if name.endswith(".conv1d.weight"):
        data = data.squeeze(1)                          # [C, 1, K] -> [C, K]
    elif mamba2 and name.endswith((".A_log", ".D")):
        data = data.reshape(*data.shape, 1)             # [H] -> [H, 1]: Mamba-1's A layout, one state column
    elif mamba2 and name.endswith((".mixer.norm.weight", ".mamba.norm.weight")):
        groups = config.get("n_groups") or config.get("mamba_n_groups", 1)
        data = data.reshape(groups, -1)
    if name.endswith(".A_log"):
        data = -np.exp(data)                            # llama.cpp reads A itself
    return name, data


def quantizable(gguf_name: str, data: np.ndarray) -> bool:
    """The converter keeps vectors, norms, conv1d weights and tensors not named .weight (A, D, biases) F32."""
    return data.ndim == 2 and gguf_name.endswith(".weight") and not gguf_name.endswith(
        ("_norm.weight", "ssm_conv1d.weight"))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture (and Bamba's, its rotary partial or not): each head's two
    halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_tensors(config: dict):
    rope = rope_settings(config)
    if rope.get("rope_type") == "llama3":
        # the converter reads a top-level original_max_position_embeddings only (Llama 3 configs have none)
        original = config.get("original_max_position_embeddings", 8192)
        yield "rope_freqs.weight", llama3_factors(rope, head_dim(config), original)
    elif rope.get("rope_type") == "longrope":
        yield "rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32)
        yield "rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32)


def llama3_factors(rope: dict, dim: int, original: int) -> np.ndarray:
    """The per-frequency divisors the converter writes for Llama 3 rope scaling."""
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    wavelen = 2 * math.pi / inv_freq
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    smooth = (original / wavelen - low) / (high - low)
    return np.where(wavelen < original / high, 1.0,
                    np.where(wavelen > original / low, factor,
                             1 / ((1 - smooth) / factor + smooth))).astype(np.float32)


def add_tensor(writer: GGUFWriter, name: str, data: np.ndarray, type_name: str) -> None:
    qtype = GGMLQuantizationType[type_name]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
        return
    try:
        packed = quantized(data, qtype)
    except QuantError:   # rows that are not whole blocks: the converter falls back to F16
        qtype = GGMLQuantizationType.F16
        packed = quantize(data, qtype)
    writer.add_tensor(name, packed, raw_dtype=None if qtype == GGMLQuantizationType.F16 else qtype)


def quantized(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """data [rows, cols] in qtype's blocks: the gguf package's quantizer, and ours for the K-quants and i-quants (which it
    lacks; plain absmax scales, not llama.cpp's search, but blocks its dequantizer reads as llama.cpp's)."""
    ours = {GGMLQuantizationType.Q2_K: quantize_q2_k, GGMLQuantizationType.Q3_K: quantize_q3_k,
            GGMLQuantizationType.Q4_K: quantize_q4_k, GGMLQuantizationType.Q6_K: quantize_q6_k,
            GGMLQuantizationType.IQ4_NL: quantize_iq4_nl, GGMLQuantizationType.IQ4_XS: quantize_iq4_xs}
    if qtype.name in IQ_SCALES:
        ours[qtype] = lambda blocks: quantize_low_iq(blocks, qtype.name)
    if qtype not in ours:
        return quantize(data, qtype)
    block = 32 if qtype == GGMLQuantizationType.IQ4_NL else 256
    if data.shape[-1] % block:
        raise QuantError(f"rows of {data.shape[-1]} values are not whole blocks of {block}")
    return ours[qtype](data.reshape(-1, block).astype(np.float32)).reshape(*data.shape[:-1], -1)


def f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(np.float32)


def with_mins(sub: np.ndarray, levels: int, scale_levels: int):
    """Sub-blocks sub [n, subs, values] as w = d sc q - dmin m (absmax): d, dmin (f16 values) [n], sc, m [n, subs] in
    0..scale_levels, q in 0..levels."""
    mins = np.maximum(-sub.min(axis=2), 0)
    scales = (sub.max(axis=2) + mins) / levels
    d, dmin = f16(scales.max(axis=1) / scale_levels), f16(mins.max(axis=1) / scale_levels)
    sc = np.clip(np.round(scales / np.where(d > 0, d, 1)[:, None]), 0, scale_levels).astype(np.uint8)
    m = np.clip(np.round(mins / np.where(dmin > 0, dmin, 1)[:, None]), 0, scale_levels).astype(np.uint8)
    step = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.round((sub + (dmin[:, None] * m)[:, :, None]) / np.where(step > 0, step, 1)), 0, levels)
    return d, dmin, sc, m, np.where(step > 0, q, 0).astype(np.uint8)


def halves_f16(*values: np.ndarray) -> list[np.ndarray]:
    return [v.astype(np.float16)[:, None].view(np.uint8) for v in values]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Super-blocks x [n, 256] as Q4_K: d, dmin (f16), 12 bytes of 8 sub-blocks' 6-bit scales and mins, 128 bytes
    of 4-bit values (32-byte chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high ones); w = d sc q - dmin m."""
    d, dmin, sc, m, q = with_mins(x.reshape(-1, 8, 32), 15, 63)
    packed_scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                                    (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)
    values = (q[:, 0::2] | q[:, 1::2] << 4).reshape(-1, 128)
    return np.concatenate([*halves_f16(d, dmin), packed_scales, values], axis=1)


def two_bit_planes(q: np.ndarray) -> np.ndarray:
    """Values q [n, 256] of 0..3 as Q2_K / Q3_K keep their low 2 bits: 64 bytes, half h's byte l holding values
    128h + 32j + l at bits 2j."""
    q = q.reshape(-1, 2, 4, 32)
    return sum(q[:, :, j] << 2 * j for j in range(4)).astype(np.uint8).reshape(-1, 64)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """Super-blocks x [n, 256] as Q2_K: 16 bytes of sub-block (16 values) scales and mins (low and high nibble), 64
    of 2-bit values (two_bit_planes), d and dmin (f16); w = d sc q - dmin m."""
    d, dmin, sc, m, q = with_mins(x.reshape(-1, 16, 16), 3, 15)
    return np.concatenate([sc | m << 4, two_bit_planes(q.reshape(-1, 256)), *halves_f16(d, dmin)], axis=1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """Super-blocks x [n, 256] as Q3_K: 32 bytes of third bits (value 128h + 32j + l at bit 4h + j of byte l, set
    for q >= 0), 64 of low 2 bits (two_bit_planes), 12 of sub-block 6-bit scales (stored + 32: low nibbles in
    bytes 0-7, high bit pairs in bytes 8-11), d (f16); w = d sc q for q in -4..3."""
    sub = x.reshape(-1, 16, 16)
    scales = np.abs(sub).max(axis=2) / 4
    d = f16(scales.max(axis=1) / 31)
    sc = np.clip(np.round(scales / np.where(d > 0, d, 1)[:, None]), 0, 31).astype(np.int32)
    step = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.round(sub / np.where(step > 0, step, 1)), -4, 3)
    q = (np.where(step > 0, q, 0).astype(np.int32) + 4).reshape(-1, 256)   # 0..7
    high = (q >> 2).reshape(-1, 8, 32)   # [n, 4h + j, l]
    hmask = sum(high[:, k] << k for k in range(8)).astype(np.uint8)
    s = (sc + 32).astype(np.uint8)
    packed_scales = np.concatenate([(s[:, :8] & 15) | (s[:, 8:] & 15) << 4,
                                    sum(((s[:, 4 * k:4 * k + 4] >> 4) & 3) << 2 * k for k in range(4)).astype(np.uint8)],
                                   axis=1)
    return np.concatenate([hmask, two_bit_planes(q & 3), packed_scales, *halves_f16(d)], axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Super-blocks x [n, 256] as Q6_K: 128 bytes of low nibbles (half h's byte i: values 128h + i and 128h + 64 + i),
    64 of high bit pairs (half h's byte i: values 128h + 32k + i at bits 2k), 16 int8 scales of 16 values, d (f16);
    w = d scale (q - 32)."""
    groups = x.reshape(-1, 16, 16)
    scales = np.abs(groups).max(axis=2) / 31
    d = f16(scales.max(axis=1) / 127)
    sc = np.clip(np.round(scales / np.where(d > 0, d, 1)[:, None]), 0, 127).astype(np.int8)
    step = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.round(groups / np.where(step > 0, step, 1)) + 32, 0, 63)
    q = np.where(step > 0, q, 32).astype(np.uint8).reshape(-1, 2, 4, 32)   # [half, k, i]
    low = (q[:, :, :2] & 15) | (q[:, :, 2:] & 15) << 4                        # [half, 2, 32]: bytes i, 32 + i
    high = sum((q[:, :, k] >> 4) << 2 * k for k in range(4)).astype(np.uint8)  # [half, 32]
    return np.concatenate([low.reshape(-1, 128), high.reshape(-1, 64), sc.view(np.uint8), *halves_f16(d)], axis=1)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def iq4_indices(v: np.ndarray) -> np.ndarray:
    """Blocks v [..., 32] (in units of their step) as the 16 bytes of the nearest IQ4_VALUES' indices: value i in
    byte i's low nibble, value 16 + i in its high one."""
    i = np.abs(v[..., None] - IQ4_VALUES).argmin(axis=-1).astype(np.uint8)
    return i[..., :16] | i[..., 16:] << 4


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """Blocks x [n, 32] as IQ4_NL: d (f16), 16 bytes of indices into IQ4_VALUES; w = d IQ4_VALUES[i]."""
    d = f16(np.abs(x).max(axis=1) / 127)
    return np.concatenate([*halves_f16(d), iq4_indices(x / np.where(d > 0, d, 1)[:, None])], axis=1)


def quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    """Super-blocks x [n, 256] as IQ4_XS: d (f16), 2 bytes of the sub-blocks' high scale bits (bits 2j), 4 of their
    low nibbles (sub-block j's at nibble j), 8 sub-blocks of 16 index bytes; w = d (scale - 32) IQ4_VALUES[i]."""
    sub = x.reshape(-1, 8, 32)
    scales = np.abs(sub).max(axis=2) / 127
    d = f16(scales.max(axis=1) / 31)
    sc = np.clip(np.round(scales / np.where(d > 0, d, 1)[:, None]), 0, 31).astype(np.uint16)
    step = (d[:, None] * sc)[:, :, None]
    s = sc + 32
    high = sum((s[:, j] >> 4) << 2 * j for j in range(8)).astype(np.uint16)
    low = ((s[:, 0::2] & 15) | (s[:, 1::2] & 15) << 4).astype(np.uint8)
    values = iq4_indices(sub / np.where(step > 0, step, 1)).reshape(-1, 128)
    return np.concatenate([*halves_f16(d), high[:, None].view(np.uint8), low, values], axis=1)


def nearest(targets: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The grid entry nearest each row of targets [n, width] (squared distance)."""
    out = np.empty(len(targets), dtype=np.int64)
    for a in range(0, len(targets), 2048):
        out[a:a + 2048] = ((targets[a:a + 2048, None, :] - grid[None]) ** 2).sum(-1).argmin(-1)
    return out


def bits_of(flags: np.ndarray) -> np.ndarray:
    """Boolean rows [..., k] as integers, flag i at bit i."""
    return (flags.astype(np.int64) << np.arange(flags.shape[-1])).sum(-1)


def even_signs(x: np.ndarray) -> np.ndarray:
    """The signs (True: negative) of groups x [..., 8] with the least magnitude's flipped where the count is odd:
    the seven stored sign bits imply the eighth (ksigns)."""
    neg = x < 0
    odd = neg.sum(-1) % 2 == 1
    least = np.abs(x).argmin(-1)
    np.put_along_axis(neg, least[..., None], np.take_along_axis(neg, least[..., None], -1) ^ odd[..., None], -1)
    return neg


# per low i-quant: (the sub-block scale code written, the multiplier it stands for, the grid's largest value)
IQ_SCALES = {"IQ2_XXS": (15, 3.875, 43), "IQ2_XS": (15, 3.875, 43), "IQ2_S": (15, 3.875, 43),
             "IQ3_XXS": (15, 7.75, 62), "IQ3_S": (15, 31, 15), "IQ1_S": (7, 15, 1.125), "IQ1_M": (7, 15, 1.125)}


def quantize_low_iq(x: np.ndarray, name: str) -> np.ndarray:
    """Super-blocks x [n, 256] as a low i-quant: every sub-block at one scale code (IQ_SCALES), d from the block's
    absmax, each group of 8 the nearest grid entries to its magnitudes with its signs (IQ1: its values less the
    +1/8 delta, no signs). Not llama.cpp's search, but blocks its dequantizer reads as llama.cpp's."""
    n = len(x)
    sc, mult, top = IQ_SCALES[name]
    d = f16(np.abs(x).max(axis=1) / (top * mult))
    t = (x / np.where(d > 0, d * mult, 1)[:, None]).reshape(n, 32, 8)   # in grid units, groups of 8
    grid = iq_grid(name).astype(np.float32)
    u8 = lambda v: np.asarray(v).astype(np.uint8).reshape(n, -1)
    u16 = lambda v: np.asarray(v).astype("<u2").reshape(n, -1).view(np.uint8)
    u32 = lambda v: np.asarray(v).astype("<u4").reshape(n, -1).view(np.uint8)
    head = halves_f16(d)
    if name.startswith("IQ1"):
        idx = nearest((t - 0.125).reshape(-1, 8), grid).reshape(n, 8, 4)   # delta +1/8: its sign bits clear
        if name == "IQ1_S":
            qh = sum((idx[:, :, l] >> 8) << 3 * l for l in range(4)) + (sc << 12)   # the delta's sign clear
            return np.concatenate([*head, u8(idx & 255), u16(qh)], axis=1)
        nibbles = (idx >> 8).reshape(n, 16, 2)   # bit 3 (the delta's sign) clear
        bits = d.astype(np.float16).view(np.uint16).astype(np.int64)
        scales = [sc * 0o1111 + ((bits >> 4 * k & 15) << 12) for k in range(4)]
        return np.concatenate([u8(idx & 255), u8(nibbles[..., 0] | nibbles[..., 1] << 4), u16(np.stack(scales, 1))],
                              axis=1)
    neg = even_signs(t) if name in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS") else t < 0
    mags = np.abs(t)
    signs = bits_of(neg)                                                       # [n, 32]
    if name.startswith("IQ3"):
        idx = nearest(mags.reshape(-1, 4), grid).reshape(n, 8, 8)             # 8 entries a sub-block
        if name == "IQ3_XXS":
            aux = sum((signs.reshape(n, 8, 4)[:, :, l] & 127) << 7 * l for l in range(4)) + (sc << 28)
            return np.concatenate([*head, u8(idx), u32(aux)], axis=1)
        qh = bits_of((idx >> 8).astype(bool))
        return np.concatenate([*head, u8(idx & 255), u8(qh), u8(signs), u8(np.full((n, 4), sc * 17))], axis=1)
    idx = nearest(mags.reshape(-1, 8), grid).reshape(n, 32)
    scales = u8(np.full((n, 8), sc * 17))
    if name == "IQ2_XXS":
        groups, s7 = idx.reshape(n, 8, 4), (signs & 127).reshape(n, 8, 4)
        aux = sum(s7[:, :, l] << 7 * l for l in range(4)) + (sc << 28)
        return np.concatenate([*head, np.concatenate([u8(groups).reshape(n, 8, 4), u32(aux).reshape(n, 8, 4)],
                                                     axis=2).reshape(n, 64)], axis=1)
    if name == "IQ2_XS":
        return np.concatenate([*head, u16(idx | (signs & 127) << 9), scales], axis=1)
    qh = sum((idx.reshape(n, 8, 4)[:, :, l] >> 8) << 2 * l for l in range(4))
    return np.concatenate([*head, u8(idx & 255), u8(signs), u8(qh), scales], axis=1)
