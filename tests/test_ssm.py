"""The SSM mixers (Mamba-1, Mamba-2) equal HF transformers' mixers run through HF's own cache: whole sequences,
chunks carried through a state slot, decode one token at a time, several sequences packed in one call, state
snapshots after chosen rows; the C kernels equal the PyTorch path on every ISA level this CPU runs."""
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from lanner import native
from lanner.model import ssm
from lanner.model.ssm import Mamba2Mixer, MambaMixer, SSMBatch

TOL = 1e-5
NUM_SLOTS = 8
LAYER = 1   # HF's cache keeps one state per layer: the mixer of the second layer reads and writes its own


def perturbed(mixer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """HF's init leaves A structured (A_log = log(1..N)), D = 1, conv biases 0 and time steps tiny (states
    would barely move): spread them out, time steps around softplus(-1) = 0.3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name in ("dt_bias", "dt_proj.bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1)
            elif name in ("A_log", "D", "conv1d.bias", "norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return mixer


def tiny_mamba() -> SimpleNamespace:
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, vocab_size=64,
                      initializer_range=0.15)
    hf = perturbed(MambaForCausalLM(cfg).eval().backbone.layers[LAYER].mixer, 1)
    return SimpleNamespace(config=cfg, hf=hf, ours=load(MambaMixer(cfg.to_dict()), hf))


def tiny_mamba2() -> SimpleNamespace:
    torch.manual_seed(0)
    cfg = Mamba2Config(hidden_size=64, num_hidden_layers=2, state_size=16, conv_kernel=4, num_heads=4, head_dim=32,
                       n_groups=2, chunk_size=8, vocab_size=64, initializer_range=0.15)
    hf = perturbed(Mamba2ForCausalLM(cfg).eval().backbone.layers[LAYER].mixer, 1)
    return SimpleNamespace(config=cfg, hf=hf, ours=load(Mamba2Mixer(cfg.to_dict()), hf))


def load(ours: torch.nn.Module, hf: torch.nn.Module) -> torch.nn.Module:
    """HF's weights in our mixer; a state pool of random contents (a fresh sequence must not read its slot)."""
    ours.load_state_dict(hf.state_dict(), assign=True)
    conv_dim, kernel = ours.conv1d.weight.shape[0], ours.conv1d.weight.shape[-1]
    ours.conv_state = torch.randn(NUM_SLOTS, conv_dim, kernel - 1)
    if isinstance(ours, MambaMixer):
        ours.ssm_state = torch.randn(NUM_SLOTS, ours.intermediate, ours.state_size)
    else:
        ours.ssm_state = torch.randn(NUM_SLOTS, ours.num_heads, ours.head_dim, ours.state_size)
    return ours


@pytest.fixture(scope="module", params=["mamba", "mamba2"])
def model(request) -> SimpleNamespace:
    return tiny_mamba() if request.param == "mamba" else tiny_mamba2()


@pytest.fixture(params=["native", "pytorch"])
def path(request):
    """Each behaviour holds for the C kernels (this CPU's best ISA) and for the PyTorch fallback."""
    with mock.patch.dict(os.environ, {"LANNER_NATIVE": "1" if request.param == "native" else "0", "LANNER_ISA": ""}):
        if request.param == "native":
            assert ssm.kernels() is not None
        yield request.param


def hf_run(m: SimpleNamespace, chunks: list[torch.Tensor]):
    """HF's mixer over consecutive chunks of one sequence through its cache: (outputs, conv state without its
    oldest column, which the next step never reads, ssm state)."""
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        out = torch.cat([m.hf(c[None], cache=cache)[0] for c in chunks])
    layer = cache.layers[LAYER]
    return out, layer.conv_states[0][0, :, 1:], layer.recurrent_states[0][0]


def run(m: SimpleNamespace, seqs: list[tuple[torch.Tensor, int, bool]], snapshots=()) -> list[torch.Tensor]:
    """Our mixer over sequences (rows, slot, fresh) packed in one call: each sequence's output rows."""
    lengths = torch.tensor([len(x) for x, _, _ in seqs])
    batch = SSMBatch(torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int(),
                     torch.tensor([s for _, s, _ in seqs]), torch.tensor([f for _, _, f in seqs]), list(snapshots))
    with torch.no_grad():
        out = m.ours(torch.cat([x for x, _, _ in seqs]), batch)
    return list(out.split(lengths.tolist()))


def states(m: SimpleNamespace, slot: int):
    return m.ours.conv_state[slot], m.ours.ssm_state[slot]


def feed(m: SimpleNamespace, x: torch.Tensor, cuts: list[int], slot: int) -> torch.Tensor:
    """x fed to our mixer in chunks ending at `cuts`, the state carried through `slot`."""
    bounds = [0, *cuts, len(x)]
    return torch.cat([run(m, [(x[a:b], slot, a == 0)])[0] for a, b in zip(bounds, bounds[1:])])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL


def test_whole_sequence_equals_hf(model, path):
    x = torch.randn(29, 64)
    ref, conv, state = hf_run(model, [x])
    out, = run(model, [(x, 3, True)])
    assert ref.std() > 0.1 and state.abs().max() > 0.5   # not degenerate
    assert close(out, ref) and close(states(model, 3)[0], conv) and close(states(model, 3)[1], state)


def test_one_token_at_a_time_equals_hf_decode(model, path):
    x = torch.randn(13, 64)
    ref, conv, state = hf_run(model, list(x.split(1)))
    out = feed(model, x, list(range(1, 13)), 2)
    assert close(out, ref) and close(states(model, 2)[0], conv) and close(states(model, 2)[1], state)


def test_chunks_cut_at_odd_places_equal_the_whole_sequence(model, path):
    x = torch.randn(31, 64)
    ref, conv, state = hf_run(model, [x])
    out = feed(model, x, [1, 3, 4, 11, 17, 30], 5)   # chunks shorter and longer than the conv window
    assert close(out, ref) and close(states(model, 5)[0], conv) and close(states(model, 5)[1], state)


def test_mamba2_chunks_equal_hf_chunked_prefill(path):
    """HF's Mamba-2 mixer continues a chunk from its cached state (its Mamba-1 mixer restarts the scan of every
    multi-token chunk from zero, so there the whole sequence is the oracle)."""
    model = tiny_mamba2()
    x = torch.randn(20, 64)
    ref, conv, state = hf_run(model, [x[:7], x[7:16], x[16:]])
    out = feed(model, x, [7, 16], 1)
    assert close(out, ref) and close(states(model, 1)[0], conv) and close(states(model, 1)[1], state)


def test_packed_sequences_equal_each_alone(model, path):
    """A fresh prefill chunk, a decode row and a continuing chunk of three sequences in one call; the other
    slots are left as they were."""
    a, b, c = torch.randn(9, 64), torch.randn(6, 64), torch.randn(16, 64)
    run(model, [(b[:5], 6, True)])
    run(model, [(c[:4], 1, True)])
    others = [0, 2, 3, 5, 7]
    before = [s[others].clone() for s in states(model, slice(None))]
    out = run(model, [(a, 4, True), (b[5:], 6, False), (c[4:], 1, False)])
    assert all(torch.equal(s[others], s0) for s, s0 in zip(states(model, slice(None)), before))
    for x, slot, got in ((a, 4, out[0]), (b, 6, out[1]), (c, 1, out[2])):
        ref, conv, state = hf_run(model, [x])
        assert close(got, ref[len(x) - len(got):]), slot
        assert close(states(model, slot)[0], conv) and close(states(model, slot)[1], state), slot


def test_snapshot_holds_the_state_after_its_row(model, path):
    """A prefill chunk (rows 0, 3 and 8 kept, row 8 twice) beside four verify rows of a continuing sequence (its
    first and third kept): each kept state is that of the prefix up to its row alone."""
    x, y = torch.randn(10, 64), torch.randn(7, 64)
    run(model, [(y[:3], 2, True)])
    run(model, [(x, 0, True), (y[3:], 2, False)], snapshots=[(8, 5), (3, 4), (10, 7), (8, 6), (12, 1), (0, 3)])
    for prefix, slot in ((x[:1], 3), (x[:4], 4), (x[:9], 5), (x[:9], 6), (y[:4], 7), (y[:6], 1)):
        _, conv, state = hf_run(model, [prefix])
        assert close(states(model, slot)[0], conv) and close(states(model, slot)[1], state), slot


def test_a_decode_step_is_one_scan_step_for_every_sequence(model):
    """The PyTorch path loops over positions, never over sequences: a step of 1-row sequences is one step."""
    batch = SSMBatch(torch.arange(6), torch.tensor([0, 3, 1, 7, 2]), torch.zeros(5, dtype=torch.bool))
    assert len(batch.steps) == 1 and batch.steps[0][0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("isa", native.supported_isas())
def test_kernel_equals_pytorch_path_on_every_isa(model, isa):
    """Packed prefill, decode and continuing rows with snapshots: outputs and every slot as the PyTorch path."""
    seqs = [(torch.randn(37, 64), 0, True), (torch.randn(1, 64), 3, False), (torch.randn(5, 64), 6, False)]
    snapshots = [(0, 1), (20, 2), (37, 4), (40, 5)]
    pool = states(model, slice(None))
    start = [s.clone() for s in pool]
    results = {}
    for mode, env in (("native", {"LANNER_NATIVE": "1", "LANNER_ISA": isa}), ("pytorch", {"LANNER_NATIVE": "0"})):
        for s, s0 in zip(pool, start):
            s.copy_(s0)
        with mock.patch.dict(os.environ, env):
            assert (ssm.kernels() is not None) == (mode == "native")
            results[mode] = run(model, seqs, snapshots), [s.clone() for s in pool]
    (out_c, pool_c), (out_py, pool_py) = results["native"], results["pytorch"]
    assert all(close(a, b) for a, b in zip(out_c, out_py))
    assert all(close(a, b) for a, b in zip(pool_c, pool_py))


def test_native_off_runs_the_pytorch_path(model):
    reference = "mamba_scan_reference" if isinstance(model.ours, MambaMixer) else "mamba2_scan_reference"
    for setting, calls in (("0", 1), ("1", 0)):
        with mock.patch.dict(os.environ, {"LANNER_NATIVE": setting, "LANNER_ISA": ""}), \
                mock.patch.object(ssm, reference, wraps=getattr(ssm, reference)) as scan, \
                mock.patch.object(ssm, "conv_reference", wraps=ssm.conv_reference) as conv:
            run(model, [(torch.randn(3, 64), 0, True)])
        assert scan.call_count == conv.call_count == calls
