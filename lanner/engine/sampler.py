"""Batched sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds, logprobs."""
import torch

from lanner.engine.sequence import Sequence
from lanner.model import fused


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output, HF's rule), presence and frequency (output only, OpenAI's rule)."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            counts = fused.token_counts(seq.output_token_ids, logits.shape[1]).float()
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def rows_of(x: torch.Tensor, rows) -> torch.Tensor:
    """x[rows] for increasing, distinct row indices (a list or tensor); x itself when they are every row: at decode
    sizes copying a step's logits or hidden states costs more than the sampling that follows."""
    return x if len(rows) == x.shape[0] else x[rows]


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit (a NaN counts as largest), as torch.argmax; through numpy for CPU fp32 rows,
    whose vectorized argmax takes 2.6 us over a 49k vocabulary where torch's takes 28 (a decode step's 1 %)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous():
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def block_min_tokens(logits: torch.Tensor, seqs: list[Sequence], stop_ids: set[int]) -> None:
    """Until min_tokens are out, no stop token may be sampled."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else stop_ids)
            logits[row, list(banned)] = float("-inf")


def filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """The distribution each row samples from: temperature, then top-k, top-p and min-p truncation."""
    temps = [s.params.temperature or 1.0 for s in seqs]
    if any(t != 1.0 for t in temps):
        logits = logits / torch.tensor(temps, dtype=logits.dtype)[:, None]
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    min_p = [s.params.min_p for s in seqs]
    if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
        probs = truncated_probs(logits, top_k, top_p)
    else:
        probs = torch.softmax(logits, dim=-1)
    if any(m > 0 for m in min_p):
        floor = torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = torch.where(probs < floor, 0.0, probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


FIRST_CANDIDATES = 256   # logits truncated_probs() first takes: past every row's top-k, and the nucleus at LM temperatures


def truncated_probs(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Each row's softmax over its top-k, then over the top-p nucleus of that (the most likely token always kept;
    top_p 1 cuts nothing), zero elsewhere. Found among the largest logits (torch.topk) rather than by sorting the
    vocabulary, which took 4 ms a row at 49k tokens (2x a batch-1 decode step), and softmaxed there: a row's
    candidates hold its nucleus once their mass reaches top_p (or they hold its top-k), and a row whose nucleus
    runs past them takes four times more, up to the whole vocabulary."""
    vocab = logits.shape[1]
    k = torch.tensor([vocab if k <= 0 else min(k, vocab) for k in top_k])[:, None]
    p = torch.tensor(top_p, dtype=logits.dtype)[:, None]
    whole = (k == vocab) & (p >= 1)   # rows kept whole
    n = min(vocab, max([FIRST_CANDIDATES] + top_k))
    # the normalizer of a row without top-k, over the whole vocabulary (a pass worth skipping at batch 64)
    total = torch.logsumexp(logits, dim=-1, keepdim=True) if bool((k == vocab).any()) else None
    while True:
        vals, order = logits.topk(n, dim=-1)   # largest first
        cut = torch.arange(n)[None, :] >= k
        held = k <= n   # the candidates hold the row's top-k
        norm = torch.logsumexp(vals.masked_fill(cut, float("-inf")), dim=-1, keepdim=True)
        probs = torch.exp(vals - (norm if total is None else torch.where(held, norm, total))).masked_fill(cut, 0.0)
        if n == vocab or bool((held | whole | (probs.sum(-1, keepdim=True) >= p)).all()):
            break
        n = min(vocab, 4 * n)
    before = probs.cumsum(-1) - probs                            # mass strictly above each token
    cut |= (before >= p) & (p < 1)
    cut[:, 0] = False                                            # always keep the most likely token
    kept = torch.softmax(vals.masked_fill(cut, float("-inf")), dim=-1)
    out = torch.zeros_like(logits).scatter_(1, order, kept)
    if bool(whole.any()):
        rows = whole[:, 0].nonzero()[:, 0]
        out[rows] = torch.softmax(logits[rows], dim=-1)
    return out


def uniforms(seqs: list[Sequence]) -> torch.Tensor:
    """One uniform number in [0, 1) per row: from the request's own generator when it has one."""
    u = torch.rand(len(seqs))
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            u[row] = torch.rand(1, generator=seq.generator)
    return u


def burst_sampling(seqs: list[Sequence], steps: int) -> tuple[tuple | None, list]:
    """A burst's sampling (DecodeStep.burst's: the rows' parameters, [steps, R] uniform numbers, each step's drawn
    by uniforms() as that step would draw them, and with penalties theirs and the rows' token histories), None where
    every row is greedy without penalties or logprobs (whose logits every step then needs); and the rows' generators
    with their states before, to rewind a burst that runs fewer steps."""
    penalized = any(seq.params.has_penalties for seq in seqs)
    rows = [r for r, seq in enumerate(seqs) if not seq.params.greedy]
    if not rows and not penalized and all(seq.params.logprobs is None for seq in seqs):
        return None, []
    sampling = [seqs[r] for r in rows]
    generators = [(seq.generator, seq.generator.get_state()) for seq in sampling if seq.generator is not None]
    u = torch.zeros(steps, len(seqs))
    if rows:
        u[:, rows] = torch.stack([uniforms(sampling) for _ in range(steps)])
    penalties = (fused.penalty_arrays(seqs), [(seq.token_ids, seq.output_token_ids) for seq in seqs]) \
        if penalized else None
    return (fused.sampling_arrays(seqs), u, penalties), generators


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: each row's uniform number u located in the row's cumulative distribution. No
    per-token random numbers: at batch 64 over a 49k vocabulary this is ~13x cheaper than an exponential race,
    which draws one per token."""
    cdf = probs.cumsum(dim=-1)
    # right=True lands on the first token whose cumulative mass exceeds u: never one with probability 0
    target = u.to(probs.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_max_(probs.shape[1] - 1).squeeze(1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """One token per row of logits from its request's distribution (filtered_probs): in one C call over the rows
    (fused.sample_rows) where it applies, else by PyTorch's ops."""
    u = uniforms(seqs)
    tokens = fused.sample_rows(logits, seqs, u)
    return tokens if tokens is not None else sample_from(filtered_probs(logits, seqs), u)


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num: int) -> dict[int, float]:
    """{token: logprob} for the chosen token and the num most likely ones."""
    out = {int(chosen): float(logprobs[chosen])}
    if num:
        vals, ids = logprobs.topk(num)
        out.update(zip(ids.tolist(), vals.tolist()))
    return out


class Sampler:
    def __init__(self, stop_token_ids: set[int]):
        self.stop_token_ids = stop_token_ids

    def processed_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if any(s.params.has_penalties or s.num_output_tokens < s.params.min_tokens for s in seqs):
            logits = apply_penalties(logits.clone(), seqs)
            block_min_tokens(logits, seqs, self.stop_token_ids)
        return logits

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One next token per row of logits [R, V] (row r belongs to seqs[r])."""
        logits = self.processed_logits(logits, seqs)
        sampled = [r for r, s in enumerate(seqs) if not s.params.greedy]
        if len(sampled) == len(seqs):
            return sample(logits, seqs)
        tokens = argmax_rows(logits)
        if sampled:   # a mixed batch: only the sampling rows pay for probabilities
            subset = [seqs[r] for r in sampled]
            tokens[sampled] = sample(logits[sampled], subset)
        return tokens


class HistoryView:
    """A sequence as one verify row sees it: its tokens plus the drafts before that row."""

    def __init__(self, seq: Sequence, drafts: list[int]):
        self.params, self.generator = seq.params, seq.generator
        self.token_ids = seq.token_ids + drafts
        self.num_output_tokens = seq.num_output_tokens + len(drafts)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.token_ids) - self.num_output_tokens:]
