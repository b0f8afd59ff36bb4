"""``--plan``: the memory plan of a command (repq.distill.memory, repq.calib.hessian.memory) printed
or emitted as JSON, and the refusal of a run whose plan does not fit the device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import UsageError

PlanOpt = Annotated[bool, typer.Option("--plan", help="Print the predicted peak memory per GPU (each group / block) and whether it fits --gpu-memory; load nothing, run nothing.")]
PlanConfigOpt = Annotated[str | None, typer.Option("--plan-config", help="--plan for a model's shape only: llama3-8b, llama3-70b, llama2-7b, qwen2.5-7b, smollm2-135m, a shape JSON (n_embd, n_ff, n_layer, n_head, n_head_kv, vocab) or a Hugging Face config.json.")]
NprocOpt = Annotated[int, typer.Option("--nproc", help="--plan: the number of processes (GPUs); default: torchrun's WORLD_SIZE, else 1.", min=0)]
GpuMemoryOpt = Annotated[str | None, typer.Option("--gpu-memory", help="Memory of one GPU for the plan's fit (80GiB, 141GB; default: the visible GPU's total, else 80 GiB); on a larger GPU torch's allocator is held to it (a rehearsal of the smaller GPU); given on CPU it also bounds a --device cpu run.")]
IgnorePlanOpt = Annotated[bool, typer.Option("--ignore-plan", help="Run even when the memory plan predicts more than --gpu-memory.")]

GiB = 2**30


def gpu_memory(text: str | None) -> tuple[int, str]:
    """(bytes, where the number comes from)."""
    if text:
        from ..alloc.recipe import parse_size

        try:
            return parse_size(text), "--gpu-memory"
        except UsageError:
            raise UsageError(f"--gpu-memory {text!r}: expected a size like 80GiB or 141GB") from None
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, torch.cuda.get_device_name()
    return 80 * GiB, "default (no GPU visible)"


def hold_allocator(out, device: str, text: str) -> None:
    """--gpu-memory on a larger GPU: torch's allocator is held to it (:func:`repq.runtime.cap_gpu_memory`)."""
    from .. import runtime

    if runtime.cap_gpu_memory(device, gpu_memory(text)[0]) is not None:
        out.log(f"torch's CUDA allocator on {device} is held to --gpu-memory {text}")


def nproc(n: int) -> int:
    return n or int(os.environ.get("WORLD_SIZE", "1"))


def plan_model(model: Path | None, plan_config: str | None):
    """The ModelConfig a plan is for: --plan-config, else MODEL's GGUF or HF config (no weights read)."""
    from ..model.shapes import check_shape

    if plan_config:
        from ..model.shapes import shape_config

        return check_shape(shape_config(plan_config), plan_config), plan_config
    if model is None:
        raise UsageError("--plan needs MODEL or --plan-config SHAPE")
    from ..model.loader import load_config

    return check_shape(load_config(model)[0], str(model)), str(model)


def _rows(phases, budget: int) -> list[list[str]]:
    """One row per phase; consecutive blocks with the same numbers share a row (blk.0-79)."""
    rows: list[list[str]] = []
    last = None
    for p in phases:
        cells = [p.phase, f"{p.peak / GiB:.2f}", p.peak_at, f"{sum(p.host.values()) / GiB:.2f}",
                 "yes" if p.peak <= budget else "NO"]
        if last is not None and p.group.startswith("blk.") and rows[-1][0].startswith("blk.") and cells == last:
            rows[-1][0] = rows[-1][0].split("-")[0] + "-" + p.group.removeprefix("blk.")
            continue
        rows.append([p.group, *cells])
        last = cells
    return rows


def report(out: Output, command: str, source: str, phases, budget: int, budget_source: str, settings: dict) -> dict:
    """Print the plan (table + one line) or emit its JSON; returns the JSON object."""
    worst = max(phases, key=lambda p: p.peak)
    fits = worst.peak <= budget
    out.table(f"{command} memory plan: {source} (GiB per GPU; host: GiB of host memory per process)",
              ["group / block", "phase", "peak", "at", "host", "fits"], _rows(phases, budget))
    obj = {"command": f"{command} --plan", "model": source, "settings": settings, "gpu_memory_bytes": budget,
           "gpu_memory_source": budget_source, "peak_bytes": worst.peak, "peak_phase": f"{worst.group} {worst.phase}",
           "fits": fits, "phases": [p.to_dict() for p in phases]}
    worst_terms = {**worst.resident, **(worst.peaks.get(worst.peak_at, {}))}
    out.result(obj, human=f"peak {worst.peak / GiB:.2f} GiB per GPU ({worst.group} {worst.phase}, at {worst.peak_at}: "
                          + ", ".join(f"{k} {v / GiB:.2f}" for k, v in sorted(worst_terms.items(), key=lambda kv: -kv[1])[:5])
                          + f") {'fits' if fits else 'does NOT fit'} {budget / GiB:.1f} GiB ({budget_source})")
    return obj


def refuse_if_too_big(out: Output, command: str, source: str, phases, budget: int, budget_source: str) -> None:
    """Print the plan and raise when its peak is over ``budget`` (before anything is loaded)."""
    worst = max(phases, key=lambda p: p.peak)
    if worst.peak <= budget:
        return
    out.table(f"{command} memory plan: {source} (GiB per GPU)", ["group / block", "phase", "peak", "at", "host", "fits"],
              _rows(phases, budget))
    raise UsageError(f"the memory plan predicts {worst.peak / GiB:.2f} GiB per GPU ({worst.group} {worst.phase}), "
                     f"more than {budget / GiB:.1f} GiB ({budget_source})",
                     hint="more processes with --shard, a smaller --batch / --seq-len, or --ignore-plan to run anyway")
