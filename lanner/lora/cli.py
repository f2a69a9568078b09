"""`lanner finetune`: train a PEFT adapter (LoRA / QLoRA, prefix tuning, prompt tuning, P-tuning, IA3, LLaMA-Adapter)
on chat or prompt/completion JSONL; writes it in PEFT's format."""
import argparse

from lanner.lora.finetune import METHOD_OPTIONS, FinetuneOptions

EPILOG = """\
Data: one JSON object per line, either {"messages": [..., {"role": "assistant", "content": ...}]} (the model's
chat template is applied to all but the last message; the last one + eos is the completion) or
{"prompt": ..., "completion": ...}. The loss is on completion tokens only. Output: adapter_config.json and
adapter_model.safetensors (PEFT format, the best validation step's weights), loss_curve.png, finetune_log.json.
A method's options (PEFT's names) are refused with another method. Serve the adapter with:
lanner generate "..." --lora NAME=OUTPUT --adapter NAME (add --quantization nf4 after --qlora)."""


def add_parser(subparsers):
    d = FinetuneOptions()
    p = subparsers.add_parser("finetune", help="train a PEFT adapter (LoRA, prefix, prompt, P-tuning, IA3, LLaMA-Adapter)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training JSONL (chat `messages` or `prompt`/`completion`)")
    p.add_argument("--output", required=True, help="adapter directory to write, e.g. adapters/NAME")
    p.add_argument("--model", default=None, help="GGUF file, HF model directory or hub id (default: the default model)")
    p.add_argument("--method", default="lora", choices=list(METHOD_OPTIONS), help="the PEFT method (default lora)")
    p.add_argument("--qlora", action="store_true", help="freeze an NF4 (block 64) base (QLoRA; any method)")
    m = p.add_argument_group("method options (PEFT's names; default: PEFT's, or the value shown)")
    m.add_argument("--target-modules", help="lora: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or "
                                            "all-linear (default)")
    m.add_argument("--lora-r", type=int, help=f"lora: rank (default {d.lora_r})")
    m.add_argument("--lora-alpha", type=float, help=f"lora: scale alpha / r (default {d.lora_alpha:g})")
    m.add_argument("--use-rslora", action="store_true", default=None, help="lora: scale by alpha/sqrt(r)")
    m.add_argument("--lora-dropout", type=float, help=f"lora (default {d.lora_dropout})")
    m.add_argument("--num-virtual-tokens", type=int, help=f"prefix, prompt, ptuning (default {d.num_virtual_tokens})")
    m.add_argument("--prefix-projection", action="store_true", default=None,
                   help="prefix: make the prefix with an MLP from a smaller embedding")
    m.add_argument("--encoder-hidden-size", type=int, help="prefix (with projection), ptuning: encoder width")
    m.add_argument("--encoder-reparameterization-type", choices=["MLP", "LSTM"], help="ptuning (default MLP)")
    m.add_argument("--prompt-init", choices=["random", "text"], help="prompt (default random)")
    m.add_argument("--prompt-init-text", help="prompt: start from this text's token embeddings (with --prompt-init text)")
    m.add_argument("--ia3-target-modules", help=f"ia3 (default {d.ia3_target_modules})")
    m.add_argument("--feedforward-modules", help="ia3: targets whose input is scaled (o_proj, down_proj; default "
                                                 f"{d.feedforward_modules})")
    m.add_argument("--adapter-len", type=int, help=f"adaption-prompt: prompt length (default {d.adapter_len})")
    m.add_argument("--adapter-layers", type=int, help=f"adaption-prompt: top layers adapted (default {d.adapter_layers})")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"], help="frozen base and activations")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warmup, then cosine decay to 0")
    p.add_argument("--warmup-steps", type=int, default=None, help="overrides --warmup-ratio")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--val-data", default=None, help="validation JSONL (default: --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--eval-every", type=int, default=None, help="optimizer steps between validations (default: each epoch)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many validations without improvement (0: never stop early)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-plot", action="store_true", help="do not write loss_curve.png")
    p.add_argument("--with-draft", nargs="?", const="default", default=None, metavar="HEAD",
                   help="also fine-tune an EAGLE draft head (HEAD, default: the one shipped for the model) on the "
                        "adapted model's answers to the training prompts; written to OUTPUT/draft_head and used "
                        "for this adapter's requests under --speculative eagle (lora only)")
    p.add_argument("--draft-epochs", type=int, default=4, help="--with-draft: epochs of the head")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lanner.lora.finetune import finetune
    base_head = draft_head_to_adapt(args) if args.with_draft else None
    given = {name: getattr(args, name) for names in METHOD_OPTIONS.values() for name in names
             if getattr(args, name) is not None}   # a method's options: only those given (another's is an error)
    result = finetune(args.model, args.data, args.output, method=args.method, qlora=args.qlora, dtype=args.dtype,
                      optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, epochs=args.epochs, max_steps=args.max_steps,
                      max_grad_norm=args.max_grad_norm or None, val_data=args.val_data,
                      val_fraction=args.val_fraction, eval_every=args.eval_every, patience=args.patience or None,
                      max_seq_len=args.max_seq_len, seed=args.seed, threads=args.threads, plot=not args.no_plot,
                      **given)
    if base_head:
        from lanner.lora.finetune import read_records
        from lanner.spec.train_draft import adapt_head
        head = adapt_head(args.model, args.output, read_records(args.data), base_head, epochs=args.draft_epochs,
                          max_lora_rank=max(64, args.lora_r or 0))
        print(f"draft head: {head['head']}  held-out acceptance length {head['before']:.2f} -> {head['after']:.2f}")
    val = result["best_val_loss"]
    print(f"adapter: {args.output}  steps: {result['steps']}  best step: {result['best_step']}  "
          f"final train loss: {result['train_losses'][-1][1] if result['train_losses'] else float('nan'):.4f}  "
          f"best val loss: {'n/a' if val is None else f'{val:.4f}'}  trainable params: {result['trainable_params']:,}")
    return 0


def draft_head_to_adapt(args) -> str:
    """--with-draft's starting head, checked before the adapter trains (a bad one would waste the run)."""
    from lanner.model.loader import pull_default_model
    from lanner.spec.eagle import default_head_path, load_head
    if args.method != "lora" or args.qlora:
        raise ValueError("--with-draft fine-tunes a draft head for a LoRA adapter (--method lora, no --qlora)")
    path = default_head_path(args.model or pull_default_model()) if args.with_draft == "default" else args.with_draft
    load_head(path)
    return path
