"""Several quantizations of one model side by side: size, bits per weight, PPL, KLD, speed, and
task accuracy read from `repq eval --json` outputs (:mod:`repq.eval.report_tasks`).

For each model the quality numbers come from one ``llama-perplexity --kl-divergence`` style run
against the base model's log-probabilities (:func:`repq.eval.kld.kl_divergence`): PPL is its
``Mean PPL(Q)``, KLD its mean and 99.9 % percentile, and "same top" its same-top-token share.
The base's log-probabilities are computed once, into a temporary file, and only when some model's
result is not cached.

Results are cached as JSON in ``REPQ_CACHE/eval-cache/<key>.json``; the key hashes the kind of
result, the sha256 of each file involved, the sha256 of the text and the settings that change the
numbers, so re-running a report over unchanged files is instant.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError
from .bench import bench
from .chunks import read_text
from .config import EvalConfig
from .kld import check_same_tokenizer, kl_divergence
from .logits_file import BaseLogits, temp_base_path
from .ppl import perplexity
from .report_tasks import TASK_HEAD, task_cells

CACHE_VERSION = 1
PLOT_NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'repq[plot]'"


@dataclass
class ReportRow:
    file: str
    size_bytes: int
    bpw: float
    ppl: float
    ppl_error: float
    kld_mean: float | None = None
    kld_p99_9: float | None = None
    same_top: float | None = None
    """Fraction of positions where the model's top token is the base's."""
    pp_ts: float | None = None
    tg_ts: float | None = None
    is_base: bool = False
    tasks: dict | None = None
    """Task results from `repq eval --json` (:meth:`repq.eval.report_tasks.TaskResult.summary`)."""

    def to_dict(self) -> dict:
        return asdict(self)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def bits_per_weight(path: str | os.PathLike) -> tuple[int, float]:
    """(tensor bytes, bits per weight) as llama.cpp's ``print_info`` counts them: 8·bytes / elements."""
    from ..io.gguf_file import GGUFModel

    with GGUFModel(path) as g:
        n_bytes = sum(t.n_bytes for t in g.tensors.values())
        n_el = 0
        for t in g.tensors.values():
            k = 1
            for d in t.shape:
                k *= d
            n_el += k
    return n_bytes, (8.0 * n_bytes / n_el if n_el else 0.0)


class ResultCache:
    """JSON results in ``REPQ_CACHE/eval-cache``, keyed by a hash of what determines them."""

    def __init__(self, root: str | os.PathLike | None = None):
        from ..paths import cache_dir

        self.root = Path(root) if root else cache_dir() / "eval-cache"

    @staticmethod
    def key(**parts) -> str:
        blob = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str) -> dict | None:
        p = self.root / f"{key}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def sha(self, path: str | os.PathLike) -> str:
        """sha256 of a file, remembered on disk per (absolute path, size, mtime)."""
        st = os.stat(path)
        memo_key = self.key(kind="sha", path=os.path.abspath(path), size=st.st_size, mtime=st.st_mtime_ns)
        hit = self.get(memo_key)
        if hit is None:
            hit = {"sha256": sha256_file(path)}
            self.put(memo_key, hit)
        return hit["sha256"]

    def put(self, key: str, value: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.root / f"{key}.json")


def _quality_settings(cfg: EvalConfig) -> dict:
    """The settings that change the numbers (threads and offload do not)."""
    return {"n_ctx": cfg.n_ctx, "chunks": cfg.chunks, "n_batch": cfg.n_batch, "n_ubatch": cfg.n_ubatch,
            "cache_type_k": cfg.cache_type_k, "cache_type_v": cfg.cache_type_v}


def build_report(models: list[str | os.PathLike], base: str | os.PathLike, data: str | os.PathLike,
                 cfg: EvalConfig, *, speed: bool = False, bench_opts: dict | None = None,
                 cache: ResultCache | None = None,
                 log: Callable[[str], None] | None = None) -> list[ReportRow]:
    """The rows of a report: the base first, then each model in the order given.

    Args:
        models: quantized GGUFs (same tokenizer as ``base``).
        base: the reference model (F32/F16/BF16 GGUF) whose log-probabilities are the target.
        data: evaluation text.
        cfg: evaluation settings.
        speed: also run llama-bench's pp/tg tests (``bench_opts`` are passed to
            :func:`repq.eval.bench.bench`).
        cache: where results are kept (default ``REPQ_CACHE/eval-cache``).
        log: progress messages.
    Raises:
        MismatchError: a model's tokenizer differs from the base's.
    """
    say = log or (lambda _m: None)
    cache = cache or ResultCache()
    for m in models:
        check_same_tokenizer(base, m)
    data_sha = hashlib.sha256(read_text(data)).hexdigest()
    base_sha = cache.sha(base)
    q = _quality_settings(cfg)
    base_key = cache.key(kind="ppl-base", model=base_sha, data=data_sha, **q)
    keys = {str(m): cache.key(kind="kld", model=cache.sha(m), base=base_sha, data=data_sha, **q)
            for m in models}
    results = {m: cache.get(k) for m, k in keys.items()}
    base_res = cache.get(base_key)
    todo = [m for m in models if results[str(m)] is None]
    if todo or base_res is None:
        path = temp_base_path()
        try:
            say(f"base log-probabilities: {base}")
            run = perplexity(base, data, cfg, save_base=path)
            base_res = {"ppl": run.ppl, "ppl_error": run.ppl_error}
            cache.put(base_key, base_res)
            bl = BaseLogits.open(path)
            try:
                for m in todo:
                    say(f"KL divergence: {m}")
                    st = kl_divergence(m, bl, cfg).stats
                    results[str(m)] = {"ppl": st["ppl_q"]["value"], "ppl_error": st["ppl_q"]["error"],
                                       "kld_mean": st["kld"]["mean"], "kld_p99_9": st["kld"]["p99_9"],
                                       "same_top": st["same_top"]["value"], "stats": st}
                    cache.put(keys[str(m)], results[str(m)])
            finally:
                bl.close()
        finally:
            if path.exists():
                path.unlink()
    else:
        say("all results cached")

    rows = []
    for m, r, is_base in [(base, base_res, True)] + [(m, results[str(m)], False) for m in models]:
        _, bpw = bits_per_weight(m)
        row = ReportRow(file=str(m), size_bytes=Path(m).stat().st_size, bpw=bpw, ppl=r["ppl"],
                        ppl_error=r["ppl_error"], is_base=is_base)
        if not is_base:
            row.kld_mean, row.kld_p99_9, row.same_top = r["kld_mean"], r["kld_p99_9"], r["same_top"]
        if speed:
            row.pp_ts, row.tg_ts = _speed(m, cache, bench_opts or {}, say)
        rows.append(row)
    return rows


def _speed(model, cache: ResultCache, opts: dict, say) -> tuple[float | None, float | None]:
    """pp/tg tokens/s, cached per file, settings and machine (speed is a property of the host)."""
    key = cache.key(kind="bench", model=cache.sha(model), host=platform.node(), cpu=platform.processor(),
                    **{k: v for k, v in sorted(opts.items())})
    hit = cache.get(key)
    if hit is None:
        say(f"speed: {model}")
        res = {r.test[:2]: r.avg_ts for r in bench(model, **opts)}
        hit = {"pp": res.get("pp"), "tg": res.get("tg")}
        cache.put(key, hit)
    return hit["pp"], hit["tg"]


def markdown(rows: list[ReportRow], *, speed: bool = False, tasks: bool = False) -> str:
    """One Markdown table: file, size, bpw, PPL, mean KLD, 99.9 % KLD, same top (and with ``tasks``
    pooled task accuracy, lost/gained, output and agreement lengths; with ``speed`` pp/tg t/s)."""
    head = ["file", "size (bytes)", "bpw", "PPL", "mean KLD", "99.9% KLD", "same top %"]
    if tasks:
        head += TASK_HEAD
    if speed:
        head += ["pp t/s", "tg t/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = Path(r.file).name + (" (base)" if r.is_base else "")
        cells = [name, f"{r.size_bytes:,}", f"{r.bpw:.3f}", f"{r.ppl:.4f} ± {r.ppl_error:.4f}",
                 "—" if r.kld_mean is None else f"{r.kld_mean:.6f}",
                 "—" if r.kld_p99_9 is None else f"{r.kld_p99_9:.6f}",
                 "—" if r.same_top is None else f"{100 * r.same_top:.3f}"]
        if tasks:
            cells += task_cells(r.tasks)
        if speed:
            cells += ["—" if r.pp_ts is None else f"{r.pp_ts:.2f}", "—" if r.tg_ts is None else f"{r.tg_ts:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_plot_available() -> None:
    """Fail before any evaluation runs when :func:`plot` could not draw (matplotlib is optional).

    Raises:
        UsageError: matplotlib (the ``repq[plot]`` extra) is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(PLOT_NEEDS_MATPLOTLIB)


def plot(rows: list[ReportRow], path: str | os.PathLike, title: str | None = None) -> None:
    """PNG of mean KLD (log scale) against bits per weight, one labelled point per model.

    Raises:
        UsageError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError(PLOT_NEEDS_MATPLOTLIB) from e
    pts = [r for r in rows if r.kld_mean is not None and r.kld_mean > 0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot([r.bpw for r in pts], [r.kld_mean for r in pts], "o")
    for r in pts:
        ax.annotate(Path(r.file).stem, (r.bpw, r.kld_mean), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL divergence vs base")
    ax.set_title(title or "KL divergence vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, p)
