"""Data: readers, the MovieLens-100K fetch, encoding, synthetic data, the leave-one-out and cold-item splits
and the one token-batch pipeline (training, evaluation and serving share it)."""
from .batch import (History, TokenBatch, TokenBuilder, TrainBatches, event_gaps, live_token_batch, pack_streams,
                    training_users,
                    time_buckets)
from .dataset import (AGE_BOUNDARIES, PAD, Dataset, Feature, FeatureSpec, FeatureTable, TBEBags,
                      default_feature_specs, encode)
from .fetch import FetchError, fetch_movielens_1m, fetch_movielens_100k, unirec_home
from .readers import (DataFormatError, RawData, Table, read_atomic, read_atomic_file, read_movielens_100k,
                      read_movielens_1m, read_recbole_movielens, retype_columns)
from .sources import DataConfig, load_dataset, strict_from_dict
from .split import COLD_STAGES, SPLITS, ColdItemSplit, LeaveOneOutSplit, cold_item_split, leave_one_out
from .summary import describe
from .synthetic import cluster_truth, synthetic
from .tabular import read_csv, read_parquet, read_path

__all__ = [
    "History", "TokenBatch", "TokenBuilder", "TrainBatches", "event_gaps", "live_token_batch", "pack_streams",
    "training_users",
    "time_buckets", "AGE_BOUNDARIES", "PAD", "Dataset", "Feature", "FeatureSpec", "FeatureTable", "TBEBags",
    "default_feature_specs", "describe", "encode", "FetchError", "fetch_movielens_1m", "fetch_movielens_100k", "unirec_home",
    "DataFormatError", "RawData", "Table", "read_atomic", "read_atomic_file", "read_csv", "read_movielens_100k",
    "read_movielens_1m", "read_parquet", "read_recbole_movielens", "retype_columns", "read_path", "DataConfig", "load_dataset", "strict_from_dict",
    "COLD_STAGES", "SPLITS", "ColdItemSplit", "LeaveOneOutSplit", "cold_item_split", "leave_one_out",
    "cluster_truth", "synthetic",
]
