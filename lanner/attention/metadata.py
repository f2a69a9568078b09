"""What one packed, variable-length step tells the attention backends."""
import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention inputs, vLLM's vocabulary.

    S sequences contribute T query tokens packed back to back. Sequence i owns query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1]; its context (KV already cached plus the new tokens) is
    seq_lens[i] long and lives in the blocks block_tables[i, :ceil(seq_lens[i] / block_size)].
    Query row j of sequence i sits at position seq_lens[i] - q_len_i + j and sees keys up to it.
    """
    cu_seqlens_q: torch.Tensor        # [S+1] int32
    seq_lens: torch.Tensor            # [S] int32
    block_tables: torch.Tensor        # [S, max_blocks] int32, unused entries are 0
    slot_mapping: torch.Tensor        # [T] int64, where new K/V go; -1 = skip
    max_seqlen_q: int
    max_seqlen_k: int
    tree_mask: torch.Tensor | None = None  # optional [T, max_seqlen_q] bool: draft row -> visible draft rows
    ssm: object = None                     # lanner.model.ssm.SSMBatch: state slots of a state-space model's rows
    every_row_sampled: bool = False        # the caller samples every row (decode, verify): the LM head may run on all
    # the rows whose final hidden states the caller reads (the logit rows): the last layer runs on them alone once its
    # attention is done (None: every row)
    output_rows: torch.Tensor | None = None
    # what a backend derives from the above once per step and reuses in every layer
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def query_lens(self) -> torch.Tensor:
        return self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]

    def to(self, device) -> "AttentionMetadata":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return AttentionMetadata(move(self.cu_seqlens_q), move(self.seq_lens), move(self.block_tables),
                                 move(self.slot_mapping), self.max_seqlen_q, self.max_seqlen_k,
                                 move(self.tree_mask), self.ssm, self.every_row_sampled, move(self.output_rows))

    @staticmethod
    def build(query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
              slot_mapping: list[int], tree_mask: torch.Tensor | None = None) -> "AttentionMetadata":
        # one tensor per field from Python lists: at decode sizes each op costs more than its data
        width = max((len(b) for b in block_tables), default=0) or 1
        tables = torch.tensor([list(b) + [0] * (width - len(b)) for b in block_tables] or [[0]], dtype=torch.int32)
        cu = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32)
        return AttentionMetadata(cu, torch.tensor(seq_lens, dtype=torch.int32), tables[:len(block_tables)],
                                 torch.tensor(slot_mapping, dtype=torch.int64),
                                 max(query_lens, default=0), max(seq_lens, default=0), tree_mask)
