"""The one place that builds lanner's C kernels: compiler, flags, CPU features, and the cache of builds.

Each kernel is a C file compiled at first use and cached under the lanner cache directory, keyed by its
source, the compiler, the flags and the CPU's feature flags. The instruction set is the host's best
(-march=native) unless LANNER_ISA forces a lower level, so every path a machine can run can be tested
on it: avx512 (x86-64-v4: AVX-512 F/BW/CD/DQ/VL), avx2 (x86-64-v3: AVX2, FMA, F16C) or scalar
(x86-64: SSE2 only). LANNER_NATIVE=0 turns the kernels off (callers fall back to PyTorch).
"""
import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings

from lanner.cache import cache_dir

# reassociation lets sums vectorize as trees; no finite-math: kernels rely on -inf
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                "-fno-signed-zeros", "-shared", "-fPIC"]
AVX2 = {"avx2", "fma", "f16c", "bmi2", "movbe"}
ISA_LEVELS = {   # best first: level -> (CPU flags it needs, compiler flags for a forced build)
    "avx512": ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "f16c"},
               ["-march=x86-64-v4"]),
    "avx2-vnni": (AVX2 | {"avx_vnni"}, ["-march=x86-64-v3", "-mavxvnni"]),   # Alder Lake and later, no AVX-512
    "avx2": (AVX2, ["-march=x86-64-v3"]),
    "scalar": (set(), ["-march=x86-64"]),
}


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return frozenset(line.partition(":")[2].split())


def supported_isas() -> list[str]:
    """The levels this CPU runs, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["scalar"]
    return [name for name, (needs, _) in ISA_LEVELS.items() if needs <= cpu_flags()]


def isa() -> str:
    """The level kernels are built for: LANNER_ISA, or the best this CPU runs."""
    forced = os.environ.get("LANNER_ISA")
    if not forced:
        return supported_isas()[0]
    if forced not in ISA_LEVELS:
        raise ValueError(f"LANNER_ISA={forced!r}: expected one of {list(ISA_LEVELS)}")
    if forced not in supported_isas():
        missing = sorted(ISA_LEVELS[forced][0] - cpu_flags())
        raise ValueError(f"LANNER_ISA={forced}: this CPU lacks {', '.join(missing)}")
    return forced


def isa_flags() -> list[str]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    if not os.environ.get("LANNER_ISA"):
        return ["-march=native", "-mprefer-vector-width=512"]   # GCC's Zen 4 tuning would split 512-bit loops
    return [*ISA_LEVELS[isa()][1], "-mtune=generic", "-mprefer-vector-width=512"]


def enabled() -> bool:
    return os.environ.get("LANNER_NATIVE", "1") != "0"


@functools.lru_cache(maxsize=None)
def load(source: str, isa_flags: tuple) -> ctypes.CDLL | None:
    """The compiled library of `source`, or None (with a warning) where it cannot be built."""
    try:
        return ctypes.CDLL(_build(source, list(isa_flags)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
        warnings.warn(f"native kernel {os.path.basename(source)} unavailable ({detail}); using the PyTorch path")
        return None


def library(source: str) -> ctypes.CDLL | None:
    """`source` built for the current ISA level, or None when native kernels are off or cannot be built."""
    return load(source, _flags(os.environ.get("LANNER_ISA"))) if enabled() else None


@functools.lru_cache(maxsize=None)
def _flags(forced: str | None) -> tuple:
    """isa_flags() for a LANNER_ISA value, worked out once: library() runs per call on decode steps, when
    the weights they streamed have pushed the interpreter's own data out of the caches."""
    return tuple(isa_flags())


def compiler() -> str:
    """The C compiler the kernels are built with: $CC, else cc or gcc."""
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise OSError("no C compiler found (install gcc)")
    return found


def _build(source: str, isa_flags: list[str]) -> str:
    cc = compiler()
    flags = COMMON_FLAGS + isa_flags
    text = open(source, "rb").read()
    for header in re.findall(rb'^#include "([^"]+)"', text, re.M):   # our own headers change the build too
        text += open(os.path.join(os.path.dirname(source), header.decode()), "rb").read()
    key = hashlib.sha256(text + " ".join([cc] + flags).encode() + " ".join(sorted(cpu_flags())).encode())
    name = os.path.splitext(os.path.basename(source))[0]
    target = os.path.join(cache_dir(), "kernels", f"{name}-{key.hexdigest()[:16]}.so")
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
        os.close(fd)
        try:
            subprocess.run([cc, *flags, source, "-o", tmp, "-lm"], check=True, capture_output=True)
            os.replace(tmp, target)   # atomic: concurrent builders never load a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target
