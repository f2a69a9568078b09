"""EAGLE draft heads: the served head computes what the trained one does, speculation with it is lossless, and
`lanner train-draft` makes a head the engine serves."""
import json

import pytest
import torch
from conftest import assert_all_blocks_free, make_llm, save_tiny_model
from test_speculative import GROUNDED, OPEN, PROMPT, STEPS, chi_square_pvalue, exact_distribution, tiny, \
    tiny_logits  # noqa: F401 (fixtures)

from lanner import SamplingParams
from lanner.config import SpeculativeConfig
from lanner.spec.eagle import DraftHead, HeadConfig, default_head_path, load_head, save_head

GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def random_head(path, llm, vocab_ids=None, seed=0, std=None) -> str:
    """A random head for llm's model; std scales its weights up (peaky draft distributions)."""
    config = HeadConfig.for_target(llm.engine.model_config, "test")
    vocab_ids = torch.arange(config.target_vocab_size) if vocab_ids is None else vocab_ids
    torch.manual_seed(seed)
    head = DraftHead(config, len(vocab_ids))
    if std is not None:
        for name, p in head.named_parameters():
            if "norm" not in name:
                torch.nn.init.normal_(p, std=std)
    save_head(str(path), config, head.state_dict(), vocab_ids)
    return str(path)


def eagle(path: str | None = None, k: int = 4, **kw) -> dict:
    return {"method": "eagle", "num_speculative_tokens": k, "max_batch_size": 10**6} | ({"model": path} if path else {}) | kw


def test_cli_forms_parse():
    assert SpeculativeConfig.parse("eagle:3") == SpeculativeConfig("eagle", 3)
    assert SpeculativeConfig.parse("eagle") == SpeculativeConfig("eagle", 4)
    assert SpeculativeConfig.parse("eagle:/heads/a:b:2") == SpeculativeConfig("eagle", 2, "/heads/a:b")
    with pytest.raises(ValueError, match="needs a draft model path|needs a model"):
        SpeculativeConfig.parse("draft:5")


def test_draft_length_follows_measured_costs_and_acceptance():
    """k maximizes expected tokens per second: long drafts when verify rows are cheap and drafts accepted,
    none when a verify costs more than its accepted tokens bring (with a 1-draft probe now and then)."""
    from lanner.engine.engine import StepCosts
    from lanner.spec.eagle import PROBE_EVERY, AcceptanceByDepth, EagleProposer
    config = HeadConfig(8, 16, 2, 1, 4, 1e-5, 1e4, None, 64, 10, training={"history": [
        {"acceptance_length": 3.0, "by_position": [0.9, 0.8, 0.7, 0.6]}]})
    proposer = EagleProposer.__new__(EagleProposer)
    proposer.num_tokens, proposer.idle_steps, proposer.draft_seconds = 4, 0, 0.0005
    proposer.step_costs, proposer.depth = StepCosts(), AcceptanceByDepth(4, config)
    for rows in range(1, 6):
        proposer.step_costs.record(rows, 0.006)        # verify rows as cheap as a decode row
    assert proposer.draft_length(1) == 4
    for rows in range(2, 6):
        proposer.step_costs.record(rows, 0.012 * rows)  # expensive verify rows
    proposer.step_costs.seconds.update({r: 0.012 * r for r in range(2, 6)})
    for _ in range(50):
        proposer.depth.record(4, 0)                     # every first draft rejected
    decisions = [proposer.draft_length(1) for _ in range(PROBE_EVERY)]
    assert decisions.count(0) == PROBE_EVERY - 1 and decisions[-1] == 1


# ---- the served head equals the trained one -------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory, llm):
    """A small random Llama with the default tokenizer, saved in bf16 as hub checkpoints are (so its linears and
    LM head load as BF16 rows, quantization="auto"), and a random head for it (GQA: 4 heads, 2 KV heads)."""
    path = tmp_path_factory.mktemp("eagle-small")
    save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", llm.tokenizer, vocab_size=llm.tokenizer.vocab_size,
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, seed=5, dtype=torch.bfloat16)
    model = make_llm(str(path))
    head = random_head(tmp_path_factory.mktemp("eagle-small-head"), model, torch.arange(0, 4000, 3), seed=1, std=0.2)
    return str(path), head


def test_served_chain_equals_the_unrolled_training_forward(small, monkeypatch):
    """Catch-up over a prompt with real features, then 3 chain rows fed the head's own outputs: the paged head's
    outputs equal DraftHead.unroll's at that origin (teacher tokens = the drafted ones). Served in fp32 here (on
    the CPU the head's linears are q8_0 blocks by default: an approximation that only moves acceptance)."""
    import lanner.spec.eagle
    monkeypatch.setattr(lanner.spec.eagle, "DRAFT_FORMAT", "none")
    path, head_path = small
    llm = make_llm(path, speculative=eagle(head_path, 3), enable_prefix_caching=False)
    engine, proposer = llm.engine, llm.engine.proposer
    proposer.step_costs = None   # always the full k (no measured costs to weigh)
    tokens = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    engine.add_request(tokens, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()                                          # prefill: the head has pending features
    seq = engine.scheduler.running[0]
    state = proposer.states[seq.seq_id]
    features = torch.cat(state.pending).clone()           # [zeros, h_0 .. h_{n-1}]
    outputs = []
    forward = proposer.forward
    proposer.forward = lambda head, rows: outputs.append(out := forward(head, rows)) or out
    drafts = proposer.propose_batch([seq], [3])[0]
    proposer.forward = forward
    chain = [outputs[0][0][-1]] + [o[0][-1] for o in outputs[1:]]

    config, weights, vocab_ids = load_head(head_path)
    dense = DraftHead(config, len(vocab_ids))
    dense.load_state_dict(weights)
    ids = torch.tensor(seq.token_ids + drafts[:-1])        # teacher tokens: x_0 .. x_N, then the drafts fed
    n = len(seq.token_ids)
    embeds = engine.runner.model.embed_tokens(ids)[None].float()
    inputs = torch.zeros(1, len(ids), features.shape[1])
    inputs[0, :n] = features[:n]
    with torch.no_grad():
        unrolled = dense.unroll(embeds, inputs, 3)
    for j, out in enumerate(chain):
        torch.testing.assert_close(out, unrolled[j][0, n - 1], rtol=1e-4, atol=1e-4)
    engine.abort_request(seq.request_id)


# ---- lossless ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(llm):
    return [o.outputs[0].token_ids for o in llm.generate(GROUNDED + OPEN, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def default_head(default_model_path):
    return default_head_path(default_model_path)


@pytest.mark.parametrize("options", [
    dict(),
    dict(num_kv_blocks=24, block_size=4),               # preemption: heads restart from the recomputed prompt
    dict(max_num_batched_tokens=9),                      # chunked prefill: features arrive chunk by chunk
], ids=["plain", "preempt", "chunked"])
def test_greedy_output_identical_with_the_shipped_head(default_model_path, baseline, options):
    llm = make_llm(default_model_path, speculative=eagle(), **options)
    if not options:   # the full k every step: the acceptance then measures the head, not the step costs measured
        llm.engine.proposer.step_costs = None
    got = [o.outputs[0].token_ids for o in llm.generate(GROUNDED + OPEN, GREEDY, use_tqdm=False)]
    assert got == baseline
    stats = llm.engine.stats()
    assert stats["spec_drafted_tokens"] > 0
    if not options:
        # a trained head, not a random one (1.42 measured on these raw, untemplated prompts; a random head: 1.0)
        assert stats["spec_mean_accepted_length"] > 1.3, stats
    assert_all_blocks_free(llm)
    assert not llm.engine.proposer.states


def test_eagle_plus_ngram_is_lossless_and_copies(default_model_path, baseline):
    llm = make_llm(default_model_path, speculative=eagle(method="eagle+ngram"))
    got = [o.outputs[0].token_ids for o in llm.generate(GROUNDED, GREEDY, use_tqdm=False)]
    assert got == baseline[:len(GROUNDED)]
    assert llm.engine.stats()["spec_mean_accepted_length"] > 2.0
    assert_all_blocks_free(llm)


def test_prefix_cache_hit_then_drafts(default_model_path, baseline):
    """The second request's prompt is served from cached blocks (no features for it): lossless still."""
    llm = make_llm(default_model_path, speculative=eagle())
    for _ in range(2):
        got = llm.generate(GROUNDED[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert got == baseline[0]
    assert llm.engine.blocks.hit_rate() > 0.3
    assert_all_blocks_free(llm)


def test_shipped_head_config_says_how_it_was_made(default_head):
    config = json.load(open(f"{default_head}/config.json"))
    assert config["training"]["command"].startswith("lanner train-draft")
    assert config["training"]["history"]


def test_bad_heads_are_refused_clearly(default_model_path, small, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        make_llm(default_model_path, speculative=eagle(str(tmp_path)))
    with pytest.raises(ValueError, match="trained for a model of"):
        make_llm(default_model_path, speculative=eagle(small[1]))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read draft head"):
        make_llm(default_model_path, speculative=eagle(str(tmp_path)))
    with pytest.raises(ValueError, match="no draft head ships"):
        make_llm(small[0], speculative=eagle())


def test_a_full_pool_means_fewer_drafts_not_a_failure(small):
    path, head = small
    llm = make_llm(path, speculative=eagle(head, 4), num_kv_blocks=6, block_size=4)
    outs = llm.generate([PROMPT * 2, PROMPT], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 5 for o in outs)
    assert_all_blocks_free(llm)


def test_an_adapter_drafts_with_its_own_head(small, tmp_path):
    """An adapter directory with a draft_head/ gets its requests drafted by that head; outputs stay the
    adapted model's."""
    import shutil

    from test_lora import make_adapter

    from lanner import LoRARequest
    path, head = small
    adapter = tmp_path / "adapter"
    make_adapter(path, adapter, seed=4)
    shutil.copytree(random_head(tmp_path / "other-head", make_llm(path), seed=9), adapter / "draft_head")
    lora = LoRARequest("a", 1, str(adapter))
    want = make_llm(path, enable_lora=True).generate(OPEN, GREEDY, use_tqdm=False, lora_request=lora)
    llm = make_llm(path, enable_lora=True, speculative=eagle(head, 3))
    got = llm.generate(OPEN, GREEDY, use_tqdm=False, lora_request=lora)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    proposer = llm.engine.proposer
    assert [h.path for h in proposer.adapter_heads.values()] == [str(adapter / "draft_head")]
    assert proposer.adapter_heads[str(adapter / "draft_head")] is not proposer.base
    assert llm.engine.stats()["spec_drafted_tokens"] > 0
    assert_all_blocks_free(llm)


def test_prefix_tuned_requests_run_without_drafts_beside_drafting_ones(small, tmp_path):
    """A prefix adapter's pinned KV fills the model's layers of its blocks (not the head's); its requests
    do not draft (virtual tokens), the others do; nothing leaks."""
    import transformers
    from peft import PrefixTuningConfig, get_peft_model

    from lanner import LoRARequest
    path, head = small
    torch.manual_seed(3)
    get_peft_model(transformers.LlamaForCausalLM.from_pretrained(path),
                   PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)).save_pretrained(str(tmp_path / "p"))
    prefix = LoRARequest("p", 7, str(tmp_path / "p"))
    want = make_llm(path, enable_lora=True).generate(OPEN, GREEDY, use_tqdm=False, lora_request=prefix)
    llm = make_llm(path, enable_lora=True, speculative=eagle(head, 3))
    got = llm.generate(OPEN, GREEDY, use_tqdm=False, lora_request=prefix)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    plain = llm.generate(OPEN, GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in plain)
    assert llm.engine.stats()["spec_drafted_tokens"] > 0
    llm.engine.remove_lora(7)
    assert_all_blocks_free(llm)


# ---- sampling: the chi-square test on a 6-token model ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory, tiny):  # noqa: F811
    return random_head(tmp_path_factory.mktemp("tiny-head"), make_llm(tiny[0]), seed=2, std=0.5)


def sample_many(tiny, head, k: int, temperature: float, n: int = 1500) -> list[tuple]:  # noqa: F811
    llm = make_llm(tiny[0], kv_cache_memory=0.05, max_num_seqs=256, speculative=eagle(head, k))
    llm.engine.proposer.step_costs = None   # the full k every step: as many drafts verified as possible
    params = [SamplingParams(temperature=temperature, max_tokens=STEPS + k - 1, seed=s, ignore_eos=True)
              for s in range(n)]
    outs = llm.generate([PROMPT] * n, params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats["spec_drafted_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    assert_all_blocks_free(llm)
    return [tuple(o.outputs[0].token_ids[:STEPS]) for o in outs]


@pytest.mark.parametrize("k,temperature", [(2, 1.0), (3, 0.7)])
def test_sampled_distribution_matches_the_target_with_a_head(tiny, tiny_head, tiny_logits, k, temperature):  # noqa: F811
    exact = exact_distribution(tiny_logits, temperature)
    assert chi_square_pvalue(sample_many(tiny, tiny_head, k, temperature), exact) > 1e-3


def test_negative_control_is_detected(tiny, tiny_head, tiny_logits, monkeypatch):  # noqa: F811
    """Verifying against a q other than the one each draft was drawn from is lossy, and the test sees it."""
    import lanner.engine.engine as engine_module
    from lanner.spec.rejection import verify_sampled

    def shifted_q(target_probs, drafts, draft_probs, generator):
        return verify_sampled(target_probs, drafts, draft_probs.roll(1, dims=0), generator)

    monkeypatch.setattr(engine_module, "verify_sampled", shifted_q)
    samples = sample_many(tiny, tiny_head, 2, 1.0)
    assert chi_square_pvalue(samples, exact_distribution(tiny_logits, 1.0)) < 1e-6


# ---- training --------------------------------------------------------------------------------------------------
def test_train_draft_makes_a_head_the_engine_serves(small, tmp_path):
    from lanner.cli import main
    path, _ = small
    out = tmp_path / "head"
    assert main(["train-draft", "--model", path, "--output", str(out), "--num-prompts", "6", "--held-out", "2",
                 "--max-tokens", "16", "--epochs", "2", "--vocab", "512"]) == 0
    config, weights, vocab_ids = load_head(str(out))
    assert len(vocab_ids) <= 512 and config.training["history"][0]["epoch"] == 1
    assert (out / "training.png").stat().st_size > 1000
    base = make_llm(path).generate(OPEN, GREEDY, use_tqdm=False)
    spec = make_llm(path, speculative=eagle(str(out), 3))
    got = spec.generate(OPEN, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in base]
    assert spec.engine.stats()["spec_drafted_tokens"] > 0
