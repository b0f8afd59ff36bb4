"""The GGUF metadata keys `repq quantize` and `repq distill` write, named in one place.

llama-quantize's keys, written exactly as llama-quantize writes them (every `repq quantize` file)::

    general.quantization_version   u32      GGML_QNT_VERSION
    general.file_type              u32      the ftype id
    quantize.imatrix.file          string   the --imatrix path (first 127 bytes)
    quantize.imatrix.dataset       string   the imatrix's first dataset (first 127 bytes)
    quantize.imatrix.entries_count u32
    quantize.imatrix.chunks_count  u32
    split.*                        removed (the output is one file)

repq's provenance keys, only in files whose tensor bytes repq computed itself (``--method ldlq``,
`repq distill`); a ``--method rtn|imatrix`` file stays byte-identical to llama-quantize's and
carries none::

    repq.version                   string    repq's version
    repq.method                    string    "ldlq" or "distill"
    repq.ggml_commit               string    commit of the libggml that quantized and decoded the tensors
    repq.data_fingerprints         string[]  sha256 of the calibration token data: the Hessian set's
                                             fingerprints (ldlq), the training data's (distill)
    repq.config                    string    JSON (sorted keys) of the settings that determine the
                                             result: LDLQ's damp/act_order/scales/refit, or the whole
                                             distill config; nothing that only says how it ran
                                             (device, threads, paths)
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .. import __version__
from ..ggml import _lib
from .gguf_file import ARRAY, STRING

GGML_QNT_VERSION = 2
"""The value of general.quantization_version (ggml.h GGML_QNT_VERSION at the pinned commit)."""

QUANTIZATION_VERSION = "general.quantization_version"
FILE_TYPE = "general.file_type"
IMATRIX_FILE = "quantize.imatrix.file"
IMATRIX_DATASET = "quantize.imatrix.dataset"
IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

REPQ_VERSION = "repq.version"
REPQ_METHOD = "repq.method"
REPQ_GGML_COMMIT = "repq.ggml_commit"
REPQ_DATA_FINGERPRINTS = "repq.data_fingerprints"
REPQ_CONFIG = "repq.config"

KeyValue = tuple[str, int, object, "int | None"]
"""(key, GGUF value type, value, array element type or None): arguments of ``GGUFWriter.set_kv``."""


def provenance(method: str, config: dict, data_fingerprints: Iterable[str]) -> list[KeyValue]:
    """The ``repq.*`` key/value pairs of a file made by ``method`` with ``config`` on calibration
    data with these fingerprints (deterministic: a resumed run writes the same bytes)."""
    return [
        (REPQ_VERSION, STRING, __version__, None),
        (REPQ_METHOD, STRING, method, None),
        (REPQ_GGML_COMMIT, STRING, _lib.commit(), None),
        (REPQ_DATA_FINGERPRINTS, ARRAY, [str(f) for f in data_fingerprints], STRING),
        (REPQ_CONFIG, STRING, json.dumps(config, sort_keys=True, separators=(",", ":"), default=str), None),
    ]
