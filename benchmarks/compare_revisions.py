"""Two revisions of repq side by side: LDLQ tensor bytes and CLI start-up time.

    python benchmarks/compare_revisions.py BASE_REV [NEW_REV] [--ftypes Q4_0,IQ4_XS,Q3_K_S,Q4_K_M]
                                           [--calib-chunks 100] [--startup-runs 15] [--skip-ldlq]

Each revision is checked out into a git worktree under $REPQ_CACHE/revisions and run with this
checkout's venv and native build (through benchmarks/in_tree.py, native/build linked to this
checkout's).  Two checks:

* **LDLQ bytes**: Hessians of the reference model from --calib-chunks × 512 library tokens are
  collected once (by BASE_REV), then `repq quantize --method ldlq` runs in both revisions for each
  ftype; the tensors (names, order, types, shapes, data bytes) are compared, and metadata keys that
  only one file has are listed.  Identical tensors mean identical quality numbers (make bench-ldlq).
* **Start-up**: `repq version --json` and `repq quantize` Q4_0 of the reference model (2 threads),
  alternating between the revisions, median and minimum of --startup-runs runs each.

Writes benchmarks/results/revisions_<base>_<new>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.io.gguf_file import GGUFModel  # noqa: E402
from repq.paths import cache_dir  # noqa: E402


def worktree(rev: str) -> tuple[str, Path]:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    d = cache_dir() / "revisions" / sha
    if not d.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(d), sha], check=True)
    link = d / "native" / "build"   # this checkout's native build, for both revisions
    if not link.exists():
        link.symlink_to((ROOT / "native" / "build").resolve())
    return sha, d


def repq(tree: Path, *args, quiet: bool = True) -> float:
    t0 = time.perf_counter()   # in_tree.py: PYTHONPATH alone would run this checkout's repq (its editable install)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "in_tree.py"), str(tree), "-m", "repq", *map(str, args)],
                   check=True, cwd="/tmp", capture_output=quiet)
    return time.perf_counter() - t0


def same_tensors(a: Path, b: Path) -> dict:
    with GGUFModel(a) as x, GGUFModel(b) as y:
        same = list(x.tensors) == list(y.tensors) and all(
            x.tensors[n].type == y.tensors[n].type and x.tensors[n].shape == y.tensors[n].shape
            and bytes(x.tensors[n].data) == bytes(y.tensors[n].data) for n in x.tensors)
        return {"tensors_identical": same, "n_tensors": len(x.tensors),
                "keys_only_in_base": sorted(set(x.keys()) - set(y.keys())),
                "keys_only_in_new": sorted(set(y.keys()) - set(x.keys())),
                "bytes_base": a.stat().st_size, "bytes_new": b.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--ftypes", default="Q4_0,IQ4_XS,Q3_K_S,Q4_K_M")
    ap.add_argument("--calib-chunks", type=int, default=100)
    ap.add_argument("--startup-runs", type=int, default=15)
    ap.add_argument("--skip-ldlq", action="store_true")
    a = ap.parse_args()
    model = cache_dir() / "models" / "smollm2-135m-f32.gguf"
    library = cache_dir() / "data" / "library.txt"
    (base_sha, base), (new_sha, new) = worktree(a.base), worktree(a.new)
    work = cache_dir() / "revisions" / f"{base_sha}-{new_sha}"
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": " ".join(["python", "benchmarks/compare_revisions.py", *sys.argv[1:]]),
                 "base": base_sha, "new": new_sha, "load_average": os.getloadavg()}
    if not a.skip_ldlq:
        hess = work / f"hess-{a.calib_chunks}"
        if not (hess / "hessians.json").exists():
            repq(base, "hessian", model, "--data", library, "--chunks", a.calib_chunks, "-o", hess, "-t", 2, "-q")
        res["ldlq"] = {}
        for f in a.ftypes.split(","):
            files = []
            for tag, tree in (("base", base), ("new", new)):
                out = work / f"{tag}-ldlq-{f}.gguf"
                if not out.exists():
                    repq(tree, "quantize", model, out, "--fmt", f, "--hessian", hess, "-t", 2, "-q")
                files.append(out)
            res["ldlq"][f] = same_tensors(*files)
            print(f, res["ldlq"][f], flush=True)
    times: dict[str, list[float]] = {k: [] for k in ("base_version", "new_version", "base_quantize", "new_quantize")}
    for _ in range(a.startup_runs):
        for tag, tree in (("base", base), ("new", new)):
            times[f"{tag}_version"].append(repq(tree, "version", "--json"))
            times[f"{tag}_quantize"].append(repq(tree, "quantize", model, work / f"su-{tag}.gguf", "--fmt", "Q4_0",
                                                 "-t", 2, "-q"))
    res["startup_s"] = {k: {"median": round(statistics.median(v), 4), "min": round(min(v), 4)} for k, v in times.items()}
    res["load_average_after"] = os.getloadavg()
    out = ROOT / "benchmarks" / "results" / f"revisions_{base_sha}_{new_sha}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["startup_s"], indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
