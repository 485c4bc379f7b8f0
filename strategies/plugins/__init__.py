"""Strategy plugins, registered by name and configured as `[[plugins]]` tables."""

from fedtune.config.registry import register_config_check
from strategies.plugins import el2n as _el2n  # noqa: F401  (registers itself)
from strategies.plugins import expansion as _expansion  # noqa: F401
from strategies.plugins.base import (
    Plugin,
    available_plugins,
    build_plugins,
    register_plugin,
    validate_plugins,
)

# Config validation checks plugin names and params once the app layer is loaded; the
# library's config module never imports this package.
register_config_check(validate_plugins)

__all__ = ["Plugin", "available_plugins", "build_plugins", "register_plugin",
           "validate_plugins"]
