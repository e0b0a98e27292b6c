"""TableBatchedEmbedding: T embedding tables in one packed weight, optionally
trained by a fused backward + optimizer step (FBGEMM's design), so that a
catalogue of millions of rows never gets a dense gradient."""
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..ops.embedding import empty_table, table_batched_embedding, tbe_backward_update_

OPTIMIZERS = (None, "sgd", "rowwise_adagrad")


class _FusedUpdate(torch.autograd.Function):
    """Forward: the pooled lookup. Backward: the in-place row update; no weight gradient."""

    @staticmethod
    def forward(ctx, trigger, module, indices, offsets, per_sample_weights):
        ctx.module = module
        ctx.save_for_backward(indices, offsets, per_sample_weights)
        return torch.ops.unirec.tbe_forward(
            module.weight, module.table_offsets, indices, offsets, per_sample_weights, module.pooling
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        indices, offsets, per_sample_weights = ctx.saved_tensors
        m = ctx.module
        grad_psw = tbe_backward_update_(
            m.weight, m.optimizer_state, grad_output, m.table_offsets, indices, offsets, per_sample_weights,
            m.pooling, m.optimizer, m.lr, m.eps,
        )
        return None, None, None, None, grad_psw


class TableBatchedEmbedding(nn.Module):
    """T embedding tables of ``rows_per_table[t]`` rows and width ``dim``, looked up in one call.

    ``forward(indices, offsets, per_sample_weights=None) -> [B, T, dim]``
    with the bag layout of :func:`unirec.ops.table_batched_embedding`.

    With ``optimizer=None`` the packed weight is an ordinary parameter. With
    ``"sgd"`` or ``"rowwise_adagrad"`` it is a buffer updated in place during
    backward, touching only the rows that were looked up; keep it out of your
    torch.optim optimizer (it is not among ``parameters()``); that path always runs the
    compiled kernels.

    ``impl``: the backend of the lookup (a model-wide choice, see :func:`unirec.ops.resolve_impl`),
    an attribute that :func:`unirec.nn.set_impl` changes at run time.
    """

    def __init__(
        self,
        rows_per_table: Sequence[int],
        dim: int,
        pooling: str = "sum",
        optimizer: Optional[str] = None,
        lr: float = 0.01,
        eps: float = 1e-8,
        *,
        init_std: Optional[float] = None,
        dtype: torch.dtype = torch.float32,
        device=None,
        impl: str = "auto",
    ):
        super().__init__()
        rows = [int(r) for r in rows_per_table]
        if not rows or min(rows) < 0:
            raise ValueError(f"rows_per_table must be a non-empty list of row counts >= 0, got {rows_per_table}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.rows_per_table = rows
        self.dim, self.pooling, self.optimizer, self.lr, self.eps = dim, pooling, optimizer, lr, eps
        self.impl = impl
        table_offsets = torch.tensor([0] + rows, dtype=torch.long, device=device).cumsum(0)
        self.register_buffer("table_offsets", table_offsets)
        weight = empty_table(sum(rows), dim, dtype=dtype, device=device)  # huge pages on a CPU
        nn.init.normal_(weight, std=init_std if init_std is not None else dim**-0.5)
        if optimizer is None:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
            state_rows = sum(rows) if optimizer == "rowwise_adagrad" else 0
            self.register_buffer("optimizer_state", torch.zeros(state_rows, dtype=torch.float32, device=device))
            # A zero-size leaf that requires grad makes autograd call the fused backward.
            self._trigger = torch.empty(0, requires_grad=True)

    @property
    def num_tables(self) -> int:
        return len(self.rows_per_table)

    def forward(self, indices, offsets, per_sample_weights=None):
        if self.optimizer is None or not torch.is_grad_enabled():
            return table_batched_embedding(
                self.weight, self.table_offsets, indices, offsets, per_sample_weights, self.pooling,
                impl=ops.resolve_impl(self.impl, "embedding"),
            )
        return _FusedUpdate.apply(self._trigger, self, indices, offsets, per_sample_weights)

    def extra_repr(self) -> str:
        return (
            f"rows_per_table={self.rows_per_table}, dim={self.dim}, pooling={self.pooling!r}, "
            f"optimizer={self.optimizer!r}, lr={self.lr}"
        )
