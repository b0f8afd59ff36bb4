#!/usr/bin/env bash
# Pack what a device machine needs and the working tree does not hold, into .carry/g (git-ignored):
#   llama.tgz       vendor/llama.cpp without models/, docs/, media/, tests/, benches/, examples/, the web UI
#                   and the GPU backends other than CUDA (~6 MB)
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
  --exclude=llama.cpp/benches --exclude=llama.cpp/examples --exclude=llama.cpp/.devops \
  --exclude=llama.cpp/tools/ui $(for b in opencl vulkan sycl hexagon metal et webgpu openvino cann virtgpu; do
    echo --exclude=llama.cpp/ggml/src/ggml-$b; done) llama.cpp
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" gguf==0.19.0 diskcache
SDIST=$(bash "$ROOT/scripts/vendor.sh" sdist)
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip wheel -q --no-deps -w "$OUT" "$SDIST"
du -sh "$OUT"; ls "$OUT"
# `make_carry.sh model` also packs the reference model in two halves (a call carries at most 64 MiB)
# and the distillation inputs: .carry/a = llama.tgz + wheels + first half (for setup.sh),
# .carry/b = second half, the tutorial text, the library text's token chunks and llama.cpp's
# imatrix of the library text (for run.sh and distill.sh).
if [ "${1:-}" = model ]; then
  CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
  Q41=$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
  A=$ROOT/.carry/a B=$ROOT/.carry/b
  rm -rf "$A" "$B" && mkdir -p "$A" "$B"
  cp "$OUT"/* "$A"/
  half=$(( ($(stat -c %s "$Q41") + 1) / 2 ))
  split -b "$half" -d -a 2 "$Q41" "$B/q41.part" && mv "$B/q41.part00" "$A/"
  cp "$CACHE/data/tutorial.txt" "$B/"
  for t in "$CACHE"/data/*.txt; do case $(basename "$t") in library.txt|tutorial.txt) ;; *) cp "$t" "$B/";; esac; done
  "$ROOT/.venv/bin/repq" tokenize "$CACHE/models/smollm2-135m-f32.gguf" --data "$CACHE/data/library.txt" -c 512 -o "$B/library-512.npy"
  IMX=${IMATRIX:-$CACHE/bench-ldlq-iq/imatrix-100.gguf}
  [ -f "$IMX" ] && cp "$IMX" "$B/imatrix-100.gguf"
  # .carry/c: calibration and held-out texts for iq_domains.sh / calib_domains.sh: the first 20,000
  # lines of the library text, sysadmin + fortunes, and any `repq calib` mixtures in $CACHE/calibmix
  C=$ROOT/.carry/c; rm -rf "$C" && mkdir -p "$C"
  head -n 20000 "$CACHE/data/library.txt" > "$C/library-head.txt"
  cp "$CACHE/data/sysadmin.txt" "$CACHE/data/fortunes.txt" "$C/"
  cp "$CACHE"/calibmix/*.jsonl "$C/" 2>/dev/null || true
  # .carry/d: the mixture + library JSONL (and any mix-*.jsonl, distillation data) and the library head, small enough to travel beside .carry/b (eval_study.sh)
  D=$ROOT/.carry/d; rm -rf "$D" && mkdir -p "$D"
  cp "$CACHE/calibmix/mixlib-52k.jsonl" "$CACHE"/calibmix/mix-*.jsonl "$C/library-head.txt" "$D/" 2>/dev/null || true
  du -sh "$A" "$B" "$C" "$D"
fi
