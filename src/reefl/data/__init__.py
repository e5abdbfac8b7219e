"""Data for federated runs: sources (named or the user's own), partitions, and loaders."""

from reefl.data.federated import (
    PARTITIONERS,
    DataOptions,
    FederatedData,
    InputPipeline,
    build_federated_data,
    input_pipeline,
)
from reefl.data.hub import Columns
from reefl.data.loaders import (
    client_loader,
    client_test_loader,
    held_out_loader,
    held_out_split,
    test_loader,
)
from reefl.data.sources import DATA_SOURCES, SourceOptions, check_dataset_value, load_source
from reefl.data.spec import DataError, DataSpec, Split
from reefl.data.transforms import normalize, random_translate

__all__ = [
    "DATA_SOURCES",
    "PARTITIONERS",
    "Columns",
    "DataError",
    "DataOptions",
    "DataSpec",
    "FederatedData",
    "InputPipeline",
    "Split",
    "SourceOptions",
    "build_federated_data",
    "check_dataset_value",
    "client_loader",
    "client_test_loader",
    "held_out_loader",
    "held_out_split",
    "input_pipeline",
    "load_source",
    "normalize",
    "random_translate",
    "test_loader",
]
