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
