"""Modules built on unirec.ops."""
from .embedding import TableBatchedEmbedding

__all__ = ["TableBatchedEmbedding"]
