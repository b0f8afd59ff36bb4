"""`--gpu-memory` on a GPU larger than it holds torch's allocator to it (repq.runtime.cap_gpu_memory):
the fraction of the device's memory, set on that device; nothing on CPU or when the budget is not
smaller than the GPU.  torch.cuda is stubbed: the machine running the tests has no GPU."""

from __future__ import annotations

import types

import torch

from repq import runtime


def _stub(monkeypatch, total: int) -> list:
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, dev: calls.append((f, dev)))
    return calls


def test_budget_below_the_gpu_sets_that_fraction(monkeypatch):
    calls = _stub(monkeypatch, 150_000_000_000)
    assert runtime.cap_gpu_memory("cuda:1", 80_000_000_000) == 80 / 150
    assert calls == [(80 / 150, torch.device("cuda:1"))]


def test_no_cap_on_cpu_or_for_a_budget_the_gpu_does_not_exceed(monkeypatch):
    calls = _stub(monkeypatch, 80_000_000_000)
    assert runtime.cap_gpu_memory("cpu", 10) is None
    assert runtime.cap_gpu_memory("cuda", 80_000_000_000) is None
    assert runtime.cap_gpu_memory("cuda", 90_000_000_000) is None
    assert calls == []
