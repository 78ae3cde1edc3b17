"""Config values that import code (``'package.module:callable'``): checked against an allow-list, logged on import.

A config is data, yet ``model.text_conditioner`` (image) and the evaluation ``judge`` (text) name a callable to
import and run. They stay, as *code hooks*: ``--help`` marks them, every import is logged with the file it came
from, and a module outside :data:`ALLOWED_MODULES` is refused unless the config sets ``allow_code_hooks: true``
(the same explicit opt-in as ``trust_remote_code``).
"""
from __future__ import annotations

import importlib
import logging
import re
from typing import Any, Callable

__all__ = ["ALLOWED_MODULES", "CODE_HOOK_HELP", "check_code_hook", "import_code_hook"]

logger = logging.getLogger("mmalign.code_hooks")

# modules shipped with mmalign; anything else is the user's own code and needs allow_code_hooks: true
ALLOWED_MODULES = ("mmalign", "mmalign_experiments")

CODE_HOOK_HELP = ("[CODE HOOK: imports and runs the named Python callable; modules outside "
                  f"{', '.join(m + '.*' for m in ALLOWED_MODULES)} need allow_code_hooks: true] ")

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_code_hook(spec: str, *, key: str, allow: bool, allow_key: str = "allow_code_hooks") -> tuple[str, str]:
    """(module, attribute) of ``spec``; a ValueError naming ``key`` for a malformed spec or, unless ``allow``, a
    module outside the allow-list. Imports nothing."""
    if not _SPEC.match(spec or ""):
        raise ValueError(f"{key}: invalid value {spec!r}; expected a code hook 'package.module:callable'")
    module, _, attr = spec.partition(":")
    if not allow and module.split(".")[0] not in ALLOWED_MODULES:
        raise ValueError(f"{key}: {spec!r} would import and run code from module {module!r}, outside the allowed "
                         f"{', '.join(ALLOWED_MODULES)}; set {allow_key}: true if you trust it")
    return module, attr


def import_code_hook(spec: str, *, key: str, allow: bool, allow_key: str = "allow_code_hooks") -> Callable[..., Any]:
    """Imports the callable named by ``spec`` after :func:`check_code_hook`; logs what was imported from where."""
    module_name, attr = check_code_hook(spec, key=key, allow=allow, allow_key=allow_key)
    try:
        module = importlib.import_module(module_name)
        target: Any = module
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{key} {spec!r}: cannot import it ({error})") from error
    logger.warning("code hook %s = %r: imported %s from %s", key, spec, attr, getattr(module, "__file__", "?"))
    if not callable(target):
        raise ValueError(f"{key} {spec!r} is not callable")
    return target
