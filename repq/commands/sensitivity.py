"""`repq sensitivity`: per-tensor, per-type costs for bit allocation (`repq quantize --target-size`)."""

import time
from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import UsageError
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
    kl_data: Annotated[Path | None, typer.Option("--kl-data", help="Turn the costs into KL divergence on this text (UTF-8; not your evaluation text), predicted or measured: --kl-measure.")] = None,
    kl_chunks: Annotated[int, typer.Option("--kl-chunks", help="--kl-data: chunks of -c tokens to measure on.")] = 8,
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="--kl-data: tokens per chunk.")] = 512,
    kl_measure: Annotated[str | None, typer.Option("--kl-measure", help="--kl-data: fisher (with --hessian, the default: every cost weighted into a predicted KL by the output-side Fisher, from --kl-samples forward + backward passes for all tensors at once; repq/alloc/fisher.py) | probe (the default with --imatrix: each tensor quantized alone in the model and its KL measured at the candidate nearest --kl-bpw; scales its costs: one partial forward per tensor) | all (every candidate measured; the allocator uses those KLs).", show_default=False)] = None,
    kl_samples: Annotated[int, typer.Option("--kl-samples", help="--kl-measure fisher: label draws per token (one forward + backward pass over the chunks each).")] = 1,
    kl_bpw: Annotated[float, typer.Option("--kl-bpw", help="--kl-measure probe: bits per weight of the probe type (also --proxy estimate's reference type).")] = 4.0,
    proxy: Annotated[str, typer.Option("--proxy", help="--hessian: ldlq (LDLQ on every tensor × type: the exact costs) | estimate (LDLQ on the type nearest --kl-bpw and on every type of one sample tensor per candidate list; the other types' costs are ggml's quantizer's error under H times the LDLQ gain measured there, on --estimate-rows rows of each tensor of more than twice that: ~5× faster on CPU, see repq/alloc/estimate.py).")] = "ldlq",
    estimate_rows: Annotated[int, typer.Option("--estimate-rows", help="--proxy estimate: a tensor of more than twice this many rows (not a sample) runs ggml's quantizer, and its reference LDLQ unless KL-probed, on this many evenly spaced rows, scaled to the whole tensor by each row's expected cost.")] = 256,
    device: Annotated[str, typer.Option(help="LDLQ and the KL probe: torch device (cpu, cuda, cuda:1).")] = "cpu",
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

        repq sensitivity model-f32.gguf --hessian hess/ -o sens-kl.json --kl-data calib.txt --kl-chunks 16 --device cuda

        repq sensitivity model-f32.gguf --hessian hess/ -o sens-fast.json --proxy estimate --kl-data calib.txt --kl-chunks 8

        repq quantize model-f32.gguf q.gguf --target-size 90MB --hessian hess/ --sensitivity sens.json
    """
    out = Output(json_out, quiet)

    def body():
        from ..alloc import sensitivity as sens_mod
        from ..io.convert import ensure_gguf
        from ..runtime import check_device

        types = candidate_list(allow_types, exclude_types)
        check_device(device)
        measure = kl_measure or ("fisher" if hessian is not None else "probe")
        if measure not in ("probe", "all", "fisher"):
            raise UsageError(f"--kl-measure {measure!r}: use probe, all or fisher")
        sens_mod.check_proxy(proxy, measure, kl_data is not None)   # before the probe loads the model
        if estimate_rows < 1:
            raise UsageError(f"--estimate-rows {estimate_rows}: must be at least 1")
        if kl_chunks < 1:
            raise UsageError(f"--kl-chunks {kl_chunks}: must be at least 1")
        if kl_samples < 1:
            raise UsageError(f"--kl-samples {kl_samples}: must be at least 1")
        fisher_run = kl_data is not None and measure == "fisher"
        if fisher_run and hessian is None:
            raise UsageError("--kl-measure fisher weights LDLQ's errors under H: it needs --hessian",
                             hint="with --imatrix, use --kl-measure probe or all")
        t0 = time.perf_counter()
        src = ensure_gguf(model, trust_remote_code=trust_remote_code)
        probe, kl_config, fisher = None, None, None
        if fisher_run:
            fisher, kl_config = fisher_weights(src, kl_data, kl_chunks, ctx_size, device, kl_samples)
        elif kl_data is not None:
            probe, kl_config = kl_probe(src, kl_data, kl_chunks, ctx_size, device)
        with out.progress(f"sensitivity {model.name}", total=0) as advance:
            s = sens_mod.compute(src, types=types, hessian_dir=str(hessian) if hessian else None,
                                 imatrix_path=str(imatrix) if imatrix else None, device=device,
                                 threads=threads or None, probe=probe, measure="probe" if measure == "fisher" else measure, probe_bpw=kl_bpw,
                                 kl_config=kl_config, proxy=proxy, ref_rows=estimate_rows, fisher=fisher,
                                 on_tensor=lambda name, i, n: advance(1, name, total=n))
        s.save(output)
        rows = [[n, str(len(e["candidates"])), ", ".join(e["candidates"])] for n, e in s.tensors.items()]
        out.table(f"{output.name}: {s.source} costs", ["tensor", "types", "candidates"], rows)
        out.result({**meta(), "command": "sensitivity", "output": str(output), "source": s.source,
                    "tensors": len(s.tensors), "unallocated": s.unallocated, "types": types,
                    "kl": s.config.get("kl"), "proxy": s.config.get("proxy"),
                    "seconds": round(time.perf_counter() - t0, 3)},
                   human=f"wrote {output}: {len(s.tensors)} tensors × up to {len(types)} types ({s.source}"
                         + (", calibrated against measured KL" if probe is not None else "")
                         + (", weighted by the output Fisher" if fisher is not None else "") + ")"
                         + (f"; no statistics for {len(s.unallocated)} (pin them)" if s.unallocated else ""))

    run_command(out, body)


def kl_probe(src: Path, data: Path, chunks: int, ctx: int, device: str):
    """The torch model of ``src`` on ``device`` and a KL probe on ``chunks`` × ``ctx`` tokens of
    ``data``; (probe, what to record of the data)."""
    from ..alloc.calibrate import KLProbe
    from ..data.calibration import load_calibration_with
    from ..model.loader import load_model

    cal, _ = load_calibration_with(data, src, n_ctx=ctx, n_chunks=chunks)
    lm = load_model(src, device=device)
    return KLProbe(lm.model, cal.chunks), {"data": str(data), "chunks": int(len(cal.chunks)), "ctx": cal.n_ctx,
                                           "data_fingerprint": cal.fingerprint}


def fisher_weights(src: Path, data: Path, chunks: int, ctx: int, device: str, samples: int):
    """The output-side Fisher's row weights of ``src`` on ``chunks`` × ``ctx`` tokens of ``data``
    (:func:`repq.alloc.fisher.output_fisher`); (weights, what to record of the data)."""
    from ..alloc.fisher import output_fisher
    from ..data.calibration import load_calibration_with
    from ..model.loader import load_model

    cal, _ = load_calibration_with(data, src, n_ctx=ctx, n_chunks=chunks)
    lm = load_model(src, device=device)
    f = output_fisher(lm.model, cal.chunks, samples=samples)
    return f, {"data": str(data), "chunks": int(len(cal.chunks)), "ctx": cal.n_ctx, "samples": samples,
               "data_fingerprint": cal.fingerprint}


def candidate_list(allow_types: str | None, exclude_types: str | None) -> list[str]:
    """The candidate type names: --allow-types (default all) minus --exclude-types."""
    from ..alloc.sensitivity import DEFAULT_TYPES, parse_types

    allowed = parse_types(allow_types, "--allow-types") or list(DEFAULT_TYPES)
    excluded = set(parse_types(exclude_types, "--exclude-types") or ())
    types = [t for t in allowed if t not in excluded]
    if not types:
        raise UsageError("--allow-types/--exclude-types leave no candidate type")
    return types
