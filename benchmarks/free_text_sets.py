"""Calibration sets with the model's free-running text (the exploration before `repq calib --free`).

    python benchmarks/free_text_sets.py gen MODEL free.jsonl --tokens 30000 --temperature 1.0 --top-k 200 --start 0
    python benchmarks/free_text_sets.py build MODEL freelib-52k.jsonl --base mixlib-52k.jsonl --free free.jsonl \\
        --tokens 52000 lib=0.5 free=0.5

``gen``: continuations of one start token (``--start``; SmolLM2's ``<|endoftext|>`` is 0) with
:func:`repq.data.selfgen.generate_answers`, 512 tokens at most each, one ``{"text"}`` record per
non-empty continuation, until ``--tokens``.  ``build``: records taken in file order from three pools
— ``lib`` (the ``mix:`` records of ``--base``), ``chat`` (its ``selfgen:`` answers) and ``free`` —
until each pool's share of ``--tokens`` (counted as the calibration loader counts), shuffled
(seed 0).  `repq calib --free W` does the same inside one command (with the answers' sampling
settings); this script is what the first measurement used (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from repq.data.chat import chat_tokens
from repq.data.selfgen import GenerateConfig, generate_answers
from repq.data.tokenizer import Tokenizer


def gen(a) -> None:
    cfg = GenerateConfig(max_tokens=512, seed=a.seed, temperature=a.temperature, top_k=a.top_k, top_p=0.95,
                         n_ctx=640, parallel=16, threads=a.threads)
    got, t0 = 0, time.time()
    with open(a.out, "w") as f:
        for _, toks, text in generate_answers(a.model, [np.asarray([a.start], np.int32)], cfg):
            s = text.decode("utf-8", "replace").strip()
            if s:
                f.write(json.dumps({"text": s, "source": "selfgen:free"}, ensure_ascii=False) + "\n")
                got += len(toks) + 1
            if got >= a.tokens:
                break
    print(f"{got} tokens in {time.time() - t0:.0f} s")


def build(a) -> None:
    recs = [json.loads(line) for line in open(a.base)]
    pools = {"lib": [r for r in recs if r["source"].startswith("mix:")],
             "chat": [r for r in recs if r["source"].startswith("selfgen:")],
             "free": [json.loads(line) for line in open(a.free)] if a.free else []}
    sel = []
    with Tokenizer(a.model) as tok:
        for spec in a.shares:
            k, w = spec.split("=")
            got = 0
            for r in pools[k]:
                if got >= float(w) * a.tokens:
                    break
                sel.append(r)
                got += len(chat_tokens(tok, r["messages"])) if "messages" in r else len(tok.tokenize(r["text"]))
            print(k, got)
    random.Random(0).shuffle(sel)
    with open(a.out, "w") as f:
        for r in sel:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("model")
    g.add_argument("out")
    g.add_argument("--tokens", type=int, default=30000)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=200)
    g.add_argument("--start", type=int, default=0)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--threads", type=int, default=2)
    b = sub.add_parser("build")
    b.add_argument("model")
    b.add_argument("out")
    b.add_argument("--base", required=True)
    b.add_argument("--free")
    b.add_argument("--tokens", type=int, default=52000)
    b.add_argument("shares", nargs="+", help="POOL=W (lib, chat, free)")
    a = ap.parse_args()
    (gen if a.cmd == "gen" else build)(a)


if __name__ == "__main__":
    main()
