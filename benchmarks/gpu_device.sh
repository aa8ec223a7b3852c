#!/usr/bin/env bash
# The device check (benchmarks/gpu.py) on a machine with an NVIDIA GPU and no network.
#
#   bash benchmarks/gpu_device.sh --pack SRC.tar.gz       # here: what the device machine needs
#   bash benchmarks/gpu_device.sh SRC.tar.gz OUTDIR [SECONDS]   # there (no network)
#
# SRC.tar.gz: the pinned llama-cpp-python sdist trimmed to what a CUDA build needs
# (src/llama_cpp: its Python package; src/vendor/llama.cpp: the vendored sources without the
# other backends, models and docs; tools/ holds llama-bench alone). Built with CUDA for this
# GPU's architecture as `CMAKE_ARGS=-DGGML_CUDA=on pip install llama-cpp-python` would, shared
# libraries in the package's lib/ (where llama_cpp loads them); then gpu.py, whose results
# (gpu.json, gpu.md, the log) go to OUTDIR. SECONDS: the whole run's budget (default 560);
# gpu.py stops starting cases when the build has used its share. --pack makes SRC.tar.gz from
# the sdist `make install` unpacked in .cache/ and adds pysite/ with diskcache (pure Python,
# which llama_cpp imports and a bare image lacks; $GPU_PYSITE names another such folder).
# GPU_STEPS=build stops after the build; $GPU_ARGS go to gpu.py (--diagnose).
# $GPU_CMAKE_FLAGS replaces the CUDA flags (-DGGML_CUDA=OFF tries the script on a CPU).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "${1:-}" = --pack ]; then
  sdist=$here/.cache/llama_cpp_python-0.3.36 tmp=$(mktemp -d)
  mkdir -p "$tmp/src/vendor/llama.cpp/tools" "$tmp/pysite"
  cp -r "$sdist/llama_cpp" "$tmp/src/" && rm -rf "$tmp/src/llama_cpp/lib"
  (cd "$sdist/vendor/llama.cpp" && cp -r CMakeLists.txt cmake ggml src include common vendor gguf-py LICENSE \
     "$tmp/src/vendor/llama.cpp/" && cp -r tools/llama-bench "$tmp/src/vendor/llama.cpp/tools/")
  for b in cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; do
    rm -rf "$tmp/src/vendor/llama.cpp/ggml/src/ggml-$b"
  done
  printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' \
    > "$tmp/src/vendor/llama.cpp/tools/CMakeLists.txt"  # llama-bench alone
  cp -r "$(dirname "$("$here/.venv/bin/python" -c 'import diskcache; print(diskcache.__file__)')")" "$tmp/pysite/"
  tar czf "$2" -C "$tmp" src pysite && rm -rf "$tmp" && ls -l "$2"
  exit 0
fi
tarball=$1 out=$2 budget=${3:-560}
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
export PYTHONPATH="$here:$work/src:$llama/gguf-py:$work/pysite${GPU_PYSITE:+:$GPU_PYSITE}" PYTHONUNBUFFERED=1
python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
[ "${GPU_STEPS:-all}" != build ] || exit 0
left=$((budget - SECONDS - 100))
quick=
[ "$left" -ge 60 ] || { quick=--quick; left=60; }
python3 "$here/benchmarks/gpu.py" $quick ${GPU_ARGS:-} --bench "$work/build/bin/llama-bench" --work "$work/models" \
  --json "$out/gpu.json" --md "$out/gpu.md" --deadline "$left" 2>&1 | tee "$out/gpu.log"
