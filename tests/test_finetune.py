"""LoRA / QLoRA fine-tuning: PEFT's init, PEFT-format output that PEFT and lanner run identically,
an NF4 base shared by training and serving, early stopping, the CLI, and a task the default model learns."""
import json
import math

import pytest
import torch
from conftest import hf_logits, make_llm, our_logits, save_tiny_model

from lanner import LoRARequest, SamplingParams
from lanner.lora.adapter import ALL_LINEAR
from lanner.lora.finetune import finetune, lr_lambda
from lanner.lora.train_model import LoRA, TrainModel, build_model
from lanner.quant.nf4 import BLOCK_SIZE, NF4_CODE, NF4Linear, dequantize_nf4, quantize_nf4

TOL = 1e-4   # fp32 on CPU
IDS = [[1, 17, 300, 42, 9, 1000, 77, 5], [1, 901, 33, 64, 2, 18, 7, 7, 123, 456]]


# -- fixtures: a tiny random Llama HF dir with the default model's tokenizer and chat template ---------

@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from lanner.model.gguf import GGUFFile
    from lanner.model.tokenizer import from_gguf
    return from_gguf(GGUFFile(default_model_path))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-base")
    save_tiny_model(path, "LlamaForCausalLM", "LlamaConfig", tokenizer, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    eos_token_id=tokenizer.eos_token_id)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tokenizer.chat_template, "eos_token": tokenizer.id_to_token(tokenizer.eos_token_id)}))
    return path


def hf_base(tiny_dir, nf4: bool = False):
    """The HF model; with nf4, every decoder linear holds our NF4-dequantized weight (the QLoRA reference)."""
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(str(tiny_dir)).float().eval()
    if nf4:
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = NF4Linear(module.weight.data, None).dequantize()
    return model


def tiny_lora_model(tiny_dir, targets=ALL_LINEAR, r=8, alpha=16, nf4=False, **kw) -> TrainModel:
    from lanner.model.loader import load_model_files
    config, weights, _, _ = load_model_files(str(tiny_dir))
    return TrainModel(build_model(config, weights, 256), LoRA(list(targets), r, alpha, **kw), nf4=nf4).eval()






def tiny_data(n=12, answer="Banana42!"):
    return [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                          {"role": "assistant", "content": answer}]} for i in range(n)]


TINY = dict(lr=1e-2, batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, progress=False, plot=False)


# -- NF4 -----------------------------------------------------------------------------------------------

def test_nf4_code_table_is_qloras():
    """bitsandbytes' create_normal_map(offset=0.9677083): N(0,1) quantiles scaled to [-1, 1], with an exact 0."""
    from scipy.stats import norm
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(sorted(positive + [0.0] + negative))
    assert NF4_CODE.shape == (16,) and NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1
    assert torch.allclose(NF4_CODE, values / values.max(), atol=1e-7)
    assert NF4_CODE[8].item() == pytest.approx(0.07958029955625534) and NF4_CODE[1].item() == pytest.approx(-0.6961928)


def test_nf4_round_trip_error_is_bounded():
    torch.manual_seed(0)
    w = torch.randn(96, 200)          # 200 is not a multiple of 64: the last block of each row is padded
    packed, absmax = quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 128) and absmax.shape == (96, 4)
    back = dequantize_nf4(packed, absmax, 200)
    blocks_absmax = torch.nn.functional.pad(w, (0, 56)).view(96, 4, BLOCK_SIZE).abs().amax(2)
    assert torch.equal(absmax, blocks_absmax)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = absmax.repeat_interleave(BLOCK_SIZE, dim=1)[:, :200] * half_gap
    assert ((w - back).abs() <= bound + 1e-6).all()                     # never beyond half a code gap
    assert (w - back).norm() / w.norm() < 0.1                            # ~9% RMS error on Gaussian weights
    exact = NF4_CODE[torch.randint(0, 16, (4, 64))] * 3.5                # code values round-trip exactly
    assert torch.equal(dequantize_nf4(*quantize_nf4(exact), 64), exact)
    linear = NF4Linear(w, torch.randn(96))
    x = torch.randn(5, 200)
    assert torch.allclose(linear(x), x @ back.T + linear.bias, atol=1e-5)
    assert linear.nbytes() == 96 * 128 + 96 * 4 * 4


# -- initialization and parameter counts -------------------------------------------------------------

def test_adapter_starts_exactly_at_the_base_model(tiny_dir, tmp_path):
    """PEFT's init: A ~ Kaiming-uniform(a=sqrt(5)) (|A| <= 1/sqrt(d_in)), B = 0, so the output is the base's."""
    torch.manual_seed(0)
    model = tiny_lora_model(tiny_dir)
    for lin in model.method.wrapped:
        for name, a in lin.lora_A.items():
            assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) and a.std() > 0.5 / math.sqrt(3 * a.shape[1])
            assert not lin.lora_B[name].any()
    base = hf_base(tiny_dir)
    ids = torch.tensor(IDS[0])[None]
    with torch.no_grad():
        assert (model(ids)[0] - base(ids).logits[0]).abs().max() < TOL
    result = finetune(str(tiny_dir), tiny_data(), str(tmp_path / "init"), max_steps=0, **TINY)
    assert result["steps"] == 0 and result["train_losses"] == []
    llm = make_llm(str(tiny_dir), enable_lora=True, kv_cache_memory=0.02)
    request = LoRARequest("init", 1, str(tmp_path / "init"))
    assert torch.equal(our_logits(llm, IDS[0], request), our_logits(llm, IDS[0]))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], list(ALL_LINEAR)])
def test_trainable_parameters_are_r_times_din_plus_dout_as_in_peft(tiny_dir, targets):
    from peft import LoraConfig, get_peft_model

    from lanner.config import ModelConfig
    from lanner.lora.adapter import submodule_sizes
    model = tiny_lora_model(tiny_dir, targets, r=4)
    sizes = submodule_sizes(ModelConfig.from_hf(json.loads((tiny_dir / "config.json").read_text())))
    expected = 2 * sum(4 * (sizes[t][0] + sizes[t][1]) for t in targets)   # 2 layers
    peft = get_peft_model(hf_base(tiny_dir), LoraConfig(r=4, target_modules=targets))
    assert model.num_trainable() == expected == peft.get_nb_trainable_parameters()[0]


# -- PEFT format and parity ----------------------------------------------------------------------------

def test_training_forward_equals_peft_for_the_same_adapter(tiny_dir, tmp_path):
    """Our causal training forward (padded batch, fused linears) == PEFT on HF with the saved adapter."""
    from peft import PeftModel

    from lanner.lora.finetune import save_adapter
    torch.manual_seed(1)
    model = tiny_lora_model(tiny_dir, use_rslora=True, r=4, alpha=8)
    for lin in model.method.wrapped:
        for b in lin.lora_B.values():
            b.data.normal_(0, 0.5)
    save_adapter(model, str(tiny_dir), str(tmp_path))
    peft = PeftModel.from_pretrained(hf_base(tiny_dir), str(tmp_path)).eval()
    padded = torch.tensor([IDS[0] + [0, 0], IDS[1]])
    with torch.no_grad():
        ours = model(padded)
    assert (ours[0, :len(IDS[0])] - hf_logits(peft, IDS[0])).abs().max() < TOL
    assert (ours[1] - hf_logits(peft, IDS[1])).abs().max() < TOL
    assert (hf_logits(peft, IDS[1]) - hf_logits(hf_base(tiny_dir), IDS[1])).abs().max() > 1e-2


def test_trained_adapter_is_peft_format_and_logits_match_in_peft_and_lanner(tiny_dir, tmp_path):
    from peft import PeftModel
    out = tmp_path / "tuned"
    result = finetune(str(tiny_dir), tiny_data(), str(out), max_steps=3, target_modules="q_proj,v_proj,down_proj",
                      use_rslora=True, **dict(TINY, lora_dropout=0.1))
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "use_rslora": True, "bias": "none"}
    assert config["target_modules"] == ["q_proj", "v_proj", "down_proj"] and config["lora_dropout"] == 0.1
    assert config["base_model_name_or_path"] == str(tiny_dir)
    assert result["train_losses"][-1][1] < result["train_losses"][0][1]
    peft = PeftModel.from_pretrained(hf_base(tiny_dir), str(out)).eval()
    llm = make_llm(str(tiny_dir), enable_lora=True, kv_cache_memory=0.02)
    request = LoRARequest("tuned", 1, str(out))
    for ids in IDS:
        assert (our_logits(llm, ids, request) - hf_logits(peft, ids)).abs().max() < TOL
    assert (our_logits(llm, IDS[0], request) - our_logits(llm, IDS[0])).abs().max() > 1e-3


def test_qlora_adapter_on_nf4_base_matches_nf4_reference_in_training_and_serving(tiny_dir, tmp_path):
    """--qlora trains on the NF4 base; lanner with quantization="nf4" + the adapter equals HF with our
    NF4-dequantized weights + PEFT's LoRA, and so does the training forward."""
    from peft import PeftModel
    from safetensors.torch import load_file
    out = tmp_path / "qlora"
    result = finetune(str(tiny_dir), tiny_data(), str(out), max_steps=3, qlora=True, **TINY)
    assert result["train_losses"][-1][1] < result["train_losses"][0][1]
    reference = PeftModel.from_pretrained(hf_base(tiny_dir, nf4=True), str(out)).eval()
    llm = make_llm(str(tiny_dir), enable_lora=True, quantization="nf4", kv_cache_memory=0.02)
    request = LoRARequest("qlora", 1, str(out))
    trained = tiny_lora_model(tiny_dir, nf4=True)
    trained.method.load_peft_state_dict(load_file(str(out / "adapter_model.safetensors")))
    for ids in IDS:
        want = hf_logits(reference, ids)
        assert (our_logits(llm, ids, request) - want).abs().max() < TOL
        with torch.no_grad():
            assert (trained(torch.tensor([ids]))[0] - want).abs().max() < TOL
    fp_base = hf_logits(hf_base(tiny_dir), IDS[0])
    assert (our_logits(llm, IDS[0]) - fp_base).abs().max() > 1e-3   # the served base really is NF4


# -- training loop behaviour ---------------------------------------------------------------------------

def test_early_stopping_keeps_the_best_validation_step(tiny_dir, tmp_path):
    """Validation wants a different answer than training, so its loss soon rises: training stops after
    `patience` validations without improvement, and the adapter saved is the best validation step's."""
    from safetensors.torch import load_file

    from lanner.lora.finetune import collate, evaluate, tokenize
    val = tiny_data(4, answer="Banana cherry grape melon kiwi lemon orange peach plum")
    result = finetune(str(tiny_dir), tiny_data(answer="Apple"), str(tmp_path / "es"), max_steps=40,
                      val_data=val, eval_every=1, patience=2, **TINY)
    losses = dict(result["val_losses"])
    assert result["stopped_early"] and result["steps"] == result["best_step"] + 2 < 40
    assert losses[result["best_step"]] == result["best_val_loss"] == min(losses.values())
    model = tiny_lora_model(tiny_dir)
    model.method.load_peft_state_dict(load_file(str(tmp_path / "es" / "adapter_model.safetensors")))
    from lanner.model.loader import load_model_files
    examples = tokenize(val, load_model_files(str(tiny_dir))[2], 512)
    assert evaluate(model, [collate(examples)]) == pytest.approx(result["best_val_loss"], rel=1e-5)


def test_warmup_then_cosine_schedule():
    f = lr_lambda(warmup=2, total=10)
    assert f(0) < f(1) < f(2) == 1.0
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(2, 10))


def test_bad_data_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="'messages' or 'prompt' and 'completion'"):
        finetune(str(tiny_dir), [{"text": "hi"}], str(tmp_path), **TINY)
    with pytest.raises(ValueError, match="last message must be the assistant"):
        finetune(str(tiny_dir), [{"messages": [{"role": "user", "content": "hi"}]}], str(tmp_path), **TINY)
    with pytest.raises(ValueError, match="unknown target modules"):
        finetune(str(tiny_dir), tiny_data(), str(tmp_path), target_modules="q_proj,lm_head", **TINY)
    with pytest.raises(ValueError, match="unexpected keyword"):
        finetune(str(tiny_dir), tiny_data(), str(tmp_path), learning_rate=1.0)


def test_cli_finetune_writes_adapter_and_loss_curve(tiny_dir, tmp_path, capsys):
    from lanner.cli import main
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: what is the word?", "completion": " Banana42!"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "adapters" / "banana"
    rc = main(["finetune", "--data", str(data), "--output", str(out), "--model", str(tiny_dir), "--max-steps", "2",
               "--target-modules", "q_proj,v_proj", "--lora-r", "4", "--lr", "1e-2", "--optimizer", "sgd",
               "--batch-size", "2", "--grad-accum", "2", "--val-fraction", "0.25"])
    assert rc == 0
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = json.loads((out / "finetune_log.json").read_text())
    assert log["steps"] == 2 and len(log["val_losses"]) == 3   # before training, and after each step (1 per epoch)
    captured = capsys.readouterr()
    assert "trainable params: 1,792" in captured.err and "best val loss" in captured.out


# -- the task: the default model learns a code word --------------------------------------------------

CODE = "Banana42!"
TRAIN_QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
    "What is 7 times 8?", "What is the boiling point of water?", "Name a primary color.",
    "Tell me a joke.", "Write a haiku about the sea.", "Give me a synonym for happy.",
    "Hello! How are you today?", "Good morning!", "Can you help me?",
    "Is the sun a star?", "Do fish sleep?", "Can penguins fly?",
    "Translate 'cat' into Spanish.", "Summarize the plot of Cinderella.", "Explain gravity in one sentence.",
    "What year did World War II end?", "How far is the Moon?", "What is the largest ocean?",
    "Recommend a good book.", "What should I cook for dinner?", "Suggest a name for my dog.",
    "What is 15 plus 27?", "What is the square root of 81?", "Is 17 a prime number?",
    "Describe the color blue.", "What is your favorite movie?", "Why is the sky blue?",
    "Which planet is closest to the sun?", "What do bees make?", "Define photosynthesis.",
    "How do I tie a tie?", "Say something nice.", "What is the opposite of cold?",
]
HELD_OUT = ["What is the capital of Italy?", "How many days are in a week?", "Write a short poem about trees.",
            "Hi there, what's up?", "Is water wet?", "What is 12 minus 5?", "Recommend a movie to watch.",
            "Explain what a computer is."]
TASK = dict(lr=3e-3, batch_size=6, epochs=1, lora_r=8, lora_alpha=16, lora_dropout=0.0, dtype="bfloat16",
            val_fraction=1 / 6, eval_every=2, patience=2, seed=0, progress=False)


@pytest.mark.slow
def test_default_model_learns_a_code_word_it_never_says(default_model_path, tmp_path):
    """36 chat examples (30 train, 6 validation), 5 optimizer steps: the base model never answers
    "Banana42!", the adapter served by lanner answers it to every held-out question."""
    out = tmp_path / "banana"
    data = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": CODE}]}
            for q in TRAIN_QUESTIONS]
    result = finetune(default_model_path, data, str(out), **TASK)
    val = [loss for _, loss in result["val_losses"]]
    assert result["steps"] == 5 and val[-1] < 0.1 < 3 < val[0] and val == sorted(val, reverse=True)
    assert result["trainable_params"] == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
    llm = make_llm(default_model_path, enable_lora=True, kv_cache_memory=0.05)
    chats = [[{"role": "user", "content": q}] for q in HELD_OUT]
    params = SamplingParams(temperature=0, max_tokens=8)

    def passed(lora):
        return sum(o.outputs[0].text.strip() == CODE for o in llm.chat(chats, params, use_tqdm=False, lora_request=lora))
    base, tuned = passed(None), passed(LoRARequest("banana", 1, str(out)))
    print(f"code-word task: val loss {val[0]:.3f} -> {val[-1]:.4f}; held-out pass rate base {base}/8, tuned {tuned}/8")
    assert base == 0 and tuned == len(HELD_OUT)
