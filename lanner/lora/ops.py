"""The batched adapter step of one linear, rows grouped by their adapter slot: a LoRA slot adds
(x @ A_slot^T) @ B_slot^T to its rows; an IA3 slot multiplies its rows' input or output by its vectors."""
import torch


class LoRAWeights:
    """Stacked A [slots + 1, R, in] and B [slots + 1, out, R] of one linear, and the IA3 slots' fp32 vectors
    (only the slots that have one on this linear); slot 0 is the base model."""

    def __init__(self, manager, max_loras: int, max_rank: int, d_in: int, d_out: int, dtype: torch.dtype):
        self.manager = manager
        self.a = torch.zeros(max_loras + 1, max_rank, d_in, dtype=dtype)
        self.b = torch.zeros(max_loras + 1, d_out, max_rank, dtype=dtype)
        self.ranks = torch.zeros(max_loras + 1, dtype=torch.int32)   # rows of A (columns of B) each slot uses
        # the IA3 vectors' addresses (0: none; input, output) for the one-call decode step
        self.scale_table = torch.zeros(2, max_loras + 1, dtype=torch.int64)
        self.input_scales: dict[int, torch.Tensor] = {}    # slot -> [in]
        self.output_scales: dict[int, torch.Tensor] = {}   # slot -> [out], ones outside its modules' slices

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.ranks[slot] = 0
        self.input_scales.pop(slot, None)
        self.output_scales.pop(slot, None)
        self.scale_table[:, slot] = 0

    def write(self, slot: int, row: int, a: torch.Tensor, b: torch.Tensor, out_offset: int) -> None:
        r = a.shape[0]
        self.a[slot, row:row + r] = a.to(self.a.dtype)
        self.b[slot, out_offset:out_offset + b.shape[0], row:row + r] = b.to(self.b.dtype)

    def write_output_scale(self, slot: int, vector: torch.Tensor, cols: slice) -> None:
        self.output_scales.setdefault(slot, torch.ones(self.b.shape[1]))[cols] = vector
        self.scale_table[1, slot] = self.output_scales[slot].data_ptr()

    def write_input_scale(self, slot: int, vector: torch.Tensor) -> None:
        self.input_scales[slot] = vector.float().contiguous()
        self.scale_table[0, slot] = self.input_scales[slot].data_ptr()

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, or a copy with the rows of IA3 slots that scale this linear's input scaled."""
        if not self.input_scales:
            return x
        scaled = [(rows, self.input_scales[slot]) for slot, rows in self.manager.batch if slot in self.input_scales]
        if not scaled:
            return x
        x = x.clone()
        for rows, vector in scaled:
            scale_rows(x, rows, vector)
        return x

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y, the base output for the unscaled input x, with each LoRA slot's delta added to its rows and each
        IA3 slot's output vector applied to its rows."""
        for slot, rows in self.manager.batch:
            if self.ranks[slot]:
                self.add_delta(slot, rows, x, y)
            if slot in self.output_scales:
                scale_rows(y, rows, self.output_scales[slot])
        return y

    def add_delta(self, slot: int, rows: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor) -> None:
        r = int(self.ranks[slot])
        if rows is None:
            y += (x @ self.a[slot, :r].T) @ self.b[slot, :, :r].T
        else:
            y.index_add_(0, rows, (x[rows] @ self.a[slot, :r].T) @ self.b[slot, :, :r].T)


def scale_rows(t: torch.Tensor, rows: torch.Tensor | None, vector: torch.Tensor) -> None:
    """t[rows] *= vector in place (rows None: every row): computed in the vector's fp32 as PEFT does, stored
    in t's dtype."""
    if rows is None:
        t.mul_(vector)
    else:
        t[rows] = (t[rows] * vector).to(t.dtype)
