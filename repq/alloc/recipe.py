"""From a size target to a type per tensor, and the chosen mix as a llama-quantize recipe.

`repq quantize --target-size` runs, inside the GGUF pipeline (:func:`repq.quant.pipeline.quantize_model`'s
``allocate`` hook), :meth:`Allocator.__call__`:

1. the bytes that do not depend on the choice are counted exactly: the header, metadata and tensor
   infos (``header_bytes``, from the writer's own encoding; a tensor info has the same length
   whatever its type) and the padded data of every tensor that is not allocated (norms, pinned and
   unquantizable tensors);
2. the rest of the target is the solver's budget, each candidate counted with its alignment padding,
   so the written file is ≤ the target (tests/native/test_alloc_cli.py checks the file's size);
3. ``--tensor-type`` pins win: a pinned tensor has its pinned type (after llama.cpp's fallback) and
   costs its bytes; quantizable tensors without statistics must be pinned.

:func:`recipe_text` writes the choice in llama-quantize's ``--tensor-type-file`` format
(tools/quantize/quantize.cpp at the pinned commit: whitespace-separated ``PATTERN=TYPE`` words,
PATTERN lower-cased and matched with ``std::regex_search``, the first match wins): one anchored,
escaped pattern per tensor, so llama.cpp's own quantizer reproduces exactly this mix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .. import mix
from ..errors import InputFileError, UsageError
from ..ggml.types import block_size, row_size, type_id, type_name
from .sensitivity import Sensitivity
from .solver import Allocation, Candidate, restrict, solve

ALIGNMENT = 32   # GGUF data alignment of every file repq writes (repq.io.gguf_file.pad)

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """``88202048``, ``900MB``, ``85M`` (10⁶), ``3.5GiB`` (2³⁰) → bytes (rounded down).

    Raises:
        UsageError: not a size.
    """
    m = _SIZE_RE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise UsageError(f"--target-size {text!r}: expected bytes or a number with a unit "
                         "(B, KB, MB, GB, KiB, MiB, GiB; K/M/G = KB/MB/GB), e.g. 900MB or 3.5GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def recipe_text(types: Mapping[str, int]) -> str:
    """The llama-quantize ``--tensor-type-file`` recipe for these tensor types (one line each)."""
    return "".join(f"{exact_pattern(name)}={type_name(t).lower()}\n" for name, t in types.items())


def pinned_types(tensor_types: Sequence[tuple[str, int]], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """``--tensor-type`` pins: tensor → the first matching pattern's type after llama.cpp's fallback
    (as :func:`repq.mix.plan_types` applies them)."""
    pins = {}
    for name, shape in shapes.items():
        for pattern, t in tensor_types:
            if re.search(pattern, name):
                pins[name] = mix.tensor_type_fallback(name, shape[0], t)[0]
                break
    return pins


@dataclass
class Allocator:
    """The ``allocate`` hook of :func:`repq.quant.pipeline.quantize_model` for a size target."""

    sens: Sensitivity
    target: int
    """File bytes (header included) not to exceed."""
    shapes: dict[str, tuple[int, ...]]
    """Every tensor of the model (ggml order) → its shape."""
    pins: dict[str, int] = field(default_factory=dict)
    allowed: Sequence[str] | None = None
    """Candidate types that may be chosen (None: all in the sensitivity file)."""
    result: Allocation | None = None
    """The solver's answer, after the call."""
    costs: dict[str, float] = field(default_factory=dict)
    """Predicted cost of each allocated tensor's chosen type."""

    def __call__(self, plans: Sequence[mix.TensorPlan], header_bytes: int) -> dict[str, int]:
        """Tensor name → type id for every quantizable tensor (pins included).

        Raises:
            UsageError: a target below the smallest or above the largest possible file, a
                quantizable tensor with neither statistics nor a pin, or constraints leaving a
                tensor without a candidate.
        """
        cands = self.sens.candidates()
        fixed, chosen, free = header_bytes, {}, {}
        for p in plans:
            if not p.allows_quantization:
                fixed += pad(_bytes(p.src_type, self.shapes[p.name]))
            elif p.name in self.pins:
                chosen[p.name] = self.pins[p.name]
                fixed += pad(_bytes(self.pins[p.name], self.shapes[p.name]))
            elif p.name in cands:
                free[p.name] = [Candidate(c.type, pad(c.bytes), c.cost) for c in cands[p.name]]
            else:
                raise UsageError(f"{p.name} has no sensitivity (no Hessian or imatrix entry) and no pin",
                                 hint=f"pin it, e.g. --tensor-type '^{re.escape(p.name)}$=q8_0'")
        # the largest file counts every candidate: a target that restricted types cannot use up is fine
        hi = fixed + sum(max(c.bytes for c in v) for v in free.values())
        free = restrict(free, allowed=self.allowed)
        lo = fixed + sum(min(c.bytes for c in v) for v in free.values())
        if self.target < lo:
            raise UsageError(f"target {self.target:,} bytes is below the smallest possible file ({lo:,} bytes "
                             "with every tensor at its smallest candidate type)")
        if self.target > hi:
            raise UsageError(f"target {self.target:,} bytes is above the largest possible file ({hi:,} bytes "
                             "with every tensor at its largest type in the sensitivities)",
                             hint="pass a smaller target, or quantize with --fmt F16 / Q8_0")
        self.result = solve(free, self.target - fixed)
        by_type = {n: {c.type: c.cost for c in v} for n, v in free.items()}
        self.costs = {n: by_type[n][t] for n, t in self.result.types.items()}
        return chosen | {n: type_id(t) for n, t in self.result.types.items()}


def _bytes(t: int, shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:]) * row_size(t, shape[0])


def _check_bytes(sens: Sensitivity, shapes: Mapping[str, tuple[int, ...]], path: str) -> None:
    """Every candidate of a reused sensitivity file is a type valid for its tensor's rows and records
    that type's exact bytes: the file comes from outside, and the solver's byte budget (the
    promise that the output never exceeds the target) rests on those numbers.

    Raises:
        InputFileError: a candidate the tensor cannot have, or bytes that are not its size.
    """
    for name, e in sens.tensors.items():
        shape = shapes.get(name)
        if shape is None:
            continue                    # not in this model's plan: never a solver input
        for t, c in e["candidates"].items():
            tid = type_id(t)
            if shape[0] % block_size(tid) or int(c["bytes"]) != _bytes(tid, shape):
                raise InputFileError(f"{path}: {name}: candidate {t} records {int(c['bytes']):,} bytes, but "
                                     f"{t} is not a valid {'×'.join(map(str, shape))} tensor of that size")


def _target(target_size: str | None, target_bpw: float | None, n_params: int) -> int:
    """File bytes from --target-size text or --target-bpw over ``n_params`` weights."""
    if target_bpw is not None:
        if not 0 < target_bpw <= 32:
            raise UsageError(f"--target-bpw {target_bpw}: expected bits per weight in (0, 32]")
        return int(target_bpw * n_params / 8)
    return parse_size(target_size)


def exact_pattern(name: str) -> str:
    """The --tensor-type / recipe pattern that matches exactly this tensor."""
    return f"^{re.escape(name.lower())}$"


def make_allocator(src, *, target_size: str | None, target_bpw: float | None, sensitivity: str | None,
                   hessian: str | None, imatrix: str | None, types: Sequence[str],
                   tensor_types: Sequence[tuple[str, int]], ldlq=None, device: str = "cpu",
                   threads: int | None = None, on_tensor=None) -> Allocator:
    """The :class:`Allocator` for ``repq quantize --target-size/--target-bpw``.

    Args:
        src: the input GGUF.
        target_size: file bytes as text (:func:`parse_size`); or
        target_bpw: bits per weight of the whole file (file bits / all parameters of the model).
        sensitivity: a `repq sensitivity` file to reuse (checked against the model and statistics);
            None: computed now for ``types``.
        hessian, imatrix: the statistics (exactly one).
        types: the candidate types (--allow-types minus --exclude-types).
        tensor_types: the --tensor-type pins (pattern, type id), lower-cased as on the command line.

    Raises:
        UsageError, MismatchError: bad target, sensitivities of another model or statistics.
        InputFileError: a malformed sensitivity file, or one whose candidate bytes are not exact.
    """
    from ..io.gguf_file import GGUFModel
    from . import sensitivity as sens_mod

    if (target_size is None) == (target_bpw is None):
        raise UsageError("pass one of --target-size and --target-bpw")
    if (hessian is None) == (imatrix is None):
        raise UsageError("--target-size/--target-bpw needs --hessian DIR (LDLQ) or --imatrix FILE (ggml's quantizer)",
                         hint="make them with `repq hessian` or `repq imatrix`")
    with GGUFModel(src) as g:
        shapes = {n: tuple(t.shape) for n, t in g.tensors.items()}
        n_params = sum(math.prod(s) for s in shapes.values())
        if sensitivity is not None:
            sens = sens_mod.Sensitivity.load(sensitivity)
            fp, kind = sens_mod.model_fingerprint(g), "hessian" if hessian else "imatrix"
            sens.check(fp, kind, None, sensitivity)   # model and kind first: their errors say more
            sens.check(fp, kind, sens_mod.source_fingerprint(hessian, imatrix, g), sensitivity)
            if hessian and ldlq is not None:
                sens.check_ldlq(ldlq.to_dict(), sensitivity)
            _check_bytes(sens, shapes, sensitivity)
    target = _target(target_size, target_bpw, n_params)
    if sensitivity is None:
        sens = sens_mod.compute(src, types=types, hessian_dir=hessian, imatrix_path=imatrix, ldlq=ldlq,
                                device=device, threads=threads, on_tensor=on_tensor)
    return Allocator(sens, target, shapes, pinned_types(tensor_types, shapes), allowed=list(types))


def allocate_distill(src, cfg, *, label: str | None, target_size: str | None, target_bpw: float | None, sensitivity: str,
                     types: Sequence[str], data_fingerprints: Sequence[str]):
    """`repq distill --target-size`: the run's config with the allocated types as exact-name
    ``--tensor-type`` pins (so checkpoints record them and a resumed run checks them), and the
    :class:`Allocator` (predicted costs).

    The file's header holds the run's config, pins included, so its length depends on the choice;
    the budget is split with the header of a config whose pins have the widest type ids and whose
    ftype label is the longest name: the written file is at most the target.

    Args:
        cfg: a :class:`repq.distill.config.DistillConfig`.
        label: the file's ftype label (--fmt); None: the allocated mix's dominant type names it.
        sensitivity: a `repq sensitivity --hessian` file of this model (distillation quantizes with
            LDLQ on Hessians it takes itself; the file's own Hessians are not needed).

    Raises:
        UsageError, MismatchError, InputFileError: as :func:`make_allocator`.
    """
    from dataclasses import replace

    from ..io import keys
    from ..io.gguf_file import GGUFModel
    from ..quant import pipeline
    from . import sensitivity as sens_mod

    sens = sens_mod.Sensitivity.load(sensitivity)
    with GGUFModel(src) as g:
        shapes = {n: tuple(t.shape) for n, t in g.tensors.items()}
        sens.check(sens_mod.model_fingerprint(g), "hessian", None, sensitivity)
        _check_bytes(sens, shapes, sensitivity)
        plans = pipeline.plan_model(g, mix.ftype_from_name(cfg.ftype), replace(cfg.mix, has_imatrix=True))
    target = _target(target_size, target_bpw, sum(math.prod(s) for s in shapes.values()))
    user = tuple(cfg.mix.tensor_types)
    alloc = Allocator(sens, target, shapes, pinned_types(user, shapes), allowed=list(types))
    free = [p.name for p in plans if p.allows_quantization and p.name not in alloc.pins]
    longest = label or max(mix.FTYPES, key=len)
    bound = replace(cfg, ftype=longest, mix=replace(cfg.mix, tensor_types=user + tuple((exact_pattern(n), 99) for n in free)))
    header = pipeline.header_bytes(src, pipeline.QuantizeConfig(ftype="Q8_0", method="distill", mix=cfg.mix),
                                   keys.provenance("distill", bound.to_dict(), data_fingerprints))
    chosen = alloc(plans, header)
    ftype = label or pipeline.dominant_ftype(chosen, src)
    pins = user + tuple((exact_pattern(n), t) for n, t in chosen.items() if n not in alloc.pins)
    return replace(cfg, ftype=ftype, mix=replace(cfg.mix, tensor_types=pins)), alloc
