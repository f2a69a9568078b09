#!/usr/bin/env bash
# llama-cpp-python built for this host, into the current python: the llama.cpp peer of bench/latency.py and
# bench/throughput.py. Native (-DGGML_NATIVE=ON) on every CPU but those with AMX, where the native build crashed
# (a segfault at the first decode; llama-cpp-python 0.3.36 on a Sapphire Rapids class Xeon): there it gets every
# extension the host has except AMX. The build takes 5-10 minutes on 2 cores.
#
#     bash bench/llama_cpp_build.sh
set -euo pipefail

flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }

if has amx_tile; then
    args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
                avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
        has "${pair%%:*}" && args+=" -DGGML_${pair#*:}=ON"
    done
else
    args="-DGGML_NATIVE=ON"
fi
echo "CMAKE_ARGS=$args" >&2
CMAKE_ARGS="$args" python -m pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python
python -m pip install llama-cpp-python   # its dependencies; the build above already satisfies it
