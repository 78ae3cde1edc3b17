"""Loading a config from a YAML file, a mapping or an instance, with dotted ``--set`` overrides."""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union

import yaml

from mmalign.config.building import from_dict, refuse_renamed_keys
from mmalign.config.errors import ConfigError
from mmalign.config.fieldtypes import is_dataclass_type, type_hints
from mmalign.config.saving import to_dict

T = TypeVar("T")


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
            if is_dataclass_type(node_cls):
                refuse_renamed_keys(node_cls, [part], prefix, source)
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
                field_type = type_hints(node_cls)[part]
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
            if is_dataclass_type(inner):
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
