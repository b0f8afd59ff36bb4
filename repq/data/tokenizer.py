"""llama.cpp's tokenizer, and the text llama.cpp's tools read from a file: one rule for every command.

Everything repq tokenizes goes through :func:`tokenize_bytes`, ``common_tokenize`` on a loaded
vocabulary: calibration data through :class:`Tokenizer` (the vocabulary alone, no weights), and
evaluation on the vocabulary of the model it has loaded anyway.  Files are read as llama.cpp's
``-f FILE`` reads them (:func:`read_text_file`), so the same file gives the same tokens in
``repq imatrix`` / ``repq hessian`` / ``repq distill`` as in llama-imatrix, and in ``repq ppl`` as
in llama-perplexity.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import InputFileError, OperationError


def read_text_file(path: str | os.PathLike) -> bytes:
    """A text file's bytes as llama.cpp's ``-f FILE`` hands them to the tokenizer.

    ``read_file`` in common/arg.cpp reads the bytes unchanged (no newline translation: a CRLF
    file keeps its ``\\r``), and ``-f`` then drops one trailing ``\\n``.  The bytes must be UTF-8:
    llama.cpp would tokenize anything (a binary file gives a perplexity too), repq refuses it.  The
    caller checks that the file exists and what an empty text means for it.

    Raises:
        InputFileError: the file is not UTF-8 text.
    """
    data = Path(path).read_bytes()
    check_utf8(data, path)
    return data[:-1] if data.endswith(b"\n") else data


def check_utf8(data: bytes, path: str | os.PathLike) -> str:
    """``data`` decoded as UTF-8, or an InputFileError naming the file and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                             hint="pass a text file (UTF-8)") from None


def read_utf8(path: str | os.PathLike) -> str:
    """A text file's contents as a string (JSONL, prompt lists).

    Raises:
        InputFileError: the file is not UTF-8 text.
    """
    return check_utf8(Path(path).read_bytes(), path)


def tokenize_bytes(lc: ModuleType, vocab, raw: bytes, *, add_special: bool = True,
                   parse_special: bool = False) -> np.ndarray:
    """``common_tokenize(vocab, text, add_special, parse_special)``: int32 token ids of ``raw``.

    Args:
        lc: llama-cpp-python's bindings (:func:`repq.llama.llama_cpp`).
        vocab: ``llama_model_get_vocab`` of a loaded model.
        raw: UTF-8 text.
        add_special: BOS (and EOS) where the vocabulary adds them.
        parse_special: special-token text (``<|im_start|>``) becomes one token.

    Raises:
        OperationError: llama_tokenize fails on a buffer of the size it asked for.
    """
    n_max = len(raw) + 2 * int(add_special)
    for _ in range(2):
        buf = np.empty(max(n_max, 1), dtype=np.int32)
        n = lc.llama_tokenize(vocab, raw, len(raw), buf.ctypes.data_as(ctypes.POINTER(lc.llama_token)),
                              n_max, add_special, parse_special)
        if n >= 0:
            return buf[:n].copy()
        n_max = -n
    raise OperationError("llama_tokenize failed")  # pragma: no cover


class Tokenizer:
    """The vocabulary of a GGUF, loaded vocab-only into libllama (no weights)."""

    def __init__(self, gguf_path: str | os.PathLike):
        from ..io.gguf_file import GGUFModel
        from ..llama import capture_llama_log, last_llama_log, llama_cpp

        self.path = Path(gguf_path)
        with GGUFModel(self.path) as g:  # also validates the file before libllama sees it
            self.chat_template: str | None = g.get("tokenizer.chat_template")
            if g.get("tokenizer.ggml.model") is None:
                raise InputFileError(f"{self.path}: no tokenizer in this GGUF (tokenizer.ggml.model missing)")
        self._lc = lc = llama_cpp()
        # Through the high-level class: building llama_model_params by hand from
        # llama_model_default_params() segfaults with the CUDA build (seen on an H100).  llama.cpp's
        # log (its context warns that a vocab-only model has no training context) is captured.
        import jinja2

        try:
            with capture_llama_log():
                self._llm = lc.Llama(model_path=str(self.path), vocab_only=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise InputFileError(f"{self.path}: llama.cpp could not load this model's vocabulary "
                                 f"({e}; {last_llama_log()})") from None
        except jinja2.exceptions.TemplateError as e:   # llama-cpp-python compiles the chat templates
            raise InputFileError(f"{self.path}: its chat template (tokenizer.chat_template) is not valid "
                                 f"jinja: {e}", hint="fix or remove the template in the GGUF's metadata") from None
        self._vocab = lc.llama_model_get_vocab(self._llm.model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(lc.llama_vocab_bos(self._vocab))
        self.eos = int(lc.llama_vocab_eos(self._vocab))

    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        """``common_tokenize``: int32 token ids of ``text`` (a string, or its UTF-8 bytes)."""
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return tokenize_bytes(self._lc, self._vocab, raw, add_special=add_special, parse_special=parse_special)

    def token_text(self, token: int) -> str:
        t = self._lc.llama_vocab_get_text(self._vocab, token)
        return t.decode("utf-8", errors="replace") if t else ""

    def close(self) -> None:
        if getattr(self, "_llm", None) is not None:
            self._llm.close()  # frees the model once (llama-cpp-python owns it)
            self._llm = None
            self._vocab = None

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
