"""Speculative decoding is lossless: greedy output is unchanged, sampled output keeps the target's distribution."""
import itertools

import pytest
import torch
from conftest import assert_all_blocks_free, make_llm, save_tiny_model

from lanner import SamplingParams
from lanner.engine.kv_cache import block_hash
from lanner.spec.proposers import NgramProposer

PASSAGE = ("The mitochondrion is the powerhouse of the cell. It produces ATP through oxidative phosphorylation, "
           "using oxygen and nutrients. Mitochondria have their own DNA and divide independently.")
GROUNDED = [f"Repeat this passage exactly:\n{PASSAGE}\nRepeat:", f"def add(a, b):\n    return a + b\n\n# same again\n",
            f"Extract the first sentence: {PASSAGE}\nFirst sentence:", "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"]
OPEN = ["Tell me a story about a dragon.", "What is the meaning of life?"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def test_ngram_proposes_the_continuation_of_the_latest_match():
    proposer = NgramProposer(num_tokens=3, min_n=1, max_n=3)
    assert proposer.propose([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3], 3) == [5, 6, 1]
    assert proposer.propose([7, 8, 9], 3) == []
    assert proposer.propose([1, 2, 1], 5) == [2, 1]


@pytest.fixture(scope="module")
def baseline(llm):
    return [o.outputs[0].token_ids for o in llm.generate(GROUNDED + OPEN, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("options", [
    dict(),
    dict(num_kv_blocks=20, block_size=4),               # preemption
    dict(max_num_batched_tokens=9),                      # chunked prefill, drafts cut by the budget
    dict(enable_prefix_caching=False),
], ids=["plain", "preempt", "chunked", "no-prefix-cache"])
def test_greedy_output_identical_with_ngram_speculation(default_model_path, baseline, options):
    llm = make_llm(default_model_path, speculative=NGRAM, **options)
    got = [o.outputs[0].token_ids for o in llm.generate(GROUNDED + OPEN, GREEDY, use_tqdm=False)]
    assert got == baseline
    stats = llm.engine.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_mean_accepted_length"] > 1.5
    assert_all_blocks_free(llm)


def test_drafts_that_do_not_fit_the_token_budget_are_dropped_not_split(default_model_path, baseline):
    """One sequence (full k every step) with a 3-token budget: its 1 + 4 verify rows never fit a step."""
    llm = make_llm(default_model_path, speculative=NGRAM, max_num_batched_tokens=3)
    got = llm.generate(GROUNDED[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == baseline[0]
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    assert_all_blocks_free(llm)


def test_n_children_speculate_losslessly(default_model_path, llm):
    params = SamplingParams(n=2, temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(GROUNDED[0], params, use_tqdm=False)[0].outputs]
    spec = make_llm(default_model_path, speculative=NGRAM)
    assert [o.token_ids for o in spec.generate(GROUNDED[0], params, use_tqdm=False)[0].outputs] == want


def test_prefix_cache_never_holds_a_rejected_token(default_model_path):
    llm = make_llm(default_model_path, speculative=NGRAM, block_size=4)
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in GROUNDED + OPEN]
    bs = engine.cfg.block_size
    while engine.has_unfinished_requests():
        engine.step()
        for seq in engine.scheduler.running:
            parent = None
            for i, h in enumerate(seq.block_hashes):   # hashed blocks hold verified tokens only
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                assert len(tokens) == bs
                parent = block_hash(parent, tokens, seq.adapter_digest)
                assert h == parent
    assert engine.stats()["spec_drafted_tokens"] > engine.stats()["spec_accepted_tokens"] > 0
    assert not any(rid in engine.requests for rid in ids)
    assert_all_blocks_free(llm)


# ---- the statistical test: the sampled distribution is exactly the target's ------------------------------

VOCAB, PROMPT, STEPS = 6, [1, 2, 3, 1, 2, 3, 1, 2], 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llm):
    """A tiny random Llama with a 6-token vocabulary (weights scaled up so its distributions are peaky)."""
    path = tmp_path_factory.mktemp("tiny-spec")
    model = save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, vocab_size=VOCAB, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, initializer_range=0.3, seed=3)
    return str(path), model


@pytest.fixture(scope="module")
def tiny_logits(tiny) -> dict[tuple, torch.Tensor]:
    """Next-token logits of the HF model after PROMPT + every prefix of up to STEPS - 1 tokens."""
    _, model = tiny
    table = {}
    for length in range(STEPS):
        for prefix in itertools.product(range(VOCAB), repeat=length):
            with torch.no_grad():
                table[prefix] = model(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
    return table


def exact_distribution(logits: dict[tuple, torch.Tensor], temperature: float) -> dict[tuple, float]:
    """P(first STEPS tokens), by enumerating every continuation."""
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=STEPS):
        p = 1.0
        for i, t in enumerate(seq):
            p *= float(torch.softmax(logits[seq[:i]] / temperature, -1)[t])
        probs[seq] = p
    return probs


def chi_square_pvalue(samples: list[tuple], exact: dict[tuple, float]) -> float:
    """Pearson chi-square, pooling cells with expected count < 5 into one."""
    from collections import Counter
    from scipy.stats import chi2
    counts, n = Counter(samples), len(samples)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for cell, p in exact.items():
        if p * n >= 5:
            observed.append(counts[cell])
            expected.append(p * n)
        else:
            pool_o, pool_e = pool_o + counts[cell], pool_e + p * n
    observed.append(pool_o)
    expected.append(pool_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
    return float(chi2.sf(stat, len(observed) - 1))


def sample_many(path: str, k: int, temperature: float, n: int = 1500) -> list[tuple]:
    llm = make_llm(path, kv_cache_memory=0.05, max_num_seqs=256,
                   speculative={"method": "ngram", "num_speculative_tokens": k, "max_batch_size": 10**6})
    params = [SamplingParams(temperature=temperature, max_tokens=STEPS, seed=s, ignore_eos=True) for s in range(n)]
    outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
    assert llm.engine.stats()["spec_drafted_tokens"] > 0
    return [tuple(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("k,temperature", [(1, 1.0), (2, 0.7), (4, 1.5)])
def test_sampled_distribution_matches_the_target(tiny, tiny_logits, k, temperature):
    exact = exact_distribution(tiny_logits, temperature)
    assert chi_square_pvalue(sample_many(tiny[0], k, temperature), exact) > 1e-3


def test_negative_control_accepting_every_draft_is_detected(tiny, tiny_logits, monkeypatch):
    import lanner.engine.engine as engine_module
    from lanner.spec.rejection import sample_one

    def accept_all(target_probs, drafts, draft_probs, generator):
        return list(drafts) + [sample_one(target_probs[len(drafts)], generator)]

    monkeypatch.setattr(engine_module, "verify_sampled", accept_all)
    assert chi_square_pvalue(sample_many(tiny[0], 2, 1.0), exact_distribution(tiny_logits, 1.0)) < 1e-6
