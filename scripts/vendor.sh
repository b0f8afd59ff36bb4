#!/usr/bin/env bash
# Populate vendor/llama.cpp at the pinned commit; `vendor.sh sdist` only fetches the pinned
# llama-cpp-python sdist and prints its path (the package build makes the Python bindings from it).
#
# vendor/llama.cpp is a git submodule of upstream llama.cpp pinned at $COMMIT.  When the
# submodule cannot be fetched (no network to the upstream host, or no git checkout: an sdist),
# the same tree is taken from the llama-cpp-python sdist on PyPI, which vendors llama.cpp at
# exactly that commit.  The sdist is hash-checked and cached under $REPQ_CACHE/dl so that this
# runs once per machine.  The pins live in repq/_pins.py.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
pin() { sed -n "s/^$1 = \"\(.*\)\"\$/\1/p" "$ROOT/repq/_pins.py"; }
COMMIT=$(pin LLAMA_CPP_COMMIT)
VERSION=$(pin LLAMA_CPP_PYTHON_VERSION)
SDIST_SHA256=$(pin LLAMA_CPP_PYTHON_SDIST_SHA256)
[ -n "$COMMIT" ] && [ -n "$VERSION" ] && [ -n "$SDIST_SHA256" ] || {
  echo "vendor: cannot read the pins from $ROOT/repq/_pins.py" >&2; exit 1; }
SDIST=llama_cpp_python-$VERSION.tar.gz
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
DEST=$ROOT/vendor/llama.cpp
PY=${PYTHON:-python3}

fetch_sdist() {   # the hash-checked sdist in $CACHE/dl (pip download: the user's index settings apply)
  mkdir -p "$CACHE/dl"
  if ! echo "$SDIST_SHA256  $CACHE/dl/$SDIST" | sha256sum -c --status 2>/dev/null; then
    echo "vendor: downloading $SDIST from PyPI" >&2
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/dl" >&2
  fi
  echo "$SDIST_SHA256  $CACHE/dl/$SDIST" | sha256sum -c --status || {
    echo "vendor: sha256 mismatch for $CACHE/dl/$SDIST" >&2; exit 1; }
}

if [ "${1:-}" = sdist ]; then
  fetch_sdist
  echo "$CACHE/dl/$SDIST"
  exit 0
fi
if [ -f "$DEST/CMakeLists.txt" ] && [ -f "$DEST/.repq-commit" ] && [ "$(cat "$DEST/.repq-commit")" = "$COMMIT" ]; then
  exit 0
fi
if [ -d "$ROOT/.git" ] && timeout 60 git -C "$ROOT" submodule update --init vendor/llama.cpp >/dev/null 2>&1 \
   && [ -f "$DEST/CMakeLists.txt" ]; then
  echo "$COMMIT" > "$DEST/.repq-commit"
  exit 0
fi
echo "vendor: submodule not reachable; populating vendor/llama.cpp from the pinned PyPI sdist" >&2
fetch_sdist
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$CACHE/dl/$SDIST" -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
src=$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp
rm -f "$src/.git"   # a gitlink file pointing into the sdist's own (absent) repository
mkdir -p "$DEST"
# Replace contents, keep the directory (it is the submodule path).
find "$DEST" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
cp -a "$src/." "$DEST/"
echo "$COMMIT" > "$DEST/.repq-commit"
