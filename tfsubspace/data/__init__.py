"""Where the images come from: offline IDX files and tensorflow-datasets (`load`), fetching
them (`fetch`), and what compress() accepts as data, checked before training (`inputs`)."""

from tfsubspace.data.datasets import (
    DATA_DIR_ENV,
    DATASETS,
    DatasetInfo,
    dataset_info,
    default_data_dir,
    load,
    load_arrays,
    read_idx,
    unlabeled,
)

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "DatasetInfo",
    "dataset_info",
    "default_data_dir",
    "load",
    "load_arrays",
    "read_idx",
    "unlabeled",
]
