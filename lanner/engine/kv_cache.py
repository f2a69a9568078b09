"""BlockManager: paged KV block allocation with ref counts, an LRU free queue and prefix caching."""
from collections import OrderedDict
from dataclasses import dataclass

from lanner.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...], extra_key) -> int:
    """A full block's identity: everything before it (parent), its tokens, and e.g. its adapter's digest."""
    return hash((parent, token_ids, extra_key))


@dataclass
class PinnedPrefix:
    """A prefix-tuned adapter's virtual tokens in the pool, KV positions 0..num_virtual_tokens-1 of each sequence:
    the full blocks are shared by reference, the partial last one (tail) is copied into each sequence's own block,
    since the sequence's first tokens go after it in that block."""
    num_virtual_tokens: int
    full_blocks: list[int]
    tail_block: int | None

    @property
    def blocks(self) -> list[int]:
        return self.full_blocks + ([] if self.tail_block is None else [self.tail_block])


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: dict[int, int] = {}            # block id -> hash, for cached blocks
        self.block_of: dict[int, int] = {}           # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.prefix_queries = self.prefix_hits = 0   # tokens looked up / found, for the hit rate
        self.pending_copies: list[tuple[int, int]] = []   # (source, destination) blocks to copy before the forward

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def take(self, block_id: int) -> None:
        if self.ref_counts[block_id] == 0:
            del self.free[block_id]
        self.ref_counts[block_id] += 1

    def begin(self, seq: Sequence) -> None:
        """A waiting sequence's first blocks: its adapter's prefix blocks (pinned virtual tokens count as computed),
        then cached blocks for the longest known prefix of its positions (a prompt adapter's virtual ones too)."""
        if seq.prefix is not None:
            for block_id in seq.prefix.full_blocks:
                self.take(block_id)
            seq.block_table = list(seq.prefix.full_blocks)
            seq.block_hashes = [None] * len(seq.block_table)   # never looked up: the adapter's digest keys what follows
        seq.num_computed_tokens = seq.num_pinned_tokens
        if self.enable_prefix_caching and seq.prompt_logprobs is None:   # prompt logprobs need every row computed
            self.match_prefix(seq)

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest known prefix; the last prompt token is always computed."""
        num_full = (seq.num_verified_tokens - 1) // self.block_size
        self.prefix_queries += len(seq.token_ids)
        for i in range(len(seq.block_table), num_full):
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None,
                           seq.block_token_ids(i, self.block_size), seq.adapter_digest)
            if h not in self.block_of:
                break
            self.take(self.block_of[h])
            seq.block_table.append(self.block_of[h])
            seq.block_hashes.append(h)
        seq.num_computed_tokens = max(len(seq.block_table) * self.block_size, seq.num_pinned_tokens)
        seq.num_cached_tokens = max(0, seq.num_computed_tokens - seq.num_virtual_tokens)
        self.prefix_hits += seq.num_cached_tokens

    def keep_leading(self, seq: Sequence, num_blocks: int) -> None:
        """Keep only seq's first num_blocks prefix-cache hits (a state-space model resumes where it has a state)."""
        if num_blocks >= len(seq.block_table):
            return
        for block_id in reversed(seq.block_table[num_blocks:]):
            self.unref(block_id)
        del seq.block_table[num_blocks:], seq.block_hashes[num_blocks:]
        self.prefix_hits -= seq.num_cached_tokens
        seq.num_computed_tokens = seq.num_cached_tokens = num_blocks * self.block_size
        self.prefix_hits += seq.num_cached_tokens

    def pop_free(self) -> int:
        """The least recently freed block, dropped from the prefix cache, with one reference."""
        block_id, _ = self.free.popitem(last=False)
        if block_id in self.hash_of:
            del self.block_of[self.hash_of.pop(block_id)]
        self.ref_counts[block_id] = 1
        return block_id

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id = self.pop_free()
            if seq.prefix is not None and seq.prefix.tail_block is not None and \
                    len(seq.block_table) == len(seq.prefix.full_blocks):
                self.pending_copies.append((seq.prefix.tail_block, block_id))
            seq.block_table.append(block_id)

    def pop_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies this step's allocations need, to run before its forward."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def pin_prefix(self, num_tokens: int) -> PinnedPrefix:
        """Blocks for an adapter's virtual tokens, held (one reference) until drop_prefix."""
        needed = -(-num_tokens // self.block_size)
        if needed > self.num_free_blocks:
            raise ValueError(f"a prefix of {num_tokens} virtual tokens needs {needed} KV blocks, "
                             f"only {self.num_free_blocks} are free")
        blocks = [self.pop_free() for _ in range(needed)]
        full = num_tokens // self.block_size
        return PinnedPrefix(num_tokens, blocks[:full], blocks[full] if needed > full else None)

    def hold_prefix(self, prefix: PinnedPrefix) -> None:
        """One more holder (a sequence, from its arrival to its end): the blocks outlive an unloaded adapter."""
        for block_id in prefix.blocks:
            self.take(block_id)

    def drop_prefix(self, prefix: PinnedPrefix) -> None:
        for block_id in prefix.blocks:
            self.unref(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that are full of computed, verified tokens (never draft tokens)."""
        if not self.enable_prefix_caching:
            return
        verified = min(seq.num_computed_tokens, seq.num_verified_tokens)
        for i in range(len(seq.block_hashes), verified // self.block_size):
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None,
                           seq.block_token_ids(i, self.block_size), seq.adapter_digest)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if h not in self.block_of and block_id not in self.hash_of:
                self.block_of[h], self.hash_of[block_id] = block_id, h

    def share(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's full blocks (ref counted); it recomputes the partial tail itself (but for
        virtual tokens, which it copies as a new sequence does)."""
        full = min(parent.num_computed_tokens, parent.num_virtual_tokens + parent.num_prompt_tokens) // self.block_size
        released = min(parent.num_released_blocks, full)   # out of the window: the child needs them no more
        for block_id in parent.block_table[released:full]:
            self.take(block_id)
        child.block_table, child.num_released_blocks = list(parent.block_table[:full]), released
        child.block_hashes = child.block_hashes[:full]
        child.num_computed_tokens = max(full * self.block_size, child.num_pinned_tokens)
        if child.prefix is not None:
            self.hold_prefix(child.prefix)

    def unref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free[block_id] = None

    def trim(self, seq: Sequence) -> None:
        """Return blocks that only held rejected drafts."""
        keep = -(-seq.num_verified_tokens // self.block_size)
        keep = max(keep, -(-(seq.num_computed_tokens + 1) // self.block_size))
        for block_id in seq.block_table[keep:]:
            self.unref(block_id)
        del seq.block_table[keep:]

    def release_out_of_window(self, seq: Sequence, window: int) -> None:
        """Give back the blocks whose keys no later query of seq can see, when every layer attends only to
        the last `window` positions. Their ids stay in the block table so positions keep their blocks; the
        attention backends never read them (they start at the window)."""
        unseen = max(0, seq.num_computed_tokens - window + 1) // self.block_size
        for block_id in seq.block_table[seq.num_released_blocks:unseen]:
            self.unref(block_id)
        seq.num_released_blocks = max(seq.num_released_blocks, unseen)

    def release(self, seq: Sequence) -> None:
        # Free the tail first so it is evicted before the (more shareable) head of the sequence.
        for block_id in reversed(seq.block_table[seq.num_released_blocks:]):
            self.unref(block_id)
        seq.block_table, seq.block_hashes, seq.num_released_blocks = [], [], 0

    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
