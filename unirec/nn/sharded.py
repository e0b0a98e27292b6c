"""Row-wise sharded tables: the rows of an [R, D] table split across the processes of a group.

:class:`ShardedRows` is what a sharded item encoder hands on instead of the whole [N + 1, D] item
representation: this rank's rows [bounds[r], bounds[r + 1]) and the bounds. :func:`item_rows`
looks rows up in either kind: ``take_rows`` of a tensor, or an all-to-all fetch from the owning
ranks (:func:`unirec.distributed.fetch_rows`) of a :class:`ShardedRows`; the table is never gathered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple, Union

import torch

from .. import distributed


@dataclass
class ShardedRows:
    """Rows [bounds[r], bounds[r + 1]) of an [R, D] table (R = bounds[-1]) on rank r.

    local: [bounds[r + 1] - bounds[r], D]; bounds: [world + 1] row bounds (:func:`unirec.distributed.shard_bounds`).
    """

    local: torch.Tensor
    bounds: List[int]
    rank: int

    @property
    def shape(self) -> Tuple[int, int]:
        return (self.bounds[-1], self.local.shape[1])

    @property
    def dtype(self):
        return self.local.dtype

    def float(self) -> "ShardedRows":
        return ShardedRows(self.local.float(), self.bounds, self.rank)

    def to(self, dtype) -> "ShardedRows":
        return ShardedRows(self.local.to(dtype), self.bounds, self.rank)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[*ids.shape, D] rows ``ids`` from their owners (every rank must call it)."""
        return distributed.fetch_rows(self.local, ids, self.bounds)

    def without_first_row(self) -> Tuple[torch.Tensor, int]:
        """(this rank's rows of table[1:], their offset in table[1:]): the catalogue without the padding
        row 0, as the sharded loss and top-k take it."""
        lo = self.bounds[self.rank]
        if lo == 0:
            return self.local[1:], 0
        return self.local, lo - 1


Table = Union[torch.Tensor, ShardedRows]


def item_rows(table: Table, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for a tensor (``index_select``, whose backward is an index_add) or a
    :class:`ShardedRows` (rows fetched from their owners)."""
    if isinstance(table, ShardedRows):
        return table.rows(ids)
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, *table.shape[1:])
