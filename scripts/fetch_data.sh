#!/usr/bin/env bash
# Evaluation and calibration text from Debian packages (REFERENCE.md), written to $REPQ_CACHE/data/:
#   tutorial.txt   python3.11-doc: tutorial/*.rst.txt in name order   (evaluation only)
#   library.txt    python3.11-doc: library/*.rst.txt in name order    (calibration / training)
# and two held-out evaluation domains unrelated to Python documentation and to each other
# (evaluation ONLY: never calibrate, train or tune on them; issue 16):
#   sysadmin.txt   debian-reference-en: the Debian Reference (a system administration guide),
#                  its own plain-text rendering debian-reference.en.txt.gz, as shipped (878 KB)
#   fortunes.txt   fortunes: English quotations, aphorisms, poems and jokes of the non-computing
#                  categories listed in FORTUNE_FILES; overstrike (X^H) sequences removed, the
#                  cookies deduplicated and ordered by their sha256 so that any prefix (the first
#                  N chunks an evaluation reads) mixes all categories (1.3 MB)
# Each .deb is downloaded and unpacked without installing it (no root needed). The packages are
# named, not versioned (a pinned version vanishes from the archive when Debian replaces it), so a
# Debian update of one of them can change its text: the sha256 check below then fails naming the
# file and the package version it got; re-pin the hash only together with new baseline numbers.
# Writes are atomic (temp file, then rename) and a file already present with the right hash is kept.
#
#   bash scripts/fetch_data.sh [--core]     --core: tutorial.txt and library.txt only (what the tests use)
set -euo pipefail
CORE=0; [ "${1:-}" = --core ] && CORE=1
CACHE=${REPQ_CACHE:-$HOME/.cache/repq}
OUT=$CACHE/data
PY=${PYTHON:-python3}
mkdir -p "$OUT"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

# the held-out texts' sha256, as produced from debian-reference-en 2.100 and fortunes 1:1.99.1-7.3
SHA_SYSADMIN=fc8dce7f9d076f78432b74cc91555017c855d19d5bbc5b8e7e3ad472f00ec6cf
SHA_FORTUNES=5dc670419c7a1dc1e51030f5545e64dbf305c4aa652a9fdef8f7c5f47c588180
FORTUNE_FILES="art education food humorists kids law love medicine men-women miscellaneous people
  pets platitudes politics pratchett science songs-poems sports wisdom work"

# unpack PACKAGE into $tmp/PACKAGE (once per run)
unpack() {
  [ -d "$tmp/$1" ] && return 0
  ( cd "$tmp" && apt-get download "$1" >/dev/null 2>&1 ) || {
    echo "fetch_data: cannot download $1 (apt-get download)" >&2; exit 1; }
  dpkg -x "$tmp"/"$1"_*.deb "$tmp/$1"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }

# check NAME.tmp against SHA, then rename it to NAME
publish() {
  local name=$1 want=$2 pkg=$3 got
  got=$(sha "$OUT/$name.tmp")
  if [ "$got" != "$want" ]; then
    local ver
    ver=$(dpkg-deb -f "$tmp"/"$pkg"_*.deb Version 2>/dev/null || echo "?")
    echo "fetch_data: $OUT/$name has sha256 $got, expected $want." >&2
    echo "  It is built from Debian package $pkg (got version $ver); a new version of the package" >&2
    echo "  changes the text. Evaluation numbers on $name are only comparable on the same text." >&2
    rm -f "$OUT/$name.tmp"; exit 1
  fi
  mv "$OUT/$name.tmp" "$OUT/$name"
}

# 1. python3.11-doc: tutorial (evaluation) and library (calibration)
if ! { [ -s "$OUT/tutorial.txt" ] && [ -s "$OUT/library.txt" ]; }; then
  SRC=/usr/share/doc/python3.11/html/_sources
  if [ ! -d "$SRC/tutorial" ]; then
    unpack python3.11-doc
    SRC=$tmp/python3.11-doc/usr/share/doc/python3.11/html/_sources
  fi
  LC_ALL=C cat $(LC_ALL=C ls "$SRC"/tutorial/*.rst.txt) > "$OUT/tutorial.txt.tmp"
  LC_ALL=C cat $(LC_ALL=C ls "$SRC"/library/*.rst.txt) > "$OUT/library.txt.tmp"
  mv "$OUT/tutorial.txt.tmp" "$OUT/tutorial.txt"
  mv "$OUT/library.txt.tmp" "$OUT/library.txt"
  echo "fetch_data: $(wc -c < "$OUT/tutorial.txt") bytes tutorial, $(wc -c < "$OUT/library.txt") bytes library" >&2
fi

[ "$CORE" = 1 ] && exit 0

# 2. held-out: the Debian Reference, plain text as shipped
if [ ! -s "$OUT/sysadmin.txt" ] || [ "$(sha "$OUT/sysadmin.txt")" != "$SHA_SYSADMIN" ]; then
  unpack debian-reference-en
  gzip -dc "$tmp"/debian-reference-en/usr/share/debian-reference/debian-reference.en.txt.gz > "$OUT/sysadmin.txt.tmp"
  publish sysadmin.txt "$SHA_SYSADMIN" debian-reference-en
  echo "fetch_data: $(wc -c < "$OUT/sysadmin.txt") bytes sysadmin (held-out evaluation)" >&2
fi

# 3. held-out: fortunes, cleaned with Python's stdlib only
if [ ! -s "$OUT/fortunes.txt" ] || [ "$(sha "$OUT/fortunes.txt")" != "$SHA_FORTUNES" ]; then
  unpack fortunes
  # shellcheck disable=SC2086
  "$PY" - "$tmp/fortunes/usr/share/games/fortunes" "$OUT/fortunes.txt.tmp" $FORTUNE_FILES <<'EOF'
import hashlib, re, sys
from pathlib import Path
src, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
cookies = set()
for name in names:
    text = (src / name).read_bytes().decode("utf-8")
    while re.search(".\b", text):          # overstrike: "_\bX" and "X\bX" print as X
        text = re.sub("[^\b]\b", "", text)
    for cookie in re.split(r"^%\n", text, flags=re.M):
        cookie = "\n".join(line.rstrip() for line in cookie.strip("\n").splitlines())
        if cookie.strip():
            cookies.add(cookie)
order = sorted(cookies, key=lambda c: hashlib.sha256(c.encode()).hexdigest())
out.write_text("\n\n".join(order) + "\n", encoding="utf-8")
EOF
  publish fortunes.txt "$SHA_FORTUNES" fortunes
  echo "fetch_data: $(wc -c < "$OUT/fortunes.txt") bytes fortunes (held-out evaluation)" >&2
fi
