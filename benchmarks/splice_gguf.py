"""Diagnosis: which tensors carry a quality difference between two quantized files of one layout.

    python benchmarks/splice_gguf.py A.gguf B.gguf OUT.gguf REGEX

OUT is A (its metadata, its tensors) with every tensor whose name matches REGEX taken from B.  A and
B must hold the same tensors with the same types and shapes (e.g. repq's and llama.cpp's file of one
ftype), so every spliced file has the same bytes and mix; scoring OUT against A and B with
llama-perplexity --kl-divergence says how much of the difference those tensors make.  A tool for
reading results, not for choosing anything on evaluation text.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repq.io.gguf_file import GGUFModel, GGUFWriter  # noqa: E402


def splice(a_path: str, b_path: str, out: str, pattern: str) -> list[str]:
    """Write ``out``; returns the names taken from B."""
    rx = re.compile(pattern)
    taken = []
    with GGUFModel(a_path) as a, GGUFModel(b_path) as b, GGUFWriter(out) as w:
        for key, raw in a.kv_items():
            w.add_raw_kv(key, raw)
        for name, t in a.tensors.items():
            u = b.tensors.get(name)
            if u is None or (u.type, u.shape) != (t.type, t.shape):
                raise SystemExit(f"{b_path}: {name} missing or of another type/shape than in {a_path}")
            w.add_tensor_info(name, t.shape, t.type, t.n_bytes)
        w.begin()
        for name, t in a.tensors.items():
            src = b.tensors[name] if rx.search(name) else t
            if src is not t:
                taken.append(name)
            w.write_tensor_data(name, bytes(src.data))
        w.finish()
    return taken


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("out")
    ap.add_argument("regex", help="names of the tensors taken from B (re.search)")
    args = ap.parse_args()
    taken = splice(args.a, args.b, args.out, args.regex)
    print(f"{args.out}: {len(taken)} tensors from {args.b}")


if __name__ == "__main__":
    main()
