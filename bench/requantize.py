"""The default model requantized by llama.cpp into one of its presets (Q4_K_M by default), for the benchmarks' --model:
the formats llama.cpp users download (K-quants, with Q5_0 / Q8_0 where a width is not a multiple of 256), from the
one GGUF this machine has. Needs llama-cpp-python (bench/llama_cpp_build.sh). Prints the file's path.

    python bench/latency.py --model "$(python bench/requantize.py Q4_K_M)" --systems lanner,llamacpp
"""
import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def requantized(preset: str) -> str:
    """The default model in llama.cpp's preset (Q4_K_M, Q5_K_M, Q6_K, Q4_0, ...), written once beside it."""
    source = common.model_path(None)
    return quantize_file(source, source.replace(".Q4_1.gguf", f".{preset}.gguf"), preset)


def quantize_file(source: str, target: str, preset: str) -> str:
    """source written by llama.cpp into preset at target (once; target == source: nothing to do)."""
    import llama_cpp
    if target == source or os.path.exists(target):
        return target
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
    params.nthread, params.allow_requantize = os.cpu_count() or 1, True
    if llama_cpp.llama_model_quantize(source.encode(), (target + ".part").encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama.cpp could not requantize {source} into {preset}")
    os.replace(target + ".part", target)
    return target


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", nargs="?", default="Q4_K_M", help="llama.cpp's ftype name (LLAMA_FTYPE_MOSTLY_<preset>)")
    print(requantized(ap.parse_args().preset))
