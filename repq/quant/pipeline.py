"""`repq quantize`'s file workflow: llama-quantize's file layout and type mix around the per-tensor API.

This module only reads, plans and writes; what happens to each tensor's values is
:func:`repq.quant.tensor.quantize_tensor`'s (ggml's own quantizer for ``rtn`` and ``imatrix``, LDLQ
for ``ldlq``).  It mirrors llama_model_quantize_impl (src/llama-quant.cpp at the pinned commit):

1. read the input GGUF (F32/F16/BF16, or a quantized one with ``allow_requantize``);
2. order tensors as llama's model loader does and pick each tensor's type (repq.mix), then check
   the plans (:func:`repq.quant.tensor.check_plans`);
3. copy the input's key/value pairs, then set ``general.quantization_version`` and
   ``general.file_type`` (remove + append, as gguf_set_val_u32 does) and the
   ``quantize.imatrix.*`` keys llama-quantize adds when given an imatrix (key names:
   :mod:`repq.io.keys`), then the caller's own keys (``repq.*`` provenance for ldlq and distill);
4. stream each tensor: copy it if its type is unchanged, else convert to float32 and quantize it;
5. write to a temporary file and rename it into place.

With ``rtn`` and ``imatrix`` the result is byte-identical to llama-quantize's file for the same
input, ftype and imatrix.  With ``ldlq`` the type mix is the one llama-quantize picks *with* an
imatrix, so files compare with ``llama-quantize --imatrix`` at equal tensor bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import mix
from ..errors import InputFileError, MismatchError, UsageError
from ..ggml import quants
from ..ggml.types import F32, row_size, type_name
from ..io import gguf_file, keys
from ..io.imatrix import Imatrix, load_imatrix
from . import DEFAULT_HESS_SHRINK
from . import importance as importance_rules
from .tensor import LdlqOptions, check_plans, quantize_tensor


@dataclass(frozen=True)
class QuantizeConfig:
    """What to produce.  Every field maps to a `repq quantize` option."""

    ftype: str
    """llama-quantize ftype name, e.g. ``Q4_K_M``; empty with a size target (``allocate``): the
    ftype of the type holding most of the allocated bytes (its ``general.file_type`` label)."""
    method: str = "rtn"
    """``rtn`` (no importance), ``imatrix`` (ggml's importance-weighted search; needs an imatrix) or
    ``ldlq`` (error feedback through Hessians; needs ``hessian``).  ``distill`` is internal to
    `repq distill`, which supplies the bytes of the tensors it quantized (``tensor_bytes``)."""
    hessian: str | None = None
    """Directory of proxy Hessians written by `repq hessian` (method ldlq)."""
    sequential: bool = False
    """Method ldlq without ``hessian``: the caller takes each block's Hessians on the quantized blocks
    before it (:mod:`repq.quant.sequential`, through ``hessian_for`` and ``tensor_done``)."""
    damp: float = 0.01
    """LDLQ: relative diagonal damping of H."""
    act_order: bool = True
    """LDLQ: round the columns of each block by decreasing diag(H)."""
    device: str = "cpu"
    """LDLQ: torch device for the error-feedback arithmetic."""
    scales: str = "static"
    """LDLQ: ``static`` fits every block's grid on the original weights (ggml's imatrix search) and
    visits columns in global activation order; ``dynamic`` fits each block on the error-corrected
    weights when the pass reaches it (columns in block order)."""
    refit: bool = True
    """LDLQ: re-fit fp16 block scales against H once the codes are fixed (legacy types, IQ4_NL, IQ3_S,
    IQ2_XS)."""
    hess_shrink: float = DEFAULT_HESS_SHRINK
    """LDLQ: shrink H toward its diagonal, (1 − a) · H + a · Diag(H) (0 = off)."""
    imatrix: str | None = None
    """Path of an imatrix file (GGUF or legacy .dat) as given on the command line."""
    threads: int = 0
    """Worker threads; 0 = all cores."""
    allow_requantize: bool = False
    """Accept quantized input tensors (dequantized through ggml first)."""
    mix: mix.MixOptions = field(default_factory=mix.MixOptions)

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "imatrix", "ldlq", "distill"):
            raise UsageError(f"unknown method {self.method!r} (expected rtn, imatrix or ldlq)")
        if self.method == "imatrix" and not self.imatrix:
            raise UsageError("--method imatrix needs --imatrix FILE")
        if self.method == "ldlq" and not (self.hessian or self.sequential):
            raise UsageError("--method ldlq needs --hessian DIR (make one with `repq hessian`) or --sequential")
        if self.sequential and (self.method != "ldlq" or self.hessian):
            raise UsageError("--sequential is LDLQ with Hessians it takes itself: drop --method/--hessian")
        if self.method != "ldlq" and self.hessian:
            raise UsageError("--hessian is only used by --method ldlq")
        self.ldlq_options()   # checks scales, damp and hess_shrink
        if self.threads < 0:
            raise UsageError("--threads must be ≥ 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = {k: v for k, v in asdict(self.mix).items()}
        return d

    def ldlq_options(self) -> LdlqOptions:
        return LdlqOptions(damp=self.damp, act_order=self.act_order, scales=self.scales, refit=self.refit,
                           hess_shrink=self.hess_shrink)


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    src_type: str
    dst_type: str
    src_bytes: int
    dst_bytes: int
    fallback: bool
    imatrix: bool
    seconds: float
    method: str = ""
    """How this tensor was produced: copy, rtn, imatrix, ldlq, or a fallback with its reason."""
    proxy_rel_err: float | None = None
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of the result (methods with a Hessian)."""
    baseline_rel_err: float | None = None
    """The same for ggml's imatrix quantization with importance diag(H)."""


@dataclass
class QuantizeReport:
    output: str
    ftype: str
    file_bytes: int
    n_params: int
    tensors: list[TensorReport]
    seconds: float

    @property
    def bpw(self) -> float:
        data = sum(t.dst_bytes for t in self.tensors)
        return 8.0 * data / max(1, self.n_params)


def model_info(model: gguf_file.GGUFModel) -> mix.ModelInfo:
    """Hyper-parameters the type mix depends on, from the GGUF metadata."""
    arch = model.arch

    def first(v):   # per-layer arrays: the largest value, as llama.cpp's loader keeps it
        return (max(v) if v else 0) if isinstance(v, list) else v

    n_layer = model.require_int(f"{arch}.block_count")
    n_head = first(model.get_int(f"{arch}.attention.head_count", 0, per_layer=True)) or 0
    n_head_kv = first(model.get_int(f"{arch}.attention.head_count_kv", n_head, per_layer=True)) or n_head
    n_expert = model.get_int(f"{arch}.expert_count", 0) or 0
    return mix.ModelInfo(arch=arch, n_layer=int(n_layer), n_head=int(n_head),
                         n_head_kv=int(n_head_kv), n_expert=int(n_expert))


def plan_model(model: gguf_file.GGUFModel, ftype: mix.FType, opts: mix.MixOptions) -> list[mix.TensorPlan]:
    """Every tensor's type for ``ftype``, in llama's tensor order (not yet checked: see
    :func:`repq.quant.tensor.check_plans`)."""
    tinfos = [mix.TensorInfo(name=t.name, shape=t.shape, type=t.type) for t in model.tensors.values()]
    return mix.plan_types(model_info(model), tinfos, ftype, opts)


def tensor_f32(t: gguf_file.TensorRef) -> np.ndarray:
    """The tensor as float32 (n_rows × n_per_row), dequantized through ggml when needed."""
    if t.type == F32:
        return np.frombuffer(t.data, dtype="<f4").reshape(t.n_rows, t.n_per_row)
    return quants.dequantize(t.type, t.data, t.n_per_row)


def check_imatrix(im: dict[str, np.ndarray], model: gguf_file.GGUFModel, plans: list[mix.TensorPlan],
                  path: str) -> None:
    """Reject an imatrix that does not belong to this model (llama-quantize would misuse it)."""
    quantized = [p for p in plans if p.allows_quantization and p.dst_type != p.src_type]
    if quantized and not any(p.name in im for p in quantized):
        raise MismatchError(f"{path}: no imatrix entry matches a tensor of {model.path.name} "
                            "(imatrix from another model?)")
    for p in quantized:
        v = im.get(p.name)
        if v is None:
            continue
        t = model.tensors[p.name]
        n_expert = t.shape[2] if len(t.shape) > 2 else 1
        if v.size != t.n_per_row * n_expert and p.name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise MismatchError(f"{path}: imatrix entry {p.name} has {v.size} values, tensor expects "
                                f"{t.n_per_row * n_expert} (imatrix from another model?)")
        if not np.isfinite(v).all():
            raise MismatchError(f"{path}: imatrix entry {p.name} contains non-finite values")


def quantize_model(src: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig, *,
                   on_tensor: Callable[[TensorReport, int, int], None] | None = None,
                   hessian_for: Callable[[str], object] | None = None,
                   hessian_names: Container[str] = (),
                   extra_kv: list[keys.KeyValue] | None = None,
                   tensor_values: Callable[[str], np.ndarray | None] | None = None,
                   tensor_bytes: dict[str, np.ndarray] | None = None,
                   allocate: Callable[[list[mix.TensorPlan], int], dict[str, int]] | None = None,
                   tensor_done: Callable[[str, int, np.ndarray], None] | None = None) -> QuantizeReport:
    """Quantize a GGUF model; see the module docstring.

    Args:
        src: input GGUF.
        out: output path (written atomically).
        cfg: what to produce.
        on_tensor: called after each tensor with (report, index, total), for progress display.
        hessian_for: tensor name -> its input's proxy Hessian (n_per_row × n_per_row) or None
            (method ldlq; called once per quantized tensor, so only one Hessian is in memory).
        hessian_names: the tensors ``hessian_for`` has a Hessian for: their diag(H) is importance,
            so types that need an imatrix (IQ2_XS, ...) are accepted for them.
        extra_kv: key/value pairs to add after the ftype and imatrix keys (``repq.*`` provenance).
        tensor_values: name -> float32 (n_rows × n_per_row) values that replace the input's for that
            tensor (None keeps the input's); a replaced tensor is always quantized, also when its
            type does not change (`repq distill`'s trained norms).
        tensor_bytes: name -> the finished ggml bytes of that tensor (`repq distill`'s frozen
            tensors), written as they are.
        allocate: ``--target-size``: called with the plans and the exact bytes of the header,
            metadata and tensor infos (the same whatever the types); returns name -> type id for
            the tensors whose type it chooses (:class:`repq.alloc.recipe.Allocator`).
        tensor_done: called with (name, ggml type, bytes) of each tensor as it is written, in file
            order (`--sequential`: the next block's Hessians see the quantized values).

    Raises:
        InputFileError, MismatchError, UnsupportedError, UsageError: bad input (nothing written).
    """
    t_start = time.perf_counter()
    ftype = mix.ftype_from_name(cfg.ftype or "Q8_0")
    ldlq = cfg.ldlq_options() if cfg.method == "ldlq" else None
    model = gguf_file.GGUFModel(src)
    try:
        # ldlq and distill have importance data (diag H): the mix llama-quantize picks with an imatrix
        with_importance = bool(cfg.imatrix) or cfg.method in ("ldlq", "distill")
        plans = plan_model(model, ftype, replace(cfg.mix, has_imatrix=True) if with_importance else cfg.mix)
        imx: Imatrix | None = load_imatrix(cfg.imatrix) if cfg.imatrix else None
        importance = imx.importance() if imx is not None else {}
        if imx is not None:
            check_imatrix(importance, model, plans, cfg.imatrix)
        refusal = None if cfg.allow_requantize else "; pass --allow-requantize to requantize it"
        if allocate is not None:   # the header's length does not depend on the tensor types
            header = len(_writer(out, model, cfg, ftype, imx, importance, extra_kv, plans).meta_bytes())
            types = allocate(plans, header)
            if not cfg.ftype:
                ftype = _dominant_ftype(types, model)
            plans = [replace(p, dst_type=types[p.name], fallback=False,
                             requires_imatrix=mix.tensor_requires_imatrix(p.name, types[p.name], ftype.id))
                     if p.name in types else p for p in plans]
        # importance: an imatrix entry, a Hessian's diagonal, or finished bytes (distill's frozen tensors)
        have = set(importance) | {n for n in model.tensors if n in hessian_names or n in (tensor_bytes or {})}
        check_plans(plans, {n: t.n_per_row for n, t in model.tensors.items()}, importance=have,
                    requantize_refusal=refusal)
        writer = _writer(out, model, cfg, ftype, imx, importance, extra_kv, plans)

        reports: list[TensorReport] = []
        with writer:
            writer.begin()
            for i, p in enumerate(plans):
                t = model.tensors[p.name]
                t0 = time.perf_counter()
                info: dict = {"method": "copy"}
                imp = None
                x = tensor_values(p.name) if tensor_values is not None else None
                if tensor_bytes is not None and p.name in tensor_bytes:
                    data, info = tensor_bytes[p.name], {"method": cfg.method}
                elif x is None and p.dst_type == t.type:
                    data = t.data
                else:
                    if x is None:
                        x = tensor_f32(t)
                    elif x.shape != (t.n_rows, t.n_per_row):
                        raise MismatchError(f"{p.name}: replacement values have shape {x.shape}, "
                                            f"the tensor is {t.n_rows} × {t.n_per_row}")
                    experts = t.shape[2] if len(t.shape) > 2 else 1
                    imp = importance_rules.from_imatrix(importance.get(p.name), t.n_per_row, experts)
                    try:
                        res = quantize_tensor(p, x, hessian=hessian_for(p.name) if hessian_for is not None
                                              else None, importance=imp, ldlq=ldlq, experts=experts,
                                              device=cfg.device, threads=cfg.threads or None)
                    except UsageError as e:   # name the file: the message names the tensor
                        raise type(e)(f"{Path(src).name}: {e}", e.hint) from None
                    data, info = res.raw, res.report()
                writer.write_tensor_data(p.name, data)
                if tensor_done is not None:
                    tensor_done(p.name, p.dst_type, data)
                rep = TensorReport(p.name, t.shape, type_name(t.type), type_name(p.dst_type),
                                   t.n_bytes, int(data.nbytes), p.fallback, imp is not None,
                                   time.perf_counter() - t0, **info)
                reports.append(rep)
                model.drop_pages(p.name)   # read and written: its mapped pages need not stay resident
                if on_tensor:
                    on_tensor(rep, i, len(plans))
            writer.finish()
        n_params = sum(int(np.prod(t.shape)) for t in model.tensors.values())
        return QuantizeReport(str(out), ftype.name, Path(out).stat().st_size, n_params, reports,
                              time.perf_counter() - t_start)
    finally:
        model.close()


def header_bytes(src: str | os.PathLike, cfg: QuantizeConfig, extra_kv: list[keys.KeyValue] | None = None) -> int:
    """The exact bytes before the tensor data of the file :func:`quantize_model` writes for ``cfg``
    and ``extra_kv`` (header, key/values, tensor infos, padding): the same whatever the tensor
    types, so a size target can be split before the types are chosen (`repq distill --target-size`)."""
    ftype = mix.ftype_from_name(cfg.ftype or "Q8_0")
    with gguf_file.GGUFModel(src) as model:
        plans = plan_model(model, ftype, replace(cfg.mix, has_imatrix=True))
        return len(_writer(os.devnull, model, cfg, ftype, None, {}, extra_kv, plans).meta_bytes())


def dominant_ftype(types: dict[str, int], src: str | os.PathLike) -> str:
    """The ftype label of an allocated mix (:func:`_dominant_ftype`) for the model at ``src``."""
    with gguf_file.GGUFModel(src) as model:
        return _dominant_ftype(types, model).name


def _dominant_ftype(types: dict[str, int], model: gguf_file.GGUFModel) -> mix.FType:
    """The first ftype (llama-quantize's order) whose default type holds the most allocated bytes."""
    held: dict[int, int] = {}
    for name, t in types.items():
        ref = model.tensors[name]
        held[t] = held.get(t, 0) + ref.n_rows * row_size(t, ref.n_per_row)
    top = max(held, key=held.__getitem__)
    return next((f for f in mix.FTYPES.values() if f.default_type == top), mix.FTYPES["Q8_0"])


def _writer(out, model: gguf_file.GGUFModel, cfg: QuantizeConfig, ftype: mix.FType, imx: Imatrix | None,
            importance: dict, extra_kv: list[keys.KeyValue] | None,
            plans: list[mix.TensorPlan]) -> gguf_file.GGUFWriter:
    """The output's writer with every key/value pair and tensor info in place (step 3 of the module
    docstring), nothing written yet."""
    writer = gguf_file.GGUFWriter(out)
    for key, raw in model.kv_items():
        writer.add_raw_kv(key, raw)
    writer.set_kv(keys.QUANTIZATION_VERSION, gguf_file.UINT32, keys.GGML_QNT_VERSION)
    writer.set_kv(keys.FILE_TYPE, gguf_file.UINT32, ftype.id)
    for key in keys.SPLIT_KEYS:
        writer.remove_kv(key)
    if imx is not None:
        writer.set_kv(keys.IMATRIX_FILE, gguf_file.STRING, _c_trunc(cfg.imatrix, 127))
        if imx.datasets:
            writer.set_kv(keys.IMATRIX_DATASET, gguf_file.STRING, _c_trunc(imx.datasets[0], 127))
        writer.set_kv(keys.IMATRIX_N_ENTRIES, gguf_file.UINT32, len(importance))
        if imx.chunk_count > 0:
            writer.set_kv(keys.IMATRIX_N_CHUNKS, gguf_file.UINT32, imx.chunk_count)
    for key, vtype, value, sub_type in extra_kv or []:
        writer.set_kv(key, vtype, value, sub_type)
    for p in plans:
        t = model.tensors[p.name]
        nbytes = t.n_bytes if p.dst_type == t.type else t.n_rows * row_size(p.dst_type, t.n_per_row)
        writer.add_tensor_info(p.name, t.shape, p.dst_type, nbytes)
    return writer


def _c_trunc(s: str, n: int) -> str:
    """What strncpy(dst, s, n) into a char[n+1] keeps: the first n bytes."""
    b = s.encode()[:n]
    return b.decode("utf-8", errors="ignore")


def check_output_path(src: str | os.PathLike, out: str | os.PathLike) -> None:
    if Path(src).resolve() == Path(out).resolve():
        raise UsageError("output path is the input file; choose another OUT")
    if Path(out).is_dir():
        raise UsageError(f"{out} is a directory; OUT must be a file path")
    if not Path(src).exists():
        raise InputFileError(f"{src}: no such file or directory")
