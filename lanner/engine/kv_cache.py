"""BlockManager: paged KV block allocation with ref counts, an LRU free queue and prefix caching."""
from collections import OrderedDict

from lanner.engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: tuple[int, ...], extra_key) -> int:
    """A full block's identity: everything before it (parent), its tokens, and e.g. its LoRA adapter."""
    return hash((parent, token_ids, extra_key))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: dict[int, int] = {}            # block id -> hash, for cached blocks
        self.block_of: dict[int, int] = {}           # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.prefix_queries = self.prefix_hits = 0   # tokens looked up / found, for the hit rate

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

    def match_prefix(self, seq: Sequence) -> None:
        """Reuse cached blocks for the longest known prefix; the last prompt token is always computed."""
        if not self.enable_prefix_caching or seq.block_table or seq.prompt_logprobs is not None:
            return   # prompt logprobs need every prompt row computed
        tokens = seq.token_ids
        num_full = (len(tokens) - 1) // self.block_size
        self.prefix_queries += len(tokens)
        for i in range(num_full):
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None,
                           tuple(tokens[i * self.block_size:(i + 1) * self.block_size]), seq.lora_id)
            if h not in self.block_of:
                break
            self.take(self.block_of[h])
            seq.block_table.append(self.block_of[h])
            seq.block_hashes.append(h)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        self.prefix_hits += seq.num_cached_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            block_id, _ = self.free.popitem(last=False)   # evict the least recently freed
            if block_id in self.hash_of:
                del self.block_of[self.hash_of.pop(block_id)]
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks that are full of computed, verified tokens (never draft tokens)."""
        if not self.enable_prefix_caching:
            return
        verified = min(seq.num_computed_tokens, len(seq.token_ids))
        for i in range(len(seq.block_hashes), verified // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens, seq.lora_id)
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if h not in self.block_of and block_id not in self.hash_of:
                self.block_of[h], self.hash_of[block_id] = block_id, h

    def share(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's full blocks (ref counted); it recomputes the partial tail itself."""
        full = min(parent.num_computed_tokens, parent.num_prompt_tokens) // self.block_size
        released = min(parent.num_released_blocks, full)   # out of the window: the child needs them no more
        for block_id in parent.block_table[released:full]:
            self.take(block_id)
        child.block_table, child.num_released_blocks = list(parent.block_table[:full]), released
        child.block_hashes = child.block_hashes[:full]
        child.num_computed_tokens = full * self.block_size

    def unref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free[block_id] = None

    def trim(self, seq: Sequence) -> None:
        """Return blocks that only held rejected drafts."""
        keep = -(-len(seq.token_ids) // self.block_size) if seq.token_ids else 0
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
