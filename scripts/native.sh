#!/usr/bin/env bash
# Build vendor/llama.cpp into native/build (a link to a cached build directory).  The one native
# build: `make native` runs it, and so does the package build (`pip install`, through
# native/wheel/CMakeLists.txt).
#
# The cache key covers the pinned commit, native/CMakeLists.txt and the CMake options, so a
# rebuild happens only when one of them changes.  With GGML_NATIVE=ON (the default) the build uses
# every instruction set of this CPU (-march=native), so the key also covers the CPU's feature flags
# (/proc/cpuinfo, hashed): a cache shared between machines never hands an AVX-512 build to an
# AVX2-only CPU.  REPQ_CUDA=1 adds the CUDA backend
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
cpu=
case "${REPQ_GGML_NATIVE:-ON}" in   # CMake's true values: -march=native
  [Oo][Nn]|1|[Yy]|[Yy][Ee][Ss]|[Tt][Rr][Uu][Ee])
    cpu=$(grep -m1 -E '^(flags|Features)[[:space:]]*:' /proc/cpuinfo 2>/dev/null || true) ;;
esac
key=$( { cat "$ROOT/vendor/llama.cpp/.repq-commit"; cat "$ROOT/native/CMakeLists.txt"; echo "${OPTS[*]}"; echo "${TARGETS[*]}"; uname -m
         [ -z "$cpu" ] || echo "cpu $(echo "$cpu" | sha256sum | cut -c1-16)"; } | sha256sum | cut -c1-16)
BUILD=$CACHE/build/$key
mkdir -p "$BUILD"
exec 9>"$BUILD.lock"   # one build per key at a time (`make` and `pip install` may run side by side)
flock 9
if [ ! -f "$BUILD/.complete" ]; then
  # A build left half-done from another source tree (a deleted clone, pip's temporary sdist
  # directory) cannot be reconfigured from this one: start it over.
  if [ -f "$BUILD/CMakeCache.txt" ] && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT/native" "$BUILD/CMakeCache.txt"; then
    find "$BUILD" -mindepth 1 -delete
  fi
  echo "native: building llama.cpp into $BUILD (${OPTS[*]})" >&2
  cmake -S "$ROOT/native" -B "$BUILD" -G Ninja "${OPTS[@]}" > "$BUILD.configure.log" 2>&1 || {
    tail -30 "$BUILD.configure.log" >&2; exit 1; }
  cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
  touch "$BUILD/.complete"
fi
ln -sfn "$BUILD" "$ROOT/native/build"
echo "native: $ROOT/native/build -> $BUILD" >&2
