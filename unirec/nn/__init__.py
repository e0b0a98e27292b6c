"""Modules built on unirec.ops."""
from .dropout import Dropout
from .embedding import TableBatchedEmbedding

__all__ = ["Dropout", "TableBatchedEmbedding"]
