"""Parameter conversion without pydantic for typer's common cases (start-up time only).

Typer ≥ 0.2x converts every command-line value, defaults included, through a pydantic TypeAdapter
built per parameter; importing pydantic and building ~15 adapters costs 60–80 ms of every `repq`
run, more than the quantization of a small tensor set.  `install()` wraps typer's
`build_runtime_param` so that the plainest parameters convert directly:

- `str` from a `str`, `bool` from a `bool`;
- `int` / `float` (with typer's min/max, no clamp) from a value of that type or a plain decimal
  string (`-12`, `0.01`, `1e-3`: what `int()` / `float()` and pydantic read alike);
- `pathlib.Path` (no path checks beyond typer's, no file types) through typer's own
  `coerce_cli_path`, handed a `Path` so that it needs no pydantic either;
- lists of those (multiple options, variadic arguments).

Anything else — another type, a parser, choices, a bool that is not already a bool, a value outside
the simple forms or the min/max, or any error — goes to typer's own conversion, which builds the
pydantic adapter and produces exactly typer's value or error message.  So results and messages are
unchanged; tests/unit/test_cli_startup.py checks the equivalence against typer's conversion.

If typer's internals are not the expected ones (another typer version), `install()` does nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INT = re.compile(r"-?[0-9]{1,18}")
_FLOAT = re.compile(r"-?[0-9]{1,30}(\.[0-9]{0,30})?([eE][-+]?[0-9]{1,3})?")


class _Slow(Exception):
    """The fast conversion does not apply to this value: use typer's."""


def _str(value: Any, param: Any, ctx: Any, info: Any) -> Any:
    if type(value) is str:
        return value
    raise _Slow


def _bool(value: Any, param: Any, ctx: Any, info: Any) -> Any:
    if type(value) is bool:
        return value
    raise _Slow


def _number(kind: type, value: Any, info: Any) -> Any:
    if type(value) is kind:
        v = value
    elif type(value) is str and (_INT if kind is int else _FLOAT).fullmatch(value):
        v = kind(value)
    else:
        raise _Slow
    if v != v or (info.min is not None and v < info.min) or (info.max is not None and v > info.max):
        raise _Slow  # NaN or out of range: typer's message
    return v


def _int(value: Any, param: Any, ctx: Any, info: Any) -> Any:
    return _number(int, value, info)


def _float(value: Any, param: Any, ctx: Any, info: Any) -> Any:
    return _number(float, value, info)


def _path(value: Any, param: Any, ctx: Any, info: Any) -> Any:
    from typer._param_types import coerce_cli_path

    if type(value) is str:
        value = Path(value)  # what pydantic's Path validation returns for a str
    elif not isinstance(value, Path):
        raise _Slow
    return coerce_cli_path(value, info, path_type=Path, param=param, ctx=ctx)


_LEAF = {str: _str, bool: _bool, int: _int, float: _float}


def _leaf(annotation: Any, info: Any):
    """The fast converter for a non-list annotation, or None."""
    if info.parser is not None or getattr(info, "clamp", False):
        return None
    if annotation in _LEAF:
        return _LEAF[annotation]
    if annotation is Path and info.path_type in (None, Path):
        return _path
    return None


def _fast_converter(descriptor: Any):
    from typer._param_types import choice_coercion_annotation, file_coercion_annotation

    annotation, info = descriptor.annotation, descriptor.parameter_info
    if descriptor.file_annotation is not None or file_coercion_annotation(annotation) is not None:
        return None
    origin = getattr(annotation, "__origin__", None)
    if origin is list:
        args = getattr(annotation, "__args__", ())
        if len(args) != 1 or choice_coercion_annotation(args[0], info) is not None:
            return None
        item = _leaf(args[0], info)
        if item is None:
            return None

        def convert_list(value: Any, param: Any, ctx: Any, info: Any) -> Any:
            if not isinstance(value, (list, tuple)):
                raise _Slow
            return [item(v, param, ctx, info) for v in value]

        return convert_list
    if origin is not None or choice_coercion_annotation(annotation, info) is not None:
        return None
    return _leaf(annotation, info)


def install() -> bool:
    """Route typer's parameter conversion through the fast path where it applies; True if installed."""
    try:  # the typer internals used here and in the converters
        import typer.core as core
        from typer._coercion import RuntimeParam
        from typer._param_types import (  # noqa: F401
            choice_coercion_annotation,
            coerce_cli_path,
            file_coercion_annotation,
        )
    except ImportError:
        return False
    original = getattr(core, "build_runtime_param", None)
    if original is None or getattr(original, "_repq_fast", False):
        return getattr(original, "_repq_fast", False)

    @dataclass(frozen=True)
    class FastRuntimeParam(RuntimeParam):
        descriptor: Any = None
        convert: Any = None

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            try:
                return self.convert(value, param, ctx, self.parameter_info)
            except Exception:  # _Slow, or anything typer reports in its own words
                pass
            return original(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    def build_runtime_param(descriptor: Any) -> Any:
        try:
            convert = _fast_converter(descriptor)
        except Exception:
            convert = None
        if convert is None:
            return original(descriptor)
        return FastRuntimeParam(parameter_info=descriptor.parameter_info, annotation=descriptor.annotation,
                                descriptor=descriptor, convert=convert)

    build_runtime_param._repq_fast = True  # type: ignore[attr-defined]
    build_runtime_param.original = original  # type: ignore[attr-defined]
    core.build_runtime_param = build_runtime_param
    return True
