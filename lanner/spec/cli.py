"""`lanner train-draft`: the command line of lanner.spec.train_draft (imports torch only when run)."""
import argparse

DESCRIPTION = ("Train an EAGLE-style draft head on the target's own greedy answers to the shipped chat prompts; "
               "see lanner/spec/train_draft.py and docs/speculative.md.")


def add_parser(subparsers):
    p = subparsers.add_parser("train-draft", help="train an EAGLE-style draft head for a model",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="target model (default: the default model)")
    p.add_argument("--output", required=True, help="directory for the head (config.json, model.safetensors)")
    p.add_argument("--num-prompts", type=int, default=1100, help="training prompts answered by the target")
    p.add_argument("--held-out", type=int, default=48, help="prompts kept for measuring acceptance")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length cap")
    p.add_argument("--vocab", type=int, default=8192, help="tokens the head's LM head scores")
    p.add_argument("--steps", type=int, default=3, help="draft positions unrolled in training")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="k of the held-out acceptance")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=2, help="epochs without a better acceptance before stopping")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-tokens", type=int, default=1536)
    p.add_argument("--time-limit", type=float, default=50.0, help="minutes of training at most")
    p.add_argument("--data", default=None, help="reuse (or write) the generated data and features here")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lanner.spec.train_draft import run as train
    return train(args)


def default_args(**overrides) -> argparse.Namespace:
    """train-draft's options at their defaults, with overrides (for callers other than the command line)."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["train-draft", "--output", overrides.pop("output")])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise ValueError(f"unknown train-draft option {name!r}")
        setattr(args, name, value)
    return args
