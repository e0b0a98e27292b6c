"""The dropout mask generator in pure PyTorch (int64 arithmetic wraps like uint64)."""
import torch

_GOLDEN = 0x9E3779B97F4A7C15


def _s64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ _shr(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _s64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def dropout_mask_ref(input: torch.Tensor, threshold: int, seed: int) -> torch.Tensor:
    """mask[i] = (16-bit draw i of SplitMix64 seeded with ``seed``) < threshold, shaped like ``input``.

    Draw w = mix64(mix64(seed + golden) + (w + 1) * golden) gives elements 4w .. 4w + 3 (low bits first).
    """
    n = input.numel()
    state = _mix64(torch.tensor([_s64((seed + _GOLDEN) % (1 << 64))], dtype=torch.int64))
    words = torch.arange(1, (n + 3) // 4 + 1, dtype=torch.int64)
    h = _mix64(state + words * _s64(_GOLDEN))
    parts = torch.stack([_shr(h, 16 * k) & 0xFFFF for k in range(4)], 1).reshape(-1)[:n]
    return (parts < threshold).reshape(input.shape).to(input.device)
