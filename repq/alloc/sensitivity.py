"""Per-tensor, per-type sensitivities: what choosing a type for a tensor is predicted to cost.

For every quantizable tensor (llama.cpp's rule, :func:`repq.mix.tensor_allows_quantization`) and
every candidate type valid for its rows (llama.cpp's fallbacks applied: on 576-wide rows Q4_K is
Q5_0, IQ3_S is IQ4_NL; duplicates merged; types that need an importance matrix only where there is
one), the tensor is quantized through repq's one per-tensor path,
:func:`repq.quant.tensor.quantize_tensor`, and the cost of the result is

* with Hessians (``source = "hessian"``): LDLQ's proxy loss ``tr(ΔW H ΔWᵀ)``, H = E[x xᵀ] of the
  tensor's input (= E‖ΔW x‖², the expected squared error of the layer's output), the tensor
  quantized by LDLQ on that type as `repq quantize --hessian` would;
  With ``proxy="estimate"`` (``--proxy estimate``) LDLQ runs on one reference type per tensor and
  on every type of a few sample tensors only; the other costs are estimated from ggml's quantizer
  (:mod:`repq.alloc.estimate`; ``config.proxy`` records the mode, ``method`` says which costs are
  estimates);
* with an imatrix only (``source = "imatrix"``): ``Σ_j imp_j ‖ΔW_:,j‖²``, the diagonal of the same
  loss, the tensor quantized by ggml's imatrix quantizer as llama-quantize would.

The bytes are exact: rows × ``ggml_row_size``.  These costs are per-tensor proxies, not KL
divergence: the file keeps a per-tensor ``scale`` (1 until calibrated against measured KL) and the
solver uses ``scale · cost``.  Tensors without statistics (no Hessian / imatrix entry) get no
candidates: they are listed under ``unallocated`` and must be pinned (``--tensor-type``).

The file (``repq sensitivity -o sens.json``) records the fingerprint of the model (its shapes and a
sample of its weight bytes) and of the statistics, so that reusing it on another model or with
other statistics is refused (:meth:`Sensitivity.check`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__, mix
from ..errors import InputFileError, MismatchError, UnsupportedError, UsageError
from ..ggml.types import F16, GGML_TYPES, row_size, type_id, type_name
from . import calibrate, costs, estimate
from .solver import Candidate

if TYPE_CHECKING:
    from .fisher import Fisher

FORMAT = "repq.sensitivity"
VERSION = 1

#: Candidate types by default: every ggml weight type llama.cpp offers as an ftype building block
#: (legacy, K, i-quants), with Q8_0 and F16 at the top.
DEFAULT_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")


def parse_types(spec: str | None, what: str) -> list[str] | None:
    """A comma-separated list of ggml type names (any case) → upper-case names; None for None.

    Raises:
        UsageError: an unknown name (the message lists the known ones).
    """
    if spec is None:
        return None
    names = [s.strip().upper() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in DEFAULT_TYPES:
            raise UsageError(f"{what}: unknown or unsupported type {n!r}",
                             hint=f"use ggml type names from: {', '.join(DEFAULT_TYPES)}")
    if not names:
        raise UsageError(f"{what}: empty type list")
    return names


def candidate_types(name: str, n_per_row: int, types: Iterable[str], *, has_importance: bool) -> list[str]:
    """The distinct types ``types`` become on rows of ``n_per_row`` after llama.cpp's fallbacks
    (``tensor_type_fallback``) that are themselves in ``types`` (a Q5_K that falls back to an
    excluded Q5_1 is no candidate), minus those llama-quantize refuses without an importance matrix."""
    types = list(types)
    out: list[str] = []
    for t in types:
        tid = type_id(t)
        if tid != F16:
            try:
                tid, _ = mix.tensor_type_fallback(name, n_per_row, tid)
            except UnsupportedError:
                continue
        if not has_importance and mix.tensor_requires_imatrix(name, tid, mix.FTYPES["Q8_0"].id):
            continue
        if type_name(tid) in types and type_name(tid) not in out:
            out.append(type_name(tid))
    return out


def model_fingerprint(g) -> str:
    """sha256 of the model's config fingerprint (architecture, names, shapes) and, per tensor, its
    type and the first and last 4 KiB of its data: two models of one architecture differ here."""
    from ..model.config import config_from_gguf

    h = hashlib.sha256(config_from_gguf(g).fingerprint().encode())
    for name in sorted(g.tensors):
        t = g.tensors[name]
        h.update(f"{name}:{t.type}:{t.shape}".encode())
        h.update(bytes(t.data[:4096]))
        h.update(bytes(t.data[-4096:]))
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Sensitivity:
    """A sensitivity file: per tensor, per candidate type, exact bytes and predicted cost."""

    model: str
    model_fingerprint: str
    source: str
    """``hessian`` or ``imatrix``."""
    source_path: str
    source_fingerprint: str
    cost: str
    """What ``cost`` measures, in words."""
    tensors: dict[str, dict] = field(default_factory=dict)
    """name → {"shape": [...], "scale": 1.0, "candidates": {type: {"bytes", "cost", "method"}}}."""
    unallocated: list[str] = field(default_factory=list)
    """Quantizable tensors without statistics (no candidates; pin them)."""
    config: dict = field(default_factory=dict)

    def candidates(self) -> dict[str, list[Candidate]]:
        """Solver input: name → candidates with their predicted KL: the measured ``kl`` where the
        candidate has one, else cost × the tensor's scale."""
        return {n: [Candidate(t, int(c["bytes"]), predicted(c, e)) for t, c in e["candidates"].items()]
                for n, e in self.tensors.items()}

    @property
    def calibrated(self) -> bool:
        """Whether the costs were calibrated against measured KL (``repq sensitivity --kl-data``)."""
        return bool(self.config.get("kl"))

    def check(self, model_fp: str, source: str, source_fp: str | None, what: str) -> None:
        """Refuse sensitivities of another model, another kind of statistics or other statistics.

        Raises:
            MismatchError: with the file named in ``what``.
        """
        if model_fp != self.model_fingerprint:
            raise MismatchError(f"{what}: sensitivities of another model ({self.model}; fingerprint "
                                f"{self.model_fingerprint[:12]}…, this model {model_fp[:12]}…)",
                                hint="compute them for this model with `repq sensitivity`")
        if source != self.source:
            raise MismatchError(f"{what}: sensitivities from {self.source} statistics, this run quantizes "
                                f"with {source} statistics", hint=f"pass --{self.source} or recompute them")
        if source_fp is not None and source_fp != self.source_fingerprint:
            raise MismatchError(f"{what}: sensitivities from other {source} statistics ({self.source_path})",
                                hint="recompute them with `repq sensitivity`, or pass the statistics they came from")

    def check_ldlq(self, options: dict, what: str) -> None:
        """Refuse Hessian-mode costs measured with other LDLQ settings than this run quantizes with
        (e.g. a file made before --hess-shrink's default changed): the costs describe other files.

        Raises:
            MismatchError: with the file named in ``what`` and the settings that differ.
        """
        made = self.config.get("ldlq")
        if made is None:
            return
        made, options = {"hess_shrink": 0.0} | made, {"hess_shrink": 0.0} | options   # unrecorded: 0
        if made == options:
            return
        diff = ", ".join(f"{k} {made.get(k, 'unset')} there, {options.get(k, 'unset')} here"
                         for k in sorted(set(made) | set(options)) if made.get(k) != options.get(k))
        raise MismatchError(f"{what}: sensitivities measured with other LDLQ settings ({diff})",
                            hint="recompute them with `repq sensitivity` and this run's options, or pass theirs")

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "repq_version": __version__, "model": self.model,
                "model_fingerprint": self.model_fingerprint, "source": self.source,
                "source_path": self.source_path, "source_fingerprint": self.source_fingerprint,
                "cost": self.cost, "config": self.config, "unallocated": self.unallocated, "tensors": self.tensors}

    def save(self, path: str | os.PathLike) -> None:
        from ..io.atomic import atomic_write_bytes

        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        """Raises InputFileError: unreadable, not a sensitivity file, or a malformed entry."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputFileError(f"{path}: cannot read a sensitivity file ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise InputFileError(f"{path}: not a repq sensitivity file (format != {FORMAT!r})",
                                 hint="make one with `repq sensitivity MODEL --hessian DIR -o sens.json`")
        if d.get("version") != VERSION:
            raise InputFileError(f"{path}: sensitivity file version {d.get('version')!r}, expected {VERSION}")
        try:
            s = cls(str(d["model"]), str(d["model_fingerprint"]), str(d["source"]), str(d["source_path"]),
                    str(d["source_fingerprint"]), str(d["cost"]), dict(d["tensors"]), list(d["unallocated"]),
                    dict(d.get("config", {})))
            for n, e in s.tensors.items():
                for t, c in e["candidates"].items():
                    if (t not in GGML_TYPES or int(c["bytes"]) < 0 or not np.isfinite(float(c["cost"]))
                            or not (np.isfinite(float(c.get("kl", 0.0))) and float(c.get("kl", 0.0)) >= 0)):
                        raise ValueError(f"{n}: bad candidate {t}")
                if not (np.isfinite(float(e.get("scale", 1.0))) and float(e.get("scale", 1.0)) >= 0):
                    raise ValueError(f"{n}: bad scale")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputFileError(f"{path}: malformed sensitivity file ({e})") from None
        return s


def predicted(c: dict, e: dict) -> float:
    """A candidate's predicted KL: its measured ``kl`` if it has one, else cost × the tensor's scale."""
    return float(c["kl"]) if "kl" in c else float(c["cost"]) * float(e.get("scale", 1.0))


def compute(src: str | os.PathLike, *, types: Iterable[str], hessian_dir: str | None = None,
            imatrix_path: str | None = None, ldlq=None, device: str = "cpu", threads: int | None = None,
            probe=None, measure: str = "probe", probe_bpw: float = 4.0, kl_config: dict | None = None,
            proxy: str = "ldlq", sample_per_group: int = 1, ref_rows: int = 256, workers: int = 0,
            fisher: Fisher | None = None,
            on_tensor: Callable[[str, int, int], None] | None = None) -> Sensitivity:
    """Quantize every quantizable tensor of ``src`` (a GGUF) to every candidate type and measure the cost.

    Args:
        src: F32/F16/BF16 GGUF.
        types: candidate type names (before fallbacks).
        hessian_dir: `repq hessian` directory (LDLQ, cost tr(ΔW H ΔWᵀ)); or
        imatrix_path: imatrix file (ggml's quantizer, cost Σ imp ‖ΔW_:,j‖²).
        ldlq: :class:`repq.quant.tensor.LdlqOptions` (Hessian mode).
        probe: a :class:`repq.alloc.calibrate.KLProbe` on the same model: calibrate the costs
            against measured KL: ``measure="probe"`` measures each tensor at one type (the
            candidate closest to ``probe_bpw`` bits per weight) and sets the tensor's ``scale``;
            ``measure="all"`` measures every candidate (the solver then uses the measured KLs).
        kl_config: what the probe measured on (recorded in the file's config).
        proxy: Hessian mode: ``ldlq`` (LDLQ on every tensor × type: exact costs) or ``estimate``
            (LDLQ on the type nearest ``probe_bpw`` and on every type of ``sample_per_group``
            tensors per candidate list, ggml's quantizer scaled by the measured LDLQ gain on the
            rest: :mod:`repq.alloc.estimate`).
        ref_rows: ``estimate``: on a tensor of more than twice this many rows, not a sample, ggml's
            costs are taken on this many evenly spaced rows, × the whole/rows ratio of the
            expected cost without error feedback (:func:`repq.alloc.costs.expected_row_costs`); and
            unless the KL probe measures the tensor (it needs the whole tensor's LDLQ values),
            LDLQ at the reference type runs on those rows only (LDLQ's rows are independent given
            H), its cost scaled by the same ratio (method ``estimate (rows)``).
        fisher: Hessian mode: the output-side Fisher's row weights (:mod:`repq.alloc.fisher`): every
            cost is then the predicted KL, ½ Σ_i D_ii (ΔW H ΔWᵀ)_ii (scale 1); not with ``probe``.
        workers: tensors measured at once (0: 2 with a CUDA device, where one's ggml work on the
            CPU overlaps another's LDLQ and KL on the GPU; 1 on the CPU).  The result does not
            depend on it.
        on_tensor: progress: (tensor name, index, total), as each tensor is done.

    Raises:
        UsageError, MismatchError, InputFileError: bad input (statistics of another model, ...).
    """
    from ..io.gguf_file import GGUFModel
    from ..quant import importance as importance_rules
    from ..quant.pipeline import check_imatrix, plan_model, tensor_f32
    from ..quant.tensor import LdlqOptions, ldlq_fallback, quantize_tensor

    if (hessian_dir is None) == (imatrix_path is None):
        raise UsageError("pass exactly one of --hessian DIR and --imatrix FILE")
    types = list(types)
    check_proxy(proxy, measure, probe is not None)
    if fisher is not None and (probe is not None or hessian_dir is None):
        raise UsageError("the Fisher's KL weights need --hessian and no KL probe")
    estimating = proxy == "estimate" and hessian_dir is not None
    with GGUFModel(src) as g:
        fp = model_fingerprint(g)
        plans = [p for p in plan_model(g, mix.FTYPES["Q8_0"], mix.MixOptions(has_imatrix=True)) if p.allows_quantization]
        if hessian_dir is not None:
            hs, source_fp = _hessians(hessian_dir, g)
            stats = {p.name for p in plans if hs.has(p.name)}
            ldlq = ldlq or LdlqOptions()
        else:
            from ..io.imatrix import load_imatrix

            imp_all = load_imatrix(imatrix_path).importance()
            check_imatrix(imp_all, g, plans, imatrix_path)
            source_fp = file_fingerprint(imatrix_path)
            stats = {p.name for p in plans
                     if importance_rules.from_imatrix(imp_all.get(p.name), g.tensors[p.name].n_per_row,
                                                      _experts(g.tensors[p.name])) is not None}
        sens = Sensitivity(str(src), fp, "hessian" if hessian_dir else "imatrix", str(hessian_dir or imatrix_path),
                           source_fp, "tr(dW H dW^T), H = mean x x^T of the input; LDLQ quantization"
                           if hessian_dir else "sum_j imp_j |dW_:,j|^2; ggml imatrix quantization",
                           config={"types": types, "ldlq": ldlq.to_dict() if hessian_dir else None,
                                   "kl": ({**(kl_config or {}), "measure": measure, "probe_bpw": probe_bpw}
                                          if probe is not None else {**(kl_config or {}), "measure": "fisher"}
                                          if fisher is not None else None),
                                   "proxy": proxy if hessian_dir else "ggml"})
        if estimating:
            sens.config["estimate_rows"] = ref_rows
        if measure not in ("probe", "all"):
            raise UsageError(f"KL measurement {measure!r}: use probe or all")
        groups: dict[tuple, list[str]] = {}
        for p in plans:
            if p.name in stats:
                t = g.tensors[p.name]
                groups.setdefault(tuple(candidate_types(p.name, t.n_per_row, types, has_importance=True)),
                                  []).append(p.name)
        sample = estimate.sample_names(groups, sample_per_group) if estimating else set()
        missing = sorted(stats - set(fisher.rows)) if fisher is not None else []
        if missing:
            raise UsageError(f"{missing[0]}: the model's torch graph has no such layer for the Fisher's weights")
        cost_device = device if str(device).startswith("cuda") else "cpu"
        # One tensor's device work at a time: the KL probe swaps the tensor into its one model, and the
        # i-quants' LDLQ records a CUDA graph, which another thread's GPU work would break.  ggml's
        # quantizer (CPU) runs outside it, beside the other tensor's GPU work, under a lock of its own:
        # it takes every core it is given, and two tensors' calls at once would oversubscribe the
        # host and starve the thread that feeds the GPU.
        dev_lock = threading.Lock()
        gpu = dev_lock if cost_device != "cpu" else contextlib.nullcontext()
        host = threading.Lock() if cost_device != "cpu" else contextlib.nullcontext()

        def measure_tensor(p: mix.TensorPlan) -> tuple[dict, dict[str, float] | None, str | None]:
            """One tensor: (its entry, ggml's costs and the reference type when estimating)."""
            t = g.tensors[p.name]
            w = tensor_f32(t)
            h = hs.mean(p.name) if hessian_dir else None
            imp = None if hessian_dir else importance_rules.from_imatrix(imp_all[p.name], t.n_per_row, _experts(t))
            cands = {}
            ctypes = candidate_types(p.name, t.n_per_row, types, has_importance=True)
            measured = set()
            if probe is not None and p.name in probe.names():
                measured = set(ctypes) if measure == "all" else {calibrate.probe_type(ctypes, t.n_per_row, probe_bpw)}

            def kl(values: np.ndarray) -> float:
                with dev_lock:
                    return probe.kl(p.name, values.reshape(tuple(reversed(t.shape))))

            ref = calibrate.probe_type(ctypes, t.n_per_row, probe_bpw)
            rw, lk = (fisher.rows[p.name], fisher.lookup.get(p.name)) if fisher is not None else (None, None)
            g_costs: dict[str, float] | None = None
            with gpu:
                h_cost = None if h is None else h.to(cost_device)   # the H-weighted errors on LDLQ's device

            def weights(sel):   # the Fisher's row weights (and lookup term) of the rows ``sel`` (None: all)
                if rw is None or sel is None:
                    return rw, lk
                return rw[sel], None if lk is None else (lk[0][sel], lk[1])

            def ldlq_q(x: np.ndarray, tid: int, sel=None, **kw):
                # LDLQ on the device with H already there; where it falls back to ggml (F16: no
                # grid), ggml's quantizer on the host, beside the other tensor's device work
                grid = h is not None and kw.get("ldlq") is not None and ldlq_fallback(
                    tid, kw["ldlq"], hessian=True, experts=kw.get("experts", 1)) is None
                with gpu if grid else host:
                    res = quantize_tensor(_plan(p, tid), x, hessian=h_cost if grid else h,
                                          device=device if grid else "cpu", threads=threads, **kw)
                if h is None:
                    return res, costs.proxy_cost(x, res.values, importance=imp)
                return res, costs.blocked_trace(x, res.values, h_cost, *weights(sel), lock=gpu)

            def ggml_q(x: np.ndarray, tid: int):   # ggml's quantizer, importance diag(H)
                with host:
                    return quantize_tensor(_plan(p, tid), x, importance=diag, threads=threads)

            def c32(x: np.ndarray, values: np.ndarray, sel=None) -> float:
                return costs.blocked_trace(x, values, h32, *weights(sel), like=h32, lock=gpu)

            if estimating:
                g_costs = {}
                diag = importance_rules.from_hessian(h)
                h32 = h_cost if cost_device != "cpu" else h_cost.float()   # float64 costs nothing there
            # the reference type on a subset of rows (see ref_rows), where its whole LDLQ is not needed
            rows = (np.unique(np.linspace(0, w.shape[0] - 1, ref_rows).round().astype(np.int64))
                    if estimating and p.name not in sample and w.shape[0] > 2 * ref_rows
                    and _experts(t) == 1 else None)
            row_scale = None   # the whole tensor's expected cost / the rows'
            if rows is not None:
                per = costs.expected_row_costs(w, h.diagonal().clamp_min(0).cpu().numpy(), *weights(None))
                tot, sub = float(per.sum()), float(per[rows].sum())
                # non-finite weights anywhere, or none on the rows: the whole tensor (ggml refuses NaN/Inf)
                row_scale = tot / sub if sub > 0 and np.isfinite(tot) and np.isfinite(sub) else None
                rows = rows if row_scale is not None else None
            for ty in ctypes:
                tid = type_id(ty)
                nbytes = t.n_rows * row_size(tid, t.n_per_row)
                exact = not estimating or ty == ref or p.name in sample or tid == F16   # F16: no LDLQ grid
                if rows is not None and tid != F16 and (ty == ref or not exact):   # ggml on the rows, scaled
                    g_res = ggml_q(w[rows], tid)
                    g_costs[ty] = c32(w[rows], g_res.values, rows) * row_scale
                    if ty != ref:
                        cands[ty] = {"bytes": nbytes, "cost": 0.0, "method": "estimate"}
                    elif ty in measured:   # the KL probe measures the whole tensor's LDLQ: that cost is exact
                        res, cost = ldlq_q(w, tid, ldlq=ldlq)
                        cands[ty] = {"bytes": nbytes, "cost": cost, "method": res.method, "kl": kl(res.values)}
                    else:
                        _, l_sub = ldlq_q(w[rows], tid, rows, ldlq=ldlq)
                        cands[ty] = {"bytes": nbytes, "method": "estimate (rows)", "cost": l_sub * row_scale}
                    continue
                if exact:
                    res, cost = ldlq_q(w, tid, importance=imp, ldlq=ldlq if hessian_dir else None,
                                       experts=_experts(t))
                    cands[ty] = {"bytes": nbytes, "cost": cost, "method": res.method}
                if estimating:   # ggml's quantizer, importance diag(H), its error under the full H
                    g_res = ggml_q(w, tid)
                    g_costs[ty] = c32(w, g_res.values)
                    if not exact:
                        cands[ty] = {"bytes": nbytes, "cost": 0.0,
                                     "method": "estimate"}
                if ty in measured:
                    cands[ty]["kl"] = kl(res.values)
            entry = {"shape": list(t.shape), "scale": 1.0,
                     "candidates": {ty: cands[ty] for ty in ctypes if ty in cands}}
            with gpu:   # its device tensors go while no other thread may be recording a CUDA graph
                h_cost = h32 = None  # noqa: F841
            return entry, g_costs, ref if estimating else None

        ggml_costs: dict[str, dict[str, float]] = {}
        refs: dict[str, str] = {}
        # Tensors overlap (``workers``): one's ggml quantizations on the CPU while another's LDLQ and
        # KL probe run on the GPU; entries are kept in the plans' order, so the file is the same.
        pool = ThreadPoolExecutor(max_workers=workers or (2 if cost_device != "cpu" else 1),
                                  thread_name_prefix="repq-sens")
        try:
            futures = [(p, pool.submit(measure_tensor, p)) for p in plans if p.name in stats]
            sens.unallocated += [p.name for p in plans if p.name not in stats]
            done = 0
            for p, f in futures:
                entry, g_costs, ref = f.result()
                sens.tensors[p.name] = entry
                if g_costs is not None:
                    ggml_costs[p.name], refs[p.name] = g_costs, ref
                if on_tensor:
                    on_tensor(p.name, done, len(futures))
                done += 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if estimating:
            sens.config["estimate"] = estimate.fill(sens.tensors, ggml_costs, refs, groups, sample)
        if probe is not None:
            calibrate.apply_scales(sens.tensors)
    return sens


def check_proxy(proxy: str, measure: str, kl: bool) -> None:
    """``--proxy`` and ``--kl-measure`` together.

    Raises:
        UsageError: an unknown proxy, or ``estimate`` with every candidate's KL measured.
    """
    if proxy not in ("ldlq", "estimate"):
        raise UsageError(f"--proxy {proxy!r}: use ldlq or estimate")
    if proxy == "estimate" and kl and measure == "all":
        raise UsageError("--proxy estimate measures KL at one type per tensor; --kl-measure all needs --proxy ldlq")


def _plan(p: mix.TensorPlan, tid: int) -> mix.TensorPlan:
    return mix.TensorPlan(p.name, p.src_type, tid, True, False, False)


def _experts(t) -> int:
    return t.shape[2] if len(t.shape) > 2 else 1


def _hessians(path: str, g):
    """The Hessian set, checked against the model; (set, fingerprint of its data)."""
    from ..calib.hessian.store import HessianSet
    from ..model.config import config_from_gguf

    hs = HessianSet(path)
    hs.check_model(config_from_gguf(g).fingerprint(), f"{g.path.name} is")
    fp = hashlib.sha256(json.dumps([hs.model_fingerprint, hs.data_fingerprints]).encode()).hexdigest()
    return hs, fp


def source_fingerprint(hessian_dir: str | None, imatrix_path: str | None, g) -> str:
    """The fingerprint :func:`compute` records for these statistics (to check a reused file)."""
    return _hessians(hessian_dir, g)[1] if hessian_dir else file_fingerprint(imatrix_path)
