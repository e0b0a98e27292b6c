"""nn.Dropout on ``unirec.ops.dropout``."""
from torch import nn

from .. import ops


class Dropout(nn.Module):
    """Like ``torch.nn.Dropout(p)``, with the C++ mask generator on CPU tensors and optional per-row
    mask keys (``forward(x, row_keys=None)``). ``impl`` is the model-wide backend choice (see
    :func:`unirec.ops.resolve_impl`)."""

    def __init__(self, p: float = 0.5, impl: str = "auto"):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        self.p, self.impl = p, impl

    def forward(self, x, row_keys=None):
        """``row_keys``: optional int64 [x.numel() / x.shape[-1]] keys of x's rows (see
        :func:`unirec.ops.dropout`); the C++ kernel then draws row r's mask from (seed, row_keys[r])
        alone. The "reference" impl and CUDA tensors (``F.dropout``) ignore them."""
        return ops.dropout(x, self.p, self.training, impl=ops.resolve_impl(self.impl, "dropout"), row_keys=row_keys)

    def extra_repr(self) -> str:
        return f"p={self.p}, impl={self.impl!r}"
