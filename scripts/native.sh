#!/usr/bin/env bash
# Build vendor/llama.cpp into native/build (a link to a cached build directory).
#
# The cache key covers the pinned commit, native/CMakeLists.txt and the CMake options, so a
# rebuild happens only when one of them changes.  REPQ_CUDA=1 adds the CUDA backend
# (GGML_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=${REPQ_CUDA_ARCH:-90}).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
JOBS=${JOBS:-$(nproc)}
bash "$ROOT/scripts/vendor.sh"
OPTS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=${REPQ_GGML_NATIVE:-ON})
if [ "${REPQ_CUDA:-0}" = 1 ]; then
  OPTS+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${REPQ_CUDA_ARCH:-90})
fi
TARGETS=(ggml-base ggml-cpu ggml llama llama-quantize llama-imatrix llama-perplexity llama-bench)
[ "${REPQ_CUDA:-0}" = 1 ] && TARGETS+=(ggml-cuda)
key=$( { cat "$ROOT/vendor/llama.cpp/.repq-commit"; cat "$ROOT/native/CMakeLists.txt"; echo "${OPTS[*]}"; echo "${TARGETS[*]}"; uname -m; } | sha256sum | cut -c1-16)
BUILD=$CACHE/build/$key
mkdir -p "$BUILD"
if [ ! -f "$BUILD/.complete" ]; then
  echo "native: building llama.cpp into $BUILD (${OPTS[*]})" >&2
  cmake -S "$ROOT/native" -B "$BUILD" -G Ninja "${OPTS[@]}" > "$BUILD.configure.log" 2>&1 || {
    tail -30 "$BUILD.configure.log" >&2; exit 1; }
  cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
  touch "$BUILD/.complete"
fi
ln -sfn "$BUILD" "$ROOT/native/build"
echo "native: $ROOT/native/build -> $BUILD" >&2
