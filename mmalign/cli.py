"""The one command-line implementation every ``python -m mmalign...`` command uses: ``--config FILE``,
repeatable ``--set KEY=VALUE``, ``--print-config``, ``--resume [CHECKPOINT]`` (for configs with
``training.resume_from_checkpoint``) and ``--help`` (which names the command and lists every config key).

    def main(argv=None):
        return run_command(prog="python -m mmalign.text.sft", description="...", config_cls=SFTConfig,
                           run=lambda cfg, args: report(train(cfg)), argv=argv)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from mmalign.config import ConfigError, config_help, load_config, to_dict

__all__ = ["build_parser", "load_from_args", "run_command", "supports_resume"]

T = TypeVar("T")


def supports_resume(config_cls: type) -> bool:
    """Whether the config has ``training.resume_from_checkpoint`` (the key ``--resume`` sets)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    training = fields.get("training")
    if training is None:
        return False
    section = training.type if isinstance(training.type, type) else None
    if section is None:  # postponed annotations: look at the default instance
        factory = training.default_factory
        section = type(factory()) if factory is not dataclasses.MISSING else None
    return section is not None and any(f.name == "resume_from_checkpoint" for f in dataclasses.fields(section))


def build_parser(prog: str, description: str, config_cls: type, *, config_required: bool = False,
                 default_config: Optional[Path] = None) -> argparse.ArgumentParser:
    epilog = config_help(config_cls)
    if default_config is not None:
        epilog = f"Without --config: {default_config}\n\n{epilog}"
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=config_required, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key by its dotted path, e.g. --set training.learning_rate=1e-5 "
                             "(repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    if supports_resume(config_cls):
        parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                            help="resume from a checkpoint folder, or from the latest one in output_dir when no "
                                 "value (= --set training.resume_from_checkpoint=...)")
    return parser


def load_from_args(parser: argparse.ArgumentParser, config_cls: type[T], args: argparse.Namespace, *,
                   default_config: Optional[Path] = None) -> T:
    """The config from ``--config`` (or ``default_config``), ``--set`` and ``--resume``; a bad config exits with the
    parser's usage and the error, before anything runs."""
    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"training.resume_from_checkpoint={args.resume}")
    source = args.config if args.config is not None else default_config
    try:
        return load_config(config_cls, source, overrides)
    except ConfigError as err:
        parser.error(str(err))
        raise  # parser.error exits; this line keeps type checkers content


def run_command(*, prog: str, description: str, config_cls: type[T], run: Callable[[T, argparse.Namespace], Any],
                argv: Optional[Sequence[str]] = None, config_required: bool = False,
                default_config: Optional[Path] = None,
                add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> Any:
    """Parses ``argv``, loads and validates the config, prints it (``--print-config``, returns 0) or calls
    ``run(config, args)`` and returns what it returns (0 for None): an exit status, or a report for in-process
    callers."""
    import yaml

    parser = build_parser(prog, description, config_cls, config_required=config_required,
                          default_config=default_config)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    config = load_from_args(parser, config_cls, args, default_config=default_config)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(config, args)
    return 0 if result is None else result
