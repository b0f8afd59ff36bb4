"""`repq sensitivity`: per-tensor, per-type costs for bit allocation (`repq quantize --target-size`)."""

import time
from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from .common import JsonOpt, QuietOpt, ThreadsOpt, meta, run_command

AllowTypesOpt = Annotated[str | None, typer.Option("--allow-types", help="Comma-separated ggml types allowed as candidates (default: all of IQ1_S … F16).")]
ExcludeTypesOpt = Annotated[str | None, typer.Option("--exclude-types", help="Comma-separated ggml types never chosen, e.g. Q4_1,Q5_1.")]


def sensitivity(
    model: Annotated[Path, typer.Argument(help="Input model: F32/F16/BF16 GGUF, or a Hugging Face model directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Sensitivity file to write (JSON).")],
    hessian: Annotated[Path | None, typer.Option(help="Hessian directory from `repq hessian`: LDLQ on every type, cost tr(ΔW H ΔWᵀ).")] = None,
    imatrix: Annotated[Path | None, typer.Option(help="Importance matrix: ggml's quantizer on every type, cost Σ imp·ΔW².")] = None,
    allow_types: AllowTypesOpt = None,
    exclude_types: ExcludeTypesOpt = None,
    device: Annotated[str, typer.Option(help="LDLQ: torch device (cpu, cuda, cuda:1).")] = "cpu",
    threads: ThreadsOpt = 0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Convert a Hugging Face folder whose JSON names custom code.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize every tensor of MODEL to every candidate type and record the predicted cost.

    The file is reused by `repq quantize --target-size ... --sensitivity FILE` for any number of
    targets; it records the model's and the statistics' fingerprints and is refused for others.

    Examples:

        repq sensitivity model-f32.gguf --hessian hess/ -o sens.json

        repq sensitivity model-f32.gguf --imatrix imatrix.gguf -o sens-im.json --exclude-types Q4_1,Q5_1

        repq quantize model-f32.gguf q.gguf --target-size 90MB --hessian hess/ --sensitivity sens.json
    """
    out = Output(json_out, quiet)

    def body():
        from ..alloc import sensitivity as sens_mod
        from ..io.convert import ensure_gguf
        from ..runtime import check_device

        types = candidate_list(allow_types, exclude_types)
        check_device(device)
        t0 = time.perf_counter()
        src = ensure_gguf(model, trust_remote_code=trust_remote_code)
        with out.progress(f"sensitivity {model.name}", total=0) as advance:
            s = sens_mod.compute(src, types=types, hessian_dir=str(hessian) if hessian else None,
                                 imatrix_path=str(imatrix) if imatrix else None, device=device,
                                 threads=threads or None,
                                 on_tensor=lambda name, i, n: advance(1 if i else 0, name, total=n))
        s.save(output)
        rows = [[n, str(len(e["candidates"])), ", ".join(e["candidates"])] for n, e in s.tensors.items()]
        out.table(f"{output.name}: {s.source} costs", ["tensor", "types", "candidates"], rows)
        out.result({**meta(), "command": "sensitivity", "output": str(output), "source": s.source,
                    "tensors": len(s.tensors), "unallocated": s.unallocated, "types": types,
                    "seconds": round(time.perf_counter() - t0, 3)},
                   human=f"wrote {output}: {len(s.tensors)} tensors × up to {len(types)} types ({s.source})"
                         + (f"; no statistics for {len(s.unallocated)} (pin them)" if s.unallocated else ""))

    run_command(out, body)


def candidate_list(allow_types: str | None, exclude_types: str | None) -> list[str]:
    """The candidate type names: --allow-types (default all) minus --exclude-types."""
    from ..alloc.sensitivity import DEFAULT_TYPES, parse_types
    from ..errors import UsageError

    allowed = parse_types(allow_types, "--allow-types") or list(DEFAULT_TYPES)
    excluded = set(parse_types(exclude_types, "--exclude-types") or ())
    types = [t for t in allowed if t not in excluded]
    if not types:
        raise UsageError("--allow-types/--exclude-types leave no candidate type")
    return types
