"""A model streamed block by block from its GGUF: only the block in use is on the device.

:class:`BlockStream` keeps the token embedding, the final norm and the output head on the device
and leaves every block's parameters on the meta device; :meth:`BlockStream.block` materialises one
block (from the memory-mapped file, or from values the caller gives for some of its tensors, e.g.
their quantized values) for the duration of a ``with``, then returns them to the meta device.  The
modules themselves stay in place, so hooks registered on them keep working.

Memory: the resident tensors plus one block (a 70B Llama-3 in bf16: 2.1 GB embedding, 2.1 GB head
and 1.7 GB per block), where the whole model would be 140 GB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputFileError, UsageError
from ..runtime import return_freed_memory
from .loader import load_config, set_tensor
from .tensors import gguf_tensor
from .transformer import Block, Transformer


class BlockStream:
    """The model of a GGUF with its blocks left in the file until used; see the module docstring.

    Raises:
        UsageError: ``path`` is a Hugging Face directory (convert it to GGUF first).
        InputFileError: a missing or mis-shaped tensor.
    """

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        from ..io.gguf_file import GGUFModel

        self.path = Path(path)
        self.config, gguf_path = load_config(self.path)
        if gguf_path is None:
            raise UsageError(f"{self.path}: block streaming reads a GGUF file; convert the directory first")
        self.device, self.dtype = torch.device(device), dtype
        with torch.device("meta"):
            self.model = Transformer(self.config)
        self._shapes = self.config.tensor_shapes()
        self._g = GGUFModel(self.path)
        missing = sorted(set(self._shapes) - set(self._g.tensors))
        if missing:
            self._g.close()
            raise InputFileError(f"{self.path}: missing tensors {', '.join(missing[:4])}")
        for name in self._shapes:
            if not name.startswith("blk."):
                set_tensor(self.model, name, gguf_tensor(self._g, name, dtype), self._shapes[name], self.device,
                           dtype, self.path)
                self._g.drop_pages(name)
        if self.config.tied:
            self.model.output.weight = self.model.token_embd.weight
        self.model.eval().requires_grad_(False)

    def block_names(self, i: int) -> list[str]:
        return [n for n in self._shapes if n.startswith(f"blk.{i}.")]

    @contextmanager
    def block(self, i: int, values: dict[str, np.ndarray] | None = None) -> Iterator[Block]:
        """Block ``i`` on the device, its tensors from ``values`` (float32 arrays, any shape of the
        right size) where given, else from the file."""
        names = self.block_names(i)
        values = values or {}
        try:
            for n in names:
                if n in values:
                    t = torch.from_numpy(np.asarray(values[n], np.float32)).reshape(self._shapes[n])
                else:
                    t = gguf_tensor(self._g, n, self.dtype)
                    self._g.drop_pages(n)   # copied: the mapped pages need not stay resident
                set_tensor(self.model, n, t, self._shapes[n], self.device, self.dtype, self.path)
            yield self.model.blk[i]
        finally:
            for n in names:
                mod_name, _, attr = n.rpartition(".")
                setattr(self.model.get_submodule(mod_name), attr,
                        nn.Parameter(torch.empty(self._shapes[n], device="meta"), requires_grad=False))
            return_freed_memory()   # the block's host copies, back to the system before the next block

    def close(self) -> None:
        self._g.close()
