"""`repq quantize`: llama-quantize's file layout and type mix, with a pluggable per-tensor quantizer.

With ``rtn`` and ``imatrix`` the per-tensor quantizer is ggml's own and the file is byte-identical to
llama-quantize's; ``ldlq`` (repq.quant.ldlq_method) replaces the per-tensor quantizer only.

The pipeline mirrors llama_model_quantize_impl (src/llama-quant.cpp at the pinned commit):

1. read the input GGUF (F32/F16/BF16, or a quantized one with ``allow_requantize``);
2. order tensors as llama's model loader does and pick each tensor's type (repq.mix);
3. copy the input's key/value pairs, then set ``general.quantization_version`` and
   ``general.file_type`` (remove + append, as gguf_set_val_u32 does) and the
   ``quantize.imatrix.*`` keys llama-quantize adds when given an imatrix;
4. stream each tensor: copy it if its type is unchanged, else convert to float32 and quantize
   with ggml (per expert slice of the importance vector for 3-D tensors);
5. write to a temporary file and rename it into place.

The result is byte-identical to llama-quantize's file for the same input, ftype and imatrix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import mix
from ..errors import InputFileError, MismatchError, UsageError
from ..ggml import quants
from ..ggml.types import F32, block_size, is_quantized, row_size, type_name
from ..io import gguf_file
from ..io.imatrix import Imatrix, load_imatrix

GGML_QNT_VERSION = 2
KV_QNT_VERSION = "general.quantization_version"
KV_FILE_TYPE = "general.file_type"
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass(frozen=True)
class QuantizeConfig:
    """What to produce.  Every field maps to a `repq quantize` option."""

    ftype: str
    """llama-quantize ftype name, e.g. ``Q4_K_M``."""
    method: str = "rtn"
    """``rtn`` (no importance), ``imatrix`` (ggml's importance-weighted search; needs an imatrix) or
    ``ldlq`` (error feedback through Hessians; needs ``hessian``).  ``distill`` is internal to
    `repq distill`, which supplies the bytes of every tensor itself."""
    hessian: str | None = None
    """Directory of proxy Hessians written by `repq hessian` (method ldlq)."""
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
    """LDLQ: re-fit fp16 block scales against H once the codes are fixed (legacy types, IQ4_NL)."""
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
        if self.method == "ldlq" and not self.hessian:
            raise UsageError("--method ldlq needs --hessian DIR (make one with `repq hessian`)")
        if self.method != "ldlq" and self.hessian:
            raise UsageError("--hessian is only used by --method ldlq")
        if self.scales not in ("static", "dynamic"):
            raise UsageError(f"--scales must be static or dynamic, not {self.scales!r}")
        if not 0 <= self.damp < 10:
            raise UsageError("--damp must be in [0, 10)")
        if self.threads < 0:
            raise UsageError("--threads must be ≥ 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = {k: v for k, v in asdict(self.mix).items()}
        return d


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

    def first(v):
        return (max(v) if v else 0) if isinstance(v, list) else v

    n_layer = model.require(f"{arch}.block_count")
    n_head = first(model.get(f"{arch}.attention.head_count", 0)) or 0
    n_head_kv = first(model.get(f"{arch}.attention.head_count_kv", n_head)) or n_head
    n_expert = model.get(f"{arch}.expert_count", 0) or 0
    return mix.ModelInfo(arch=arch, n_layer=int(n_layer), n_head=int(n_head),
                         n_head_kv=int(n_head_kv), n_expert=int(n_expert))


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


TensorQuantizer = Callable[[mix.TensorPlan, np.ndarray, gguf_file.TensorRef, "np.ndarray | None"],
                           tuple[np.ndarray, dict]]
"""(plan, float32 rows × n_per_row, source tensor, importance or None) -> (ggml bytes, report fields)."""


def ggml_tensor_quantizer(threads: int | None) -> TensorQuantizer:
    """ggml's own quantizer: what llama-quantize does for every tensor."""
    def run(p, x, t, imp):
        return _quantize_tensor(p.dst_type, x, t, imp, threads), {"method": "imatrix" if imp is not None else "rtn"}
    return run


def quantize_model(src: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig, *,
                   on_tensor: Callable[[TensorReport, int, int], None] | None = None,
                   tensor_quantizer: TensorQuantizer | None = None,
                   extra_kv: list[tuple[str, int, object]] | None = None,
                   tensor_values: Callable[[str], np.ndarray | None] | None = None) -> QuantizeReport:
    """Quantize a GGUF model; see the module docstring.

    Args:
        src: input GGUF.
        out: output path (written atomically).
        cfg: what to produce.
        on_tensor: called after each tensor with (report, index, total), for progress display.
        tensor_quantizer: the per-tensor quantizer (default: ggml's, as llama-quantize).
        extra_kv: key/value pairs to add after the ftype keys.
        tensor_values: name -> float32 (n_rows × n_per_row) values that replace the input's for that
            tensor (None keeps the input's); a replaced tensor always goes through
            ``tensor_quantizer``, also when its type does not change (`repq distill`'s trained norms).

    Raises:
        InputFileError, MismatchError, UnsupportedError, UsageError: bad input (nothing written).
    """
    t_start = time.perf_counter()
    ftype = mix.ftype_from_name(cfg.ftype)
    tq = tensor_quantizer or ggml_tensor_quantizer(cfg.threads or None)
    model = gguf_file.GGUFModel(src)
    try:
        info = model_info(model)
        tinfos = [mix.TensorInfo(name=t.name, shape=t.shape, type=t.type) for t in model.tensors.values()]
        imx: Imatrix | None = load_imatrix(cfg.imatrix) if cfg.imatrix else None
        # ldlq has importance data (diag H): pick the mix llama-quantize picks with an imatrix
        mix_opts = cfg.mix if imx is None and cfg.method not in ("ldlq", "distill") else _with_imatrix(cfg.mix)
        plans = mix.plan_types(info, tinfos, ftype, mix_opts)
        importance = imx.importance() if imx is not None else {}
        if imx is not None:
            check_imatrix(importance, model, plans, cfg.imatrix)
        for p in plans:
            if p.allows_quantization and p.dst_type != p.src_type:
                if p.requires_imatrix and p.name not in importance:
                    raise UsageError(f"{p.name} → {type_name(p.dst_type)} requires an importance matrix; "
                                     "pass --imatrix FILE (make one with `repq imatrix` or llama-imatrix)")
                if is_quantized(p.src_type) and not cfg.allow_requantize:
                    raise UsageError(f"{p.name} is already quantized ({type_name(p.src_type)}); "
                                     "pass --allow-requantize to requantize it")
                if p.dst_type != F32 and model.tensors[p.name].n_per_row % block_size(p.dst_type):
                    raise UsageError(f"{p.name}: row length not divisible by the {type_name(p.dst_type)} block")

        writer = gguf_file.GGUFWriter(out)
        for key, raw in model.kv_items():
            writer.add_raw_kv(key, raw)
        writer.set_kv(KV_QNT_VERSION, gguf_file.UINT32, GGML_QNT_VERSION)
        writer.set_kv(KV_FILE_TYPE, gguf_file.UINT32, ftype.id)
        for key in ("split.no", "split.count", "split.tensors.count"):
            writer.remove_kv(key)
        if imx is not None:
            writer.set_kv(KV_IMATRIX_FILE, gguf_file.STRING, _c_trunc(cfg.imatrix, 127))
            if imx.datasets:
                writer.set_kv(KV_IMATRIX_DATASET, gguf_file.STRING, _c_trunc(imx.datasets[0], 127))
            writer.set_kv(KV_IMATRIX_N_ENTRIES, gguf_file.UINT32, len(importance))
            if imx.chunk_count > 0:
                writer.set_kv(KV_IMATRIX_N_CHUNKS, gguf_file.UINT32, imx.chunk_count)
        for key, vtype, value in extra_kv or []:
            writer.set_kv(key, vtype, value)

        for p in plans:
            t = model.tensors[p.name]
            nbytes = t.n_bytes if p.dst_type == t.type else t.n_rows * row_size(p.dst_type, t.n_per_row)
            writer.add_tensor_info(p.name, t.shape, p.dst_type, nbytes)

        reports: list[TensorReport] = []
        with writer:
            writer.begin()
            for i, p in enumerate(plans):
                t = model.tensors[p.name]
                t0 = time.perf_counter()
                info: dict = {"method": "copy"}
                imp = None
                x = tensor_values(p.name) if tensor_values is not None else None
                if x is None and p.dst_type == t.type:
                    data = t.data
                else:
                    if x is None:
                        x = tensor_f32(t)
                    elif x.shape != (t.n_rows, t.n_per_row):
                        raise MismatchError(f"{p.name}: replacement values have shape {x.shape}, "
                                            f"the tensor is {t.n_rows} × {t.n_per_row}")
                    imp = importance.get(p.name)
                    if imp is not None and imp.size != t.n_per_row * (t.shape[2] if len(t.shape) > 2 else 1):
                        imp = None  # token_embd with a foreign size: llama-quantize ignores it too
                    data, info = tq(p, x, t, imp)
                writer.write_tensor_data(p.name, data)
                rep = TensorReport(p.name, t.shape, type_name(t.type), type_name(p.dst_type),
                                   t.n_bytes, int(data.nbytes), p.fallback, imp is not None,
                                   time.perf_counter() - t0, **info)
                reports.append(rep)
                if on_tensor:
                    on_tensor(rep, i, len(plans))
            writer.finish()
        n_params = sum(int(np.prod(t.shape)) for t in model.tensors.values())
        return QuantizeReport(str(out), ftype.name, Path(out).stat().st_size, n_params, reports,
                              time.perf_counter() - t_start)
    finally:
        model.close()


def _with_imatrix(opts: mix.MixOptions) -> mix.MixOptions:
    from dataclasses import replace

    return replace(opts, has_imatrix=True)


def _c_trunc(s: str, n: int) -> str:
    """What strncpy(dst, s, n) into a char[n+1] keeps: the first n bytes."""
    b = s.encode()[:n]
    return b.decode("utf-8", errors="ignore")


def _quantize_tensor(dst_type: int, x: np.ndarray, t: gguf_file.TensorRef, imp: np.ndarray | None,
                     threads: int | None) -> np.ndarray:
    if len(t.shape) <= 2 or imp is None:
        return quants.quantize(dst_type, x, imp, threads=threads)
    # 3-D expert tensors: each expert's rows use its own slice of the importance vector.
    rows_per_expert = t.shape[1]
    parts = []
    for e in range(t.shape[2]):
        sl = imp[e * t.n_per_row:(e + 1) * t.n_per_row]
        parts.append(quants.quantize(dst_type, x[e * rows_per_expert:(e + 1) * rows_per_expert], sl,
                                     threads=threads))
    return np.concatenate(parts)


def check_output_path(src: str | os.PathLike, out: str | os.PathLike) -> None:
    if Path(src).resolve() == Path(out).resolve():
        raise UsageError("output path is the input file; choose another OUT")
    if Path(out).is_dir():
        raise UsageError(f"{out} is a directory; OUT must be a file path")
    if not Path(src).exists():
        raise InputFileError(f"{src}: no such file or directory")
