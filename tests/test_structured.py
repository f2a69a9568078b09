"""Structured output: what is generated follows the JSON schema, regex, choice or grammar; bad constraints are
clear errors; under speculation drafts are cut at the grammar and sampling stays exactly the masked target."""
import itertools
import json
import re

import jsonschema
import pytest
import torch
from conftest import assert_all_blocks_free, make_llm
from test_speculative import chi_square_pvalue, tiny  # noqa: F401

from lanner import SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                      "population": {"type": "number", "minimum": 0}}, "required": ["city"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"]}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
     "required": ["id"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                "additionalProperties": False}, {"type": "string", "maxLength": 12}]},
]
ASK = "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n"


def generate(llm, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0].outputs


def test_sampled_outputs_validate_against_their_schemas(llm):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=120, n=2, structured_outputs={"json": schema})
              for i, schema in enumerate(SCHEMAS)]
    outputs = [(o, schema) for out, schema in zip(llm.generate([ASK] * len(SCHEMAS), params, use_tqdm=False), SCHEMAS)
               for o in out.outputs]
    completed = [(o, schema) for o, schema in outputs if o.finish_reason == "stop"]
    assert len(completed) >= len(outputs) * 3 // 4
    for o, schema in completed:
        jsonschema.validate(json.loads(o.text), schema)
    assert_all_blocks_free(llm)


def test_regex_choice_json_object_and_grammars(llm):
    assert re.fullmatch(r"\d{3}-\d{4}", generate(llm, "Phone:", temperature=1.0, seed=1, max_tokens=20,
                                                 structured_outputs={"regex": r"\d{3}-\d{4}"})[0].text)
    choices = ["Paris", "London", "a city I do not know"]
    assert generate(llm, "The capital of France is", temperature=1.0, seed=2, max_tokens=20,
                    structured_outputs={"choice": choices})[0].text in choices
    ask_ok = '<|im_start|>user\nReply with a JSON object with one key "ok" set to true.<|im_end|>\n<|im_start|>assistant\n'
    assert json.loads(generate(llm, ask_ok, temperature=0, max_tokens=100,
                               structured_outputs={"json_object": True})[0].text) == {"ok": True}
    gbnf = 'root ::= "yes" | "no" | "count: " [0-9]+'
    assert re.fullmatch(r"yes|no|count: \d+", generate(llm, "Answer:", temperature=1.0, seed=3, max_tokens=10,
                                                       structured_outputs={"grammar": gbnf})[0].text)
    lark = 'start: "Result: " obj\nobj: %json {"type": "object", "properties": {"v": {"type": "integer", ' \
           '"minimum": 0, "maximum": 99}}, "required": ["v"], "additionalProperties": false}'
    text = generate(llm, "Compute:", temperature=0, max_tokens=40, structured_outputs={"grammar": lark})[0].text
    assert text.startswith("Result: ") and isinstance(json.loads(text[len("Result: "):])["v"], int)


@pytest.mark.parametrize("constraint,message", [
    ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "cannot be compiled"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(unclosed"}, "cannot be compiled"),
    ({"grammar": "start: missing_rule"}, "cannot be compiled"),
    ({"regex": "a", "choice": ["b"]}, "exactly one"),
    ({"choice": []}, "non-empty"),
    ({"jsn": {}}, "unknown structured_outputs fields"),
])
def test_bad_constraints_are_clear_errors_and_the_engine_goes_on(llm, constraint, message):
    with pytest.raises(ValueError, match=message):
        generate(llm, "Hi", max_tokens=5, structured_outputs=constraint)
    assert generate(llm, "Hi", temperature=0, max_tokens=3)[0].finish_reason == "length"
    assert_all_blocks_free(llm)


def test_a_grammar_longer_than_max_tokens_ends_by_length_with_the_partial_output(llm):
    out = generate(llm, "Count:", temperature=0, max_tokens=6, structured_outputs={"regex": r"(one ){50}"})[0]
    assert out.finish_reason == "length" and "one one".startswith(out.text.strip()[:7])


def test_ngram_speculation_gives_the_same_constrained_greedy_output(default_model_path, llm):
    record = json.dumps({"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"]})
    prompt = f"Copy this record exactly.\n{record}\nCopy:\n"
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                                               "fields": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "born", "fields"], "additionalProperties": False}
    params = dict(temperature=0, max_tokens=60, structured_outputs={"json": schema})
    spec = make_llm(default_model_path, speculative="ngram:4")
    want = generate(llm, prompt, **params)[0]
    got = generate(spec, prompt, **params)[0]
    assert got.token_ids == want.token_ids
    jsonschema.validate(json.loads(got.text), schema)
    assert spec.engine.stats()["spec_drafted_tokens"] > 0
    assert_all_blocks_free(spec)


def test_drafts_the_grammar_forbids_are_cut(default_model_path):
    """The prompt repeats "7 7 7": the n-gram proposer drafts "7"s, which a grammar of "8"s forbids."""
    spec = make_llm(default_model_path, speculative="ngram:4")
    drafted, original = [], spec.engine.propose_drafts

    def watch():
        original()
        drafted.extend(t for s in spec.engine.scheduler.running for t in s.spec_token_ids)
    spec.engine.propose_drafts = watch
    out = generate(spec, "7 7 7 7 7 7 7 7 7 7 7", temperature=0, max_tokens=8,
                   structured_outputs={"regex": "( 8)+"})[0]
    eight = spec.tokenizer.encode(" 8")
    assert set(out.token_ids) <= set(eight) and set(drafted) <= set(eight)


GRAMMAR_TOKENS = [(3, 4), (3, 5), (4, 5)]   # the tokens the tiny grammar allows at each position
GRAMMAR_PROMPT = [3, 5, 4, 3, 5, 4, 3, 5]   # its n-grams draft tokens the grammar allows (after 5 4: 3 5)


def masked_exact_distribution(model, temperature: float) -> dict[tuple, float]:
    """P(the output) under the tiny HF model with every token the grammar forbids masked, by enumeration."""
    probs = {}
    for seq in itertools.product(*GRAMMAR_TOKENS):
        p = 1.0
        for i, t in enumerate(seq):
            with torch.no_grad():
                logits = model(torch.tensor([GRAMMAR_PROMPT + list(seq[:i])])).logits[0, -1]
            masked = torch.full_like(logits, float("-inf"))
            masked[list(GRAMMAR_TOKENS[i])] = logits[list(GRAMMAR_TOKENS[i])]
            p *= float(torch.softmax(masked / temperature, -1)[t])
        probs[seq] = p
    return probs


def sample_under_grammar(path: str, k: int, n: int = 1200) -> list[tuple]:
    grammar = "start: " + " ".join("(" + " | ".join(f"<[{t}]>" for t in allowed) + ")" for allowed in GRAMMAR_TOKENS)
    llm = make_llm(path, kv_cache_memory=0.05, max_num_seqs=256,
                   speculative={"method": "ngram", "num_speculative_tokens": k, "max_batch_size": 10**6})
    params = [SamplingParams(temperature=1.0, max_tokens=len(GRAMMAR_TOKENS), seed=s, ignore_eos=True,
                             structured_outputs={"grammar": grammar}) for s in range(n)]
    samples = [tuple(o.outputs[0].token_ids) for o in llm.generate([GRAMMAR_PROMPT] * n, params, use_tqdm=False)]
    assert llm.engine.stats()["spec_accepted_tokens"] > 0
    return samples


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_under_a_grammar_is_the_masked_target(tiny, k):  # noqa: F811
    assert chi_square_pvalue(sample_under_grammar(tiny[0], k), masked_exact_distribution(tiny[1], 1.0)) > 1e-3


def test_negative_control_accepting_every_draft_under_a_grammar_is_detected(tiny, monkeypatch):  # noqa: F811
    import lanner.engine.engine as engine_module
    from lanner.spec.rejection import sample_one
    monkeypatch.setattr(engine_module, "verify_sampled", lambda target_probs, drafts, draft_probs, generator:
                        list(drafts) + [sample_one(target_probs[len(drafts)], generator)])
    assert chi_square_pvalue(sample_under_grammar(tiny[0], 2), masked_exact_distribution(tiny[1], 1.0)) < 1e-6
