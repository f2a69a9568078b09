"""Fine-tuning of a PEFT adapter (LoRA, QLoRA, prefix tuning, prompt tuning, P-tuning, IA3, LLaMA-Adapter) that
lanner and PEFT load and run alike.

finetune(model_path, data, output_dir, method=..., **options) trains the method's parameters only (lanner.lora.
train_model: one Method class per PEFT method, PEFT's initialization) on the frozen base (fp32/bf16, or NF4 with
qlora=True) on chat or prompt/completion examples, with the loss on completion tokens only, a validation split and
early stopping, and saves adapter_config.json + adapter_model.safetensors as PEFT's save_pretrained does (the best
validation step's weights), loss_curve.png and finetune_log.json into output_dir. See docs/finetune.md.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from lanner.lora.train_model import (IA3, LoRA, AdaptionPrompt, Method, PrefixTuning, PromptTuning, PTuning,
                                     TrainModel, build_model, parse_targets)

PEFT_VERSION = "0.21.2"   # the PEFT release whose adapter format (config fields, tensor keys) these files follow

# each method's own options (PEFT's names); the rest are the training loop's and apply to every method
METHOD_OPTIONS = {
    "lora": ("target_modules", "lora_r", "lora_alpha", "use_rslora", "lora_dropout"),
    "prefix": ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
    "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
    "ptuning": ("num_virtual_tokens", "encoder_hidden_size", "encoder_reparameterization_type"),
    "ia3": ("ia3_target_modules", "feedforward_modules"),
    "adaption-prompt": ("adapter_len", "adapter_layers"),
}


@dataclass
class FinetuneOptions:
    method: str = "lora"                # lora | prefix | prompt | ptuning | ia3 | adaption-prompt
    target_modules: str | list[str] = "all-linear"   # LoRA: "all-linear", "q_proj,v_proj" or a list
    lora_r: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = False
    lora_dropout: float = 0.05
    num_virtual_tokens: int = 20        # prefix, prompt, ptuning
    prefix_projection: bool = False     # prefix: an MLP makes the prefix from a smaller embedding
    encoder_hidden_size: int | None = None   # prefix projection / P-tuning encoder width (PEFT: token_dim)
    encoder_reparameterization_type: str = "MLP"   # ptuning: MLP | LSTM
    prompt_init: str = "random"         # prompt: random (N(0, 1)) | text (the embeddings of prompt_init_text)
    prompt_init_text: str | None = None
    ia3_target_modules: str | list[str] = "k_proj,v_proj,down_proj"   # PEFT's defaults for Llama
    feedforward_modules: str | list[str] = "down_proj"                # IA3: these scale their input
    adapter_len: int = 10               # adaption-prompt: prompt length per adapted layer
    adapter_layers: int = 8             # adaption-prompt: the top layers adapted
    qlora: bool = False                 # freeze an NF4 (block 64) base instead of the fp base
    dtype: str = "float32"              # float32 | bfloat16: the frozen base and activations
    optimizer: str = "adamw"            # adamw | sgd
    lr: float = 2e-4
    weight_decay: float = 0.0
    momentum: float = 0.9               # sgd only
    warmup_ratio: float = 0.1           # linear warmup over this fraction of the steps, then cosine to 0
    warmup_steps: int | None = None     # overrides warmup_ratio
    batch_size: int = 4
    grad_accum: int = 1                 # micro-batches per optimizer step
    epochs: int = 3
    max_steps: int | None = None        # optimizer steps; 0 writes the freshly initialized adapter
    max_grad_norm: float | None = 1.0
    val_fraction: float = 0.1           # held out for validation (when no val_data is given)
    val_data: str | list | None = None
    eval_every: int | None = None       # optimizer steps between validations (default: once per epoch)
    patience: int | None = 3            # stop after this many validations without improvement (None: never)
    max_seq_len: int = 512
    seed: int = 0
    threads: int | None = None
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        checks = [(self.method in METHOD_OPTIONS, f"method must be one of {', '.join(METHOD_OPTIONS)}, "
                                                  f"got {self.method!r}"),
                  (self.lora_r >= 1, "lora_r must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.grad_accum >= 1, "grad_accum must be >= 1"), (self.epochs >= 1, "epochs must be >= 1"),
                  (self.max_steps is None or self.max_steps >= 0, "max_steps must be >= 0"),
                  (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
                  (self.num_virtual_tokens >= 1, "num_virtual_tokens must be >= 1"),
                  (self.encoder_hidden_size is None or self.encoder_hidden_size >= 1, "encoder_hidden_size must be >= 1"),
                  (self.encoder_reparameterization_type in ("MLP", "LSTM"),
                   "encoder_reparameterization_type must be MLP or LSTM"),
                  (self.prompt_init in ("random", "text"), "prompt_init must be random or text"),
                  ((self.prompt_init == "text") == (self.prompt_init_text is not None),
                   "prompt_init text needs prompt_init_text, and prompt_init_text needs prompt_init text"),
                  (self.adapter_len >= 1 and self.adapter_layers >= 1, "adapter_len and adapter_layers must be >= 1"),
                  (self.optimizer in ("adamw", "sgd"), "optimizer must be adamw or sgd"),
                  (self.dtype in ("float32", "bfloat16"), "dtype must be float32 or bfloat16"),
                  (self.lr > 0, "lr must be > 0"), (self.max_seq_len >= 2, "max_seq_len must be >= 2")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.target_modules = parse_targets(self.target_modules)
        self.ia3_target_modules = parse_targets(self.ia3_target_modules)
        ff = self.feedforward_modules
        self.feedforward_modules = parse_targets(ff) if (ff.strip() if isinstance(ff, str) else ff) else []


def make_options(method: str, options: dict) -> FinetuneOptions:
    """FinetuneOptions, refusing another method's options (e.g. lora_r for prefix tuning) by name."""
    foreign = sorted(k for k in options if k not in METHOD_OPTIONS.get(method, ())
                     and any(k in names for names in METHOD_OPTIONS.values()))
    if foreign and method in METHOD_OPTIONS:
        raise ValueError(f"finetune: {', '.join(foreign)} do not apply to method {method!r} (its options: "
                         f"{', '.join(METHOD_OPTIONS[method])})")
    try:
        return FinetuneOptions(method=method, **options)
    except TypeError as e:
        raise ValueError(f"finetune: {e}") from None


def make_method(o: FinetuneOptions, cfg, word_embeddings: torch.Tensor, tokenizer) -> Method:
    """The method's trainable part, initialized as PEFT initializes it."""
    if o.method == "lora":
        return LoRA(o.target_modules, o.lora_r, o.lora_alpha, o.use_rslora, o.lora_dropout)
    if o.method == "ia3":
        return IA3(o.ia3_target_modules, o.feedforward_modules)
    if o.method == "prefix":
        return PrefixTuning(cfg, o.num_virtual_tokens, o.prefix_projection, o.encoder_hidden_size)
    if o.method == "prompt":
        ids = tokenizer.tokenizer.encode(o.prompt_init_text).ids if o.prompt_init_text is not None else None
        return PromptTuning(cfg, o.num_virtual_tokens, o.prompt_init_text, ids, word_embeddings)
    if o.method == "ptuning":
        return PTuning(cfg, o.num_virtual_tokens, o.encoder_hidden_size, o.encoder_reparameterization_type)
    return AdaptionPrompt(cfg, o.adapter_len, o.adapter_layers)


# -- data ------------------------------------------------------------------------------------------------

@dataclass
class Example:
    ids: list[int]
    prompt_len: int    # tokens before the completion (no loss on them)


def read_records(data: str | list) -> list[dict]:
    if not isinstance(data, str):
        return list(data)
    if not os.path.exists(data):
        raise ValueError(f"training data {data} does not exist")
    records = []
    with open(data) as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{data}:{n}: not valid JSON ({e})") from None
    return records


def prompt_and_completion(record: dict, tokenizer) -> tuple[str, str]:
    """Chat: the template over all but the last message (with the assistant header); the last is the completion."""
    if "messages" in record:
        messages = record["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("a chat example's last message must be the assistant's reply")
        return tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True), messages[-1]["content"]
    if "prompt" in record and "completion" in record:
        return record["prompt"], record["completion"]
    raise ValueError(f"an example needs 'messages' or 'prompt' and 'completion'; got keys {sorted(record)}")


def tokenize(records: list[dict], tokenizer, max_len: int) -> list[Example]:
    """prompt ids + completion ids + eos; over max_len, the prompt loses its start, then the completion its end."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples = []
    for record in records:
        prompt, completion = prompt_and_completion(record, tokenizer)
        p, c = tokenizer.encode(prompt), tokenizer.tokenizer.encode(completion, add_special_tokens=False).ids + eos
        c = c[:max_len - 1]
        p = p[max(0, len(p) - (max_len - len(c))):]
        if not p:
            raise ValueError("an example has an empty prompt; the first completion token needs context")
        examples.append(Example(p + c, len(p)))
    return examples


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples)))) if val_fraction > 0 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L] and the mask of completion tokens (the ones with a loss)."""
    length = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, :len(e.ids)] = torch.tensor(e.ids)
        mask[row, e.prompt_len:len(e.ids)] = True
    return ids, mask


def batches(examples: list[Example], batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(examples), generator=generator).tolist() if generator else range(len(examples))
    return [collate([examples[i] for i in order[a:a + batch_size]]) for a in range(0, len(order), batch_size)]


# -- training ------------------------------------------------------------------------------------------

def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate(model: TrainModel, val_batches) -> float:
    model.eval()
    total, count = 0.0, 0
    for ids, mask in val_batches:
        loss, n = model.loss(ids, mask)
        total, count = total + loss.item(), count + n
    model.train()
    return total / max(1, count)


def make_optimizer(params, o: FinetuneOptions):
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


def count_base_params(model) -> int:
    return sum(p.numel() for p in model.parameters())   # parameters() yields a tied weight once


def finetune(model_path: str | None, data: str | list, output_dir: str, method: str = "lora", **options) -> dict:
    """Train a PEFT adapter of `method` (lora, prefix, prompt, ptuning, ia3, adaption-prompt; qlora=True: on an
    NF4 base) on `data` (JSONL path or list of records) and save it in output_dir.

    Returns {"train_losses": [[step, loss]], "val_losses": [[step, loss]], "best_step", "best_val_loss",
    "trainable_params", "base_params", "steps", "stopped_early", "seconds", "output_dir"}.
    """
    o = make_options(method, options)
    start = time.time()
    if o.threads:
        torch.set_num_threads(o.threads)
    from lanner.model.loader import load_model_files
    hf_config, weights, tokenizer, resolved = load_model_files(model_path, dense=True)
    examples = tokenize(read_records(data), tokenizer, o.max_seq_len)
    if o.val_data is not None:
        train, val = examples, tokenize(read_records(o.val_data), tokenizer, o.max_seq_len)
    else:
        train, val = split(examples, o.val_fraction, o.seed)
    if not train:
        raise ValueError("no training examples")

    torch.manual_seed(o.seed)
    virtual = o.num_virtual_tokens if o.method in ("prefix", "prompt", "ptuning") else 0
    base = build_model(hf_config, weights, max(len(e.ids) for e in examples + val) + virtual)
    del weights
    base_params = count_base_params(base)
    model = TrainModel(base, make_method(o, base.config, base.embed_tokens.weight, tokenizer), nf4=o.qlora)
    if o.dtype == "bfloat16":   # the frozen base only (NF4 is quantized from fp32 above); the method's stays fp32
        rotary = base.layers[0].self_attn.rotary
        base.to(torch.bfloat16)
        rotary.cos_sin = rotary.cos_sin.float()
    trainable = model.num_trainable()
    log(f"trainable params: {trainable:,} || base params: {base_params:,} || "
        f"trainable%: {100 * trainable / base_params:.4f} ({model.method.describe()}{', NF4 base' if o.qlora else ''})")
    result = train_loop(model, train, val, o)
    result.update(trainable_params=trainable, base_params=base_params, seconds=round(time.time() - start, 1),
                  output_dir=output_dir)
    save_adapter(model, resolved, output_dir)
    with open(os.path.join(output_dir, "finetune_log.json"), "w") as f:
        json.dump(dict(result, options=jsonable(o)), f, indent=1)
    if o.plot:
        plot_losses(result, os.path.join(output_dir, "loss_curve.png"))
    log(f"saved adapter to {output_dir} (best step {result['best_step']}, val loss {result['best_val_loss']})")
    return result


def train_loop(model: TrainModel, train: list[Example], val: list[Example], o: FinetuneOptions) -> dict:
    """The training loop, the same for every method: AdamW/SGD on the method's parameters, warmup + cosine,
    validation every eval_every steps, early stopping; the model ends with the best validation step's weights."""
    micro_per_epoch = math.ceil(len(train) / o.batch_size)
    steps_per_epoch = max(1, micro_per_epoch // o.grad_accum)
    total = o.epochs * steps_per_epoch if o.max_steps is None else o.max_steps   # max_steps overrides epochs
    warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_ratio * total)
    eval_every = o.eval_every or steps_per_epoch
    optimizer = make_optimizer(model.trainable_parameters(), o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))
    val_batches = batches(val, o.batch_size, None)
    generator = torch.Generator().manual_seed(o.seed)

    result = dict(train_losses=[], val_losses=[], best_step=0, best_val_loss=None, steps=0, stopped_early=False)
    best = model.snapshot()
    if val:
        result["best_val_loss"] = evaluate(model, val_batches)
        result["val_losses"].append([0, result["best_val_loss"]])
    model.train()
    bar = progress_bar(total, o.progress)
    stale, step = 0, 0
    while step < total and not result["stopped_early"]:
        micro = batches(train, o.batch_size, generator)
        for a in range(0, steps_per_epoch * o.grad_accum, o.grad_accum):
            loss = train_step(model, optimizer, micro[a:a + o.grad_accum], o.max_grad_norm)
            scheduler.step()
            step += 1
            result["train_losses"].append([step, loss])
            postfix = {"loss": f"{loss:.4f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
            if val and (step % eval_every == 0 or step == total):
                val_loss = evaluate(model, val_batches)
                result["val_losses"].append([step, val_loss])
                if val_loss < result["best_val_loss"]:
                    result["best_val_loss"], result["best_step"], best, stale = val_loss, step, model.snapshot(), 0
                else:
                    stale += 1
                postfix["val"] = f"{val_loss:.4f}"
                result["stopped_early"] = o.patience is not None and stale >= o.patience
            bar.set_postfix(postfix)
            bar.update(1)
            if step >= total or result["stopped_early"]:
                break
    bar.close()
    model.eval()
    if val:
        model.restore(best)     # the adapter saved is the best validation step's
    else:
        result["best_step"] = step
    result["steps"] = step
    return result


def train_step(model: TrainModel, optimizer, group, max_grad_norm) -> float:
    """One optimizer step over micro-batches: the token-mean loss of all their completion tokens."""
    tokens = sum(int(mask[:, 1:].sum()) for _, mask in group)
    total = 0.0
    for ids, mask in group:
        loss, _ = model.loss(ids, mask)
        (loss / max(1, tokens)).backward()
        total += loss.item()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / max(1, tokens)


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="finetune", unit="step", disable=not enabled, file=sys.stderr)


def log(message: str) -> None:
    print(f"lanner: {message}", file=sys.stderr)


def jsonable(o: FinetuneOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(o).items() if k != "val_data" or isinstance(v, (str, type(None)))}


# -- outputs -------------------------------------------------------------------------------------------

def adapter_config(method: Method, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it: the fields of every PEFT config, then the method's."""
    config = {"auto_mapping": None, "base_model_name_or_path": base_model, "inference_mode": True,
              "peft_type": method.peft_type, "peft_version": PEFT_VERSION, "revision": None, "task_type": "CAUSAL_LM",
              **method.peft_config(base_model)}
    return dict(sorted(config.items()))


def save_adapter(model: TrainModel, base_model: str, output_dir: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(model.method, base_model), f, indent=2)
    with torch.no_grad():
        tensors = model.method.peft_state_dict()
    save_file(tensors, os.path.join(output_dir, "adapter_model.safetensors"), metadata={"format": "pt"})


def plot_losses(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    if result["train_losses"]:
        steps, losses = zip(*result["train_losses"])
        ax.plot(steps, losses, label="train", lw=1.2)
    if result["val_losses"]:
        steps, losses = zip(*result["val_losses"])
        ax.plot(steps, losses, "o-", label="validation", lw=1.2, ms=3)
    if result["best_val_loss"] is not None and result["val_losses"]:
        ax.axvline(result["best_step"], color="gray", ls=":", lw=1, label=f"best (step {result['best_step']})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
