#!/usr/bin/env bash
# The device check (benchmarks/gpu.py) on a machine with an NVIDIA GPU and no network.
#
#   bash benchmarks/gpu_device.sh SRC.tar.gz OUTDIR [SECONDS]
#
# SRC.tar.gz: the pinned llama-cpp-python sdist trimmed to what a CUDA build needs
# (src/llama_cpp: its Python package; src/vendor/llama.cpp: the vendored sources without the
# other backends, models and docs; tools/ holds llama-bench alone). Built with CUDA for this
# GPU's architecture as `CMAKE_ARGS=-DGGML_CUDA=on pip install llama-cpp-python` would, shared
# libraries in the package's lib/ (where llama_cpp loads them); then gpu.py, whose results
# (gpu.json, gpu.md, the log) go to OUTDIR. SECONDS: the whole run's budget (default 560);
# gpu.py stops starting cases when the build has used its share. Pure-Python packages the
# machine lacks (diskcache, which llama_cpp imports) go in a folder named by $GPU_PYSITE.
# GPU_STEPS=build stops after the build; $GPU_ARGS go to gpu.py (--diagnose).
# $GPU_CMAKE_FLAGS replaces the CUDA flags (-DGGML_CUDA=OFF tries the script on a CPU).
set -euo pipefail
tarball=$1 out=$2 budget=${3:-560}
here=$(cd "$(dirname "$0")/.." && pwd)
work=${GPU_WORK:-/tmp/alpaca-gpu}
mkdir -p "$work" "$out"
[ -d "$work/src" ] || tar xzf "$tarball" -C "$work"
llama=$work/src/vendor/llama.cpp
command -v nvcc > /dev/null || export PATH="$PATH:$(dirname "$(ls -d /usr/local/cuda*/bin/nvcc | head -1)")"
generator=$(command -v ninja > /dev/null && echo Ninja || echo "Unix Makefiles")
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [ ! -f "$work/build/bin/llama-bench" ]; then
  cmake -S "$llama" -B "$work/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    ${GPU_CMAKE_FLAGS:--DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${arch}-real} -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
    > "$out/cmake.log" 2>&1 || { tail -40 "$out/cmake.log"; exit 1; }
  start=$SECONDS
  cmake --build "$work/build" --target llama-bench -j "$(nproc)" > "$out/build.log" 2>&1 \
    || { grep -m5 -B2 -A8 "error" "$out/build.log"; exit 1; }
  echo "CUDA build (sm_${arch}): $((SECONDS - start)) s"
fi
mkdir -p "$work/src/llama_cpp/lib"
cp -a "$work/build/bin/"*.so* "$work/src/llama_cpp/lib/"
export PYTHONPATH="$here:$work/src:$llama/gguf-py${GPU_PYSITE:+:$GPU_PYSITE}" PYTHONUNBUFFERED=1
python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
[ "${GPU_STEPS:-all}" != build ] || exit 0
left=$((budget - SECONDS - 100))
quick=
[ "$left" -ge 60 ] || { quick=--quick; left=60; }
python3 "$here/benchmarks/gpu.py" $quick ${GPU_ARGS:-} --bench "$work/build/bin/llama-bench" --work "$work/models" \
  --json "$out/gpu.json" --md "$out/gpu.md" --deadline "$left" 2>&1 | tee "$out/gpu.log"
