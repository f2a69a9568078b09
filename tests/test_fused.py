"""Fused decoder steps (lanner/model/fused.c) equal HF's modules; a GGML linear's dense twin equals its blocks."""
import pytest
import torch
from conftest import built_for_isa
from test_ggml import random_weight

from lanner import native
from lanner.model import fused
from lanner.model.layers import onednn_pack
from lanner.quant.ggml import GGMLLinear

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler")


@pytest.fixture(params=native.supported_isas())
def isa(request):
    """fused.c on every level: its 16-lane vectors split differently on each."""
    with built_for_isa(request.param, fused.library) as level:
        yield level


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("size", [576, 83])   # whole vectors; vectors and a tail of 3
def test_rms_norm_equals_hf(dtype, with_residual, size):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf = LlamaRMSNorm(size, eps=1e-5)
    hf.weight.data = torch.randn(size)
    hf = hf.to(dtype)
    x, residual = torch.randn(3, size).to(dtype), torch.randn(3, size).to(dtype)
    want_sum = x + residual if with_residual else x
    want = hf(want_sum)
    res = residual.clone() if with_residual else None
    with torch.inference_mode():
        got = fused.rms_norm(x, res, hf.weight.detach(), 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, want, **tol)
    if with_residual:
        assert torch.equal(res, want_sum)            # the residual stream now holds the sum


def test_rms_norm_declines_what_it_does_not_take():
    w = torch.ones(8)
    with torch.inference_mode():
        assert fused.rms_norm(torch.randn(2, 16)[:, ::2], None, w, 1e-6) is None    # strided rows
        assert fused.rms_norm(torch.randn(2, 8).half(), None, w.half(), 1e-6) is None
    x = torch.randn(2, 8, requires_grad=True)
    assert fused.rms_norm(x, None, w, 1e-6) is None                                   # training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_split_over_threads_equal_row_by_row(dtype):
    """Prefill sizes split their rows over the threads: each row as it is alone (rotary's in the decode step tests)."""
    x, residual, gate_up = (torch.randn(300, n).to(dtype) for n in (64, 64, 128))
    w = torch.randn(64).to(dtype)
    with torch.inference_mode():
        summed = residual.clone()
        whole = fused.rms_norm(x, summed, w, 1e-6)
        for i in range(300):
            one = residual[i:i + 1].clone()
            assert torch.equal(fused.rms_norm(x[i:i + 1], one, w, 1e-6), whole[i:i + 1])
            assert torch.equal(one, summed[i:i + 1])
        rows = torch.cat([fused.silu_mul(gate_up[i:i + 1]) for i in range(300)])
        assert torch.equal(fused.silu_mul(gate_up), rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_twin_answers_like_the_blocks(dtype):
    w = random_weight("Q4_1", 96, 128)
    dense = onednn_pack(w.dequantize(dtype))
    if dense is None:
        pytest.skip("oneDNN does not run this dtype natively here")
    lin = GGMLLinear(w, None, dense)
    x = torch.randn(40, 128).to(dtype)
    with torch.inference_mode():
        twin, blocks = lin.large(x), torch.cat([lin.small(x[i:i + 4], lin.lib) for i in range(0, 40, 4)])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(twin.float(), blocks.float(), rtol=tol, atol=tol * blocks.abs().max().item())


@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("d", [64, 40])   # 40: 16 lanes at a time, then 4 one by one
def test_rope_store_equals_rotary_then_store_kv_on_every_isa(isa, dtype, kv_dtype, d):
    """Also into a cache of another dtype (kv_cache_dtype): rounded as store_kv's .to() rounds."""
    from lanner.attention import cpu
    from lanner.model.layers import RotaryEmbedding
    hq, hkv, t = 6, 2, 5
    rotary = RotaryEmbedding(d, 64, 100000.0, None)
    positions = torch.tensor([3, 9, 10, 40, 63])
    table = rotary.table(positions, dtype)
    qkv = torch.randn(t, (hq + 2 * hkv) * d)
    # v values an fp16 cache holds as subnormals, rounds to zero or overflows to infinity
    qkv[:, -hkv * d:] *= torch.tensor([1.0, 1e-5, 1e-8, 1e5, 1.0])[:, None]
    qkv = qkv.to(dtype)
    slots = torch.tensor([7, -1, 0, 12, 3])
    caches = [torch.zeros(4, 4, hkv, d, dtype=kv_dtype) for _ in range(4)]
    # the PyTorch ops the fused call replaces
    qk, v = qkv.clone().split([(hq + hkv) * d, hkv * d], dim=-1)
    qk, = rotary(table, qk.reshape(t, hq + hkv, d))
    q_want, k = qk.split([hq, hkv], dim=1)
    cpu.store_kv(k, v.reshape(t, hkv, d), caches[0], caches[1], slots)
    with torch.inference_mode():
        assert fused.rope_store(qkv, table, caches[2], caches[3], slots, hq, hkv)
    # bf16: every rounding as HF's ops round; fp32: up to the compiler fusing a multiply-add
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv.view(t, -1, d)[:, :hq], q_want, **tol)
    torch.testing.assert_close(caches[2], caches[0], **(tol if kv_dtype == torch.float32 else dict(rtol=8e-3, atol=0)))
    assert torch.equal(caches[3], caches[1])                       # v is copied as is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_torch_on_every_isa(isa, dtype):
    gate_up = (torch.randn(3, 2 * 200) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.inference_mode():
        got = fused.silu_mul(gate_up)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, **tol)
