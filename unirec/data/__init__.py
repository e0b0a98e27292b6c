"""Data: readers, the MovieLens-100K fetch, encoding, synthetic data, leave-one-out batches."""
from .dataset import (AGE_BOUNDARIES, PAD, Dataset, Feature, FeatureSpec, FeatureTable, TBEBags,
                      default_feature_specs, describe, encode, load_dataset)
from .fetch import FetchError, fetch_movielens_100k, unirec_home
from .readers import (DataFormatError, RawData, Table, read_atomic, read_atomic_file, read_csv,
                      read_movielens_100k, read_movielens_1m, read_parquet, read_path)
from .split import EvalBatch, LeaveOneOutSplit, TrainBatch, leave_one_out
from .synthetic import cluster_truth, synthetic

__all__ = [
    "AGE_BOUNDARIES", "PAD", "Dataset", "Feature", "FeatureSpec", "FeatureTable", "TBEBags", "default_feature_specs",
    "describe", "encode", "load_dataset", "FetchError", "fetch_movielens_100k", "unirec_home", "DataFormatError",
    "RawData", "Table", "read_atomic", "read_atomic_file", "read_csv", "read_movielens_100k", "read_movielens_1m",
    "read_parquet", "read_path", "EvalBatch", "LeaveOneOutSplit", "TrainBatch", "leave_one_out", "cluster_truth",
    "synthetic",
]
