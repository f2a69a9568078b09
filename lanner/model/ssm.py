"""State-space mixers (Mamba-1, Mamba-2) over packed rows of several sequences, each carrying its state in a slot.

A sequence's rows continue from the conv state (its last K - 1 conv inputs, pre-activation) and SSM state in
its slot, or from zeros on its first chunk, and leave the state after their last row there; a step may pack
decode rows, prefill chunks and verify rows of different sequences. ssm.c runs the conv and the scans
(compiled through lanner.native); the PyTorch path here is its fallback and the tests' oracle.
"""
import ctypes
import functools
import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from lanner import native
from lanner.model.layers import Linear

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssm.c")
ACT = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "identity": lambda x: x}   # conv activations


@dataclass
class SSMBatch:
    """Which slot each sequence of a step reads and writes. Built once per step, shared by every layer."""
    cu_seqlens: torch.Tensor      # [S+1] int: packed rows of each sequence (consecutive tokens of it)
    slots: torch.Tensor           # [S] long: each sequence's state slot (distinct)
    fresh: torch.Tensor           # [S] bool: start from a zero state (a sequence's first chunk), not the slot's
    # (packed row r, slot j): the state right after row r is also copied into slot j (speculative rollback,
    # prefix-cache checkpoints); j is none of the step's own slots
    snapshots: list[tuple[int, int]] = ()

    @cached_property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff().long()

    @cached_property
    def row_seq(self) -> torch.Tensor:
        """[T]: the sequence of each packed row."""
        return torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)

    @cached_property
    def steps(self) -> list[tuple[torch.Tensor, ...]]:
        """For the PyTorch scans, one entry per position in a sequence: the rows at that position, their
        sequences, and the (sequences, slots) of snapshots taken after those rows."""
        start, snaps = self.cu_seqlens[:-1].long(), self.snapshot_rows
        taken = self.row_seq[snaps[:, 0]]
        out = []
        for pos in range(int(self.lengths.max()) if len(self.lengths) else 0):
            seqs = (self.lengths > pos).nonzero().flatten()
            here = snaps[:, 0] - start[taken] == pos
            out.append((start[seqs] + pos, seqs, taken[here], snaps[here, 1]))
        return out

    @cached_property
    def snapshot_rows(self) -> torch.Tensor:
        """[n, 2] int64: the snapshots' (row, slot), by row."""
        return torch.tensor(sorted(self.snapshots), dtype=torch.int64).reshape(-1, 2)

    def history_index(self, seqs: torch.Tensor, ends: torch.Tensor, width: int, kernel: int) -> torch.Tensor:
        """[len(seqs), width]: for each (sequence, end), its last `width` conv inputs before local position `end`,
        as rows of the buffer [each sequence's K - 1 saved inputs; the step's rows] (see causal_conv)."""
        positions = ends[:, None] - width + torch.arange(width)                   # local positions
        saved = seqs[:, None] * (kernel - 1) + (kernel - 1) + positions          # < 0: before this chunk
        new = len(self.lengths) * (kernel - 1) + self.cu_seqlens[seqs].long()[:, None] + positions
        return torch.where(positions < 0, saved, new)

    @cached_property
    def native_args(self) -> tuple:
        """The metadata as the kernels take it (int64 and bytes, contiguous), and the tensors kept alive."""
        rows = self.snapshot_rows
        keep = (self.cu_seqlens.to(torch.int64).contiguous(), self.slots.to(torch.int64).contiguous(),
                self.fresh.to(torch.bool).contiguous(), rows[:, 0].contiguous(), rows[:, 1].contiguous())
        cu, slots, fresh, snap_rows, snap_slots = keep
        args = (cu.data_ptr(), slots.data_ptr(), fresh.data_ptr(), len(slots), snap_rows.data_ptr(),
                snap_slots.data_ptr(), len(snap_rows), torch.get_num_threads())
        return args, keep


MAX_STATE_SIZE = 256   # ssm.c keeps a state_size x vector-width block of the state on the stack


def check_state_size(n: int) -> None:
    if not 1 <= n <= MAX_STATE_SIZE:
        raise ValueError(f"SSM state_size {n} is outside 1..{MAX_STATE_SIZE}")


def json_float(value) -> float:
    """A float from config.json, where transformers 5 writes infinities as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


@functools.lru_cache(maxsize=None)
def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    batch = [p, p, p, i64, p, p, i64, i]   # cu, slots, fresh, S, snap_rows, snap_slots, n_snap, threads
    lib.ssm_conv.argtypes = [p, i64, p, p, p, i64, i64, *batch, p, i]
    lib.mamba_scan.argtypes = [p, p, p, p, p, i64, p, p, i64, p, i64, i64, *batch, p]
    lib.mamba2_scan.argtypes = [p, i64, p, i64, p, f, f, p, p, p, i64, p, p, i64, i64, i64, i64, *batch, p]
    lib.ssm_conv.restype = ctypes.c_int
    lib.mamba_scan.restype = lib.mamba2_scan.restype = None
    return lib


def kernels() -> ctypes.CDLL | None:
    """ssm.c built for the current ISA level, or None (no compiler, or LANNER_NATIVE=0)."""
    lib = native.library(SOURCE)
    return None if lib is None else _typed(lib)


def _native_fits(*tensors: torch.Tensor) -> bool:
    """Inference on fp32 CPU tensors whose rows are contiguous (the kernels take a row stride at most)."""
    return not torch.is_grad_enabled() and all(t.dtype == torch.float32 and t.is_cpu and t.stride(-1) == 1
                                               for t in tensors)


def causal_conv(u: torch.Tensor, conv: nn.Conv1d, state: torch.Tensor, batch: SSMBatch, act: str) -> torch.Tensor:
    """Depthwise causal conv1d of u [T, C] whose left context is each sequence's conv state [slots, C, K - 1]
    (updated in place to the last K - 1 inputs), then the activation."""
    weight, bias = conv.weight.view(conv.weight.shape[0], -1), conv.bias
    lib = kernels()
    if lib is not None and _native_fits(u, weight, state, *([bias] if bias is not None else [])) \
            and state.is_contiguous() and weight.is_contiguous():
        out = torch.empty(u.shape, dtype=torch.float32)
        args, _keep = batch.native_args
        if lib.ssm_conv(u.data_ptr(), u.stride(0), weight.data_ptr(), None if bias is None else bias.data_ptr(),
                        state.data_ptr(), u.shape[1], weight.shape[1], *args, out.data_ptr(), int(act == "silu")):
            raise MemoryError("ssm_conv: out of memory for the transposed conv weights")
        return out if act == "silu" else ACT[act](out)
    return ACT[act](conv_reference(u, weight, bias, state, batch))


def conv_reference(u, weight, bias, state, batch: SSMBatch) -> torch.Tensor:
    """causal_conv's PyTorch path (before the activation): every row's window gathered from one buffer of the
    sequences' saved inputs and the new rows."""
    kernel = weight.shape[1]
    saved = state[batch.slots].masked_fill(batch.fresh[:, None, None], 0)       # [S, C, K - 1]
    buffer = torch.cat([saved.transpose(1, 2).reshape(-1, u.shape[1]), u]).to(weight.dtype)

    def inputs_before(seqs: torch.Tensor, ends: torch.Tensor, width: int) -> torch.Tensor:   # [n, C, width]
        return buffer[batch.history_index(seqs, ends, width, kernel)].transpose(1, 2)

    local = torch.arange(u.shape[0]) - batch.cu_seqlens[batch.row_seq].long()
    out = (inputs_before(batch.row_seq, local + 1, kernel) * weight).sum(-1)
    if bias is not None:
        out = out + bias
    state[batch.slots] = inputs_before(torch.arange(len(batch.lengths)), batch.lengths, kernel - 1).to(state.dtype)
    rows, slots = batch.snapshot_rows.unbind(1)
    if len(rows):
        seqs = batch.row_seq[rows]
        state[slots] = inputs_before(seqs, rows - batch.cu_seqlens[seqs].long() + 1, kernel - 1).to(state.dtype)
    return out


class MambaMixer(nn.Module):
    """Mamba-1's mixer (HF MambaMixer's parameter names): in_proj -> causal conv -> selective scan with
    input-dependent dt, B, C -> gated by silu(z) -> out_proj."""

    def __init__(self, hf_config: dict):
        super().__init__()
        c = hf_config
        hidden = c["hidden_size"]
        self.intermediate = int(c.get("expand", 2) * hidden)   # as HF, which derives it (not read from the file)
        self.state_size, self.kernel = c.get("state_size", 16), c.get("conv_kernel", 4)
        rank = c.get("time_step_rank", "auto")
        self.rank = -(-hidden // 16) if rank == "auto" else int(rank)
        self.act = c.get("hidden_act", "silu")
        if self.act not in ACT:
            raise ValueError(f"Mamba: hidden_act {self.act!r} is not one of {sorted(ACT)}")
        bias, conv_bias = c.get("use_bias", False), c.get("use_conv_bias", True)
        check_state_size(self.state_size)
        I, N = self.intermediate, self.state_size
        self.in_proj = Linear(hidden, 2 * I, bias=bias, device="meta")
        self.conv1d = nn.Conv1d(I, I, self.kernel, groups=I, padding=self.kernel - 1, bias=conv_bias)
        self.x_proj = Linear(I, self.rank + 2 * N, bias=False, device="meta")
        self.dt_proj = Linear(self.rank, I, bias=True, device="meta")
        self.A_log = nn.Parameter(torch.zeros(I, N))
        self.D = nn.Parameter(torch.ones(I))
        self.out_proj = Linear(I, hidden, bias=bias, device="meta")
        self.conv_state = self.ssm_state = None   # [slots, I, K - 1], [slots, I, N]: views into the engine's pool

    def forward(self, x: torch.Tensor, batch: SSMBatch) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = causal_conv(u, self.conv1d, self.conv_state, batch, self.act)
        dt, B, C = self.x_proj(u).split([self.rank, self.state_size, self.state_size], dim=-1)
        y = self.scan(u.float(), self.dt_proj(dt).float(), B.float(), C.float(), z.float(), batch)
        return self.out_proj(y.to(x.dtype))

    def scan(self, u, dt, B, C, z, batch: SSMBatch) -> torch.Tensor:
        """y [T, I] of the selective scan (dt before its softplus) from the slots' states, which it updates."""
        lib, A_log, D, state = kernels(), self.A_log.float(), self.D.float(), self.ssm_state
        if lib is not None and _native_fits(u, dt, A_log, B, C, D, z, state) and state.is_contiguous() \
                and u.is_contiguous() and dt.is_contiguous() and A_log.is_contiguous() and B.stride(0) == C.stride(0):
            y = torch.empty_like(u)
            args, _keep = batch.native_args
            lib.mamba_scan(u.data_ptr(), dt.data_ptr(), A_log.data_ptr(), B.data_ptr(), C.data_ptr(), B.stride(0),
                           D.data_ptr(), z.data_ptr(), z.stride(0), state.data_ptr(), u.shape[1], A_log.shape[1], *args,
                           y.data_ptr())
            return y
        return mamba_scan_reference(u, dt, A_log, B, C, D, z, state, batch)


def mamba_scan_reference(u, dt, A_log, B, C, D, z, state, batch: SSMBatch) -> torch.Tensor:
    """Mamba-1's scan as HF's slow path writes it, one position of every sequence at a time: with
    delta = softplus(dt) and A = -exp(A_log), h = exp(delta A) h + delta B u, y = (h C + D u) silu(z)."""
    delta, A = F.softplus(dt), -torch.exp(A_log)
    h = state[batch.slots].float().masked_fill(batch.fresh[:, None, None], 0)   # [S, I, N]
    y = torch.empty_like(u)
    for rows, seqs, snap_seqs, snap_slots in batch.steps:
        dA = torch.exp(delta[rows, :, None] * A)
        dBu = delta[rows, :, None] * B[rows, None, :] * u[rows, :, None]
        h[seqs] = hs = dA * h[seqs] + dBu
        y[rows] = (hs @ C[rows, :, None]).squeeze(-1)
        state[snap_slots] = h[snap_seqs].to(state.dtype)
    state[batch.slots] = h.to(state.dtype)
    return (y + u * D) * F.silu(z)


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm: RMSNorm of x * silu(gate) over groups of the channels, in fp32 (HF MambaRMSNormGated)."""

    def __init__(self, size: int, group_size: int, eps: float):
        super().__init__()
        self.weight, self.group_size, self.eps = nn.Parameter(torch.ones(size)), group_size, eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        groups = x.view(*x.shape[:-1], -1, self.group_size)
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(x.shape)
        return self.weight * x.to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2's mixer (HF Mamba2Mixer's parameter names): in_proj -> z | xBC | dt, causal conv of xBC, the scan
    with a scalar decay per head and B, C shared by each group of heads, gated RMSNorm by z -> out_proj."""

    def __init__(self, hf_config: dict):
        super().__init__()
        c = hf_config
        hidden = c["hidden_size"]
        self.intermediate = int(c.get("expand", 2) * hidden)
        self.num_heads, self.head_dim = c["num_heads"], c["head_dim"]
        self.n_groups, self.state_size = c.get("n_groups", 1), c.get("state_size", 128)
        self.kernel, self.act = c.get("conv_kernel", 4), c.get("hidden_act", "silu")
        if self.act not in ACT:
            raise ValueError(f"Mamba-2: hidden_act {self.act!r} is not one of {sorted(ACT)}")
        self.dt_limit = tuple(json_float(v) for v in c.get("time_step_limit", (0.0, float("inf"))))
        I, H, GN = self.intermediate, self.num_heads, self.n_groups * self.state_size
        check_state_size(self.state_size)
        if H * self.head_dim != I or H % self.n_groups or I % self.n_groups:   # ssm.c indexes by these
            raise ValueError(f"Mamba-2 config: num_heads * head_dim ({H} * {self.head_dim}) must equal expand * "
                             f"hidden_size ({I}), and n_groups ({self.n_groups}) divide num_heads")
        self.conv_dim = I + 2 * GN
        bias = c.get("use_bias", False)
        self.in_proj = Linear(hidden, I + self.conv_dim + H, bias=bias, device="meta")
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim,
                                padding=self.kernel - 1, bias=c.get("use_conv_bias", True))
        self.dt_bias = nn.Parameter(torch.ones(H))
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(I, I // self.n_groups, c.get("layer_norm_epsilon", 1e-5))
        self.out_proj = Linear(I, hidden, bias=bias, device="meta")
        self.conv_state = self.ssm_state = None   # [slots, conv_dim, K - 1], [slots, H, head_dim, N]

    def forward(self, x: torch.Tensor, batch: SSMBatch) -> torch.Tensor:
        GN = self.n_groups * self.state_size
        z, xBC, dt = self.in_proj(x).split([self.intermediate, self.conv_dim, self.num_heads], dim=-1)
        xBC = causal_conv(xBC, self.conv1d, self.conv_state, batch, self.act)
        xs, B, C = xBC.float().split([self.intermediate, GN, GN], dim=-1)
        y = self.scan(xs, dt.float(), B, C, batch)
        return self.out_proj(self.norm(y, z).to(x.dtype))

    def scan(self, x, dt, B, C, batch: SSMBatch) -> torch.Tensor:
        """y [T, H * head_dim] of the scan (dt before its bias and softplus; with the D skip) from the slots'
        states, which it updates."""
        lib, state = kernels(), self.ssm_state
        dt_bias, A_log, D = self.dt_bias.float(), self.A_log.float(), self.D.float()
        if lib is not None and _native_fits(x, dt, dt_bias, A_log, B, C, D, state) and state.is_contiguous() \
                and B.stride(0) == C.stride(0):
            y = torch.empty(x.shape, dtype=torch.float32)
            args, _keep = batch.native_args
            lib.mamba2_scan(x.data_ptr(), x.stride(0), dt.data_ptr(), dt.stride(0), dt_bias.data_ptr(),
                            *self.dt_limit, A_log.data_ptr(), B.data_ptr(), C.data_ptr(), B.stride(0), D.data_ptr(),
                            state.data_ptr(), self.num_heads, self.head_dim, self.state_size, self.n_groups, *args,
                            y.data_ptr())
            return y
        return mamba2_scan_reference(x, dt, dt_bias, self.dt_limit, A_log, B, C, D, state, batch, self.n_groups)


def mamba2_scan_reference(x, dt, dt_bias, dt_limit, A_log, B, C, D, state, batch: SSMBatch,
                          n_groups: int) -> torch.Tensor:
    """Mamba-2's scan as HF's decode step writes it, one position of every sequence at a time: with
    delta = softplus(dt + dt_bias) (clamped to dt_limit) and A = -exp(A_log), h = exp(delta A) h + delta B x,
    y = h C + D x, per head (B and C shared by the heads of a group)."""
    dt, A = F.softplus(dt + dt_bias).clamp(*dt_limit), -torch.exp(A_log)
    h = state[batch.slots].float().masked_fill(batch.fresh[:, None, None, None], 0)   # [S, H, P, N]
    H, P, N = h.shape[1:]
    x, y = x.reshape(-1, H, P), torch.empty(x.shape[0], H, P)
    B, C = (m.reshape(-1, n_groups, N).repeat_interleave(H // n_groups, dim=1) for m in (B, C))   # [T, H, N]
    for rows, seqs, snap_seqs, snap_slots in batch.steps:
        dA = torch.exp(dt[rows] * A)[:, :, None, None]
        dBx = (dt[rows, :, None] * B[rows])[:, :, None, :] * x[rows, :, :, None]
        h[seqs] = hs = h[seqs] * dA + dBx
        y[rows] = (hs @ C[rows, :, :, None]).squeeze(-1) + D[:, None] * x[rows]
        state[snap_slots] = h[snap_seqs].to(state.dtype)
    state[batch.slots] = h.to(state.dtype)
    return y.flatten(1)
