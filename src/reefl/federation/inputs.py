"""The run's data as the apps use it: the partition, the input pipeline, and what the data
fixes about the model (classes, input channels). One function, so that the server and every
client derive them the same way from the run config."""

from __future__ import annotations

from reefl.config import RunConfig
from reefl.data import FederatedData, InputPipeline, build_federated_data, input_pipeline
from reefl.methods import TaskSpec


def run_data(cfg: RunConfig) -> tuple[FederatedData, InputPipeline, TaskSpec]:
    """Partitioned data, pipeline and task of the run ``cfg`` describes."""
    data = build_federated_data(cfg.data_options)
    pipeline = input_pipeline(data, cfg.img_size, bool(cfg.pretrained), cfg.augment)
    return data, pipeline, TaskSpec(num_classes=data.num_classes, in_chans=pipeline.channels)


def source_task(cfg: RunConfig) -> TaskSpec:
    """Classes and input channels of the run's source, without partitioning it."""
    from reefl.data import load_source

    spec = load_source(cfg.data_options.source)
    return TaskSpec(num_classes=spec.num_classes,
                    in_chans=3 if cfg.pretrained else spec.channels)
