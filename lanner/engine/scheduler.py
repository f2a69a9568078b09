"""One token budget per step: running requests first, then waiting ones; chunked prefill; preemption."""
from collections import deque

from lanner.config import EngineConfig
from lanner.engine.kv_cache import BlockManager
from lanner.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, block_manager: BlockManager, states=None):
        self.cfg, self.blocks, self.states = cfg, block_manager, states   # states: a state-space model's slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.prefix is not None:
            self.blocks.hold_prefix(seq.prefix)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, number of its tokens to compute this step)]: counters catch up within the budget."""
        budget, scheduled = self.cfg.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            seq.fit_drafts(budget)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new > 0:
                if not self.reserve(seq, num_new):
                    break   # seq itself was preempted: nothing behind it is left to run
                scheduled.append((seq, num_new))
                budget -= num_new
            i += 1
        skipped = []   # waiting sequences whose adapter cannot join this step
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not self.adapter_fits(seq):
                skipped.append(self.waiting.popleft())
                continue
            if self.states is not None and not self.states.free_running:
                break   # no free state slot: it waits for a running sequence to end
            self.blocks.begin(seq)
            if self.states is not None:
                self.begin_state(seq)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.blocks.blocks_needed(seq, num_new) > self.blocks.num_free_blocks:
                self.release_state(seq)
                self.blocks.release(seq)   # give back the prefix hits; it waits for memory
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                break
            self.blocks.allocate(seq, num_new)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return scheduled

    def begin_state(self, seq: Sequence) -> None:
        """A state slot for seq (one is free), resumed from the latest prompt checkpoint among its prefix-cache
        hits (the hits past it are given back: an SSM layer needs the state at the point it continues from)."""
        self.states.acquire(seq)
        self.blocks.keep_leading(seq, self.states.resume(seq))

    def release_state(self, seq: Sequence) -> None:
        if self.states is not None:
            self.states.release(seq)

    def adapter_fits(self, seq: Sequence) -> bool:
        """At most max_loras distinct adapters in LoRA slots run at once."""
        if seq.slot_lora_id == 0:
            return True
        active = {s.slot_lora_id for s in self.running} - {0}
        return seq.slot_lora_id in active or len(active) < self.cfg.max_loras

    def reserve(self, seq: Sequence, num_new: int) -> bool:
        """Allocate seq's blocks, preempting the newest running sequences if memory runs out."""
        while self.blocks.blocks_needed(seq, num_new) > self.blocks.num_free_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, num_new)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free its blocks; it will be recomputed (prompt + output so far) when memory allows."""
        self.running.remove(seq)
        self.blocks.release(seq)
        self.release_state(seq)
        seq.num_computed_tokens, seq.spec_token_ids = 0, []
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        self.release_state(seq)
        if seq.prefix is not None:
            self.blocks.drop_prefix(seq.prefix)
        seq.status = Status.FINISHED
