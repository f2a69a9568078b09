"""Sampling parameters behave as documented and invalid ones are refused by name."""
import pytest
from conftest import PROMPTS

from lanner import SamplingParams


def texts(outs):
    return [o.outputs[0].text for o in outs]


def test_seed_reproduces_across_batch_compositions(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(PROMPTS[:4], [params, others, others, others], use_tqdm=False)[0].outputs[0].token_ids
    assert alone == mixed


def test_different_seeds_differ(llm):
    outs = [llm.generate(PROMPTS[2], SamplingParams(temperature=1.0, max_tokens=16, seed=s, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids for s in range(4)]
    assert len({tuple(o) for o in outs}) > 1


def test_top_k_1_equals_greedy(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True)
    assert texts(llm.generate(PROMPTS[:3], greedy, use_tqdm=False)) == texts(llm.generate(PROMPTS[:3], top1, use_tqdm=False))


def test_stop_string_ends_generation_and_is_excluded(llm):
    free = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0].outputs[0].text
    stop = free.strip().split()[1]
    out = llm.generate(PROMPTS[4], SamplingParams(temperature=0, max_tokens=30, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and free.startswith(out.text)


def test_stop_token_ids_end_generation(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    token = free.outputs[0].token_ids[3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[token]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == token and out.finish_reason == "stop"
    assert out.token_ids == free.outputs[0].token_ids[:free.outputs[0].token_ids.index(token) + 1]


def test_n_children_share_prompt_and_differ(llm):
    out = llm.generate(PROMPTS[2], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate(PROMPTS[2], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True),
                         use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_greedy_n_children_are_identical(llm):
    out = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in out.outputs}) == 1


def test_repetition_and_frequency_penalties_break_a_loop(llm):
    prompt = "1, 2, 3, 1, 2, 3, 1, 2, 3,"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    for params in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=1.5)):
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert len(set(out.token_ids)) > len(set(base.token_ids))


def test_penalty_arithmetic():
    """Repetition (HF): positive logits / p, negative * p over prompt + output; presence and frequency
    (OpenAI): minus presence once and frequency per occurrence, over output tokens only."""
    import torch

    from lanner.engine.sampler import apply_penalties
    from lanner.engine.sequence import Sequence
    seq = Sequence("r", [0, 1], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25))
    seq.token_ids += [2, 2, 3]
    logits = torch.tensor([[4.0, -4.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits.clone(), [seq])
    expected = torch.tensor([[2.0, -8.0, 0.5 - 0.5 - 0.5, 0.5 - 0.5 - 0.25, 1.0]])
    assert torch.allclose(out, expected)


def test_min_tokens_blocks_eos(llm):
    out = llm.chat([{"role": "user", "content": "Say yes."}], SamplingParams(temperature=0, max_tokens=40, min_tokens=30),
                   use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 30


def test_logprobs_and_prompt_logprobs(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 4
    for token, entry in zip(comp.token_ids, comp.logprobs):
        assert token in entry and len(entry) >= 3
        assert entry[token] == max(entry.values())   # greedy picks the most likely token
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(out.prompt_token_ids[i] in out.prompt_logprobs[i] for i in range(1, len(out.prompt_token_ids)))
    assert comp.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(comp.token_ids, comp.logprobs)))


@pytest.mark.parametrize("name,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -5), ("min_p", 2.0), ("n", 0),
    ("max_tokens", 0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
    ("logprobs", -1), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_invalid_parameters_raise_naming_them(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}"):
        SamplingParams(**{name: value})


def test_sample_from_follows_the_distribution_and_never_picks_a_zero():
    """Chi-square against the exact probabilities; a token of probability 0 is never drawn, also at row ends."""
    import torch
    from scipy.stats import chisquare

    from lanner.engine.sampler import sample_from, uniforms
    from lanner.engine.sequence import Sequence

    probs = torch.tensor([[0.0, 0.1, 0.0, 0.25, 0.4, 0.25, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    seqs = [Sequence("r", [1], SamplingParams(temperature=1.0), seed=7), Sequence("s", [1], SamplingParams())]
    draws = torch.stack([sample_from(probs, uniforms(seqs)) for _ in range(4000)])       # [4000, 2]
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=7).float()
        assert counts[probs[row] == 0].sum() == 0
        keep = probs[row] > 0
        assert chisquare(counts[keep], 4000 * probs[row][keep]).pvalue > 1e-3
    counts = torch.bincount(draws[:, 0], minlength=7).float()[probs[0] > 0]  # negative control: the same
    assert chisquare(counts, torch.full((4,), 1000.0)).pvalue < 1e-3        # draws are not uniform


def test_argmax_rows_picks_as_torch_does():
    """Greedy tokens come from numpy's argmax on CPU rows: the first of tied maxima, a NaN over any number, and
    the same on the strided or bf16 rows that take torch's."""
    import torch

    from lanner.engine.sampler import argmax_rows
    logits = torch.randn(6, 49152)
    logits[1, 7] = logits[1, 9000] = 50.0                          # a tie: the first wins
    logits[2, :] = float("-inf")                                    # nothing allowed: index 0
    logits[3, 123] = float("nan")                                   # NaN beats everything
    logits[4, 5] = float("inf")
    for rows in (logits, logits[:, :1000], logits.bfloat16()):
        assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))
    assert argmax_rows(logits).tolist()[1:4] == [7, 0, 123]


def nucleus_bounds(logits, top_k, top_p, slack=1e-5):
    """Per row, the fewest and most tokens truncation may keep, in float64: the top-k (all where top_k <= 0),
    then every token whose mass strictly above it (of the top-k renormalized) is below top_p, the most likely
    always. Tokens within `slack` of the boundary may fall either way: fp32 sums move it by ~1e-7 a thousand tokens."""
    import torch
    vocab = logits.shape[1]
    lo, hi = [], []
    for row, k, p in zip(logits.double(), top_k, top_p):
        vals = row.sort(descending=True).values[:vocab if k <= 0 else min(k, vocab)]
        probs = torch.softmax(vals, dim=-1)
        before = probs.cumsum(-1) - probs
        if p >= 1:
            lo.append(len(vals)), hi.append(len(vals))
            continue
        lo.append(max(1, int((before < p - slack).sum()))), hi.append(max(1, int((before < p + slack).sum())))
    return lo, hi


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 10.0])   # flat rows: nuclei of thousands of tokens, past the
def test_truncated_probs_keep_the_top_k_then_the_nucleus(scale):   # first candidates; peaked: a handful
    import torch

    from lanner.engine.sampler import FIRST_CANDIDATES, truncated_probs
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(9, 49152, generator=gen) * scale
    logits[8, 1000:] = float("-inf")                     # a grammar's mask: fewer allowed tokens than asked for
    top_k = [0, 0, 40, 1, 5000, 0, 49152, 300, 0]
    top_p = [0.9, 0.5, 1.0, 0.9, 0.95, 1.0, 0.99, 0.7, 0.999]
    got = truncated_probs(logits, top_k, top_p)
    kept = got > 0
    counts = kept.sum(-1).tolist()
    lo, hi = nucleus_bounds(logits, top_k, top_p)
    for row in range(9):
        assert lo[row] <= counts[row] <= hi[row], (row, counts[row], lo[row], hi[row])
        # the kept tokens are the largest logits, their probabilities the softmax over them
        want = torch.softmax(logits[row][kept[row]].double(), dim=-1)
        assert torch.allclose(got[row][kept[row]].double(), want, rtol=1e-5, atol=0)
        if counts[row] < logits.shape[1]:
            assert logits[row][kept[row]].min() >= logits[row][~kept[row]].max()
    assert counts[2] == 40 and counts[3] == 1 and counts[5] == 49152 and counts[8] <= 1000
    if scale <= 1.0:   # the case the growth is for
        assert counts[0] > 4 * FIRST_CANDIDATES


def test_truncated_probs_on_a_small_vocabulary():
    import torch

    from lanner.engine.sampler import truncated_probs
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 2.0], [0.0, 3.0, 1.0, 2.0]])
    probs = truncated_probs(logits, [0, 2, 0], [0.7, 1.0, 1.0])
    assert (probs > 0).tolist() == [[True, True, False, False], [False, True, False, True], [True, True, True, True]]
    assert torch.allclose(probs[1, [1, 3]], torch.softmax(torch.tensor([3.0, 2.0]), -1))
    assert torch.allclose(probs[2], torch.softmax(logits[2], -1)) and torch.allclose(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_sample_rows_draws_from_the_truncated_distribution(scale):
    """The C sampler against truncated_probs (the PyTorch path's distribution): uniforms on a grid of N points
    land on each token about N times its probability and on no token outside the nucleus (top-k, top-p, min-p,
    temperature, and a row that truncates nothing)."""
    import torch

    from lanner.engine.sampler import filtered_probs
    from lanner.engine.sequence import Sequence
    from lanner.model import fused
    if fused.library() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(3)
    V, N = 5000, 10000
    logits = torch.randn(1, V, generator=gen) * scale
    grid = (torch.arange(N, dtype=torch.float64) + 0.5) / N
    for params in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.0, top_k=40),
                   SamplingParams(temperature=0.8, top_k=300, top_p=0.95, min_p=0.3),
                   SamplingParams(temperature=1.3), SamplingParams(temperature=1.0, min_p=0.2)):
        seqs = [Sequence("r", [1], params)] * N
        tokens = fused.sample_rows(logits.expand(N, V), seqs, grid.float())
        counts = torch.bincount(tokens, minlength=V).double()
        want = filtered_probs(logits, seqs[:1])[0].double() * N
        assert (counts[want == 0] == 0).all()                      # nothing outside the nucleus
        assert (counts - want).abs().max() <= 2 + 1e-4 * N          # each token's share, to rounding
    # a negative control: the untruncated distribution is not the top-p one
    wide = fused.sample_rows(logits.expand(N, V), [Sequence("r", [1], SamplingParams(temperature=0.7))] * N, grid.float())
    assert (torch.bincount(wide, minlength=V) > 0).sum() > (counts > 0).sum()
