"""An offline draft model: the target's first N decoder layers with its embeddings, final norm and LM head.

    python -m lanner.spec.make_draft [--target PATH] [--out DIR] [--layers N]

writes an HF model directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that
`--speculative draft:DIR:4` loads. It shares the target's vocabulary by construction and needs no download
beyond the target itself; being untrained as a standalone model, its acceptance is low (see docs/speculative.md).
"""
import argparse
import json
import os
import shutil

import torch

DEFAULT_LAYERS = 6


def make_truncated_draft(target_path: str | None, out_dir: str, num_layers: int = DEFAULT_LAYERS,
                         dtype: torch.dtype = torch.bfloat16) -> str:
    """Write the truncated copy of target_path (None: the default model) to out_dir; return out_dir."""
    from safetensors.torch import save_file

    from lanner.model.loader import load_model_files
    config, weights, tokenizer, _ = load_model_files(target_path, dense=True)
    if not 1 <= num_layers <= config["num_hidden_layers"]:
        raise ValueError(f"num_layers must be in [1, {config['num_hidden_layers']}], got {num_layers}")
    kept = {name: w.to(dtype).contiguous() for name, w in weights.items() if keeps(name, num_layers)}
    if config.get("tie_word_embeddings"):
        kept.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    save_file(kept, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": num_layers, "torch_dtype": str(dtype).removeprefix("torch.")},
                  f, indent=2)
    tokenizer.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(tokenizer), f, indent=2)
    return out_dir


def keeps(name: str, num_layers: int) -> bool:
    if not name.startswith("model.layers."):
        return True
    return int(name.split(".")[2]) < num_layers


def tokenizer_config(tokenizer) -> dict:
    """What lanner.model.tokenizer.from_hf_dir reads back: chat template, bos/eos, add_bos."""
    token = lambda i: tokenizer.id_to_token(i) if i is not None else None
    return {"chat_template": tokenizer.chat_template, "bos_token": token(tokenizer.bos_token_id),
            "eos_token": token(tokenizer.eos_token_id), "add_bos_token": tokenizer.add_bos}


def default_draft_path(num_layers: int = DEFAULT_LAYERS) -> str:
    """The truncated draft of the default model in the lanner cache, built on first use (offline)."""
    from lanner.model.loader import DEFAULT_FILE, cache_dir
    out = os.path.join(cache_dir(), f"{DEFAULT_FILE.removesuffix('.gguf')}.draft-{num_layers}L")
    if not os.path.isdir(out):
        tmp = f"{out}.tmp-{os.getpid()}"
        make_truncated_draft(None, tmp, num_layers)
        try:
            os.rename(tmp, out)   # atomic: a concurrent builder's copy wins, ours is dropped
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default=None, help="GGUF file or HF directory (default: the default model)")
    ap.add_argument("--out", default=None, help="output directory (default: in the lanner cache)")
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    args = ap.parse_args(argv)
    if args.target is None and args.out is None:
        print(default_draft_path(args.layers))
    else:
        out = args.out or os.path.join(os.getcwd(), f"draft-{args.layers}L")
        print(make_truncated_draft(args.target, out, args.layers))


if __name__ == "__main__":
    main()
