"""The batched LoRA delta: y += (x @ A_slot^T) @ B_slot^T, rows grouped by their adapter slot."""
import torch


class LoRAWeights:
    """Stacked A [slots + 1, R, in] and B [slots + 1, out, R] of one linear; slot 0 is the base model."""

    def __init__(self, manager, max_loras: int, max_rank: int, d_in: int, d_out: int, dtype: torch.dtype):
        self.manager = manager
        self.a = torch.zeros(max_loras + 1, max_rank, d_in, dtype=dtype)
        self.b = torch.zeros(max_loras + 1, d_out, max_rank, dtype=dtype)
        self.ranks = [0] * (max_loras + 1)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def write(self, slot: int, row: int, a: torch.Tensor, b: torch.Tensor, out_offset: int) -> None:
        r = a.shape[0]
        self.a[slot, row:row + r] = a.to(self.a.dtype)
        self.b[slot, out_offset:out_offset + b.shape[0], row:row + r] = b.to(self.b.dtype)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for slot, rows in self.manager.batch:
            r = self.ranks[slot]
            if rows is None:
                y += (x @ self.a[slot, :r].T) @ self.b[slot, :, :r].T
            else:
                y.index_add_(0, rows, (x[rows] @ self.a[slot, :r].T) @ self.b[slot, :, :r].T)
        return y
