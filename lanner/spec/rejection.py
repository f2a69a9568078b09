"""Lossless verification of draft tokens against the target's distributions.

Greedy: accept the longest prefix equal to the target's argmax, then the target's own token.
Sampling: accept draft d with probability min(1, p(d) / q(d)); on rejection sample from
normalize(max(0, p - q)); if every draft is accepted, sample a bonus token from the last row.
The emitted tokens are then distributed exactly as the target alone would sample them.
"""
import torch


def verify_greedy(target_tokens: list[int], drafts: list[int]) -> list[int]:
    """target_tokens: argmax of each of the k + 1 rows."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == target_tokens[accepted]:
        accepted += 1
    return drafts[:accepted] + [target_tokens[accepted]]


def verify_sampled(target_probs: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None) -> list[int]:
    """target_probs [k + 1, V]; draft_probs [k, V], or None when drafts are deterministic (point masses)."""
    out = []
    for j, d in enumerate(drafts):
        p = target_probs[j]
        q_d = 1.0 if draft_probs is None else float(draft_probs[j, d])
        if torch.rand(1, generator=generator).item() * q_d < float(p[d]):   # u < p/q without dividing by 0
            out.append(d)
            continue
        q = torch.zeros_like(p) if draft_probs is None else draft_probs[j]
        if draft_probs is None:
            q[d] = 1.0
        residual = (p - q).clamp_min(0)
        out.append(sample_one(residual if residual.sum() > 0 else p, generator))
        return out
    out.append(sample_one(target_probs[len(drafts)], generator))
    return out


def sample_one(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
