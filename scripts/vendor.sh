#!/usr/bin/env bash
# Populate vendor/llama.cpp at the pinned commit.
#
# vendor/llama.cpp is a git submodule of upstream llama.cpp pinned at $COMMIT.  When the
# submodule cannot be fetched (no network to the upstream host), the same tree is taken
# from the llama-cpp-python sdist on PyPI, which vendors llama.cpp at exactly that commit.
# The sdist is hash-checked and cached under $REPQ_CACHE so that this runs once per machine.
set -euo pipefail
COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f
SDIST=llama_cpp_python-0.3.36.tar.gz
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/vendor/llama.cpp
PY=${PYTHON:-python3}

if [ -f "$DEST/CMakeLists.txt" ] && [ -f "$DEST/.repq-commit" ] && [ "$(cat "$DEST/.repq-commit")" = "$COMMIT" ]; then
  exit 0
fi
if [ -d "$ROOT/.git" ] && timeout 60 git -C "$ROOT" submodule update --init vendor/llama.cpp >/dev/null 2>&1 \
   && [ -f "$DEST/CMakeLists.txt" ]; then
  echo "$COMMIT" > "$DEST/.repq-commit"
  exit 0
fi
echo "vendor: submodule not reachable; populating vendor/llama.cpp from the pinned PyPI sdist" >&2
mkdir -p "$CACHE/dl"
if ! echo "$SDIST_SHA256  $CACHE/dl/$SDIST" | sha256sum -c --status 2>/dev/null; then
  "$PY" -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$CACHE/dl"
fi
echo "$SDIST_SHA256  $CACHE/dl/$SDIST" | sha256sum -c --status || {
  echo "vendor: sha256 mismatch for $CACHE/dl/$SDIST" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$CACHE/dl/$SDIST" -C "$tmp" llama_cpp_python-0.3.36/vendor/llama.cpp
src=$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp
rm -f "$src/.git"   # a gitlink file pointing into the sdist's own (absent) repository
mkdir -p "$DEST"
# Replace contents, keep the directory (it is the submodule path).
find "$DEST" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
cp -a "$src/." "$DEST/"
echo "$COMMIT" > "$DEST/.repq-commit"
