"""`lanner finetune --method`: every PEFT method trains its own parameters only, through one training loop, and writes
the files PEFT's save_pretrained writes; PEFT loads them and its logits equal the training forward's, and lanner
serves them with PEFT's logits (tiny random Llama, fp32)."""
import json

import pytest
import torch
from conftest import hf_logits
from test_finetune import IDS, TOL, hf_base, tiny_data, tiny_dir, tokenizer  # noqa: F401 (fixtures)
from test_prefix_tuning import adapter_llm, served_logits

import lanner.lora.finetune as finetune_module
from lanner import LoRARequest
from lanner.lora.finetune import finetune

STEPS = dict(max_steps=4, batch_size=4, val_fraction=0, progress=False, plot=False)
# name: (method, our options, PEFT's config class, its arguments, learning rate)
CASES = {
    "lora": ("lora", dict(target_modules="q_proj,v_proj,down_proj", lora_r=4, lora_dropout=0.0),
             "LoraConfig", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
             1e-2),
    "prefix": ("prefix", dict(num_virtual_tokens=5), "PrefixTuningConfig", dict(num_virtual_tokens=5), 3e-2),
    "prefix-projection": ("prefix", dict(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24),
                          "PrefixTuningConfig", dict(num_virtual_tokens=5, prefix_projection=True,
                                                     encoder_hidden_size=24), 1e-2),
    "prompt-text": ("prompt", dict(num_virtual_tokens=7, prompt_init="text", prompt_init_text="Say the word"),
                    "PromptTuningConfig", dict(num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                               prompt_tuning_init_text="Say the word"), 3e-2),
    "prompt-random": ("prompt", dict(num_virtual_tokens=4), "PromptTuningConfig", dict(num_virtual_tokens=4), 3e-2),
    "ptuning-mlp": ("ptuning", dict(num_virtual_tokens=4, encoder_hidden_size=32), "PromptEncoderConfig",
                    dict(num_virtual_tokens=4, encoder_hidden_size=32), 1e-2),
    "ptuning-lstm": ("ptuning", dict(num_virtual_tokens=3, encoder_hidden_size=16,
                                     encoder_reparameterization_type="LSTM"), "PromptEncoderConfig",
                     dict(num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"), 1e-2),
    "ia3": ("ia3", {}, "IA3Config", {}, 3e-2),
    "ia3-o-up": ("ia3", dict(ia3_target_modules="q_proj,o_proj,up_proj", feedforward_modules="o_proj"), "IA3Config",
                 dict(target_modules=["q_proj", "o_proj", "up_proj"], feedforward_modules=["o_proj"]), 3e-2),
    "adaption-prompt": ("adaption-prompt", dict(adapter_len=4, adapter_layers=1), "AdaptionPromptConfig",
                        dict(adapter_len=4, adapter_layers=1), 3e-2),
}


def peft_reference(tiny_dir, name, out):
    """PEFT's own adapter of the same config over the same base, saved by save_pretrained: (config, tensors, model)."""
    import peft
    from safetensors.torch import load_file
    _, _, config_class, arguments, _ = CASES[name]
    if arguments.get("prompt_tuning_init") == "TEXT":
        arguments = dict(arguments, tokenizer_name_or_path=str(tiny_dir))
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_base(tiny_dir), getattr(peft, config_class)(task_type="CAUSAL_LM", **arguments))
    model.save_pretrained(str(out))
    return json.loads((out / "adapter_config.json").read_text()), load_file(str(out / "adapter_model.safetensors")), model


def train(tiny_dir, name, out, monkeypatch, **options):
    """finetune(...) of case `name`; returns its result and the trained model handed to save_adapter."""
    method, ours, _, _, lr = CASES[name]
    trained = []
    save = finetune_module.save_adapter
    monkeypatch.setattr(finetune_module, "save_adapter", lambda model, *a: trained.append(model) or save(model, *a))
    result = finetune(str(tiny_dir), tiny_data(), str(out), method=method, lr=lr, **ours, **{**STEPS, **options})
    return result, trained[0]


def comparable(config: dict) -> dict:
    """A config's values, lists as sets (PEFT writes target_modules from a set, in no fixed order)."""
    return {k: sorted(v) if isinstance(v, list) else v for k, v in config.items() if k != "auto_mapping"}


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return adapter_llm(tiny_dir, block_size=4, max_loras=2)


@pytest.mark.parametrize("name", list(CASES))
def test_trained_adapter_is_peft_format_and_peft_and_lanner_reproduce_it(tiny_dir, llm, tmp_path, monkeypatch, name):
    from peft import PeftModel
    result, model = train(tiny_dir, name, tmp_path / "ours", monkeypatch)
    losses = [loss for _, loss in result["train_losses"]]
    assert losses[-1] < losses[0], losses

    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    want_config, want_tensors, reference = peft_reference(tiny_dir, name, tmp_path / "peft")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k: (t.shape, t.dtype) for k, t in tensors.items()} == {k: (t.shape, t.dtype) for k, t in want_tensors.items()}
    if CASES[name][0] == "lora":   # PEFT's LoRA config has dozens of fields: ours are a subset, the rest defaults
        want_config = {k: want_config[k] for k in ours_config}
    assert comparable(ours_config) == comparable(want_config)
    assert result["trainable_params"] == reference.get_nb_trainable_parameters()[0]

    peft_model = PeftModel.from_pretrained(hf_base(tiny_dir), str(tmp_path / "ours")).eval()
    request = LoRARequest(name, list(CASES).index(name) + 1, str(tmp_path / "ours"))
    for ids in IDS:
        want = hf_logits(peft_model, ids)[-len(ids):]   # prompt methods: PEFT's logits include the virtual rows
        with torch.no_grad():
            assert (model(torch.tensor([ids]))[0] - want).abs().max() < TOL
        assert (served_logits(llm, ids, request) - want).abs().max() < TOL
    assert (want - hf_logits(hf_base(tiny_dir), IDS[-1])).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["prompt-text", "ia3", "adaption-prompt", "prefix", "prompt-random", "ptuning-lstm"])
def test_initialization_is_peft_default(tiny_dir, tmp_path, monkeypatch, name):
    """--max-steps 0 writes the fresh adapter: deterministic inits (text embeddings, IA3 ones, a zero gate) equal
    PEFT's exactly; random ones (N(0, 1) embeddings, default-initialized encoders) match PEFT's spread."""
    from safetensors.torch import load_file
    train(tiny_dir, name, tmp_path / "ours", monkeypatch, max_steps=0)
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    _, want, _ = peft_reference(tiny_dir, name, tmp_path / "peft")
    for key, tensor in want.items():
        if name in ("prompt-text", "ia3") or key.endswith("gate"):
            assert torch.equal(ours[key], tensor), key
        else:
            assert 0.7 < ours[key].std() / tensor.std() < 1.4, key


@pytest.mark.parametrize("name", ["ia3", "adaption-prompt"])
def test_qlora_base_for_other_methods(tiny_dir, tmp_path, monkeypatch, name):
    """--qlora with IA3 and LLaMA-Adapter (both act on the NF4 linears): training forward, PEFT on HF with our
    NF4-dequantized weights, and lanner with quantization="nf4" give the same logits."""
    from conftest import make_llm
    from peft import PeftModel
    _, model = train(tiny_dir, name, tmp_path / "q", monkeypatch, qlora=True)
    reference = PeftModel.from_pretrained(hf_base(tiny_dir, nf4=True), str(tmp_path / "q")).eval()
    llm = make_llm(str(tiny_dir), enable_lora=True, quantization="nf4", kv_cache_memory=0.02)
    for ids in IDS:
        want = hf_logits(reference, ids)
        with torch.no_grad():
            assert (model(torch.tensor([ids]))[0] - want).abs().max() < TOL
        assert (served_logits(llm, ids, LoRARequest(name, 1, str(tmp_path / "q"))) - want).abs().max() < TOL


@pytest.mark.parametrize("method, options, message", [
    ("adapter", {}, "method must be one of lora, prefix, prompt, ptuning, ia3, adaption-prompt"),
    ("prefix", dict(lora_r=4), "lora_r do not apply to method 'prefix'"),
    ("lora", dict(num_virtual_tokens=4, adapter_len=3), "adapter_len, num_virtual_tokens do not apply to method 'lora'"),
    ("prompt", dict(prompt_init="text"), "prompt_init text needs prompt_init_text"),
    ("prompt", dict(num_virtual_tokens=0), "num_virtual_tokens must be >= 1"),
    ("ptuning", dict(encoder_reparameterization_type="GRU"), "MLP or LSTM"),
    ("ia3", dict(feedforward_modules="k_proj"), "only o_proj and down_proj can scale their input"),
    ("ia3", dict(ia3_target_modules="q_proj", feedforward_modules="down_proj"), "not among ia3_target_modules"),
    ("ia3", dict(ia3_target_modules="q_proj,embed"), "unknown target modules"),
    ("adaption-prompt", dict(adapter_layers=3), r"adapter_layers in 1..2"),
])
def test_bad_method_or_options_are_refused(tiny_dir, tmp_path, method, options, message):
    with pytest.raises(ValueError, match=message):
        finetune(str(tiny_dir), tiny_data(), str(tmp_path), method=method, **options, **STEPS)


def test_cli_method_options(tiny_dir, tmp_path, capsys):
    from lanner.cli import main
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": " Banana42!"}) + "\n" for i in range(4)))
    out = tmp_path / "prefix"
    assert main(["finetune", "--data", str(data), "--output", str(out), "--model", str(tiny_dir), "--method", "prefix",
                 "--num-virtual-tokens", "3", "--prefix-projection", "--encoder-hidden-size", "8", "--max-steps", "1",
                 "--val-fraction", "0", "--no-plot"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["prefix_projection"],
            config["encoder_hidden_size"]) == ("PREFIX_TUNING", 3, True, 8)
    assert "trainable params: 1,512" in capsys.readouterr().err   # 3*32 + (32*8 + 8) + (8*128 + 128)
    assert main(["finetune", "--data", str(data), "--output", str(out), "--model", str(tiny_dir), "--method", "ia3",
                 "--lora-r", "4"]) == 2
    assert "lora_r do not apply to method 'ia3'" in capsys.readouterr().err
