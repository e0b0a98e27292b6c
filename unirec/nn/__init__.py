"""Modules built on unirec.ops, and the settings that walk a module tree."""
from .dropout import Dropout
from .embedding import TableBatchedEmbedding
from .params import set_impl, weight_decay_groups

__all__ = ["Dropout", "TableBatchedEmbedding", "set_impl", "weight_decay_groups"]
