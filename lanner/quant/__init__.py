"""Weight formats: weight-only int8 / int4 linears (NF4 for QLoRA lives here too)."""


def quantize_linear(weight, bias, mode: str):
    """A callable x -> x @ weight.T + bias computed from `mode`-quantized weights."""
    from lanner.quant.linear import quantize_linear as impl
    return impl(weight, bias, mode)
