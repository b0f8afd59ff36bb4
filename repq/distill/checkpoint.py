"""Distillation checkpoints: one ``state.pt`` per run directory, written atomically by rank 0.

What a checkpoint holds, and what it leaves out::

    format, identity        model fingerprint, ftype, config hash, data fingerprint, world size
    position                group index, phase ("quantize" | "train"), step in group, global step
    trainable               the student's parameters that are not frozen (fp32); a sharded run's (and its
                            AdamW state) are in a Distributed Checkpoint directory (``dcp``: dcp-0 or
                            dcp-1, alternating), every rank writing its own shards
    frozen                  the ggml bytes of every frozen tensor (their float values are not stored:
                            on resume they are decoded from these bytes through ggml, exactly as
                            they were when the tensor was frozen)
    optimizer               AdamW state of the trainable parameters (None between groups)
    tensor_reports, metrics JSON strings

When the run has written its GGUF, ``finished.json`` records that (identity, the output's size and
mtime, what the command reports) before ``state.pt`` is removed: a run killed after that point is
finished, and ``--resume`` says so instead of training again from the start.

Leaving the frozen tensors' float copies out makes a checkpoint shrink as the run goes: each
quantized tensor is kept as its ggml bytes (≈ 3-5 bits per weight) instead of fp32 values plus
bytes.  The data position is a pure function of the global step (repq.distill.config), so no data
state is stored.  Loading uses ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ..errors import InputFileError, MismatchError
from ..io.atomic import atomic_output

STATE_FILE = "state.pt"
FINISHED_FILE = "finished.json"
FORMAT_VERSION = 2   #: 2: frozen tensors as bytes only (1 also stored their float values)


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings) to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def load_state(path: Path, expect: dict) -> dict:
    """Read a checkpoint and check that it belongs to this run.

    Args:
        expect: identity fields (fingerprint, ftype, config, data, world) that must match.

    Raises:
        InputFileError: unreadable, foreign or of another format version.
        MismatchError: written by a run of another model, ftype or settings.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise InputFileError(f"{path}: not a readable repq distill checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})",
                             hint="delete the checkpoint directory to start over") from None
    fmt = state.get("format") if isinstance(state, dict) else None
    if fmt != FORMAT_VERSION:
        raise InputFileError(f"{path}: not a repq distill checkpoint of format {FORMAT_VERSION} (format {fmt})",
                             hint="a checkpoint of another repq version cannot be resumed; delete it to start over")
    for k, v in expect.items():
        if k == "settings" or state.get(k) == v:   # settings: only to say what differs
            continue
        what = {"fingerprint": "another model", "ftype": "another ftype"}.get(k, f"a run with other {k}")
        detail = _settings_diff(state.get("settings"), expect.get("settings")) if k == "config" else ""
        raise MismatchError(f"{path}: checkpoint is from {what} ("
                            + (detail or f"{k} {str(state.get(k))[:16]!r}, this run {str(v)[:16]!r}") + ")",
                            hint="drop --resume and use another --checkpoint-dir, or delete it to start over; "
                                 "or resume with the checkpoint's settings")
    return state


def _settings_diff(saved, now) -> str:
    """'hess_shrink unset there, 0.2 here; ...' from two JSON dicts of run settings ('' if unknown)."""
    try:
        a, b = json.loads(saved), json.loads(now)
    except (TypeError, ValueError):
        return ""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return ""
    return "; ".join(f"{k} {a.get(k, 'unset')} there, {b.get(k, 'unset')} here"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))[:400]


def save_finished(state_path: Path, identity: dict, output: str | Path, report: dict) -> None:
    """Record, beside ``state_path``, that the run with ``identity`` wrote ``output`` (its size and
    mtime: a later change is noticed) and ``report`` (JSON: bytes, tokens, tensors, final metrics)."""
    from ..io.atomic import atomic_write_bytes

    st = Path(output).stat()
    rec = {"format": FORMAT_VERSION, "identity": identity, "output": str(output), "size": st.st_size,
           "mtime_ns": st.st_mtime_ns, "report": report}
    atomic_write_bytes(state_path.parent / FINISHED_FILE, json.dumps(rec, default=str).encode())


def run_identity(fingerprint: str, cfg, data_fingerprint: str, world: int, sharded: bool) -> dict:
    """What a checkpoint and a finished run's record must match: the model (its config's
    fingerprint), the settings (a :class:`repq.distill.config.DistillConfig`), the data and, unsharded,
    the number of processes (a sharded checkpoint, Distributed Checkpoint, reshards to any)."""
    return {"fingerprint": fingerprint, "ftype": cfg.ftype, "config": cfg.identity(), "data": data_fingerprint,
            "world": "any" if sharded else world, "sharded": sharded,
            "settings": json.dumps(cfg.to_dict(), sort_keys=True, default=str)}


def finished_result(state_path: Path, identity: dict, output: str | Path, dist=None, student=None):
    """:func:`finished_report` as the :class:`repq.distill.config.DistillResult` of a run that had
    nothing left to do (``already_finished``), or None."""
    from .config import DistillResult

    done = finished_report(state_path, identity, output, dist)
    if done is None:
        return None
    return DistillResult(str(output), done["file_bytes"], done["tensors"], done["metrics"], 0.0, done["tokens"],
                         done["global_step"], student, already_finished=True)


def finished_report(state_path: Path, identity: dict, output: str | Path, dist=None) -> dict | None:
    """The report of a finished run of ``identity`` whose ``output`` is still the file it wrote;
    None when there is no such record (none, unreadable, another run's, or the file changed).
    Under a process group (``dist``) rank 0's answer is every rank's (a collective)."""
    rep = _finished_report(state_path, identity, output)
    if dist is not None:
        obj = [rep]
        nccl = dist.get_backend() == "nccl"
        dist.broadcast_object_list(obj, src=0, device=torch.device("cuda", torch.cuda.current_device()) if nccl else None)
        rep = obj[0]
    return rep


def _finished_report(state_path: Path, identity: dict, output: str | Path) -> dict | None:
    p = state_path.parent / FINISHED_FILE
    try:
        rec = json.loads(p.read_text())
        st = Path(output).stat()
        same = (rec["format"] == FORMAT_VERSION and rec["identity"] == json.loads(json.dumps(identity, default=str))
                and rec["output"] == str(output) and (rec["size"], rec["mtime_ns"]) == (st.st_size, st.st_mtime_ns))
        rep = rec["report"]
        well_formed = (all(isinstance(rep[k], int) and rep[k] >= 0 for k in ("file_bytes", "tokens", "global_step"))
                       and all(isinstance(rep[k], list) and all(isinstance(x, dict) for x in rep[k])
                               for k in ("tensors", "metrics")))
        return dict(rep) if same and well_formed else None   # anything else: not a finished run of this one
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def clear_finished(state_path: Path) -> None:
    """Forget a finished run's record (a new run starts in its directory)."""
    (state_path.parent / FINISHED_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ sharded

#: The only globals a Distributed Checkpoint's ``.metadata`` pickle may name (what torch writes for
#: tensors, chunks and byte entries); anything else is refused before it is resolved.
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "ChunkStorageMetadata", "TensorStorageMetadata", "TensorProperties", "MetadataIndex",
        "StorageMeta", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
     ("torch.serialization", "_get_layout"), ("torch", "Size")}


def dcp_reader(path: str | Path):
    """A ``torch.distributed.checkpoint`` reader of ``path`` that never runs code from the files.

    torch's own reader unpickles ``.metadata`` with plain ``pickle.load``, which can call anything a
    crafted file names; this one resolves only the classes a checkpoint holds (:data:`_DCP_GLOBALS`,
    torch dtypes) and refuses data files outside the directory.  The tensor data is read by torch
    with ``weights_only=True``.

    Raises (when read):
        InputFileError: a metadata file that names anything else, or a data file outside ``path``.
    """
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")

    class _Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            p = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(p, "rb") as f:
                    md = _Unpickler(f).load()
            except Exception as e:  # noqa: BLE001 (a damaged pickle raises many kinds)
                raise InputFileError(f"{p}: not a repq distill checkpoint's metadata ({type(e).__name__}: "
                                     f"{str(e)[:120]})", hint="delete the checkpoint directory to start over") from None
            for info in getattr(md, "storage_data", {}).values():
                rel = str(getattr(info, "relative_path", ""))
                if not rel or Path(rel).name != rel or rel in (".", ".."):
                    raise InputFileError(f"{p}: names a data file outside its directory ({rel!r})",
                                         hint="delete the checkpoint directory to start over")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader(str(path))


def state_keys(student: torch.nn.Module, names) -> set[str]:
    """The student's state-dict keys of the parameters named ``names`` (a tied tensor's every name)."""
    ids = {id(p) for n, p in student.named_parameters() if n in names}
    return {n for n, p in student.named_parameters(remove_duplicate=False) if id(p) in ids}


def _aliases(student: torch.nn.Module) -> set[str]:
    """Second names of a parameter (tied: ``output.weight``), saved and loaded under its first name only."""
    return {n for n, _ in student.named_parameters(remove_duplicate=False)} - {n for n, _ in student.named_parameters()}


def _dcp_load(directory: str | Path, what: str, state: dict) -> None:
    """``dcp.load(state)`` from ``directory`` through :func:`dcp_reader`; any failure (torch wraps them
    in a ``CheckpointException``, a BaseException that ``except Exception`` misses) → InputFileError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    dcp_reader(directory).read_metadata()   # its own errors first: torch logs a traceback for each one
    try:
        dcp.load(state, storage_reader=dcp_reader(directory))
    except InputFileError:
        raise
    except (CheckpointException, RuntimeError, ValueError, KeyError, OSError) as e:
        first = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        if isinstance(first, InputFileError):
            raise first from None
        msg = str(first).strip().splitlines()
        raise InputFileError(f"{directory}: {what} does not fit this run ({msg[0][:160] if msg else type(first).__name__})",
                             hint="delete the checkpoint directory to start over") from None


def dcp_save(directory: Path, student: torch.nn.Module, opt, skip=frozenset()) -> None:
    """Every rank's shards of the (FSDP2) student but the parameters keyed ``skip`` (the frozen ones,
    whose values are their recorded bytes) and a tied tensor's second name, and of AdamW's state
    unless ``opt`` is None, into ``directory`` through Distributed Checkpoint (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(student, [opt] if opt is not None else [])
    skip = set(skip) | _aliases(student)
    msd = {k: v for k, v in msd.items() if k not in skip}
    dcp.save({"model": msd} | ({"optim": osd} if opt is not None else {}),
             storage_writer=dcp.FileSystemWriter(str(directory), overwrite=True))


def dcp_load_model(directory: str | Path, student: torch.nn.Module, skip=frozenset()) -> None:
    """The student's shards but those keyed ``skip`` (left as they are: the caller decodes them from
    their bytes) from ``directory`` (:func:`dcp_reader`), resharded to this run's ranks.  Every other
    key must be in the checkpoint (a missing one: InputFileError)."""
    from torch.distributed.checkpoint import state_dict as sd

    skip = set(skip) | _aliases(student)
    msd = {k: v for k, v in sd.get_model_state_dict(student).items() if k not in skip}
    _dcp_load(directory, "the model's shards", {"model": msd})
    sd.set_model_state_dict(student, msd, options=sd.StateDictOptions(strict=not skip))


def dcp_load_optimizer(directory: str | Path, student: torch.nn.Module, opt) -> None:
    """AdamW's sharded state from ``directory`` into ``opt``.

    Raises:
        InputFileError: state that does not fit this run's parameters.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    osd = get_optimizer_state_dict(student, opt)
    _dcp_load(directory, "optimizer state", {"optim": osd})
    set_optimizer_state_dict(student, opt, osd)


class Slots:
    """A sharded run's two alternating Distributed Checkpoint directories (``dcp-0``, ``dcp-1``) in
    ``directory``: a save goes to the slot that the current ``state.pt`` does not name, so a save cut
    short leaves the last checkpoint whole.

    The checkpoint that follows a group's quantization writes no shards: the trainable values are
    those of the last save (the previous group's training), or the source model's before any
    training, and the newly frozen tensors are their bytes in ``state.pt``; it names that slot, or
    none.  At 16 blocks of the 8B shape on one H200 such a save was 14.4 GB and ~30 s."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.last, self._next = Path(directory), None, 0
        self.optimizer: str | None = None   # a restored slot whose AdamW state the next optimizer loads

    def save(self, student: torch.nn.Module, opt, skip, *, unchanged: bool = False) -> str | None:
        """The shards into the next slot (a collective), or with ``unchanged`` (no training since the
        last save, no optimizer) nothing; returns the slot that now holds the values, or None."""
        if unchanged and opt is None:
            return self.last
        slot = f"dcp-{self._next}"
        dcp_save(self.dir / slot, student, opt, skip)
        self.last, self._next = slot, self._next ^ 1
        return slot

    def restore(self, slot: str | None, student: torch.nn.Module, skip, has_optimizer: bool, trained: bool) -> None:
        """The student's shards from ``slot`` (None: as loaded from the source model, only before any
        training)."""
        if slot is None and trained:
            raise ValueError("no checkpoint slot after training")
        if slot is None:
            self.last, self._next, self.optimizer = None, 0, None
            return
        if slot not in ("dcp-0", "dcp-1"):   # a plain name inside the checkpoint directory
            raise ValueError(f"checkpoint slot {str(slot)[:40]!r}")
        dcp_load_model(self.dir / slot, student, skip)
        self.last, self._next = slot, 1 - int(slot[-1])
        self.optimizer = str(self.dir / slot) if has_optimizer else None
