"""Bytes of tensors alive, counted op by op (CPU): what the memory plans are checked against.

:class:`LiveBytes` is a dispatch mode that sees every tensor an op creates; a storage first seen as
the fresh output of an op (not a view or an in-place result) is counted until the last tensor on it
is freed (torch keeps a tensor's Python object alive while autograd still holds it, so its weakref
fires when the storage's last user is gone).  Storages made before the mode are not counted.
Peaks are kept per phase: ``forward`` (before any backward op), ``backward`` (inside autograd's
backward) and ``after`` (after backward: the optimizer step).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.size: dict[int, int] = {}
        self.live = 0
        self.phase = "forward"
        self.peaks = {"forward": 0, "backward": 0, "after": 0}

    def _drop(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._current_autograd_node() is not None:
            self.phase = "backward"
        elif self.phase == "backward":
            self.phase = "after"
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in self.refs:
                if any(r.alias_info is not None for r in func._schema.returns) or st.nbytes() == 0:
                    continue   # a view or an in-place result of a storage made elsewhere
                self.refs[key], self.size[key] = 0, st.nbytes()
                self.live += st.nbytes()
            self.refs[key] += 1
            weakref.finalize(t, self._drop, key)
        self.peaks[self.phase] = max(self.peaks[self.phase], self.live)
        return out

    @property
    def peak(self) -> int:
        return max(self.peaks.values())
