"""`--gpu-memory` on a GPU larger than it holds torch's allocator to it (repq.runtime.cap_gpu_memory):
the fraction of the device's memory, set on that device; nothing on CPU or when the budget is not
smaller than the GPU.  torch.cuda is stubbed: the machine running the tests has no GPU."""

from __future__ import annotations

import types

import torch

from repq import runtime


def _stub(monkeypatch, total: int, current: int = 0) -> list:
    calls = []

    def set_fraction(f, dev):   # as torch's: a device without an index is refused
        if torch.device(dev).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        calls.append((f, dev))

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
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


def test_device_without_an_index_is_the_current_gpu(monkeypatch):
    """`--device cuda` (no index; a one-GPU run outside torchrun) caps the current device: this raised
    an internal error on the H200 (torch's setter needs an index)."""
    calls = _stub(monkeypatch, 150_000_000_000, current=2)
    assert runtime.cap_gpu_memory("cuda", 80_000_000_000) == 80 / 150
    assert calls == [(80 / 150, torch.device("cuda:2"))]


def test_json_gpu_peak_is_the_whole_commands(monkeypatch):
    """`gpu_peak_bytes` of a --json result is the command's largest allocation: repq distill resets
    torch's peak after each phase (its `gpu_memory` list), so its phases' peaks count too (the H200
    run's JSON said 27 GiB for a run whose training phase peaked at 69.6 GiB)."""
    from repq.commands.common import meta

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 5)
    assert meta()["gpu_peak_bytes"] == 5
    assert meta([9, 3])["gpu_peak_bytes"] == 9
    assert meta([2])["gpu_peak_bytes"] == 5
