#!/usr/bin/env bash
# Evaluation and calibration text from Debian's python3.11-doc package (REFERENCE.md):
#   $REPQ_CACHE/data/tutorial.txt  tutorial/*.rst.txt in name order  (evaluation only)
#   $REPQ_CACHE/data/library.txt   library/*.rst.txt in name order   (calibration / training)
# The .deb is downloaded and unpacked without installing it (no root needed).
set -euo pipefail
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
OUT=$CACHE/data
[ -s "$OUT/tutorial.txt" ] && [ -s "$OUT/library.txt" ] && exit 0
mkdir -p "$OUT"
SRC=/usr/share/doc/python3.11/html/_sources
if [ ! -d "$SRC/tutorial" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  ( cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1 ) || {
    echo "fetch_data: cannot download python3.11-doc (apt-get download)" >&2; exit 1; }
  dpkg -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
  SRC=$tmp/x/usr/share/doc/python3.11/html/_sources
fi
LC_ALL=C cat $(LC_ALL=C ls "$SRC"/tutorial/*.rst.txt) > "$OUT/tutorial.txt.tmp"
LC_ALL=C cat $(LC_ALL=C ls "$SRC"/library/*.rst.txt) > "$OUT/library.txt.tmp"
mv "$OUT/tutorial.txt.tmp" "$OUT/tutorial.txt"
mv "$OUT/library.txt.tmp" "$OUT/library.txt"
echo "fetch_data: $(wc -c < "$OUT/tutorial.txt") bytes tutorial, $(wc -c < "$OUT/library.txt") bytes library" >&2
