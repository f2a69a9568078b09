"""Weight formats: weight-only int8 / int4 linears, and NF4 (QLoRA's 4-bit base)."""


def quantize_linear(weight, bias, mode: str):
    """A callable x -> x @ weight.T + bias computed from `mode`-quantized weights."""
    if mode == "nf4":
        from lanner.quant.nf4 import quantize_linear_nf4
        return quantize_linear_nf4(weight, bias)
    from lanner.quant.linear import quantize_linear as impl
    return impl(weight, bias, mode)
