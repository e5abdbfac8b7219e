"""Federated early-exit methods behind one interface; ``build_method`` picks one by name."""

from reefl.config import RunConfig
from reefl.methods.base import ClientUpdate, Method, TaskSpec
from reefl.methods.reefl import ReeFL

METHOD_CLASSES: dict[str, type[Method]] = {"reefl": ReeFL}


def build_method(cfg: RunConfig, task: TaskSpec) -> Method:
    """The method named by ``cfg.method`` (validated by the config)."""
    return METHOD_CLASSES[cfg.method](cfg, task)


__all__ = ["ClientUpdate", "Method", "TaskSpec", "build_method", "METHOD_CLASSES"]
