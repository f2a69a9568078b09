"""Mamba and Mamba-2 GGUF files as llama.cpp's converter writes them (conversion/mamba.py), and Bamba's (the hybrid,
written as conversion/granite.py's granitehybrid): a tiny random model saved by the installed transformers, exported
by gguf_export, reads back to the config transformers saved and its weights, and lanner runs it like HF (logits within
1e-4, greedy tokens identical); llama.cpp runs the same file like HF (the oracle that the export follows llama.cpp's
conventions); what lanner cannot represent, or inconsistent metadata, is refused clearly.

Observed with llama-cpp-python 0.3.36, F32 GGUF, 20 tokens in one batch: Mamba within 3.7e-6 and Mamba-2 within
5.2e-6 of HF's logits (up to ~4), with llama.cpp's default recurrent state (no settings needed). Bamba, with an fp32
KV cache, within 4.1e-6 of HF once its rotary pairs are llama.cpp's, and 2.5 away from HF itself: llama.cpp's Granite
hybrid ropes adjacent rows (NORM) over the first rope.dimension_count rows of heads the converter permuted whole, so
on a partial rotary it rotates HF's dims j and j + head_dim / 2, not HF's pairs j and j + rotary / 2. lanner undoes
the permutation and runs HF's Bamba."""
import copy
import json
import struct

import numpy as np
import pytest
import torch
from conftest import hf_greedy, hf_logits, make_llm, save_tiny_model
from gguf_export import write_gguf
from test_gguf import NOT_IN_GGUF, PAST_THE_WINDOWS, SPECIAL_TOKENS, assert_config_as_saved, assert_weights_as_saved
from test_mamba import MODELS as SSM_MODELS
from test_mamba import ssm_logits

from lanner import SamplingParams
from lanner.model.gguf import SCALARS, load_gguf
from lanner.quant.ggml import GGMLTensor, kernels

SHAPE = dict(vocab_size=49152, **SPECIAL_TOKENS)
BAMBA_HEAD_DIM = SSM_MODELS["bamba"][2]["hidden_size"] // SSM_MODELS["bamba"][2]["num_attention_heads"]   # 16
MAMBA_SHAPE = dict(hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, expand=2)
MODELS = {   # name: (HF architecture, config class, config)
    "mamba": ("MambaForCausalLM", "MambaConfig", dict(**MAMBA_SHAPE, time_step_rank=8)),
    "mamba2": ("Mamba2ForCausalLM", "Mamba2Config", dict(**MAMBA_SHAPE, num_heads=4, head_dim=32, n_groups=2,
                                                         chunk_size=8)),
    # test_mamba's hybrid (SSM, attention, SSM), with the attn_rotary_emb released Bamba checkpoints carry (half the
    # head, as BambaConfig rotates): the converter's rotary dims
    "bamba": ("BambaForCausalLM", "BambaConfig", dict(**SSM_MODELS["bamba"][2], attn_rotary_emb=BAMBA_HEAD_DIM // 2)),
}
GGUF_ARCH = {"mamba": "mamba", "mamba2": "mamba2", "bamba": "granitehybrid"}
# initialization and kernel choices, and Mamba-2's time_step_limit: llama.cpp clamps nothing, transformers' default
NOT_IN_MAMBA_GGUF = NOT_IN_GGUF | {"time_step_floor", "time_step_min", "time_step_max", "time_step_scale",
                                   "time_step_init_scheme", "rescale_prenorm_residual", "residual_in_fp32",
                                   "use_associative_scan", "use_mambapy", "chunk_size", "time_step_limit"}
# Bamba's kernel chunk, generation and training settings, its time_step_limit (as Mamba-2's), and attn_rotary_emb,
# which the file carries as rope.dimension_count (rope_parameters' partial_rotary_factor 0.5, all BambaConfig reads)
NOT_IN_BAMBA_GGUF = NOT_IN_GGUF | {"mamba_chunk_size", "num_logits_to_keep", "z_loss_coefficient", "time_step_limit",
                                   "attn_rotary_emb"}
NOT_IN_THE_GGUF = {"mamba": NOT_IN_MAMBA_GGUF, "mamba2": NOT_IN_MAMBA_GGUF, "bamba": NOT_IN_BAMBA_GGUF}
A_LOG_ROUNDING = 1e-6   # A_log -> -exp -> float32 -> log: a couple of float32 ulps
TOLERANCE = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
GGML_TYPE_F32 = 0


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


@pytest.fixture(scope="module")
def llama_cpp_prompt_logits(exports) -> dict:
    """name: llama.cpp's logits of every position of the prompt, on that architecture's GGUF."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = {}
    for name, (_, _, _, gguf_path) in exports.items():
        llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                              type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)   # the hybrid's KV: fp16 by default
        try:
            llm.eval(PAST_THE_WINDOWS)
            out[name] = np.array(llm.scores[:len(PAST_THE_WINDOWS)])
        finally:
            llm.close()
    return out


def test_config_has_the_keys_and_values_transformers_saved(exported):
    name, _, path, gguf_path = exported
    assert_config_as_saved(path, gguf_path, {}, NOT_IN_THE_GGUF[name])


def test_weights_equal_the_hf_state_dict(exported):
    _, model, _, gguf_path = exported
    assert_weights_as_saved(model, gguf_path, lambda key: A_LOG_ROUNDING if key.endswith(".A_log") else 0)


def test_lanner_runs_the_gguf_like_hf_logits_and_greedy(exported):
    _, model, _, gguf_path = exported
    ids = PAST_THE_WINDOWS
    want = hf_logits(model, ids)
    ours = make_llm(str(gguf_path), max_num_batched_tokens=7)   # prefill in 7-token chunks
    for chunk in (len(ids), 7):
        assert (ssm_logits(ours, ids, chunk) - want).abs().max() < TOLERANCE
    assert ours.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(model, ids, 12)


def test_llama_cpp_gives_hf_prompt_logits(exported, llama_cpp_prompt_logits):
    """Bamba against HF with llama.cpp's rotary pairs (see below): every other convention of the file is HF's."""
    name, model, _, _ = exported
    reference = rotating_as_llama_cpp_does(model) if name == "bamba" else model
    ids = PAST_THE_WINDOWS
    assert np.abs(llama_cpp_prompt_logits[name] - hf_logits(reference, ids).numpy()).max() < TOLERANCE


def test_llama_cpp_rotates_other_dims_than_hf_in_bambas_attention(exports, llama_cpp_prompt_logits):
    """llama.cpp's Bamba is not HF's where the rotary is partial (every Bamba): its converter permutes q/k rows over
    the whole head and llama.cpp ropes adjacent rows, so it pairs HF's dims j and j + head_dim / 2 where HF pairs j
    and j + rotary / 2. If this starts to fail, llama.cpp changed its convention, and the reader must follow it."""
    _, model, _, _ = exports["bamba"]
    assert np.abs(llama_cpp_prompt_logits["bamba"] - hf_logits(model, PAST_THE_WINDOWS).numpy()).max() > 0.1


def rotating_as_llama_cpp_does(model):
    """HF's Bamba with each attention head's q and k dims reordered so that its rotary pairs (j, j + rotary / 2) are
    the dims llama.cpp rotates: HF's j and j + head_dim / 2, for j < rotary / 2. The dims that do not rotate follow in
    any order: q . k does not see it."""
    config, twin = model.config, copy.deepcopy(model)
    head_dim = config.hidden_size // config.num_attention_heads
    half, rotated_half = head_dim // 2, head_dim // 4   # partial_rotary_factor 0.5
    rotated = [*range(rotated_half), *range(half, half + rotated_half)]
    order = rotated + [d for d in range(head_dim) if d not in rotated]
    with torch.no_grad():
        for i in config.attn_layer_indices:
            attention = twin.model.layers[i].self_attn
            for projection in (attention.q_proj, attention.k_proj):
                heads = projection.weight.view(-1, head_dim, config.hidden_size)
                projection.weight.copy_(heads[:, order].reshape(projection.weight.shape))
    return twin


@pytest.mark.skipif(kernels() is None, reason="no ggml kernels: matrices load dense")
def test_a_q8_0_export_keeps_the_matrices_as_blocks_and_runs_like_hf_on_them(exported, tmp_path,
                                                                              default_model_path):
    name, model, path, _ = exported
    write_gguf(path, tmp_path / "q8.gguf", default_model_path, dtype="Q8_0")
    weights = load_gguf(str(tmp_path / "q8.gguf"))[1]
    assert {key for key, w in weights.items() if isinstance(w, GGMLTensor)} == matrices_in_blocks(name, model)
    on_the_same_weights = copy.deepcopy(model)
    on_the_same_weights.load_state_dict(load_gguf(str(tmp_path / "q8.gguf"), dense=True)[1], strict=False)
    ids = PAST_THE_WINDOWS
    ours = make_llm(str(tmp_path / "q8.gguf"))
    assert (ssm_logits(ours, ids, len(ids)) - hf_logits(on_the_same_weights, ids)).abs().max() < TOLERANCE


def matrices_in_blocks(name: str, model) -> set[str]:
    """Mamba's embedding is dequantized (a plain nn.Embedding) and its dt_proj (8 columns, no whole Q8_0 block) is
    the converter's F16, too narrow for blocks; its head is tied. Bamba keeps every matrix in blocks, as Llama does."""
    if name == "bamba":
        return {key for key, w in model.state_dict().items() if w.dim() == 2}
    projections = ["in_proj", "x_proj", "out_proj"] if name == "mamba" else ["in_proj", "out_proj"]
    return {f"backbone.layers.{i}.mixer.{p}.weight" for i in range(2) for p in projections} | \
        ({"lm_head.weight"} if name == "mamba2" else set())


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
    *[(name, "ssm.inner_size", 192, r"blk.0.ssm_in.weight has shape \(\d+, 64\); the .*ssm.\* metadata says")
      for name in MODELS],
    *[(name, "ssm.time_step_rank", 3, "3 heads .* must divide inner_size 128") for name in ("mamba2", "bamba")],
    *[(name, "ssm.group_count", 3, "3 groups .* the heads") for name in ("mamba2", "bamba")],
    ("mamba", "ssm.dt_b_c_rms", True, "Falcon Mamba"),
    ("bamba", "rope.scaling.finetuned", False, "attention without rope"),
    ("bamba", "block_count", 2, r"head_count_kv \[0, 2, 0\]: want one count per layer \(2\)"),
])
def test_inconsistent_or_unsupported_metadata_is_a_clear_error(exports, tmp_path, name, key, value, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(exports[name][3].read_bytes())
    set_metadata(bad, f"{GGUF_ARCH[name]}.{key}", value)
    with pytest.raises(ValueError, match=message):
        load_gguf(str(bad))


@pytest.mark.parametrize("key, value, message", [
    ("attn_rotary_emb", None, f"rope.dimension_count {BAMBA_HEAD_DIM} is not half of head_dim {BAMBA_HEAD_DIM}"),
    ("embedding_multiplier", 12.0, "embedding_scale = 12.0: Granite's multipliers are not supported"),
    ("residual_multiplier", 0.22, "residual_scale = 0.22: "),
    ("logits_scaling", 8.0, "logit_scale = 8.0"),
    ("attention_multiplier", 0.0078125, r"attention.scale = 0.0078125: .* 1 / sqrt\(head_dim\) = "),
    ("num_local_experts", 4, "mixture-of-experts"),
    ("shared_intermediate_size", 128, "shared expert"),
])
def test_a_bamba_checkpoint_the_converter_writes_past_bambaconfig_is_refused(exports, tmp_path, default_model_path,
                                                                             key, value, message):
    """Granite's hybrids share the arch: their multipliers, experts or whole-head rotary (what the converter writes
    for a Bamba saved without attn_rotary_emb, as transformers saves one) have no BambaConfig key."""
    write_gguf(with_config(exports["bamba"][2], tmp_path, **{key: value}), tmp_path / "bad.gguf", default_model_path)
    with pytest.raises(ValueError, match=message):
        load_gguf(str(tmp_path / "bad.gguf"))


def test_neutral_granite_multipliers_read_as_bamba(exports, tmp_path, default_model_path):
    _, _, path, gguf_path = exports["bamba"]
    neutral = with_config(path, tmp_path, embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
                          attention_multiplier=BAMBA_HEAD_DIM ** -0.5)
    write_gguf(neutral, tmp_path / "neutral.gguf", default_model_path)
    assert load_gguf(str(tmp_path / "neutral.gguf"), dense=True)[0] == load_gguf(str(gguf_path), dense=True)[0]


def with_config(checkpoint, tmp_path, **changes):
    """A copy of the checkpoint (its weights linked) whose config.json has these keys changed (None: removed)."""
    copy_dir = tmp_path / "checkpoint"
    copy_dir.mkdir()
    config = {**json.loads((checkpoint / "config.json").read_text()), **changes}
    (copy_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    for weights in checkpoint.glob("*.safetensors"):
        (copy_dir / weights.name).symlink_to(weights)
    return copy_dir


def test_an_a_that_is_not_negative_is_refused(exported, tmp_path, default_model_path):
    """The converter stores A = -exp(A_log) < 0; anything else would read back as a NaN A_log."""
    _, model, _, _ = exported
    broken = copy.deepcopy(model)
    last = [name for name, _ in broken.named_parameters() if name.endswith(".A_log")][-1]
    with torch.no_grad():
        broken.get_parameter(last).fill_(float("nan"))
    broken.save_pretrained(tmp_path)
    write_gguf(tmp_path, tmp_path / "nan.gguf", default_model_path)
    layer = last.split(".layers.")[1].split(".")[0]
    with pytest.raises(ValueError, match=f"blk.{layer}.ssm_a holds values that are not negative"):
        load_gguf(str(tmp_path / "nan.gguf"))
