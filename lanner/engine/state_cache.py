"""SSM state slots beside the KV blocks. A state-space layer keeps no KV: what a sequence has computed is one conv
state and one SSM state per layer, held in a slot of a fixed pool. Three kinds of slots share the pool:

- running: one per running sequence, taken at admission like its first blocks, given back at preemption or finish;
- checkpoints: the state at a block boundary of a prompt, kept in an LRU keyed by that block's hash, so a prompt
  that repeats a prefix resumes from the latest checkpoint (the prefix cache's match, backed off to a boundary
  with a state);
- scratch: the state after each draft row of a speculative verify, so a rejection rolls the state back to the last
  accepted row as the counter rolls back.

The mixers copy states into checkpoint and scratch slots themselves (SSMBatch.snapshots), in the step's forward."""
from collections import OrderedDict

import torch

CHECKPOINT_EVERY_BLOCKS = 16   # besides the last full block of each prompt


class StateCache:
    def __init__(self, mixers, shapes: tuple, dtype: torch.dtype, num_running: int, num_checkpoints: int,
                 num_scratch: int, block_size: int):
        self.mixers, self.block_size, self.num_running = mixers, block_size, num_running
        total = num_running + num_checkpoints + num_scratch
        conv_shape, ssm_shape = shapes
        for mixer in mixers:
            mixer.conv_state = torch.zeros(total, *conv_shape, dtype=dtype)
            mixer.ssm_state = torch.zeros(total, *ssm_shape, dtype=dtype)
        self.free_running = list(range(num_running))[::-1]
        self.free_checkpoints = list(range(num_running, num_running + num_checkpoints))
        self.free_scratch = list(range(num_running + num_checkpoints, total))
        self.checkpoints: OrderedDict[int, int] = OrderedDict()   # block hash -> slot, least recently used first
        self.pending: dict[int, list[tuple[int, int]]] = {}        # seq_id -> [(block index, slot)] this step
        self.scratch: dict[int, list[int]] = {}                    # seq_id -> slots of its draft rows
        self.num_resumed_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(m.conv_state.nbytes + m.ssm_state.nbytes for m in self.mixers)

    @staticmethod
    def slot_bytes(shapes: tuple, dtype: torch.dtype, num_layers: int) -> int:
        conv_shape, ssm_shape = shapes
        return num_layers * (torch.Size(conv_shape).numel() + torch.Size(ssm_shape).numel()) * dtype.itemsize

    # ---- running slots ------------------------------------------------------------------------------------
    def acquire(self, seq) -> bool:
        if seq.state_slot is None:
            if not self.free_running:
                return False
            seq.state_slot = self.free_running.pop()
        return True

    def release(self, seq) -> None:
        for _, slot in self.pending.pop(seq.seq_id, []):
            self.free_checkpoints.append(slot)
        self.free_scratch += self.scratch.pop(seq.seq_id, [])
        if seq.state_slot is not None:
            self.free_running.append(seq.state_slot)
            seq.state_slot = None

    def copy(self, source: int, destination: int) -> None:
        for mixer in self.mixers:
            mixer.conv_state[destination] = mixer.conv_state[source]
            mixer.ssm_state[destination] = mixer.ssm_state[source]

    # ---- prefix checkpoints -------------------------------------------------------------------------------
    def resume(self, seq) -> int:
        """After the prefix cache matched seq's leading blocks: the number of them to keep, the latest with a
        state checkpoint, whose state is copied into seq's slot (0: start from scratch)."""
        for i in range(len(seq.block_hashes), 0, -1):
            slot = self.checkpoints.get(seq.block_hashes[i - 1])
            if slot is not None:
                self.checkpoints.move_to_end(seq.block_hashes[i - 1])
                self.copy(slot, seq.state_slot)
                self.num_resumed_tokens += i * self.block_size
                return i
        return 0

    def plan_checkpoints(self, seq, start: int, num: int) -> list[tuple[int, int]]:
        """(row offset in this chunk, slot) for the block boundaries of seq's prompt this chunk crosses that are
        worth a checkpoint: every CHECKPOINT_EVERY_BLOCKS blocks and the last full block before the last prompt
        token (where a repeat of the prompt resumes)."""
        bs, last = self.block_size, (seq.num_prompt_tokens - 1) // self.block_size
        out = []
        for block in range(start // bs + 1, min(start + num, seq.num_prompt_tokens) // bs + 1):
            if (block % CHECKPOINT_EVERY_BLOCKS and block != last) or block > last:
                continue
            slot = self.checkpoint_slot()
            if slot is None:
                break
            self.pending.setdefault(seq.seq_id, []).append((block - 1, slot))
            out.append((block * bs - 1 - start, slot))
        return out

    def checkpoint_slot(self) -> int | None:
        if not self.free_checkpoints and self.checkpoints:
            self.free_checkpoints.append(self.checkpoints.popitem(last=False)[1])
        return self.free_checkpoints.pop() if self.free_checkpoints else None

    def commit(self, seq) -> None:
        """After the step hashed seq's full blocks: file its new checkpoints under their blocks' hashes."""
        for block, slot in self.pending.pop(seq.seq_id, []):
            h = seq.block_hashes[block] if block < len(seq.block_hashes) else None
            if h is None or h in self.checkpoints:
                self.free_checkpoints.append(slot)
            else:
                self.checkpoints[h] = slot

    # ---- speculative rollback -----------------------------------------------------------------------------
    def plan_drafts(self, seq, first_row: int) -> list[tuple[int, int]]:
        """(row, slot) snapshots after the row of the last verified token and after each draft but the last."""
        rows = [first_row + i for i in range(len(seq.spec_token_ids))]
        if len(self.free_scratch) < len(rows):
            raise RuntimeError("no scratch state slots for the drafts")   # sized for max_batch_size * k
        slots = [self.free_scratch.pop() for _ in rows]
        self.scratch[seq.seq_id] = slots
        return list(zip(rows, slots))

    def roll_back(self, seq, num_accepted: int) -> None:
        """The state after the last accepted row; the slot already holds it when every draft was accepted."""
        slots = self.scratch.pop(seq.seq_id, [])
        if num_accepted < len(slots):
            self.copy(slots[num_accepted], seq.state_slot)
        self.free_scratch += slots
