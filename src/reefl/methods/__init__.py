"""Federated early-exit methods behind one interface; ``build_method`` picks one by name."""

from reefl.config import RunConfig
from reefl.methods.base import ClientUpdate, Method, TaskSpec
from reefl.methods.depthfl import DepthFL
from reefl.methods.exclusivefl import ExclusiveFL
from reefl.methods.inclusivefl import InclusiveFL
from reefl.methods.reefl import ReeFL
from reefl.methods.scalefl import ScaleFL

METHOD_CLASSES: dict[str, type[Method]] = {
    "reefl": ReeFL, "scalefl": ScaleFL, "depthfl": DepthFL, "exclusivefl": ExclusiveFL,
    "inclusivefl": InclusiveFL}


def build_method(cfg: RunConfig, task: TaskSpec) -> Method:
    """The method named by ``cfg.method`` (validated by the config)."""
    return METHOD_CLASSES[cfg.method](cfg, task)


__all__ = ["ClientUpdate", "Method", "TaskSpec", "build_method", "METHOD_CLASSES"]
