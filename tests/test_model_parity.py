"""The model matches HF transformers on the same weights: logits and greedy tokens (fp32, CPU)."""
import json

import pytest
import torch
from conftest import PROMPTS, hf_greedy, make_llm, our_logits, save_tiny_model

from lanner import SamplingParams

LOGIT_TOL = 1e-3   # fp32 on CPU; observed ~1e-4 (different summation orders)
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)




def test_gguf_weights_equal_transformers_gguf_loader(default_model_path, default_files):
    import os
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(default_model_path),
                                              gguf_file=os.path.basename(default_model_path), dtype=torch.float32)
    theirs = hf.state_dict()
    for name, tensor in default_files[1].items():
        assert torch.equal(theirs[name], tensor), name


def test_tokenizer_equals_transformers_gguf_tokenizer(default_model_path, llm):
    import os
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(os.path.dirname(default_model_path), gguf_file=os.path.basename(default_model_path))
    texts = PROMPTS + ["  leading spaces", "ünïcødé 你好 🙂", "x=1234567;\ty\r\n", "<|im_end|> special"]
    for text in texts:
        assert llm.tokenizer.encode(text) == hf.encode(text), text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "?"}]
    assert llm.tokenizer.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_prompt_logits_match_hf(llm, hf_default):
    for prompt in PROMPTS[:3]:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_default(torch.tensor([ids])).logits[0]
        assert (our_logits(llm, ids) - ref).abs().max() < LOGIT_TOL


def test_greedy_matches_hf_batched_and_alone(llm, hf_default):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = [hf_greedy(hf_default, ids, GREEDY.max_tokens) for ids in prompts]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    alone = [llm.generate(ids, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for ids in prompts]
    assert batched == expected
    assert alone == expected


def tiny_hf_dir(path, tokenizer):
    return save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", tokenizer, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_unsupported_architecture_is_a_clear_error(tmp_path, llm):
    tiny_hf_dir(tmp_path, llm.tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        make_llm(str(tmp_path))


def test_corrupt_weights_file_is_a_clear_error(tmp_path, llm):
    tiny_hf_dir(tmp_path, llm.tokenizer)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights file"):
        make_llm(str(tmp_path))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ValueError, match="cannot read GGUF file"):
        make_llm(str(bad))


def test_hf_dir_saved_by_installed_transformers_generates_like_hf(hf_dir, hf_default):
    """transformers 5 writes rope_parameters (no top-level rope_theta): the rotary base must come from it."""
    config = json.load(open(f"{hf_dir}/config.json"))
    ours = make_llm(hf_dir)
    assert ours.engine.runner.model_cfg.rope_theta == hf_default.config.rope_parameters["rope_theta"] == 100000.0
    for prompt in ("def add(a, b):", PROMPTS[2]):
        ids = ours.tokenizer.encode(prompt)
        got = ours.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert got == hf_greedy(hf_default, ids, GREEDY.max_tokens), (prompt, config.get("rope_parameters"))


def test_an_unsupported_rope_type_is_refused_by_name(tmp_path, hf_dir):
    import shutil
    target = tmp_path / "proportional"
    shutil.copytree(hf_dir, target)
    config = json.load(open(target / "config.json"))
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "proportional", "factor": 4.0}
    json.dump(config, open(target / "config.json", "w"))
    with pytest.raises(ValueError, match="unsupported rope type 'proportional'"):
        make_llm(str(target))
