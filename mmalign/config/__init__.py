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

from mmalign.config.arguments import add_config_arguments, config_from_args, config_help
from mmalign.config.building import from_dict
from mmalign.config.errors import ConfigError
from mmalign.config.loading import apply_overrides, load_config, parse_override, read_yaml_mapping
from mmalign.config.saving import save_config, to_dict

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
    "read_yaml_mapping",
]
