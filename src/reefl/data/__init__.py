"""Data for federated runs: named image sources, client partitions, and loaders."""

from reefl.data.federated import (
    FederatedData,
    build_federated_data,
    client_loader,
    held_out_loader,
    held_out_split,
    test_loader,
)
from reefl.data.sources import DATA_SOURCES, ImageSet, load_source
from reefl.data.transforms import normalize, random_translate

__all__ = [
    "DATA_SOURCES",
    "FederatedData",
    "ImageSet",
    "build_federated_data",
    "client_loader",
    "held_out_loader",
    "held_out_split",
    "load_source",
    "normalize",
    "random_translate",
    "test_loader",
]
