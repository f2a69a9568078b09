"""A draft MODEL speculates losslessly: greedy output is unchanged, sampled output keeps the target's distribution,
and the draft's own paged KV pool (rolled back by counter) never leaks a block."""
import json

import pytest
import torch
from conftest import assert_all_blocks_free, make_llm
from test_speculative import GROUNDED, OPEN, PROMPT, STEPS, chi_square_pvalue, exact_distribution, tiny, \
    tiny_logits  # noqa: F401  (fixtures)

from lanner import SamplingParams
from lanner.engine.kv_cache import BlockManager
from lanner.spec.draft import Mirror

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = GROUNDED[:2] + OPEN[:1]


def draft_spec(path: str, k: int = 4, **kw) -> dict:
    return {"method": "draft", "model": path, "num_speculative_tokens": k, **kw}


def assert_both_pools_free(llm):
    assert_all_blocks_free(llm)
    proposer = llm.engine.proposer
    proposer.propose_batch([], [])   # the next call releases the mirrors of finished sequences
    assert not proposer.mirrors
    assert proposer.blocks.num_free_blocks == proposer.blocks.num_blocks, "draft blocks leaked"


def test_mirror_rolls_back_to_the_longest_verified_prefix():
    class Seq:
        generator, token_ids = None, [1, 2, 3]
    mirror = Mirror(Seq())
    mirror.sync([1, 2, 3])
    assert mirror.num_computed_tokens == 0 and mirror.token_ids == [1, 2, 3]
    mirror.num_computed_tokens = 5                  # fed 1 2 3 and drafts 7 8; 9 drafted, never fed
    mirror.token_ids += [7, 8, 9]
    mirror.sync([1, 2, 3, 7, 5])                    # first draft accepted, second rejected (target said 5)
    assert mirror.num_computed_tokens == 4 and mirror.token_ids == [1, 2, 3, 7, 5]
    mirror.num_computed_tokens = 5
    mirror.sync([1, 2, 3, 7, 5])                    # nothing new: the last token is recomputed for its logits
    assert mirror.num_computed_tokens == 4


# ---- greedy identity on the default model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def draft_path():
    from lanner.spec.make_draft import default_draft_path
    return default_draft_path()


@pytest.fixture(scope="module")
def baseline(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_truncated_draft_is_an_hf_directory_sharing_the_vocabulary(draft_path, llm):
    from lanner.model.loader import load_model_files
    config, weights, tokenizer, _ = load_model_files(draft_path)
    assert config["num_hidden_layers"] == 6 and config["vocab_size"] == llm.engine.model_config.vocab_size
    assert not any(k.startswith("model.layers.6.") for k in weights)
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.encode(text) == llm.tokenizer.encode(text)
    assert tokenizer.stop_token_ids == llm.tokenizer.stop_token_ids


def test_target_as_its_own_draft_accepts_nearly_everything(default_model_path, baseline):
    """A draft equal to the target proves the mirror's KV stays exact through rollbacks and catch-ups."""
    llm = make_llm(default_model_path, speculative=draft_spec(default_model_path))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == baseline
    assert llm.engine.stats()["spec_mean_accepted_length"] > 3.5
    assert_both_pools_free(llm)


@pytest.fixture(scope="module")
def spec_llm(default_model_path, draft_path):
    return make_llm(default_model_path, speculative=draft_spec(draft_path))


def test_greedy_identical_in_a_batch_mixed_with_sampled_requests(spec_llm, baseline):
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, seed=7, ignore_eos=True)
    outs = spec_llm.generate(PROMPTS + OPEN[1:2], [GREEDY] * len(PROMPTS) + [sampled], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:len(PROMPTS)]] == baseline
    assert spec_llm.engine.stats()["spec_drafted_tokens"] > 0
    assert_both_pools_free(spec_llm)


def test_n_children_speculate_losslessly(llm, spec_llm):
    params = SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(GROUNDED[0], params, use_tqdm=False)[0].outputs]
    assert [o.token_ids for o in spec_llm.generate(GROUNDED[0], params, use_tqdm=False)[0].outputs] == want
    assert_both_pools_free(spec_llm)


def test_greedy_identical_under_preemption_and_a_tiny_draft_pool(default_model_path, draft_path, baseline):
    llm = make_llm(default_model_path, num_kv_blocks=20, block_size=4, speculative=draft_spec(draft_path))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == baseline
    assert llm.engine.stats()["preemptions"] > 0 and llm.engine.stats()["spec_drafted_tokens"] > 0
    assert_both_pools_free(llm)


# ---- tiny models: exhaustion, seeds, and the statistical test -----------------------------------------------

@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, tiny):
    """Another random 6-token model (other seed, one layer): its q differs clearly from the target's p."""
    import transformers
    from safetensors.torch import save_file
    target_dir = tiny[0]
    cfg = json.loads(open(f"{target_dir}/config.json").read()) | {"num_hidden_layers": 1}
    path = tmp_path_factory.mktemp("tiny-draft")
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text(open(f"{target_dir}/tokenizer.json").read())
    return str(path)


def tiny_llm(tiny, tiny_draft, k: int, **kw):
    return make_llm(tiny[0], kv_cache_memory=0.05, max_num_seqs=256,
                    speculative=draft_spec(tiny_draft, k, max_batch_size=10**6), **kw)


def test_a_full_draft_pool_means_no_drafts_not_a_failure(tiny, tiny_draft):
    llm = tiny_llm(tiny, tiny_draft, 4)
    llm.engine.proposer.blocks = BlockManager(1, llm.engine.cfg.block_size, False)   # room for 16 tokens only
    outs = llm.generate([PROMPT * 3, PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    assert llm.engine.stats()["spec_drafted_tokens"] > 0   # the short prompt fit, the long one never did
    assert_both_pools_free(llm)


def test_seeded_requests_reproduce_with_a_draft_model(tiny, tiny_draft):
    llm = tiny_llm(tiny, tiny_draft, 3)
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=s, ignore_eos=True) for s in range(8)]
    first = [o.outputs[0].token_ids for o in llm.generate([PROMPT] * 8, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate([PROMPT] * 8, params, use_tqdm=False)]
    assert first == again and len(set(map(tuple, first))) > 1
    assert llm.engine.stats()["spec_drafted_tokens"] > 0


def sample_many(tiny, tiny_draft, k: int, temperature: float, n: int = 1500) -> list[tuple]:
    """First STEPS tokens of n seeded requests; max_tokens leaves room for k drafts after the first token."""
    llm = tiny_llm(tiny, tiny_draft, k)
    params = [SamplingParams(temperature=temperature, max_tokens=STEPS + k - 1, seed=s, ignore_eos=True)
              for s in range(n)]
    outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
    assert llm.engine.stats()["spec_drafted_tokens"] > 0
    assert_both_pools_free(llm)
    return [tuple(o.outputs[0].token_ids[:STEPS]) for o in outs]


@pytest.mark.parametrize("k,temperature", [(2, 1.0), (3, 0.7)])
def test_sampled_distribution_matches_the_target_with_a_draft_model(tiny, tiny_draft, tiny_logits, k, temperature):
    exact = exact_distribution(tiny_logits, temperature)
    assert chi_square_pvalue(sample_many(tiny, tiny_draft, k, temperature), exact) > 1e-3


@pytest.mark.parametrize("broken", ["accept_every_draft", "shifted_q"])
def test_negative_controls_are_detected(tiny, tiny_draft, tiny_logits, monkeypatch, broken):
    """Accepting every draft, or verifying against a q other than the one each draft was sampled from
    (here: the rows off by one), is lossy. (Verifying with q = None, i.e. as if drafts were fixed, is not:
    it stays exact, only accepts less often, so it is no negative control.)"""
    import lanner.engine.engine as engine_module
    from lanner.spec.rejection import sample_one, verify_sampled

    def accept_every_draft(target_probs, drafts, draft_probs, generator):
        return list(drafts) + [sample_one(target_probs[len(drafts)], generator)]

    def shifted_q(target_probs, drafts, draft_probs, generator):
        return verify_sampled(target_probs, drafts, draft_probs.roll(1, dims=0), generator)

    replacement = {"accept_every_draft": accept_every_draft, "shifted_q": shifted_q}[broken]
    monkeypatch.setattr(engine_module, "verify_sampled", replacement)
    samples = sample_many(tiny, tiny_draft, 2, 1.0)
    assert chi_square_pvalue(samples, exact_distribution(tiny_logits, 1.0)) < 1e-6
