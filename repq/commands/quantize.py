"""`repq quantize`: llama.cpp's ftype mixes with ggml's quantizers (byte-identical to llama-quantize)."""

from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import MismatchError, UsageError
from ..quant import DEFAULT_HESS_SHRINK
from .common import JsonOpt, QuietOpt, ThreadsOpt, meta, run_command
from .sensitivity import AllowTypesOpt, ExcludeTypesOpt


def quantize(
    model: Annotated[Path, typer.Argument(help="Input model: F32/F16/BF16 GGUF, or a Hugging Face model directory.")],
    out_path: Annotated[Path, typer.Argument(metavar="OUT", help="Output GGUF path.")],
    fmt: Annotated[str, typer.Option("--fmt", "-f", help="llama-quantize ftype: Q4_K_M, Q3_K_S, IQ4_XS, Q4_0, ... (with a target: only the file's label).")] = "",
    method: Annotated[str, typer.Option(help="rtn | imatrix (ggml's own quantizers, byte-identical to llama-quantize) | ldlq (error feedback through Hessians).")] = "",
    imatrix: Annotated[Path | None, typer.Option(help="Importance matrix (GGUF or legacy .dat).")] = None,
    hessian: Annotated[Path | None, typer.Option(help="Hessian directory from `repq hessian` (for --method ldlq).")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="LDLQ without a Hessian directory: block i's Hessians on the outputs of the already-quantized blocks 0..i-1, from --data.")] = False,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="--sequential: calibration text or JSONL.")] = None,
    ctx: Annotated[int, typer.Option("--ctx-size", "-c", help="--sequential: tokens per chunk.")] = 512,
    chunks: Annotated[int, typer.Option("--chunks", help="--sequential: use at most N chunks (-1 = all the data holds).")] = -1,
    damp: Annotated[float, typer.Option(help="LDLQ: relative damping of H's diagonal.")] = 0.01,
    hess_shrink: Annotated[float, typer.Option(help="LDLQ: shrink H toward its diagonal, (1-A)·H + A·Diag(H), A in [0, 1] (0 = H as collected; the default cut KLD 11-30 % at six ftypes, held-out text included).")] = DEFAULT_HESS_SHRINK,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="LDLQ: round each block's columns by decreasing diag(H).")] = True,
    device: Annotated[str, typer.Option(help="LDLQ: torch device (cpu, cuda, cuda:1).")] = "cpu",
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="LDLQ: re-fit block scales against H after rounding (legacy types, IQ4_NL, IQ3_S/IQ2_XS).")] = True,
    scales: Annotated[str, typer.Option(help="LDLQ: static (grids fitted on W up front, global act order) | dynamic (fitted on error-corrected blocks).")] = "static",
    threads: ThreadsOpt = 0,
    pure: Annotated[bool, typer.Option("--pure", help="Same type for every tensor (no k-quant mixture).")] = False,
    leave_output_tensor: Annotated[bool, typer.Option("--leave-output-tensor", help="Leave output.weight unquantized.")] = False,
    output_tensor_type: Annotated[str | None, typer.Option(help="ggml type for output.weight.")] = None,
    token_embedding_type: Annotated[str | None, typer.Option(help="ggml type for token_embd.weight.")] = None,
    tensor_type: Annotated[list[str] | None, typer.Option(help="REGEX=TYPE override; repeatable (e.g. attn_v=q8_0).")] = None,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Accept already-quantized input tensors.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Convert a Hugging Face folder whose JSON names custom code (auto_map), which runs that code.")] = False,
    target_size: Annotated[str | None, typer.Option(help="Allocate a type per tensor so that OUT is ≤ this size: bytes, 900MB, 85M, 3.5GiB (needs --hessian or --imatrix).")] = None,
    target_bpw: Annotated[float | None, typer.Option(help="The same as a size: bits per weight of the whole file.")] = None,
    sensitivity: Annotated[Path | None, typer.Option(help="Costs from `repq sensitivity` (skips computing them).")] = None,
    recipe_out: Annotated[Path | None, typer.Option(help="Write the chosen types as a llama-quantize --tensor-type-file.")] = None,
    allow_types: AllowTypesOpt = None,
    exclude_types: ExcludeTypesOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize MODEL to OUT with llama.cpp's type mix for FTYPE, or with the best mix for a size.

    Examples:

        repq quantize model-f32.gguf model-q4_k_m.gguf --fmt Q4_K_M

        repq quantize ./SmolLM2-135M-Instruct/ smollm2-q4_0.gguf --fmt Q4_0   # HF directory

        repq quantize model-f32.gguf model-iq4_xs.gguf --fmt IQ4_XS --imatrix imatrix.gguf

        repq quantize model-f32.gguf q.gguf --fmt IQ3_S --sequential --data calib.jsonl --chunks 100 --device cuda

        repq quantize model-f32.gguf q.gguf --fmt Q3_K_S --tensor-type attn_v=q6_k --json | jq .file_bytes

        repq quantize model-f32.gguf q.gguf --target-size 90MB --hessian hess/ --exclude-types Q4_1,Q5_1

        repq quantize model-f32.gguf q.gguf --target-bpw 4.5 --imatrix im.gguf --sensitivity sens-im.json --recipe-out mix.txt
    """
    out = Output(json_out, quiet)

    def body():
        from .. import mix
        from ..ggml.types import type_id
        from ..quant import pipeline

        opts = mix.MixOptions(
            pure=pure, leave_output_tensor=leave_output_tensor,
            output_tensor_type=type_id(output_tensor_type) if output_tensor_type else None,
            token_embedding_type=type_id(token_embedding_type) if token_embedding_type else None,
            tensor_types=tuple(_parse_tensor_type(s) for s in (tensor_type or [])))
        targeted = target_size is not None or target_bpw is not None
        if not fmt and not targeted:
            raise UsageError("pass --fmt FTYPE, or a size target (--target-size / --target-bpw)")
        alloc_only = [o for o, v in (("--sensitivity", sensitivity), ("--recipe-out", recipe_out),
                                     ("--allow-types", allow_types), ("--exclude-types", exclude_types)) if v]
        if alloc_only and not targeted:
            raise UsageError(f"{', '.join(alloc_only)} only apply with --target-size or --target-bpw")
        m = method or ("ldlq" if hessian or sequential else "imatrix" if imatrix else "rtn")
        seq_only = [o for o, used in (("--data", data is not None), ("--ctx-size", ctx != 512),
                                      ("--chunks", chunks != -1)) if used]
        if sequential:
            if m != "ldlq" or hessian or imatrix or targeted:
                raise UsageError("--sequential is LDLQ with Hessians it takes itself: drop --method/--hessian/"
                                 "--imatrix/--target-size")
            if data is None:
                raise UsageError("--sequential needs --data TEXT (the calibration text)")
        elif seq_only:
            raise UsageError(f"{', '.join(seq_only)} only apply with --sequential")
        if m == "rtn" and imatrix:
            raise UsageError("--method rtn ignores importance; drop --imatrix or use --method imatrix")
        ldlq_only = [o for o, used in (("--damp", damp != 0.01), ("--hess-shrink", hess_shrink != DEFAULT_HESS_SHRINK),
                                       ("--no-act-order", not act_order),
                                       ("--device", device != "cpu"), ("--no-refit", not refit),
                                       ("--scales", scales != "static")) if used]
        if m != "ldlq" and ldlq_only:
            raise UsageError(f"{', '.join(ldlq_only)} only apply to --method ldlq (this run is {m})",
                             hint="pass --hessian DIR for LDLQ, or drop the option")
        cfg = pipeline.QuantizeConfig(ftype=fmt, method=m, imatrix=str(imatrix) if imatrix else None,
                                      hessian=str(hessian) if hessian else None, sequential=sequential, damp=damp, act_order=act_order,
                                      hess_shrink=hess_shrink,
                                      device=device, scales=scales, refit=refit, threads=threads, allow_requantize=allow_requantize, mix=opts)
        from ..io.convert import ensure_gguf

        pipeline.check_output_path(model, out_path)
        src = ensure_gguf(model, trust_remote_code=trust_remote_code)
        tensor_done = None
        if sequential:
            hessian_for, hessian_names, extra_kv = _sequential_inputs(src, cfg, data, ctx, chunks, threads, out)
            tensor_done = hessian_for.tensor_done
        else:
            hessian_for, hessian_names, extra_kv = _ldlq_inputs(src, cfg) if m == "ldlq" else (None, (), None)
        alloc = None
        if targeted:
            from ..alloc.recipe import make_allocator
            from .sensitivity import candidate_list

            with out.progress(f"sensitivity {model.name}", total=0) as advance:
                alloc = make_allocator(src, target_size=target_size, target_bpw=target_bpw,
                                       sensitivity=str(sensitivity) if sensitivity else None,
                                       hessian=cfg.hessian, imatrix=cfg.imatrix,
                                       types=candidate_list(allow_types, exclude_types), tensor_types=opts.tensor_types,
                                       ldlq=cfg.ldlq_options(), device=device, threads=threads or None,
                                       on_tensor=lambda name, i, n: advance(1, name, total=n))
        with out.progress(f"quantize {model.name} → {fmt or 'target'}", total=0) as advance:
            def on_tensor(rep, i, n):
                advance(1, f"{rep.name} → {rep.dst_type}", total=n)
            try:
                rep = pipeline.quantize_model(src, out_path, cfg, on_tensor=on_tensor, hessian_for=hessian_for,
                                              hessian_names=hessian_names, extra_kv=extra_kv, allocate=alloc,
                                              tensor_done=tensor_done)
            finally:
                if sequential:
                    hessian_for.stream.close()
        if alloc is not None and recipe_out is not None:
            from ..alloc.recipe import recipe_text
            from ..ggml.types import type_id
            from ..io.atomic import atomic_write_bytes

            atomic_write_bytes(recipe_out, recipe_text({t.name: type_id(t.dst_type) for t in rep.tensors
                                                        if t.name in alloc.result.types or t.name in alloc.pins}).encode())
        cols = ["tensor", "shape", "from", "to", "MiB", "method"]
        rows = [[t.name, "×".join(map(str, t.shape)), t.src_type, t.dst_type + ("*" if t.fallback else ""),
                 f"{t.dst_bytes / 2**20:.2f}", t.method] for t in rep.tensors]
        if m == "ldlq":
            cols += ["rel.err", "ggml rel.err"]
            rows = [r + [_fmt(t.proxy_rel_err), _fmt(t.baseline_rel_err)] for r, t in zip(rows, rep.tensors, strict=True)]
        if alloc is not None:
            cols.append("pred.cost")
            rows = [r + [_fmt(alloc.costs.get(t.name))] for r, t in zip(rows, rep.tensors, strict=True)]
        out.table(f"{out_path.name}: {rep.ftype}", cols, rows)
        types: dict[str, int] = {}
        for t in rep.tensors:
            types[t.dst_type] = types.get(t.dst_type, 0) + 1
        out.result({**meta(), "command": "quantize", "config": cfg.to_dict(), "input": str(model),
                    "output": rep.output, "ftype": rep.ftype, "file_bytes": rep.file_bytes,
                    "bpw": round(rep.bpw, 4), "seconds": round(rep.seconds, 3), "tensor_types": types,
                    "tensors": [t.__dict__ | ({"predicted_cost": alloc.costs.get(t.name)} if alloc else {})
                                for t in rep.tensors]} | (_alloc_json(alloc) if alloc else {}),
                   human=f"wrote {rep.output}: {rep.file_bytes:,} bytes, {rep.bpw:.3f} bpw, "
                         f"{len(rep.tensors)} tensors in {rep.seconds:.1f} s  (* = shape fallback)"
                         + (f"\ntarget {alloc.target:,} bytes; predicted cost {alloc.result.cost:.4g} "
                            f"(no mix within the target below {alloc.result.lower_bound:.4g})" if alloc else ""))

    run_command(out, body)


def _alloc_json(alloc) -> dict:
    r = alloc.result
    return {"allocation": {"target_bytes": alloc.target, "tensor_bytes": r.bytes, "predicted_cost": r.cost,
                           "lower_bound": r.lower_bound, "solver": r.method, "source": alloc.sens.source}}


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2e}"


def _ldlq_inputs(src: Path, cfg):
    """For --method ldlq: the Hessian lookup over the --hessian directory, checked against the
    model first, the names it has a Hessian for, and the output's ``repq.*`` provenance keys (the
    Hessians' data fingerprints).

    Everything that can be checked without reading the Hessians' values is checked here, before
    the output is opened: the device, the model fingerprint, and the stored shape of every Hessian
    the model's tensors will use (a shard's header only).  Values (finite, symmetric, positive
    semi-definite) are checked per tensor as LDLQ reads them; a failure there aborts the atomic
    write, so OUT is never partial.
    """
    from ..calib.hessian.store import HessianSet
    from ..io import keys
    from ..io.gguf_file import GGUFModel
    from ..model.config import config_from_gguf
    from ..runtime import check_device

    check_device(cfg.device)
    hs = HessianSet(cfg.hessian)
    names = set()
    with GGUFModel(src) as g:
        hs.check_model(config_from_gguf(g).fingerprint(), f"{Path(src).name} is")
        for name, t in g.tensors.items():
            if len(t.shape) < 2 or not hs.has(name):
                continue
            names.add(name)
            shape = hs.shape(name)
            if shape != (t.n_per_row, t.n_per_row):
                raise MismatchError(f"{hs.path}: Hessian for {name.removesuffix('.weight')} is "
                                    f"{'×'.join(map(str, shape))}, {name} has rows of {t.n_per_row}",
                                    hint="the directory was altered or is of another model; "
                                         "collect it again with `repq hessian`")

    def lookup(name: str):
        # no entry (e.g. token_embd of an untied model: no matmul input to weight by) → ggml's quantizer;
        # an entry that cannot be read is an error, not a silent fallback
        return hs.mean(name) if hs.has(name) else None

    return lookup, names, keys.provenance("ldlq", cfg.ldlq_options().to_dict(), hs.data_fingerprints)


def _sequential_inputs(src: Path, cfg, data: Path, ctx: int, chunks: int, threads: int, out: Output):
    """For --sequential: the model on the device, the calibration chunks, and the Hessian source
    that follows the quantization block by block (:mod:`repq.quant.sequential`)."""
    from .. import runtime
    from ..data.calibration import load_calibration_with
    from ..io import keys
    from ..model.stream import BlockStream
    from ..quant.sequential import SequentialHessians

    runtime.check_device(cfg.device)
    dev, dt = runtime.configure_torch(cfg.device, "auto", threads)
    cal, n_vocab = load_calibration_with(data, src, n_ctx=ctx, n_chunks=None if chunks < 0 else chunks)
    stream = BlockStream(src, device=dev, dtype=dt)
    if n_vocab != stream.config.n_vocab:
        raise MismatchError(f"{src}: vocabulary of {n_vocab} tokens, the model has {stream.config.n_vocab}")
    out.log(f"{data}: {cal.n_tokens_file:,} tokens → {len(cal.chunks)} chunks of {cal.n_ctx} (sequential Hessians)")
    seq = SequentialHessians(stream, cal.chunks)
    return seq, seq.names, keys.provenance("ldlq", cfg.ldlq_options().to_dict() | {"sequential": True},
                                           [cal.fingerprint])


def _parse_tensor_type(spec: str) -> tuple[str, int]:
    from ..ggml.types import type_id

    name, sep, tname = spec.partition("=")
    if not sep or not name or not tname:
        raise UsageError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. attn_v=q8_0")
    return name.lower(), type_id(tname)  # llama-quantize lower-cases the pattern too


