"""The config's command-line side: ``--config`` / ``--set`` arguments and the ``--help`` listing of every key."""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from mmalign.config.fieldtypes import describe_type, is_dataclass_type, type_hints
from mmalign.config.loading import load_config
from mmalign.config.saving import to_dict

T = TypeVar("T")


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
        hints = type_hints(tp)
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
            if is_dataclass_type(inner):
                header = f"{pad}{key}:"
                if help_text:
                    header += f" {help_text}"
                lines.extend(textwrap.wrap(header, width, subsequent_indent=pad + "    "))
                walk(inner, key + ".", indent + 1)
                continue
            default = _format_default(f)
            head = f"{pad}{key} ({describe_type(ftype)}{', default ' + default if default and default != 'required' else ', required' if default == 'required' else ''})"
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
