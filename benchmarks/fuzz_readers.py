"""A long fuzz of the file readers: the hardening tests' hypothesis properties with many more cases.

    python benchmarks/fuzz_readers.py [--cases 5000] [--cli-cases 500]

Runs tests/native/test_{gguf,imatrix,hessian}_hardening.py's fuzz tests with REPQ_FUZZ_CASES and
REPQ_CLI_FUZZ_CASES raised (CI runs 300 GGUF, 200 imatrix per format, 200 Hessian-index and 40
`repq quantize` cases) and writes the outcome to benchmarks/results/fuzz_readers.json: cases per
property, wall time, pass/fail.  The properties: never an exception but InputFileError (exit 2 at
the CLI), bounded allocation, nothing accepted that llama.cpp's gguf reader rejects, never exit 0
with an output a reader refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/native/test_gguf_hardening.py", "tests/native/test_imatrix_hardening.py",
         "tests/native/test_hessian_hardening.py"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=5000, help="cases per reader property")
    ap.add_argument("--cli-cases", type=int, default=500, help="mutated models through `repq quantize`")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_readers.json")
    a = ap.parse_args()
    env = os.environ | {"REPQ_FUZZ_CASES": str(a.cases), "REPQ_CLI_FUZZ_CASES": str(a.cli_cases)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", "fuzz", *TESTS],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    res = {"command": " ".join(["python", "benchmarks/fuzz_readers.py", "--cases", str(a.cases),
                                "--cli-cases", str(a.cli_cases)]),
           "cases_per_property": a.cases, "cli_cases": a.cli_cases, "seconds": round(time.perf_counter() - t0, 1),
           "passed": p.returncode == 0, "pytest_summary": (p.stdout.strip().splitlines() or [""])[-1]}
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    if p.returncode:
        sys.exit(p.stdout[-4000:] + p.stderr[-2000:])


if __name__ == "__main__":
    main()
