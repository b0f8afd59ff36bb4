"""JSONL records of documents and conversations: ``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputFileError
from ..io.atomic import atomic_output
from .tokenizer import read_utf8


def check_messages(msgs, where: str) -> list[dict]:
    """``msgs`` if it is a non-empty list of {"role": str, "content": str}.

    Raises:
        InputFileError: it is not (``where`` names the file and line).
    """
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
        raise InputFileError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
    return msgs


def json_objects(path: str | os.PathLike, not_object: str = "a record must be a JSON object"):
    """(``file:line``, object) for each non-blank line of a UTF-8 JSONL file.

    Raises:
        InputFileError: not UTF-8, a line that is not JSON or not an object (``not_object``).
    """
    for i, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputFileError(f"{where}: {not_object}")
        yield where, rec


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, each with a ``text`` string or a ``messages`` list.

    Raises:
        InputFileError: not UTF-8, a line is not JSON, or has neither field.
    """
    out = []
    for where, rec in json_objects(path, "expected an object with 'text' or 'messages'"):
        if isinstance(rec.get("text"), str):
            out.append({"text": rec["text"]})
        elif "messages" in rec:
            out.append({"messages": check_messages(rec["messages"], where)})
        else:
            raise InputFileError(f"{where}: expected a 'text' string or a 'messages' list")
    return out

def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records as JSONL atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
