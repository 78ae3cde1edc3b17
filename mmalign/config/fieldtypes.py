"""Reading a config dataclass's field annotations: their types, their descriptions in messages, nested sections."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_hints(cls: type) -> dict[str, Any]:
    # Resolves string annotations (from __future__ import annotations) against the class's module.
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in args else "")
    if origin in (list, Sequence):
        return f"a list of {describe_type(args[0]) if args else 'values'}"
    if origin is tuple:
        inner = describe_type(args[0]) if args else "values"
        return f"a list of {inner}"
    if origin in (dict, Mapping):
        return f"a mapping of {describe_type(args[1]) if len(args) == 2 else 'values'}"
    if is_dataclass_type(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if tp is Path:
        return "a path"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def dataclass_in(tp: Any) -> Optional[type]:
    """The dataclass type of an annotation ``X`` or ``Optional[X]``; None otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = non_none[0] if len(non_none) == 1 else None
    return tp if is_dataclass_type(tp) else None
