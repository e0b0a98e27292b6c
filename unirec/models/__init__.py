"""Models: the unified recommender UniRec and its parts (item and profile encoders, token stream,
blocks, objectives, scorer), its configuration and presets."""
from .blocks import Block, JaggedSelfAttention
from .config import PRESETS, DataSchema, ModelConfig, preset, preset_training
from .items import AttributeTables, ItemEncoder, ProfileEncoder, TableMix, gather_bags
from .objectives import OBJECTIVES, Ranking, Retrieval, SampledRetrieval
from .ssl import ModelContrastive, SequenceContrastive
from .scorer import Scorer, distinct_history, recency_bucket
from .stream import Encoded, TokenStream, TokenTypes, take_rows
from .unirec import UniRec, upgrade_legacy

__all__ = ["Block", "JaggedSelfAttention", "PRESETS", "DataSchema", "ModelConfig", "preset", "preset_training",
           "AttributeTables", "ItemEncoder", "ProfileEncoder", "TableMix", "gather_bags", "OBJECTIVES", "Ranking",
           "Retrieval", "SampledRetrieval", "ModelContrastive", "SequenceContrastive", "Scorer", "distinct_history", "recency_bucket", "Encoded", "TokenStream",
           "TokenTypes", "take_rows", "UniRec", "upgrade_legacy"]
