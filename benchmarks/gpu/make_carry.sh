#!/usr/bin/env bash
# Pack what a device machine needs and the working tree does not hold, into .carry/g (git-ignored):
#   llama.tgz       vendor/llama.cpp without models/, docs/, media/, tests/, benches/, examples/ (~5 MB)
#   *.whl           Python packages the device image lacks: gguf, diskcache,
#                   and llama-cpp-python's bindings built here without a llama.cpp of their own
# Then: run(command="bash benchmarks/gpu/test_gpu.sh", carry=[".carry/g"]).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$ROOT/.carry/g
PY=${PY:-$ROOT/.venv/bin/python}
rm -rf "$OUT" && mkdir -p "$OUT"
bash "$ROOT/scripts/vendor.sh"
tar czf "$OUT/llama.tgz" -C "$ROOT/vendor" \
  --exclude=llama.cpp/models --exclude=llama.cpp/docs --exclude=llama.cpp/media --exclude=llama.cpp/tests \
  --exclude=llama.cpp/benches --exclude=llama.cpp/examples --exclude=llama.cpp/.devops llama.cpp
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" gguf==0.19.0 diskcache
SDIST=$(bash "$ROOT/scripts/vendor.sh" sdist)
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip wheel -q --no-deps -w "$OUT" "$SDIST"
du -sh "$OUT"; ls "$OUT"
