"""GGUF files load to the right weights (types, shapes, q/k permutation) and bad files fail clearly."""
import numpy as np
import pytest
import torch
from conftest import hf_model_from, make_llm
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from lanner import SamplingParams
from lanner.model.gguf import load_gguf, unpermute
from lanner.quant.ggml import GGMLTensor

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0]
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
HEADS, KV_HEADS = 4, 2


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter layout for q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def write_tiny_gguf(path, tokenizer_reader, weights: dict, types, raw_override=None):
    """A 2-layer Llama GGUF, 2-D tensors cycling through `types`; returns the weights as stored (dequantized)."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2); w.add_context_length(256); w.add_embedding_length(64); w.add_feed_forward_length(128)
    w.add_head_count(HEADS); w.add_head_count_kv(KV_HEADS); w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6); w.add_vocab_size(weights["model.embed_tokens.weight"].shape[0])
    field = lambda k: tokenizer_reader.fields[k].contents()
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("smollm")
    w.add_token_list(field("tokenizer.ggml.tokens")); w.add_token_merges(field("tokenizer.ggml.merges"))
    w.add_token_types(field("tokenizer.ggml.token_type")); w.add_eos_token_id(2); w.add_bos_token_id(1)
    stored = {}
    for i, (name, tensor) in enumerate(weights.items()):
        data = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = permute(data, HEADS)
        elif name.endswith("k_proj.weight"):
            data = permute(data, KV_HEADS)
        qtype = types[i % len(types)] if data.ndim == 2 else Q.F32
        if raw_override and name in raw_override:
            w.add_tensor(gguf_name(name), *raw_override[name])
            continue
        packed = data if qtype == Q.F32 else quantize(data, qtype)
        w.add_tensor(gguf_name(name), packed, raw_shape=packed.shape if qtype == Q.F32 else None,
                     raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        back = dequantize(packed, qtype).reshape(data.shape) if qtype != Q.F32 else data
        if name.endswith("q_proj.weight"):
            back = unpermute(back, HEADS)
        elif name.endswith("k_proj.weight"):
            back = unpermute(back, KV_HEADS)
        stored[name] = torch.from_numpy(np.array(back, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_path, llm):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=llm.tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    weights = {k: v for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    stored = write_tiny_gguf(path, GGUFReader(default_model_path), weights, TYPES)
    return path, stored


def test_every_tensor_type_and_qk_layout_loads_exactly(tiny):
    path, stored = tiny
    config, weights, _ = load_gguf(str(path))
    assert config["num_attention_heads"] == HEADS and config["num_key_value_heads"] == KV_HEADS
    assert not config["tie_word_embeddings"]
    kept = {w.type_name for w in weights.values() if isinstance(w, GGMLTensor)}
    assert kept == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"}     # block formats stay as stored; F32 is dense
    for name, tensor in stored.items():
        weight = weights[name]
        assert torch.equal(weight.dequantize() if isinstance(weight, GGMLTensor) else weight, tensor), name


def test_tiny_gguf_generates_like_hf_on_the_same_weights(tiny):
    path, stored = tiny
    config, _, _ = load_gguf(str(path))
    hf = hf_model_from(config, stored)
    ours = make_llm(str(path), kv_cache_memory=0.01)
    ids = [5, 300, 42, 9, 1000]
    out = ours.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == want[0, len(ids):].tolist()


def test_unsupported_tensor_type_is_a_clear_error(tmp_path, default_model_path, tiny):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False)
    weights = dict(transformers.LlamaForCausalLM(cfg).state_dict())
    name = "model.layers.0.mlp.up_proj.weight"   # [128, 64]: two 18-byte IQ4_NL blocks per row
    raw = np.zeros((128, 36), dtype=np.uint8)
    write_tiny_gguf(tmp_path / "iq.gguf", GGUFReader(default_model_path), weights, [Q.F32],
                    raw_override={name: (raw, None, Q.IQ4_NL)})
    with pytest.raises(ValueError, match="unsupported GGUF type IQ4_NL"):
        load_gguf(str(tmp_path / "iq.gguf"))


def test_metadata_reads_like_the_gguf_package(default_model_path):
    """Our reader (no per-element numpy views) gives the gguf package's fields and tensor table."""
    from lanner.model.gguf import GGUFFile
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
