"""`lanner finetune`: train a LoRA / QLoRA adapter on chat or prompt/completion JSONL; writes a PEFT adapter."""
import argparse

from lanner.lora.finetune import FinetuneOptions

EPILOG = """\
Data: one JSON object per line, either {"messages": [..., {"role": "assistant", "content": ...}]} (the model's
chat template is applied to all but the last message; the last one + eos is the completion) or
{"prompt": ..., "completion": ...}. The loss is on completion tokens only. Output: adapter_config.json and
adapter_model.safetensors (PEFT format, the best validation step's weights), loss_curve.png, finetune_log.json.
Serve it with: lanner generate "..." --lora NAME=OUTPUT --adapter NAME (add --quantization nf4 after --qlora)."""


def add_parser(subparsers):
    d = FinetuneOptions()
    p = subparsers.add_parser("finetune", help="train a LoRA / QLoRA adapter (PEFT format) on JSONL data",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training JSONL (chat `messages` or `prompt`/`completion`)")
    p.add_argument("--output", required=True, help="adapter directory to write, e.g. adapters/NAME")
    p.add_argument("--model", default=None, help="GGUF file, HF model directory or hub id (default: the default model)")
    p.add_argument("--qlora", action="store_true", help="freeze an NF4 (block 64) base: QLoRA")
    p.add_argument("--target-modules", default="all-linear",
                   help="comma-separated q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj or all-linear (default)")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
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
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lanner.lora.finetune import finetune
    result = finetune(args.model, args.data, args.output, qlora=args.qlora, target_modules=args.target_modules,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, use_rslora=args.use_rslora,
                      lora_dropout=args.lora_dropout, dtype=args.dtype, optimizer=args.optimizer, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
                      max_steps=args.max_steps, max_grad_norm=args.max_grad_norm or None, val_data=args.val_data,
                      val_fraction=args.val_fraction, eval_every=args.eval_every, patience=args.patience or None,
                      max_seq_len=args.max_seq_len, seed=args.seed, threads=args.threads, plot=not args.no_plot)
    val = result["best_val_loss"]
    print(f"adapter: {args.output}  steps: {result['steps']}  best step: {result['best_step']}  "
          f"final train loss: {result['train_losses'][-1][1] if result['train_losses'] else float('nan'):.4f}  "
          f"best val loss: {'n/a' if val is None else f'{val:.4f}'}  trainable params: {result['trainable_params']:,}")
    return 0
