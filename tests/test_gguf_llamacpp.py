"""The oracle for tests/gguf_export.py: llama.cpp, running each GGUF it writes, gives HF transformers' prompt
logits on the same tiny model, so the writer (and the reader tested against it) follows llama.cpp's conventions.

Observed with llama-cpp-python 0.3.36, fp32 GGUF and fp32 KV cache, 20 tokens (past the windows of 8): Llama,
Mistral (against HF without its window, which the file does not carry), Qwen 2/3 and Phi-3 within 1.1e-6.
Gemma 2/3 within 6e-3 of logits up to ~9, because ggml's GELU goes through an fp16 table; with HF's GELU
rounded through fp16 the same way, within 1e-3."""
import numpy as np
import pytest
import torch
from test_gguf import DROPPED_BY_THE_CONVERTER, PAST_THE_WINDOWS, exported  # noqa: F401 (exported: a fixture)

llama_cpp = pytest.importorskip("llama_cpp")

TOLERANCE = 1e-4
GEMMA_TOLERANCE = 2e-3   # after rounding HF's GELU through fp16 as ggml does
GGML_TYPE_F32 = 0


class Fp16TableGelu(torch.nn.Module):
    """ggml's GELU: input and output rounded to fp16 (a lookup table over fp16 inputs)."""

    def forward(self, x):
        return torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()


def llama_cpp_logits(gguf_path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])
    finally:
        llm.close()


def reference_logits(name: str, model, ids: list[int]) -> np.ndarray:
    model.config.update(DROPPED_BY_THE_CONVERTER.get(name, {}))   # run as llama.cpp runs the file
    if name.startswith("gemma"):
        for layer in model.model.layers:
            layer.mlp.act_fn = Fp16TableGelu()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_llama_cpp_gives_hf_prompt_logits(exported):
    name, model, _, gguf_path = exported
    ids = PAST_THE_WINDOWS
    diff = np.abs(llama_cpp_logits(gguf_path, ids) - reference_logits(name, model, ids)).max()
    assert diff < (GEMMA_TOLERANCE if name.startswith("gemma") else TOLERANCE), name
