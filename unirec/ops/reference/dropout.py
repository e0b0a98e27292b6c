"""The dropout mask generator in pure PyTorch: the definition that the C++ kernel (csrc/cpu/dropout.cpp)
matches bit for bit. int64 arithmetic wraps like uint64; 32-bit steps mask to the low 32 bits."""
import torch

_GOLDEN = 0x9E3779B97F4A7C15
_M32 = 0xFFFFFFFF
_HALF = 1024  # counters per chunk; a chunk holds 2 * _HALF elements


def _s64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function."""
    z = (z ^ _shr(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _s64(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on values in [0, 2^32) held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_draws_ref(n: int, seed: int) -> torch.Tensor:
    """The 16-bit draws (int64 in [0, 65536)) of elements 0 .. n-1 under ``seed``.

    Element i lies in chunk i // 2048 at r = i % 2048; its counter is c = (i // 2048) * 1024 + r % 1024 and
    it takes the low 16 bits of hash(c) if r < 1024, else the high 16 bits. With
    key = mix64(mix64(seed + golden) + (c >> 32) * golden), k0 and k1 its low and high 32 bits,
    hash(c) = lowbias32(lowbias32((c mod 2^32) ^ k0) ^ k1).
    """
    i = torch.arange(n, dtype=torch.int64)
    c = ((i >> 11) << 10) | (i & (_HALF - 1))
    upper = (i >> 10) & 1
    state = _mix64(torch.tensor(_s64((seed + _GOLDEN) % (1 << 64)), dtype=torch.int64))
    key = _mix64(state + (c >> 32) * _s64(_GOLDEN))
    k0, k1 = key & _M32, _shr(key, 32)
    h = _lowbias32(_lowbias32((c & _M32) ^ k0) ^ k1)
    return (h >> (16 * upper)) & 0xFFFF


def dropout_mask_ref(input: torch.Tensor, threshold: int, seed: int) -> torch.Tensor:
    """mask[i] = draw i of ``seed`` < threshold (bool, shaped like ``input``; see :func:`dropout_draws_ref`).
    Kept with probability threshold / 65536."""
    return (dropout_draws_ref(input.numel(), seed) < threshold).reshape(input.shape).to(input.device)


def dropout_ref(input: torch.Tensor, threshold: int, seed: int) -> torch.Tensor:
    """What ``torch.ops.unirec.dropout`` computes: input * mask * 65536 / threshold, in float for
    bfloat16 and float16 (one rounding), in the input's dtype otherwise."""
    acc = torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype
    scale = torch.tensor(65536.0 / threshold, dtype=acc)
    m = dropout_mask_ref(input, threshold, seed).to(acc)
    return (input.to(acc) * (m * scale)).to(input.dtype)
