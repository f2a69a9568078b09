"""Mamba and Mamba-2 GGUF files as llama.cpp's converter writes them (conversion/mamba.py): a tiny random model saved
by the installed transformers, exported by gguf_export, reads back to the config transformers saved and its
weights, and lanner runs it like HF (logits within 1e-4, greedy tokens identical); llama.cpp runs the same file
like HF (the oracle that the export follows llama.cpp's conventions); inconsistent metadata is refused clearly.

Observed with llama-cpp-python 0.3.36, F32 GGUF, 20 tokens in one batch: Mamba within 3.7e-6 and Mamba-2 within
5.2e-6 of HF's logits (up to ~4), with llama.cpp's default recurrent state (no settings needed)."""
import copy
import struct

import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_logits, make_llm, save_tiny_model
from gguf_export import write_gguf
from test_gguf import NOT_IN_GGUF, PAST_THE_WINDOWS, SPECIAL_TOKENS, assert_config_as_saved
from test_mamba import ssm_logits

from lanner import SamplingParams
from lanner.model.gguf import SCALARS, load_gguf
from lanner.quant.ggml import GGMLTensor, kernels

SHAPE = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2,
             **SPECIAL_TOKENS)
MODELS = {   # name: (HF architecture, config class, config)
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(time_step_rank=8)),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", dict(num_heads=4, head_dim=32, n_groups=2, chunk_size=8)),
}
# initialization and kernel choices, and Mamba-2's time_step_limit: llama.cpp clamps nothing, transformers' default
NOT_IN_MAMBA_GGUF = NOT_IN_GGUF | {"time_step_floor", "time_step_min", "time_step_max", "time_step_scale",
                                   "time_step_init_scheme", "rescale_prenorm_residual", "residual_in_fp32",
                                   "use_associative_scan", "use_mambapy", "chunk_size", "time_step_limit"}
A_LOG_ROUNDING = 1e-6   # A_log -> -exp -> float32 -> log: a couple of float32 ulps
TOLERANCE = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, default_model_path) -> dict:
    """name: (name, HF model, its directory, its F32 GGUF) for each architecture."""
    out = {}
    for name, (arch, config_class, overrides) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        model = save_tiny_model(path, arch, config_class, weight_std=0.3, **SHAPE, **overrides)
        write_gguf(path, path / "model.gguf", default_model_path)
        out[name] = name, model, path, path / "model.gguf"
    return out


@pytest.fixture(params=list(MODELS))
def exported(request, exports):
    return exports[request.param]


def test_config_has_the_keys_and_values_transformers_saved(exported):
    _, _, path, gguf_path = exported
    assert_config_as_saved(path, gguf_path, {}, NOT_IN_MAMBA_GGUF)


def test_weights_equal_the_hf_state_dict(exported):
    _, model, _, gguf_path = exported
    weights = load_gguf(str(gguf_path), dense=True)[1]
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        del expected["lm_head.weight"]
    assert sorted(weights) == sorted(expected)
    for key, tensor in expected.items():
        atol = A_LOG_ROUNDING if key.endswith(".A_log") else 0
        torch.testing.assert_close(weights[key], tensor, rtol=0, atol=atol, msg=key)


def test_lanner_runs_the_gguf_like_hf_logits_and_greedy(exported):
    _, model, _, gguf_path = exported
    ids = PAST_THE_WINDOWS
    want = hf_logits(model, ids)
    ours = make_llm(str(gguf_path), max_num_batched_tokens=7)   # prefill in 7-token chunks
    for chunk in (len(ids), 7):
        assert (ssm_logits(ours, ids, chunk) - want).abs().max() < TOLERANCE
    assert ours.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(model, ids, 12)


def test_llama_cpp_gives_hf_prompt_logits(exported):
    llama_cpp = pytest.importorskip("llama_cpp")
    _, model, _, gguf_path = exported
    ids = PAST_THE_WINDOWS
    llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    assert np.abs(theirs - hf_logits(model, ids).numpy()).max() < TOLERANCE


@pytest.mark.skipif(kernels() is None, reason="no ggml kernels: matrices load dense")
def test_a_q8_0_export_keeps_the_projections_as_blocks_and_runs_like_hf_on_them(exported, tmp_path,
                                                                                  default_model_path):
    name, model, path, _ = exported
    write_gguf(path, tmp_path / "q8.gguf", default_model_path, dtype="Q8_0")
    weights = load_gguf(str(tmp_path / "q8.gguf"))[1]
    blocks = {key for key, w in weights.items() if isinstance(w, GGMLTensor)}
    # Mamba's dt_proj (8 columns, no whole Q8_0 block) is the converter's F16, too narrow for blocks; its head is tied
    projections = ["in_proj", "x_proj", "out_proj"] if name == "mamba" else ["in_proj", "out_proj"]
    assert blocks == {f"backbone.layers.{i}.mixer.{p}.weight" for i in range(2) for p in projections} | \
        ({"lm_head.weight"} if name == "mamba2" else set())
    assert isinstance(weights["backbone.embeddings.weight"], torch.Tensor)   # dequantized: a plain nn.Embedding
    on_the_same_weights = copy.deepcopy(model)
    on_the_same_weights.load_state_dict(load_gguf(str(tmp_path / "q8.gguf"), dense=True)[1], strict=False)
    ids = PAST_THE_WINDOWS
    ours = make_llm(str(tmp_path / "q8.gguf"))
    assert (ssm_logits(ours, ids, len(ids)) - hf_logits(on_the_same_weights, ids)).abs().max() < TOLERANCE


def set_metadata(path, key: str, value) -> None:
    """Rewrite one scalar metadata value in place (same type, so the layout stays)."""
    data = bytearray(path.read_bytes())
    name = struct.pack("<Q", len(key)) + key.encode()
    at = data.find(name) + len(name)
    kind, = struct.unpack_from("<I", data, at)
    struct.pack_into(SCALARS[kind], data, at + 4, value)
    path.write_bytes(data)


@pytest.mark.parametrize("name, key, value, message", [
    *[(name, "ssm.inner_size", 100, "inner_size 100 is not a multiple of .*embedding_length 64") for name in MODELS],
    *[(name, "ssm.inner_size", 192, r"ssm_in.weight has shape \(\d+, 64\); the .*ssm.\* metadata says")
      for name in MODELS],
    ("mamba2", "ssm.time_step_rank", 3, "3 heads .* must divide inner_size 128"),
    ("mamba2", "ssm.group_count", 3, "3 groups .* the heads"),
    ("mamba", "ssm.dt_b_c_rms", True, "Falcon Mamba"),
])
def test_inconsistent_or_unsupported_metadata_is_a_clear_error(exports, tmp_path, name, key, value, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(exports[name][3].read_bytes())
    set_metadata(bad, f"{name}.{key}", value)
    with pytest.raises(ValueError, match=message):
        load_gguf(str(bad))


def test_an_a_that_is_not_negative_is_refused(exported, tmp_path, default_model_path):
    """The converter stores A = -exp(A_log) < 0; anything else would read back as a NaN A_log."""
    _, model, _, _ = exported
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.backbone.layers[1].mixer.A_log.fill_(float("nan"))
    broken.save_pretrained(tmp_path)
    write_gguf(tmp_path, tmp_path / "nan.gguf", default_model_path)
    with pytest.raises(ValueError, match="blk.1.ssm_a holds values that are not negative"):
        load_gguf(str(tmp_path / "nan.gguf"))
