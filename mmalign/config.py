"""Typed run configurations: nested dataclasses loaded from YAML, dicts or dataclasses, with dotted overrides.

A configuration class is an ordinary ``@dataclass`` whose fields carry their help text in
``field(metadata={"help": "..."})``. Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Path``,
``Literal[...]``, ``Optional[X]`` / ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and
nested dataclasses. A class may validate cross-field constraints in ``__post_init__`` by raising ``ValueError``;
the message is re-raised as :class:`ConfigError` with the file and key path prepended.

Typical use::

    cfg = load_config(TextTrainConfig, "run.yaml", overrides=["training.learning_rate=1e-5"])
    save_config(cfg, out_dir / "config.yaml")

and in a CLI::

    parser = argparse.ArgumentParser(epilog=config_help(TextTrainConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)          # --config FILE, --set KEY=VALUE (repeatable)
    cfg = config_from_args(TextTrainConfig, parser.parse_args())
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "load_config",
    "from_dict",
    "to_dict",
    "save_config",
    "apply_overrides",
    "parse_override",
    "config_help",
    "add_config_arguments",
    "config_from_args",
]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type/range. The message names the source
    (file or ``<dict>``), the dotted key path, the bad value and what is allowed."""


# --------------------------------------------------------------------------------------------- helpers
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_hints(cls: type) -> dict[str, Any]:
    # Resolves string annotations (from __future__ import annotations) against the class's module.
    return typing.get_type_hints(cls)


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe_type(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in args else "")
    if origin in (list, Sequence):
        return f"a list of {_describe_type(args[0]) if args else 'values'}"
    if origin is tuple:
        inner = _describe_type(args[0]) if args else "values"
        return f"a list of {inner}"
    if origin in (dict, Mapping):
        return f"a mapping of {_describe_type(args[1]) if len(args) == 2 else 'values'}"
    if _is_dataclass_type(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    if tp is Path:
        return "a path"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _where(source: str, path: str) -> str:
    return f"{source}: {path}" if path else source


_YAML_FALSE_WORDS = ("no", "off", "false")
_YAML_TRUE_WORDS = ("yes", "on", "true")


def _convert(value: Any, tp: Any, *, path: str, source: str) -> Any:
    """Checks/coerces ``value`` against the annotation ``tp``; raises ConfigError naming ``path``."""

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(
            f"{_where(source, path)}: invalid value {value!r}; expected {_describe_type(tp)}{extra}"
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
    if _is_dataclass_type(tp):
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


# --------------------------------------------------------------------------------------------- loading
def _dataclass_in(tp: Any) -> Optional[type]:
    """The dataclass type of an annotation ``X`` or ``Optional[X]``; None otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = non_none[0] if len(non_none) == 1 else None
    return tp if _is_dataclass_type(tp) else None


def _overlay(cls: type, base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base`` (plain dicts of ``cls``), recursing into dataclass-typed sections only; dict-typed
    fields are replaced whole."""
    hints = _type_hints(cls)
    out = dict(base)
    for key, value in update.items():
        section = _dataclass_in(hints.get(key))
        if section is not None and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            out[key] = _overlay(section, base[key], value)
        else:
            out[key] = value
    return out


def _refuse_renamed_keys(cls: type, keys: Any, path: str, source: str) -> None:
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
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if isinstance(data, cls):
        data = to_dict(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, _path) or source}: expected a mapping, got {data!r}")
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _refuse_renamed_keys(cls, data, _path, source)
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
            section = _dataclass_in(hints[name])
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
                f"{_where(source, key)}: required key is missing; expected {_describe_type(hints[name])}"
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


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} when empty); a ConfigError naming the file otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.learning_rate=1e-5"`` -> ``("training.learning_rate", 1e-5)``; the value is read as YAML,
    so lists (``[q_proj,v_proj]``), null, true/false and numbers work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted KEY, e.g. training.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(
    cls: type, data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any], *, source: str = "override"
) -> dict[str, Any]:
    """Returns a copy of ``data`` with dotted overrides applied. Keys are checked against ``cls`` so a typo
    fails with the list of allowed keys. Dict-typed fields accept new keys (``objective.hyperparameters.beta=0.5``)."""
    import copy

    result = copy.deepcopy(dict(data))
    items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(o) for o in overrides]
    for key, value in items:
        parts = key.split(".")
        node: dict[str, Any] = result
        node_cls: Any = cls
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            prefix = ".".join(parts[:depth])
            if _is_dataclass_type(node_cls):
                _refuse_renamed_keys(node_cls, [part], prefix, source)
                names = [f.name for f in dataclasses.fields(node_cls)]
                flat = getattr(node_cls, "FLAT_FIELD", None)
                if flat is not None and part not in names:  # a hyperparameter, written flat
                    if last:
                        node[part] = value
                        break
                    raise ConfigError(f"{source} {key}={value!r}: {'.'.join(parts[:depth + 1])} is not a section")
                if part not in names:
                    raise ConfigError(
                        f"{source} {key}={value!r}: unknown key {'.'.join(parts[:depth + 1])!r}; allowed keys"
                        f"{' under ' + prefix if prefix else ''}: {', '.join(names)}"
                    )
                field_type = _type_hints(node_cls)[part]
            else:
                field_type = Any
            if last:
                node[part] = value
                break
            # Unwrap Optional[Dataclass] so overrides reach nested sections that default to None.
            inner = field_type
            if typing.get_origin(inner) in (Union, types.UnionType):
                non_none = [a for a in typing.get_args(inner) if a is not type(None)]
                inner = non_none[0] if len(non_none) == 1 else Any
            child = node.get(part)
            if child is None:
                child = {}
            elif dataclasses.is_dataclass(child) and not isinstance(child, type):
                child = to_dict(child)
            elif not isinstance(child, dict):
                raise ConfigError(f"{source} {key}={value!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node[part] = child
            node = child
            if _is_dataclass_type(inner):
                node_cls = inner
            elif typing.get_origin(inner) in (dict, Mapping):
                args = typing.get_args(inner)
                node_cls = args[1] if len(args) == 2 else Any
            else:
                node_cls = Any
    return result


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | T | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> T:
    """Loads ``cls`` from a YAML file path, a mapping, an instance (re-validated) or ``None`` (all defaults),
    then applies dotted ``overrides`` (``["training.learning_rate=1e-5"]`` or ``{"training.seed": 3}``)."""
    if source is None:
        data, name = {}, "<defaults>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        data, name = read_yaml_mapping(path), str(path)
    elif isinstance(source, Mapping):
        data, name = dict(source), "<dict>"
    elif isinstance(source, cls):
        data, name = to_dict(source), f"<{cls.__name__}>"
    else:
        raise ConfigError(f"cannot load {cls.__name__} from {type(source).__name__}; give a YAML path, a dict or a {cls.__name__}")
    if overrides:
        data = apply_overrides(cls, data, overrides)
        name = f"{name} (with overrides)"
    return from_dict(cls, data, source=name)


# --------------------------------------------------------------------------------------------- saving
def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe structure of a (nested) dataclass instance: Paths become strings, tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        flat = getattr(obj, "FLAT_FIELD", None)
        if flat is not None:  # written back flat, as it is read
            out.update(out.pop(flat) or {})
        return out
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_config(obj: Any, path: str | os.PathLike) -> Path:
    """Writes the resolved config as YAML atomically (temp file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------------- CLI help
def _yaml_repr(value: Any) -> str:
    # Defaults as a YAML file would spell them (null, true/false), the rest as Python literals.
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _format_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml_repr(to_dict(f.default))
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return ""
        return _yaml_repr(to_dict(value))
    return "required"


def config_help(cls: type, *, width: int = 100) -> str:
    """Renders every field of ``cls`` (recursively) as ``dotted.key (type, default): help`` lines, for an
    argparse epilog so ``--help`` documents the whole config."""
    import textwrap

    lines = [f"configuration keys ({cls.__name__}); set in the YAML file or with --set KEY=VALUE:"]

    def walk(tp: type, prefix: str, indent: int) -> None:
        hints = _type_hints(tp)
        for f in dataclasses.fields(tp):
            if not f.init:
                continue
            key = f"{prefix}{f.name}"
            ftype = hints[f.name]
            inner = ftype
            if typing.get_origin(inner) in (Union, types.UnionType):
                non_none = [a for a in typing.get_args(inner) if a is not type(None)]
                inner = non_none[0] if len(non_none) == 1 else inner
            help_text = f.metadata.get("help", "")
            if f.metadata.get("code_hook"):
                from mmalign.code_hooks import CODE_HOOK_HELP

                help_text = CODE_HOOK_HELP + help_text
            pad = "  " * indent
            if f.name == getattr(tp, "FLAT_FIELD", None):
                lines.extend(textwrap.wrap(f"{pad}{prefix}<hyperparameter>: {help_text}", width,
                                           subsequent_indent=pad + "    "))
                continue
            if _is_dataclass_type(inner):
                header = f"{pad}{key}:"
                if help_text:
                    header += f" {help_text}"
                lines.extend(textwrap.wrap(header, width, subsequent_indent=pad + "    "))
                walk(inner, key + ".", indent + 1)
                continue
            default = _format_default(f)
            head = f"{pad}{key} ({_describe_type(ftype)}{', default ' + default if default and default != 'required' else ', required' if default == 'required' else ''})"
            text = f"{head}: {help_text}" if help_text else head
            lines.extend(textwrap.wrap(text, width, subsequent_indent=pad + "    "))

    walk(cls, "", 1)
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser, *, config_required: bool = False) -> argparse.ArgumentParser:
    """Adds ``--config FILE`` and repeatable ``--set KEY=VALUE`` to ``parser``."""
    parser.add_argument("--config", type=Path, required=config_required, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key by its dotted path, e.g. --set training.learning_rate=1e-5 (repeatable)",
    )
    return parser


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Builds the config from the ``--config`` / ``--set`` arguments added by :func:`add_config_arguments`."""
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", []) or [])
