"""Federated early-exit methods behind one interface (``base.Method``), one file each.

Every module of this package is imported here, so a new method is one new file: its
``Method`` subclass registers itself by name when the module is imported. ``build_method``
builds the method a run config names (a registered name, or ``"module:Class"`` for a method
outside the package).
"""

import importlib
import pkgutil

from reefl.config import RunConfig, registered_methods
from reefl.methods.base import ClientUpdate, Method, TaskSpec, TierModels

_FRAMEWORK_MODULES = {"aggregate", "base", "losses", "privacy"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _FRAMEWORK_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")


def build_method(cfg: RunConfig, task: TaskSpec) -> Method:
    """The method named by ``cfg.method`` (validated by the config)."""
    return cfg.method_class(cfg, task)


def method_names() -> list[str]:
    """The registered methods' names, sorted."""
    return sorted(registered_methods())


__all__ = ["ClientUpdate", "Method", "TaskSpec", "TierModels", "build_method", "method_names"]
