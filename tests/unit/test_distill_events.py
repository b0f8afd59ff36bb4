"""What `repq distill` reports per group as it goes (repq.commands.distill._Events): each phase's wall
seconds, from a clock that only the events move, and on CUDA each phase's peak beside the plan's."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from repq.commands.distill import _Events


class _Out:
    def __init__(self):
        self.lines = []

    def log(self, s: str) -> None:
        self.lines.append(s)


def _run(dev: str, events: list[dict], ticks: list[float], plan=()) -> tuple[_Events, _Out, list]:
    out, advanced = _Out(), []
    ev = _Events(out, lambda n, desc=None: advanced.append(n), dev, plan)
    clock = iter(ticks)
    ev.now = lambda: next(clock)
    ev.t = 0.0                                     # the handler was made when loading began
    for e in events:
        ev(e)
    return ev, out, advanced


GROUPS = [{"event": "started"},
          {"event": "quantized", "group": "ffn_up", "tensors": 30},
          {"event": "step", "group": "ffn_up", "step": 1, "steps": 1, "loss": 0.5, "tok_s": 10.0},
          {"event": "trained", "group": "ffn_up", "global_step": 1},
          {"event": "group_done", "group": "ffn_up", "global_step": 1},
          {"event": "quantized", "group": "ffn_down", "tensors": 30},
          {"event": "trained", "group": "ffn_down", "global_step": 1},
          {"event": "group_done", "group": "ffn_down", "global_step": 1}]


def test_each_groups_phases_are_timed_from_the_end_of_loading():
    ev, out, advanced = _run("cpu", GROUPS, [40.0, 52.5, 70.0, 71.0, 80.0, 95.0, 95.5])
    assert ev.timings == [{"group": "ffn_up", "quantize_s": 12.5, "train_s": 17.5, "checkpoint_s": 1.0},
                          {"group": "ffn_down", "quantize_s": 9.0, "train_s": 15.0, "checkpoint_s": 0.5}]
    assert ev.measured == [] and advanced == [1]   # no GPU: no memory lines
    assert out.lines[0] == "loaded the teacher and the student in 40 s"
    assert "quantized ffn_up (30 tensors) in 12.5 s" in out.lines


def test_a_resumed_run_mid_training_times_from_its_restore():
    events = [{"event": "started"}, {"event": "resumed", "group": "ffn_up", "phase": "train", "step": 3, "global_step": 3},
              {"event": "trained", "group": "ffn_up", "global_step": 5}, {"event": "group_done", "group": "ffn_up", "global_step": 5}]
    ev, out, advanced = _run("cpu", events, [10.0, 14.0, 30.0, 33.0])
    assert ev.timings == [{"group": "ffn_up", "quantize_s": None, "train_s": 16.0, "checkpoint_s": 3.0}]
    assert advanced == [3] and out.lines[1].endswith("3 steps done (4 s)")


def test_on_cuda_each_phase_has_its_peak_plan_retries_and_seconds(monkeypatch):
    peaks, retries = iter([7 << 30, 9 << 30, 6 << 30, 8 << 30]), iter([0, 2, 2, 5])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev=None: next(peaks))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda dev=None: {"num_alloc_retries": next(retries)})
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda dev=None: None)
    plan = [SimpleNamespace(group="ffn_up", phase="train", peak=10 << 30)]
    ev, out, _ = _run("cuda:0", GROUPS, [40.0, 52.5, 70.0, 71.0, 80.0, 95.0, 95.5], plan)
    assert [(m["group"], m["phase"], m["peak_bytes"] >> 30, m["plan_bytes"], m["alloc_retries"], m["seconds"])
            for m in ev.measured] == [("ffn_up", "hessian", 7, None, 0, 12.5), ("ffn_up", "train", 9, 10 << 30, 2, 17.5),
                                      ("ffn_down", "hessian", 6, None, 0, 9.0), ("ffn_down", "train", 8, None, 3, 15.0)]
    assert "memory: ffn_up train peak 9.00 GiB (plan 10.00 GiB), 2 allocator retries" in out.lines
