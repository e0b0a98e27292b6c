"""Models: the unified recommender UniRec, its config, and token batches."""
from .config import PRESETS, UniRecConfig, preset
from .inputs import TokenBatch, TokenBuilder, time_buckets
from .layers import Block, JaggedSelfAttention
from .unirec import UniRec, gather_bags

__all__ = ["PRESETS", "UniRecConfig", "preset", "TokenBatch", "TokenBuilder", "time_buckets", "Block",
           "JaggedSelfAttention", "UniRec", "gather_bags"]
