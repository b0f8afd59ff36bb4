"""The settings of an evaluation run (`repq ppl`, `repq kld`, `repq report`), validated on creation.

Every field maps to a command-line option and to the ``llama-perplexity`` option of the same
meaning, so a run can be repeated in llama.cpp's own tool with the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import UsageError
from ..ggml.types import GGML_TYPES

# llama.cpp's accepted KV cache types (common/arg.cpp kv_cache_types) -> ggml type ids.
KV_CACHE_TYPES = {n.lower(): GGML_TYPES[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL",
                                                      "Q5_0", "Q5_1")}


@dataclass(frozen=True)
class EvalConfig:
    """How a model is evaluated; every field maps to a `repq ppl`/`repq kld` option."""

    n_ctx: int = 512
    """Tokens per chunk (``-c``); the second half of each chunk is scored."""
    chunks: int = -1
    """Maximum number of chunks (``--chunks``); -1 = as many as the text holds."""
    n_batch: int = 2048
    """Logical batch (``-b``): ``n_batch // n_ctx`` chunks are decoded per call."""
    n_ubatch: int = 512
    """Physical batch (``-ub``)."""
    threads: int = 0
    """CPU threads; 0 = llama.cpp's default (physical cores)."""
    n_gpu_layers: int = -1
    """Layers offloaded to the GPU (``-ngl``); -1 = llama.cpp's default (all that fit)."""
    cache_type_k: str = "f16"
    """KV cache type for K (``-ctk``): f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1."""
    cache_type_v: str = "f16"
    """KV cache type for V (``-ctv``)."""

    def __post_init__(self) -> None:
        if self.n_ctx < 4:
            raise UsageError(f"-c {self.n_ctx}: the context must hold at least 4 tokens")
        if self.chunks == 0 or self.chunks < -1:
            raise UsageError(f"--chunks {self.chunks}: expected a positive number (or -1 for all)")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UsageError("--batch and --ubatch must be positive")
        if self.threads < 0:
            raise UsageError(f"--threads {self.threads}: expected 0 (default) or more")
        for opt, name in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if name.lower() not in KV_CACHE_TYPES:
                raise UsageError(f"{opt} {name}: unknown KV cache type",
                                 hint="allowed: " + ", ".join(KV_CACHE_TYPES))

    def layout(self, n_ctx: int | None = None) -> tuple[int, int, int]:
        """``(n_seq, n_ctx_total, n_batch)`` as llama-perplexity derives them for chunks of ``n_ctx``.

        ``n_seq = max(1, n_batch // n_ctx)`` chunks per decode call, a context of ``n_seq * n_ctx``
        cells and ``n_batch`` capped at that context (main() in perplexity.cpp).
        """
        n_ctx = n_ctx or self.n_ctx
        n_seq = max(1, self.n_batch // n_ctx)
        n_total = n_seq * n_ctx
        n_batch = min(self.n_batch, n_total)
        if not (n_batch < n_ctx or n_batch % n_ctx == 0):  # GGML_ASSERT in perplexity()
            raise UsageError(f"--batch {self.n_batch} with -c {n_ctx}: the batch must be smaller than "
                             "the context or a multiple of it")
        return n_seq, n_total, n_batch

    def to_dict(self) -> dict:
        return asdict(self)
