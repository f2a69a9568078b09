"""Draft proposers: cheap guesses of the next k tokens that the target verifies in one pass."""


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens, propose what followed."""

    drafts_are_free = True   # a lookup in the request's own tokens: no forward pass
    reads_hidden_states = False

    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 4):
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n

    def propose_batch(self, seqs, wanted: list[int]) -> list[list[int]]:
        return [self.propose(seq.token_ids, k) for seq, k in zip(seqs, wanted)]

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        k = min(k, self.num_tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, len(token_ids) - 1), self.min_n - 1, -1):
            start = find_last(token_ids, token_ids[-n:], end=len(token_ids) - n)
            if start >= 0:
                return token_ids[start + n:start + n + k]
        return []


def find_last(haystack: list[int], needle: list[int], end: int) -> int:
    """Start of the last occurrence of needle beginning before `end`, or -1."""
    first, n = needle[0], len(needle)
    for i in range(end - 1, -1, -1):
        if haystack[i] == first and haystack[i:i + n] == needle:
            return i
    return -1
