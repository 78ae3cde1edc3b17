"""Building a config dataclass from a (nested) mapping: type checks and coercion, renamed and flat keys, NaN/inf."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

from mmalign.config.errors import ConfigError
from mmalign.config.fieldtypes import dataclass_in, describe_type, is_dataclass_type, type_hints
from mmalign.config.saving import to_dict

T = TypeVar("T")


def _where(source: str, path: str) -> str:
    return f"{source}: {path}" if path else source


_YAML_FALSE_WORDS = ("no", "off", "false")
_YAML_TRUE_WORDS = ("yes", "on", "true")


def _convert(value: Any, tp: Any, *, path: str, source: str) -> Any:
    """Checks/coerces ``value`` against the annotation ``tp``; raises ConfigError naming ``path``."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(
            f"{_where(source, path)}: invalid value {value!r}; expected {describe_type(tp)}{extra}"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path=path, source=source)
            except ConfigError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads no/off/false (yes/on/true) as booleans: give back the one word this choice accepts,
            # so that `mixed_precision: no` means "no" as it does for accelerate.
            words = [w for w in (_YAML_TRUE_WORDS if value else _YAML_FALSE_WORDS) if w in args]
            if len(words) == 1:
                return words[0]
            raise fail(" (YAML reads yes/no/on/off/true/false as booleans; quote the value to keep it a word)")
        if value in args:
            return value
        raise fail()
    if is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise fail()
        return from_dict(tp, value, source=source, _path=path)
    if origin in (list, Sequence) or tp in (list,):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail()
        inner = args[0] if args else Any
        return [_convert(v, inner, path=f"{path}[{i}]", source=source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise fail()
        if args and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], path=f"{path}[{i}]", source=source) for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise fail(f" of length {len(args)}")
            return tuple(_convert(v, a, path=f"{path}[{i}]", source=source) for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail()
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(v, vt, path=f"{path}.{k}", source=source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise fail() from None
            if as_float.is_integer():
                return int(as_float)
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        # PyYAML reads "1e-5" (no dot) as a string; accept any numeric string for a float field.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise fail()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail()
    return value


def _overlay(cls: type, base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base`` (plain dicts of ``cls``), recursing into dataclass-typed sections only; dict-typed
    fields are replaced whole."""
    hints = type_hints(cls)
    out = dict(base)
    for key, value in update.items():
        section = dataclass_in(hints.get(key))
        if section is not None and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out[key] = _overlay(section, base[key], value)
        else:
            out[key] = value
    return out


def refuse_renamed_keys(cls: type, keys: Any, path: str, source: str) -> None:
    """An old spelling stops with the new one: ``cls.RENAMED_KEYS`` maps an old key to what replaces it."""
    renamed = getattr(cls, "RENAMED_KEYS", {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in keys:
        if key in renamed and key not in names:
            dotted = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{_where(source, dotted)}: no longer accepted; {renamed[key]}")


def _nest_flat_keys(cls: type, data: Mapping[str, Any], path: str, source: str) -> Mapping[str, Any]:
    """For a section whose ``FLAT_FIELD`` names a dict field (the objective's hyperparameters), every key that is
    not a field goes into that dict: ``{name: mdpo, beta: 0.1}`` -> ``{name: mdpo, hyperparameters: {beta: 0.1}}``."""
    flat = getattr(cls, "FLAT_FIELD", None)
    if flat is None:
        return data
    if flat in data:
        key = f"{path}.{flat}" if path else flat
        raise ConfigError(f"{_where(source, key)}: no longer accepted; write these keys directly under "
                          f"{path or 'the section'} (e.g. {path + '.' if path else ''}beta: 0.1)")
    names = {f.name for f in dataclasses.fields(cls)}
    nested = {k: v for k, v in data.items() if k in names}
    nested[flat] = {k: v for k, v in data.items() if k not in names}
    return nested


def from_dict(cls: type[T], data: Mapping[str, Any] | T | None, *, source: str = "<dict>", _path: str = "") -> T:
    """Builds ``cls`` from a (nested) mapping; unknown keys, missing required keys and bad values raise
    :class:`ConfigError` naming ``source`` and the dotted key path."""
    if not is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if isinstance(data, cls):
        data = to_dict(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, _path) or source}: expected a mapping, got {data!r}")
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    refuse_renamed_keys(cls, data, _path, source)
    data = _nest_flat_keys(cls, data, _path, source)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{_path}.{unknown[0]}" if _path else str(unknown[0])
        raise ConfigError(
            f"{_where(source, key)}: unknown key; allowed keys{' under ' + _path if _path else ''}: "
            + ", ".join(fields)
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{_path}.{name}" if _path else name
        if name in data:
            value = data[name]
            section = dataclass_in(hints[name])
            if section is not None and isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING:
                # A partial section keeps the values of the parent's default for that section (e.g. a training
                # section that only sets max_steps keeps the parent's learning rate, not the class default's).
                default = f.default_factory()
                if isinstance(default, section):
                    value = _overlay(section, to_dict(default), value)
            kwargs[name] = _convert(value, hints[name], path=key, source=source)
            if not f.metadata.get("allow_nonfinite"):
                _refuse_nonfinite(kwargs[name], key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text = f.metadata.get("help", "")
            raise ConfigError(
                f"{_where(source, key)}: required key is missing; expected {describe_type(hints[name])}"
                + (f" ({help_text})" if help_text else "")
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        message = str(err)
        # Messages of __post_init__ checks usually start with their own dotted key; don't repeat the section.
        if _path and not message.startswith((f"{_path}.", f"{_path}:")):
            message = f"{_path}: {message}"
        raise ConfigError(f"{source}: {message}") from None


def _refuse_nonfinite(value: Any, path: str, source: str) -> None:
    """NaN/inf anywhere in a value (numbers, lists, free-form mappings) is a ConfigError naming its key: no
    hyperparameter means anything at inf (``learning_rate: .inf`` trains to NaN weights). Nested dataclass
    sections are checked when they are built."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{_where(source, path)}: invalid value {value!r}: not finite (NaN/inf); expected a "
                          "finite number")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _refuse_nonfinite(v, f"{path}.{k}", source)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_nonfinite(v, f"{path}[{i}]", source)
