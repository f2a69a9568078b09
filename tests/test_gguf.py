"""GGUF files as llama.cpp's converter writes them load to what the HF checkpoint holds (config keys as the
installed transformers writes them, HF-named weights in HF conventions) for every supported architecture;
every tensor type loads exactly; bad files fail clearly."""
import json
import struct

import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_model_from, make_llm, our_logits, save_tiny_model
from test_decode_step import PROMPTS, both_paths
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from gguf_export import quantized, write_gguf

from lanner import SamplingParams, native
from lanner.model.gguf import GGUFFile, hf_name, load_gguf
from lanner.quant.ggml import GGMLTensor, kernels

SPECIAL_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)   # the default model's tokenizer's
SHAPE = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, **SPECIAL_TOKENS)
# name: (HF architecture, config class, config). The name becomes general.name: "mistral" in it marks a llama
# file as Mistral (as transformers reads it); "phi3" would make llama.cpp look for Phi-3's own tokens.
TINY = {
    "llama3.2": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_hidden_layers=2, head_dim=16, sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_hidden_layers=2)),
    "qwen2-yarn": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_hidden_layers=2, head_dim=32)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(   # llama.cpp's default pattern: 5 sliding, 1 full
        num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}})),
    "gemma3-layer-types": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    "phi-mini": ("Phi3ForCausalLM", "Phi3Config", dict(
        num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})),
    "phi-mini-longrope": ("Phi3ForCausalLM", "Phi3Config", dict(
        num_hidden_layers=2, max_position_embeddings=1024, original_max_position_embeddings=256,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 1.7, 2.9], "long_factor": [1.0, 2.0, 4.0, 8.0]})),
}
NOT_IN_GGUF = {"dtype", "transformers_version", "initializer_range", "attention_dropout", "embd_pdrop",
               "resid_pdrop", "use_cache", "pretraining_tp", "max_window_layers", "use_bidirectional_attention",
               "_sliding_window_pattern"}   # training and serialization settings; llama.cpp's Gemma is causal
DROPPED_BY_THE_CONVERTER = {"mistral": {"sliding_window": None}}   # written as llama, which has no window
PAST_THE_WINDOWS = [5, 300, 42, 9, 1000, 17, 2500, 77, 8, 640, 123, 4567, 33, 901, 12, 3000, 45, 6, 789, 21]
GEMMA_NORM_ROUNDING = 2 ** -23   # the converter stores 1 + w in float32: w loses its bits below 1's ulp


@pytest.fixture(scope="module", params=list(TINY))
def exported(request, tmp_path_factory, default_model_path):
    """(name, HF model, its directory, its F32 GGUF) of one architecture."""
    path = tmp_path_factory.mktemp(request.param)
    model = save_tiny(TINY[request.param], path)
    write_gguf(path, path / "model.gguf", default_model_path)
    return request.param, model, path, path / "model.gguf"


def save_tiny(spec: tuple, path):
    arch, config_class, overrides = spec
    return save_tiny_model(path, arch, config_class, weight_std=0.2, **{**SHAPE, **overrides})


def test_config_has_the_keys_and_values_transformers_saved(exported):
    name, _, path, gguf_path = exported
    assert_config_as_saved(path, gguf_path, DROPPED_BY_THE_CONVERTER.get(name, {}), NOT_IN_GGUF)


def assert_config_as_saved(path, gguf_path, dropped: dict, not_in_gguf: set) -> None:
    """The config read from the GGUF has transformers' keys and values (but those the converter drops)."""
    saved = json.loads((path / "config.json").read_text())
    config = load_gguf(str(gguf_path), dense=True)[0]
    want = {**saved, **dropped}
    wrong = {key: (value, want.get(key, "absent")) for key, value in config.items() if want.get(key, "absent") != value}
    assert wrong == {}   # key: (ours, transformers')
    assert set(saved) - set(config) <= not_in_gguf


def test_weights_equal_the_hf_state_dict(exported):
    name, model, _, gguf_path = exported
    gemma = name.startswith("gemma")
    assert_weights_as_saved(model, gguf_path, lambda key: GEMMA_NORM_ROUNDING if gemma and key.endswith("norm.weight")
                            else 0)


def assert_weights_as_saved(model, gguf_path, atol) -> None:
    """The weights read from the GGUF are the HF model's, each within atol(name)."""
    weights = load_gguf(str(gguf_path), dense=True)[1]
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert sorted(weights) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=atol(key), msg=key)


def test_lanner_runs_each_gguf_like_hf_logits_and_greedy(exported):
    name, model, _, gguf_path = exported
    if name in DROPPED_BY_THE_CONVERTER:
        model.config.update(DROPPED_BY_THE_CONVERTER[name])   # run as llama.cpp runs the file
    with torch.no_grad():
        want = model(torch.tensor([PAST_THE_WINDOWS])).logits[0]
    llm = make_llm(str(gguf_path), kv_cache_memory=0.01, max_num_batched_tokens=7)   # prefill in 7-token chunks
    assert (our_logits(llm, PAST_THE_WINDOWS) - want).abs().max() < 1e-4
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert llm.generate([PAST_THE_WINDOWS], params, use_tqdm=False)[0].outputs[0].token_ids == \
        hf_greedy(model, PAST_THE_WINDOWS, 12)


@pytest.mark.skipif(kernels() is None, reason="no ggml kernels: matrices load dense")
def test_a_q8_0_export_keeps_its_matrices_as_blocks(tmp_path, default_model_path):
    model = save_tiny(TINY["llama3.2"], tmp_path)
    write_gguf(tmp_path, tmp_path / "q8.gguf", default_model_path, dtype="Q8_0")
    weights = load_gguf(str(tmp_path / "q8.gguf"))[1]
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        weight = weights[key]
        if tensor.dim() == 2:
            assert isinstance(weight, GGMLTensor) and weight.type_name == "Q8_0", key
            want = dequantize(quantize(tensor.numpy(), Q.Q8_0), Q.Q8_0).reshape(tensor.shape)
            assert torch.equal(weight.dequantize(), torch.from_numpy(want)), key
        else:
            assert torch.equal(weight, tensor), key


TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]


@pytest.fixture(scope="module")
def mixed_types(tmp_path_factory, default_model_path):
    """A 2-layer Llama GGUF whose matrices cycle through TYPES; (its path, the weights as stored, dequantized)."""
    import transformers
    cfg = transformers.LlamaConfig(**SHAPE, num_hidden_layers=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path, default_model_path, dtype=TYPES)
    types = {hf_name(t.name, "llama"): t.type_name for t in GGUFFile(str(path)).tensors}
    assert set(types.values()) == set(TYPES)
    return path, {key: as_stored(tensor, types[key]) for key, tensor in model.state_dict().items()}


def as_stored(tensor: torch.Tensor, type_name: str) -> torch.Tensor:
    """The values a matrix keeps through quantization (q/k row permutation does not change any row)."""
    qtype = Q[type_name]
    data = tensor.numpy()
    back = data if qtype == Q.F32 else dequantize(quantized(data, qtype), qtype).reshape(data.shape)
    return torch.from_numpy(np.array(back, dtype=np.float32))


def test_every_tensor_type_and_qk_layout_loads_exactly(mixed_types):
    path, stored = mixed_types
    config, weights, _ = load_gguf(str(path))
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert not config["tie_word_embeddings"]
    kept = {w.type_name for w in weights.values() if isinstance(w, GGMLTensor)}
    if kernels() is not None:
        assert kept == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"}   # block formats stay as stored; F32 is dense
    for name, tensor in stored.items():
        weight = weights[name]
        assert torch.equal(weight.dequantize() if isinstance(weight, GGMLTensor) else weight, tensor), name


def test_tiny_gguf_generates_like_hf_on_the_same_weights(mixed_types):
    path, stored = mixed_types
    config, _, _ = load_gguf(str(path))
    hf = hf_model_from(config, stored)
    ours = make_llm(str(path), kv_cache_memory=0.01)
    ids = [5, 300, 42, 9, 1000]
    out = ours.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == want[0, len(ids):].tolist()


def test_unsupported_tensor_type_is_a_clear_error(tmp_path, mixed_types):
    path = tmp_path / "tq.gguf"
    path.write_bytes(mixed_types[0].read_bytes())
    set_tensor_type(path, "blk.0.ffn_up.weight", Q.TQ2_0)   # TQ2_0 blocks (ternary) are smaller: the data stays in bounds
    with pytest.raises(ValueError, match="unsupported GGUF type TQ2_0"):
        load_gguf(str(path))


def set_tensor_type(path, name: str, type_id: int) -> None:
    """Rewrite one tensor's type id in place. Its info (name, dims, type) follows the metadata, so it is the
    last match of the length-prefixed name."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.rfind(key) + len(key)
    n_dims, = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(data)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    writer = GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'bert'"):
        load_gguf(str(tmp_path / "bert.gguf"))


def test_llama3_rope_factors_other_than_the_converters_assumptions_are_refused(tmp_path, default_model_path):
    arch, config_class, config = TINY["llama3.2"]
    rope = {**config["rope_parameters"], "low_freq_factor": 2.0}
    save_tiny((arch, config_class, {**config, "rope_parameters": rope}), tmp_path)
    write_gguf(tmp_path, tmp_path / "odd.gguf", default_model_path)
    with pytest.raises(ValueError, match="rope_freqs.weight is not llama3 rope scaling"):
        load_gguf(str(tmp_path / "odd.gguf"))


def test_metadata_reads_like_the_gguf_package(default_model_path):
    """Our reader (no per-element numpy views) gives the gguf package's fields and tensor table."""
    ours, theirs = GGUFFile(default_model_path), GGUFReader(default_model_path)
    for key, f in ((k, f) for k, f in theirs.fields.items() if not k.startswith("GGUF.")):
        want = f.contents()
        assert ours.fields[key] == (want.tolist() if hasattr(want, "tolist") else want), key
    assert [(t.name, tuple(int(d) for d in t.shape), t.type_id) for t in ours.tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in theirs.tensors]


def test_a_truncated_file_is_a_clear_error(tmp_path, default_model_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(default_model_path, "rb").read()[:50_000_000])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(str(cut))
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_gguf(str(tmp_path / "junk.gguf"))


@pytest.mark.parametrize("with_nul", [False, True])
def test_string_arrays_decode_each_string_alone(tmp_path, with_nul):
    """The reader decodes a string array's bytes at once, joined by NULs: invalid UTF-8 at a string's end stays
    that string's replacement character, and an array holding a NUL is still read string by string."""
    raw = [b"Hello", b"\xe2\x82", b"\xac", b"", b"caf\xc3\xa9", b"\xffZ"] + ([b"a\x00b"] if with_nul else [])
    placeholders = [f"{i:0{len(r)}d}"[:len(r)] if r else "" for i, r in enumerate(raw)]
    writer = GGUFWriter(str(tmp_path / "s.gguf"), "llama")
    writer.add_array("test.strings", placeholders)
    writer.add_uint32("test.after", 7)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    data = (tmp_path / "s.gguf").read_bytes()
    start = data.index(struct.pack("<Q", len(raw[0])) + placeholders[0].encode())
    body = b"".join(struct.pack("<Q", len(r)) + p.encode() for r, p in zip(raw, placeholders))
    (tmp_path / "s.gguf").write_bytes(data[:start] + b"".join(struct.pack("<Q", len(r)) + r for r in raw)
                                      + data[start + len(body):])
    fields = GGUFFile(str(tmp_path / "s.gguf")).fields
    assert fields["test.strings"] == [str(r, "utf-8", "replace") for r in raw]
    assert fields["test.after"] == 7


# llama.cpp's Q4_K_M mix at widths of 256 (its v and down Q6_K beside Q4_K), and an up beside its Q4_K gate
K_MIX = {"attn_v": "Q6_K", "ffn_up": "Q6_K", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q8_0"}


@pytest.fixture(scope="module")
def k_quant_mix(tmp_path_factory, default_model_path):
    """A 2-layer Llama GGUF of K-quants (hidden 256): Q4_K q, k, o, gate beside Q6_K v, up, down; (its path, the
    weights as stored, dequantized)."""
    import transformers
    cfg = transformers.LlamaConfig(**{**SHAPE, "hidden_size": 256, "intermediate_size": 512}, num_hidden_layers=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("gguf") / "k-mix.gguf"
    write_gguf(model, path, default_model_path, dtype=lambda name: next(
        (t for key, t in K_MIX.items() if key in name), "Q4_K"))
    types = {hf_name(t.name, "llama"): t.type_name for t in GGUFFile(str(path)).tensors}
    assert {types["model.layers.0.self_attn.q_proj.weight"], types["model.layers.0.self_attn.v_proj.weight"]} == {
        "Q4_K", "Q6_K"}
    return path, {key: as_stored(tensor, types[key]) for key, tensor in model.state_dict().items()}


def test_k_quant_mixes_multiply_as_parts_and_generate_like_hf(k_quant_mix):
    """Fused weights of K-quants no one format holds (Q4_K q, k beside a Q6_K v) stay blocks, one linear a format,
    and greedy tokens are HF's on the same weights; the one-call decode step takes them."""
    path, stored = k_quant_mix
    config, _, _ = load_gguf(str(path))
    ours = make_llm(str(path), kv_cache_memory=0.01)
    model = ours.engine.runner.model
    for fused in (model.layers[0].self_attn.qkv_proj, model.layers[1].mlp.gate_up_proj):
        assert [p.weight.type_name for p in fused.quantized.parts] == ["Q4_K", "Q6_K"]
    assert model.decode_step is not None
    ids = [5, 300, 42, 9, 1000]
    out = ours.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf_model_from(config, stored), ids, 8)


def mixed_llama(path, default_model_path, mix: dict, default_type: str):
    """A random 2-layer Llama (hidden 256: whole super-blocks) written to path with each tensor in the type of the
    first key of mix its name holds (else default_type): the path, its config and the weights as stored."""
    import transformers
    cfg = transformers.LlamaConfig(**{**SHAPE, "hidden_size": 256, "intermediate_size": 512}, num_hidden_layers=2,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    write_gguf(model, path, default_model_path,
               dtype=lambda name: next((t for k, t in mix.items() if k in name), default_type))
    types = {hf_name(t.name, "llama"): t.type_name for t in GGUFFile(str(path)).tensors}
    stored = {key: as_stored(tensor, types[key]) for key, tensor in model.state_dict().items()}
    return path, load_gguf(str(path))[0], stored


def assert_greedy_like_hf(ours, config: dict, stored: dict) -> None:
    """A prompt past the kernel's 16 rows (so its step takes the large-batch path) and 8 greedy tokens: HF's."""
    ids = [5, 300, 42, 9, 1000, 7, 77, 123, 4, 8, 15, 16, 23, 42, 99, 512, 3, 1]
    out = ours.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf_model_from(config, stored), ids, 8)


def test_2_and_3_bit_k_quants_stay_blocks_and_generate_like_hf(tmp_path, default_model_path):
    """Q3_K and Q2_K (llama.cpp's Q3_K_M / Q2_K files) stay GGML blocks in memory, big steps included (no dense
    copy: they dequantize rows per call), and greedy tokens are HF's on the same weights."""
    mix = {"attn_v": "Q2_K", "ffn_down": "Q2_K", "token_embd": "Q3_K", "output": "Q8_0"}
    path, config, stored = mixed_llama(tmp_path / "q3-mix.gguf", default_model_path, mix, "Q3_K")
    ours = make_llm(str(path), kv_cache_memory=0.01)
    layer = ours.engine.runner.model.layers[0]
    assert [p.weight.type_name for p in layer.self_attn.qkv_proj.quantized.parts] == ["Q3_K", "Q2_K"]
    down = layer.mlp.down_proj.quantized
    assert down.weight.type_name == "Q2_K" and down.dense is None and down.dense_dtype is None
    assert_greedy_like_hf(ours, config, stored)
    assert down.dense is None   # the prompt's step dequantized per call


def test_iq4_formats_stay_blocks_and_generate_like_hf(tmp_path, default_model_path, monkeypatch):
    """IQ4_XS and IQ4_NL (llama.cpp's 4-bit i-quants; its files keep IQ4_NL where rows are not whole super-blocks)
    stay GGML blocks packed for the int8 kernel: greedy tokens are HF's on the same weights, and on int8 rows the
    one-call step's are the PyTorch path's."""
    mix = {"attn_v": "IQ4_NL", "ffn_down": "IQ4_NL", "output": "Q8_0"}
    path, config, stored = mixed_llama(tmp_path / "iq4-mix.gguf", default_model_path, mix, "IQ4_XS")
    ours = make_llm(str(path), kv_cache_memory=0.01)
    layer = ours.engine.runner.model.layers[0]
    assert [p.weight.type_name for p in layer.self_attn.qkv_proj.quantized.parts] == ["IQ4_XS", "IQ4_NL"]
    down, up = layer.mlp.down_proj.quantized, layer.mlp.gate_up_proj.quantized
    assert (down.weight.type_name, up.weight.type_name) == ("IQ4_NL", "IQ4_XS")
    assert (down.packed is not None, up.packed is not None) == (native.isa() != "scalar",) * 2   # (no packed path)
    assert_greedy_like_hf(ours, config, stored)
    monkeypatch.setenv("LANNER_EXACT_LINEARS", "0")
    lean, torch_path = both_paths(make_llm(str(path), kv_cache_memory=0.01, enable_prefix_caching=False), PROMPTS)
    assert lean == torch_path


def test_low_iq_formats_stay_blocks_and_generate_like_hf(tmp_path, default_model_path, monkeypatch):
    """The i-quants below 4 bits (IQ1_S .. IQ3_S: lattice grids), all seven in one model as llama.cpp's IQ mixes
    put them side by side, stay GGML blocks (no dense copy for big steps either): greedy tokens are HF's on the same
    weights, and on int8 rows the one-call step's are the PyTorch path's."""
    mix = {"attn_q": "IQ2_XS", "attn_k": "IQ2_S", "attn_v": "IQ3_S", "ffn_gate": "IQ1_S", "ffn_down": "IQ1_M",
           "token_embd": "IQ3_XXS", "output": "Q8_0"}
    path, config, stored = mixed_llama(tmp_path / "iq-low-mix.gguf", default_model_path, mix, "IQ2_XXS")
    ours = make_llm(str(path), kv_cache_memory=0.01)
    layer = ours.engine.runner.model.layers[0]
    assert [p.weight.type_name for p in layer.self_attn.qkv_proj.quantized.parts] == ["IQ2_XS", "IQ2_S", "IQ3_S"]
    assert [p.weight.type_name for p in layer.mlp.gate_up_proj.quantized.parts] == ["IQ1_S", "IQ2_XXS"]
    down = layer.mlp.down_proj.quantized
    assert down.weight.type_name == "IQ1_M" and down.packed is None and down.dense_dtype is None
    assert_greedy_like_hf(ours, config, stored)
    assert down.dense is None   # the prompt's step dequantized per call
    monkeypatch.setenv("LANNER_EXACT_LINEARS", "0")
    lean, torch_path = both_paths(make_llm(str(path), kv_cache_memory=0.01, enable_prefix_caching=False), PROMPTS)
    assert lean == torch_path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_k_quant_mixes_in_the_decode_step_equal_the_pytorch_path(k_quant_mix, dtype, monkeypatch):
    """The one-call step's chained parts (fused.c's matmul_parts) give bitwise the PyTorch path's tokens and
    logprobs, on int8 activations, from 1 row to past the AMX tiles' 16."""
    monkeypatch.setenv("LANNER_EXACT_LINEARS", "0")
    ours = make_llm(str(k_quant_mix[0]), dtype=dtype, kv_cache_memory=0.02, enable_prefix_caching=False)
    for prompts in (PROMPTS[:1], PROMPTS * 7):
        lean, torch_path = both_paths(ours, prompts)
        assert lean == torch_path
    assert len({tuple(ids) for ids, _ in lean}) > 1


def test_dense_loading_dequantizes_every_type_exactly(mixed_types):
    """F16 and BF16 converted here, the block formats by the gguf package: the values stored."""
    path, stored = mixed_types
    _, weights, _ = load_gguf(str(path), dense=True)
    for name, tensor in stored.items():
        assert isinstance(weights[name], torch.Tensor) and torch.equal(weights[name], tensor), name
