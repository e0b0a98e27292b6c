"""nn.Dropout on ``unirec.ops.dropout``."""
from torch import nn

from .. import ops


class Dropout(nn.Module):
    """Like ``torch.nn.Dropout(p)``, with the C++ mask generator on CPU tensors. ``impl`` is the
    model-wide backend choice (see :func:`unirec.ops.resolve_impl`)."""

    def __init__(self, p: float = 0.5, impl: str = "auto"):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p, self.impl = p, impl

    def forward(self, x):
        return ops.dropout(x, self.p, self.training, impl=ops.resolve_impl(self.impl, "dropout"))

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl!r}"
