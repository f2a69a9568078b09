import contextlib
import os
from unittest import mock

import pytest
import torch

# The suite's oracles (HF transformers and PEFT on dequantized weights, a step equal to the same rows alone or
# recomputed after preemption) hold for the exact linears; the int8-activation default has tests of its own
# (test_ggml.py, test_quant.py, test_decode_step.py), which unset this.
os.environ.setdefault("LANNER_EXACT_LINEARS", "1")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors:\n1.",
    "Translate to French: Good morning, my friend.",
    "The quick brown fox jumps over",
    "1, 2, 3, 4, 5,",
    "<|im_start|>user\nWhat is LoRA?<|im_end|>\n<|im_start|>assistant\n",
]


@contextlib.contextmanager
def built_for_isa(isa: str, library):
    """A kernel library (an lru_cached loader) built for one instruction-set level this CPU runs (LANNER_ISA) in
    place of the best, for the duration."""
    library.cache_clear()
    try:
        with mock.patch.dict(os.environ, {"LANNER_ISA": isa}):
            yield isa
    finally:
        library.cache_clear()


@pytest.fixture(scope="session", autouse=True)
def load_each_model_once():
    """Tests build many engines over the same files: read and dequantize each model only once."""
    import functools

    import lanner.engine.engine as engine_module
    original = engine_module.load_model_files
    engine_module.load_model_files = functools.lru_cache(maxsize=4)(original)
    yield
    engine_module.load_model_files = original


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from lanner.model.loader import pull_default_model
    return pull_default_model()


@pytest.fixture(scope="session")
def default_files(default_model_path):
    from lanner.model.loader import load_model_files
    return load_model_files(default_model_path, dense=True)


def hf_model_from(config: dict, weights: dict):
    """HF transformers model holding exactly our dequantized weights: the oracle."""
    import transformers
    arch = config["architectures"][0]
    cfg_cls = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
               "MistralForCausalLM": transformers.MistralConfig}[arch]
    hf_cfg = cfg_cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    model = getattr(transformers, arch)(hf_cfg).float().eval()
    model.load_state_dict(weights, strict=False)
    if hf_cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.fixture(scope="session")
def hf_default(default_files):
    config, weights, _, _ = default_files
    return hf_model_from(config, weights)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, hf_default):
    """The default model as an HF directory written by the installed transformers (dense fp32 weights)."""
    from lanner.model.loader import pull_default_model
    from transformers import AutoTokenizer
    path = tmp_path_factory.mktemp("smollm2_hf")
    hf_default.save_pretrained(path)
    gguf = pull_default_model()
    AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf)).save_pretrained(path)
    return str(path)


def save_tiny_model(path, arch: str, config_class: str, tokenizer=None, seed: int = 0, weight_std: float | None = None,
                    dtype: torch.dtype = torch.float32, **config):
    """A random HF model of arch built and saved by the installed transformers (its own config.json), with
    the default model's tokenizer when given; weight_std redraws every parameter (norms too) from N(0, std);
    dtype: the checkpoint's (a bf16 one is what most hubs hold)."""
    import transformers
    vocab = {"vocab_size": tokenizer.vocab_size} if tokenizer is not None else {}
    config = getattr(transformers, config_class)(**{**vocab, **config})
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).float().eval()
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, weight_std)
    model.to(dtype).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.tokenizer.save(os.path.join(path, "tokenizer.json"))
    return model


def make_llm(model=None, **kwargs):
    from lanner import LLM
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("kv_cache_memory", 0.25)
    kwargs.setdefault("attention_backend", os.environ.get("LANNER_TEST_BACKEND", "auto"))
    return LLM(model, **kwargs)


@pytest.fixture(scope="session")
def llm(default_model_path):
    return make_llm(default_model_path)


def hf_greedy(model, token_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(token_ids):].tolist()


def assert_all_blocks_free(llm):
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks, f"{blocks.num_blocks - blocks.num_free_blocks} blocks leaked"
    states = llm.engine.runner.states
    if states is not None:
        assert len(states.free_running) == states.num_running, "state slots leaked"
        assert not states.pending and not states.scratch
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def hf_logits(model, ids):
    """Logits of every position from an HF / PEFT model."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(llm, ids, lora_request=None):
    """Logits of every position from lanner's serving path (paged cache, LoRA slots when enabled)."""
    from lanner.attention import AttentionMetadata
    engine = llm.engine
    lora = engine.runner.lora
    lora_id = engine.register_lora(lora_request) if lora_request else 0
    runner, n, bs = engine.runner, len(ids), engine.cfg.block_size
    meta = AttentionMetadata.build([n], [n], [list(range(-(-n // bs)))], list(range(n)))
    if lora is not None:
        lora.set_batch([lora_id] * n)
    with torch.no_grad():
        out = runner.model.compute_logits(runner.model(torch.tensor(ids), torch.arange(n), meta))
    if lora is not None:
        lora.set_batch([])
    return out
