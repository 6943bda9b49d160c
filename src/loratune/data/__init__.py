"""The data layer: read records (files, built-in datasets, `datasets.Dataset`) and turn them into
tokenized examples for a task (`loratune.batching` makes batches of them)."""

from loratune.data.builtin import builtin_datasets
from loratune.data.data_config import FORMATS, DataConfig
from loratune.data.formatting import Formatter, fit_pair
from loratune.data.pipeline import (
    DataSplit,
    LoadedData,
    check_sources,
    concatenate_texts,
    load_datasets,
    read_label_names,
    split_records,
)
from loratune.data.records import BadRecords, Record
from loratune.tasks import IGNORE_INDEX

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "BadRecords",
    "DataConfig",
    "DataSplit",
    "Formatter",
    "LoadedData",
    "Record",
    "builtin_datasets",
    "check_sources",
    "concatenate_texts",
    "fit_pair",
    "load_datasets",
    "read_label_names",
    "split_records",
]
