"""Weight formats: GGML blocks (GGUF's, or HF weights quantized at load) and NF4 (QLoRA's 4-bit base)."""


def quantize_linear(weight, bias, mode: str):
    """A callable x -> x @ weight.T + bias computed from `mode`-quantized weights."""
    if mode == "nf4":
        from lanner.quant.nf4 import quantize_linear_nf4
        return quantize_linear_nf4(weight, bias)
    from lanner.quant.ggml import quantize_linear as ggml_linear
    return ggml_linear(weight, bias, mode)
