"""A random-weight Llama of a real model's shape, written as a GGUF and requantized by llama.cpp into one of its
presets: the widths llama.cpp's K-quant presets were made for (multiples of 256, so q, k and v are Q4_K beside
Q6_K in Q4_K_M), at a size where decode streams more weights than the last-level cache holds. The tokenizer is the
default model's (its vocabulary sets the embedding's rows). Speed does not depend on the weights' values, so the
file serves the latency benchmark on equal terms for every system. Needs llama-cpp-python; prints the file's path.

    python bench/latency.py --model "$(python bench/random_model.py --shape llama-1b Q4_K_M)" --systems lanner,llamacpp
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))
import common  # noqa: E402
from requantize import quantize_file  # noqa: E402

# Llama 3.2 1B's and 3B's layer shapes (hidden, intermediate, layers, heads, KV heads)
SHAPES = {"llama-1b": (2048, 8192, 16, 32, 8), "llama-3b": (3072, 8192, 28, 24, 8)}


def random_model(shape: str, preset: str) -> str:
    """The path of the shape's random model in preset, written once into the default model's directory."""
    source = common.model_path(None)
    f16 = os.path.join(os.path.dirname(source), f"random-{shape}.F16.gguf")
    if not os.path.exists(f16):
        write_f16(shape, source, f16)
    return quantize_file(f16, f16.replace(".F16.gguf", f".{preset}.gguf"), preset)


def write_f16(shape: str, tokenizer_gguf: str, path: str) -> None:
    import torch
    from gguf_export import write_gguf
    from lanner.model.gguf import GGUFFile
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, intermediate, layers, heads, kv_heads = SHAPES[shape]
    vocab = len(GGUFFile(tokenizer_gguf).fields["tokenizer.ggml.tokens"])
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.name_or_path = f"random-{shape}"
    write_gguf(model, path + ".part", tokenizer_gguf, "F16")
    os.replace(path + ".part", path)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="Q4_K_M", help="llama.cpp's ftype name (LLAMA_FTYPE_MOSTLY_<preset>)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    args = ap.parse_args()
    print(random_model(args.shape, args.preset))
