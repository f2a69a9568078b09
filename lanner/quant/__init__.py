"""Weight formats: GGML blocks (GGUF's, or HF weights quantized at load) and NF4 (QLoRA's 4-bit base)."""


def quantize_linear(weight, bias, mode: str):
    """A callable x -> x @ weight.T + bias computed from `mode`-quantized weights."""
    if mode == "nf4":
        from lanner.quant.nf4 import quantize_linear_nf4
        return quantize_linear_nf4(weight, bias)
    from lanner.quant.ggml import quantize_linear as ggml_linear
    return ggml_linear(weight, bias, mode)


def head_format(quantization: str) -> str:
    """The LM head's format at load: int8 activations' error flips near ties of the logits themselves ("The" vs "L'"
    for France's capital), so the head stays dense unless the format multiplies exact activations (bf16)."""
    from lanner.quant.ggml import EXACT_FORMATS
    return quantization if quantization in EXACT_FORMATS else "none"


def resolve_quantization(quantization: str, model, device: str) -> str:
    """The format `quantization="auto"` (the default) stands for in this model: "bf16" where every dense linear
    holds bf16 values (a bf16 checkpoint, as most on the hub are, or any model run in bf16) and has a multiple of
    32 inputs, on the CPU with the kernels built: the same weights as GGML BF16 rows, so that the one-call decode
    step and its bursts run them, in half the memory of fp32 (the default model's HF export, saved in bf16: decode
    2.1-2.2x on AVX2 in fp32, 1.4x in bf16 with AVX512-BF16; docs/quantization.md). "none" otherwise: an fp32
    checkpoint run in fp32 keeps its exact values, and a GGUF model its file's formats."""
    if quantization != "auto":
        return quantization
    import torch
    from lanner.model.layers import Linear
    from lanner.quant.ggml import kernels
    if device != "cpu" or kernels() is None:
        return "none"
    dense = [m.weight for m in model.modules() if isinstance(m, Linear) and m.ggml is None]
    takes = bool(dense) and all(w.shape[1] % 32 == 0 for w in dense)
    exact = takes and all(w.dtype == torch.bfloat16 or (w.dtype == torch.float32 and not low_halves(w).any())
                          for w in dense)
    return "bf16" if exact else "none"


def low_halves(w):
    """The low 16 bits of each fp32 value of w, read in place (x86 is little-endian): all zero where it is bf16's."""
    import torch
    return w.contiguous().view(torch.int16)[..., 0::2]
