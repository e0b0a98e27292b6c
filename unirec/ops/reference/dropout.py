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


def _seed_state(seed: int) -> torch.Tensor:
    """mix64(seed + golden): the 64-bit state of a seed."""
    return _mix64(torch.tensor(_s64((seed + _GOLDEN) % (1 << 64)), dtype=torch.int64))


def _chunk_draws(state: torch.Tensor, c: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The 16-bit draws of counters ``c`` (half ``upper``: 0 low, 1 high) under the 64-bit ``state``
    (broadcast against ``c``): key = mix64(state + (c >> 32) * golden), k0 and k1 its low and high 32 bits,
    hash(c) = lowbias32(lowbias32((c mod 2^32) ^ k0) ^ k1), the draw the low or high 16 bits of hash(c)."""
    key = _mix64(state + (c >> 32) * _s64(_GOLDEN))
    k0, k1 = key & _M32, _shr(key, 32)
    h = _lowbias32(_lowbias32((c & _M32) ^ k0) ^ k1)
    return (h >> (16 * upper)) & 0xFFFF


def dropout_draws_ref(n: int, seed: int) -> torch.Tensor:
    """The 16-bit draws (int64 in [0, 65536)) of elements 0 .. n-1 under ``seed`` (no row keys).

    Element i lies in chunk i // 2048 at r = i % 2048; its counter is c = (i // 2048) * 1024 + r % 1024 and
    it takes the low 16 bits of hash(c) if r < 1024, else the high 16 bits. With state = mix64(seed + golden),
    key = mix64(state + (c >> 32) * golden), k0 and k1 its low and high 32 bits,
    hash(c) = lowbias32(lowbias32((c mod 2^32) ^ k0) ^ k1).
    """
    i = torch.arange(n, dtype=torch.int64)
    c = ((i >> 11) << 10) | (i & (_HALF - 1))
    upper = (i >> 10) & 1
    return _chunk_draws(_seed_state(seed), c, upper)


def row_draws_ref(row_keys: torch.Tensor, cols: int, seed: int) -> torch.Tensor:
    """The 16-bit draws [rows, cols] (int64 in [0, 65536)) of rows keyed by ``row_keys`` (int64 [rows])
    under ``seed``: draw (r, j) is a pure function of (seed, row_keys[r], j).

    Row r is a sequence of its own under the state S_r = mix64(state + mix64(row_keys[r])),
    state = mix64(seed + golden). Column j lies in chunk q = j // 2048 of the row at t = j % 2048; the
    chunk holds m = min(2048, cols - 2048 q) elements, split in halves of h = ceil(m / 2) (1024 for a full
    chunk): column j's counter is c = 1024 q + (t if t < h else t - h), and it takes the low 16 bits of
    hash(c) if t < h, else the high 16 bits, with hash(c) as in :func:`dropout_draws_ref` under S_r
    instead of state. A short row (cols <= 2048) thus takes ceil(cols / 2) hashes, both halves of each.
    """
    j = torch.arange(cols, dtype=torch.int64)
    q, t = j >> 11, j & 2047
    m = (cols - (q << 11)).clamp(max=2048)
    h = (m + 1) >> 1
    upper = (t >= h).to(torch.int64)
    c = (q << 10) + t - upper * h
    rows = _mix64(_seed_state(seed) + _mix64(row_keys.to(device="cpu", dtype=torch.int64).reshape(-1, 1)))
    return _chunk_draws(rows, c.reshape(1, -1), upper.reshape(1, -1))


def dropout_mask_ref(input: torch.Tensor, threshold: int, seed: int, row_keys=None) -> torch.Tensor:
    """mask = draw < threshold (bool, shaped like ``input``): draw i of ``seed`` for element i of the
    flattened input (:func:`dropout_draws_ref`), or with ``row_keys`` draw (r, j) of the input viewed as
    [rows, cols] (:func:`row_draws_ref`). Kept with probability threshold / 65536."""
    if row_keys is None:
        draws = dropout_draws_ref(input.numel(), seed)
    else:
        draws = row_draws_ref(row_keys, input.shape[-1], seed)
    return (draws < threshold).reshape(input.shape).to(input.device)


def dropout_ref(input: torch.Tensor, threshold: int, seed: int, row_keys=None) -> torch.Tensor:
    """What ``torch.ops.unirec.dropout`` computes: input * mask * 65536 / threshold, in float for
    bfloat16 and float16 (one rounding), in the input's dtype otherwise (mask: :func:`dropout_mask_ref`)."""
    acc = torch.float32 if input.dtype in (torch.bfloat16, torch.float16) else input.dtype
    scale = torch.tensor(65536.0 / threshold, dtype=acc)
    m = dropout_mask_ref(input, threshold, seed, row_keys).to(acc)
    return (input.to(acc) * (m * scale)).to(input.dtype)
