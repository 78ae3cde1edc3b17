"""The one error of configuration loading."""
from __future__ import annotations

class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type/range. The message names the source
    (file or ``<dict>``), the dotted key path, the bad value and what is allowed."""
