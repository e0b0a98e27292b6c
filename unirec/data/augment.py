"""Sequence augmentation on packed (jagged) sequences: crop, mask, reorder, substitute, insert.

The operators of CL4SRec (crop, mask, reorder) and CoSeRec (substitute, insert by item
correlation), vectorised over a whole batch in torch (no per-sequence Python loop). A batch of B
sequences is ``items`` [L] int64 with ``offsets`` [B + 1] int64 (sequence b is
``items[offsets[b]:offsets[b+1]]``). Every operator returns ``(items, offsets, src)``: the new
packed sequences and, for each output token, the input position it comes from (an inserted
token points at the token it follows), so that per-token fields (ratings, time gaps) follow with
``field[src]``.

Randomness is a counter hash of (``keys[b]``, position, operator), not a generator walked in
batch order: the same key gives the same augmentation whatever else is in the batch, and
however the batch is split across processes. :func:`sequence_keys` derives the keys from
(seed, epoch, user, view).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

Packed = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_M64 = (1 << 64) - 1


def _wrap(x: int) -> int:
    """An unsigned 64-bit constant as the int64 that has its bits (torch has no uint64 arithmetic)."""
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = _wrap(0x9E3779B97F4A7C15), _wrap(0xBF58476D1CE4E5B9), _wrap(0x94D049BB133111EB)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (wrapping multiplication; logical shifts emulated by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sequence_keys(seed: int, epoch: int, users: torch.Tensor, view: int = 0) -> torch.Tensor:
    """[B] int64 random keys of the sequences of ``users`` in ``epoch``, view ``view`` (0, 1, ...)."""
    base = _mix(torch.tensor([_wrap(seed * 0x100000001B3 + epoch * 0x3C6EF372FE94F82B + view * _GOLDEN)],
                             dtype=torch.int64))
    return _mix(base + users.to(torch.int64) * _GOLDEN)


def uniform(keys: torch.Tensor, counter: torch.Tensor, salt: int) -> torch.Tensor:
    """Floats in [0, 1) (float64, 53 random bits) from a hash of (keys, counter, salt), elementwise."""
    x = _mix(keys * _GOLDEN + counter.to(torch.int64) * _MIX2 + _wrap(salt * _MIX1))
    return ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) * (1.0 / (1 << 53))


def _segments(offsets: torch.Tensor):
    """(seg [L] sequence of each token, pos [L] position within it, lens [B])."""
    lens = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=offsets.device), lens)
    pos = torch.arange(seg.numel(), device=offsets.device) - offsets[:-1][seg]
    return seg, pos, lens


def _offsets(lens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lens.numel() + 1, dtype=torch.int64, device=lens.device)
    torch.cumsum(lens, 0, out=out[1:])
    return out


def _check(items, offsets, keys, rate, name):
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name}: rate must lie in [0, 1], got {rate}")
    if offsets.numel() != keys.numel() + 1:
        raise ValueError(f"{name}: keys must have one entry per sequence ({offsets.numel() - 1}), got {keys.numel()}")
    if int(offsets[-1]) != items.numel():
        raise ValueError(f"{name}: offsets[-1] ({int(offsets[-1])}) must equal len(items) ({items.numel()})")


def _chosen(seg, pos, lens, keys, rate, salt):
    """[L] bool: exactly floor(rate * n) tokens of each sequence of n tokens, uniformly at random."""
    order = torch.argsort(seg.to(torch.float64) * 2.0 + uniform(keys[seg], pos, salt), stable=True)
    rank = torch.empty_like(pos)  # the rank of each token's draw within its sequence
    rank[order] = torch.arange(order.numel(), device=order.device) - _offsets(lens)[:-1][seg[order]]
    return rank < torch.floor(rate * lens.to(torch.float64)).to(torch.int64)[seg]


def crop(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rate: float) -> Packed:
    """Keeps a random contiguous ceil(rate * n)-token slice (at least 1) of each sequence of n >= 1 tokens.

    Order within the slice is kept. Returns (items [L'], offsets [B + 1], src [L'])."""
    _check(items, offsets, keys, rate, "crop")
    _, _, lens = _segments(offsets)
    keep = torch.clamp(torch.ceil(rate * lens.to(torch.float64)).to(torch.int64), min=1)
    keep = torch.minimum(keep, lens)
    start = torch.floor(uniform(keys, torch.zeros_like(keys), 1) * (lens - keep + 1).to(torch.float64)).to(torch.int64)
    new_off = _offsets(keep)
    seg, pos, _ = _segments(new_off)
    src = offsets[:-1][seg] + start[seg] + pos
    return items[src], new_off, src


def mask(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rate: float, mask_id: int) -> Packed:
    """Replaces floor(rate * n) random tokens of each sequence of n tokens by ``mask_id``."""
    _check(items, offsets, keys, rate, "mask")
    seg, pos, lens = _segments(offsets)
    hit = _chosen(seg, pos, lens, keys, rate, 2)
    return torch.where(hit, torch.full_like(items, mask_id), items), offsets, torch.arange(items.numel(), device=items.device)


def reorder(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rate: float) -> Packed:
    """Shuffles a random contiguous window of floor(rate * n) tokens of each sequence of n tokens;
    the tokens outside it keep their places (the multiset of each sequence is unchanged)."""
    _check(items, offsets, keys, rate, "reorder")
    seg, pos, lens = _segments(offsets)
    width = torch.floor(rate * lens.to(torch.float64)).to(torch.int64)
    start = torch.floor(uniform(keys, torch.zeros_like(keys), 3) * (lens - width + 1).to(torch.float64)).to(torch.int64)
    s, w = start[seg], width[seg]
    inside = (pos >= s) & (pos < s + w)
    # Sort key within a sequence: the position outside the window; inside, a random point of
    # [start, start + width), so the window's tokens land on its slots in random order.
    key = torch.where(inside, s.to(torch.float64) + uniform(keys[seg], pos, 4) * w.to(torch.float64),
                      pos.to(torch.float64))
    src = torch.argsort(seg.to(torch.float64) * (float(pos.max()) + 2.0 if pos.numel() else 1.0) + key, stable=True)
    return items[src], offsets, src


def substitute(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rate: float,
               similar: torch.Tensor) -> Packed:
    """Replaces floor(rate * n) random tokens of each sequence by their most similar item
    (``similar`` [N + 1] int64: item -> its substitute, e.g. :func:`item_correlation`)."""
    _check(items, offsets, keys, rate, "substitute")
    seg, pos, lens = _segments(offsets)
    hit = _chosen(seg, pos, lens, keys, rate, 5)
    return torch.where(hit, similar[items], items), offsets, torch.arange(items.numel(), device=items.device)


def insert(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rate: float,
           similar: torch.Tensor) -> Packed:
    """After floor(rate * n) random tokens of each sequence, inserts their most similar item; the
    inserted token's ``src`` is the token it follows (it takes that event's rating and time)."""
    _check(items, offsets, keys, rate, "insert")
    seg, pos, lens = _segments(offsets)
    hit = _chosen(seg, pos, lens, keys, rate, 6)
    reps = 1 + hit.to(torch.int64)
    src = torch.repeat_interleave(torch.arange(items.numel(), device=items.device), reps)
    # the second copy of a chosen token is the inserted one
    second = torch.zeros(src.numel(), dtype=torch.bool, device=items.device)
    second[1:] = src[1:] == src[:-1]
    out = torch.where(second, similar[items[src]], items[src])
    new_lens = torch.zeros_like(lens).index_add_(0, seg, reps)
    return out, _offsets(new_lens), src


def item_correlation(items: torch.Tensor, offsets: torch.Tensor, num_items: int, window: int = 3) -> torch.Tensor:
    """[num_items + 1] int64: for each item, the item that occurs most often within ``window``
    events of it in the given (training) sequences; itself when it has no neighbour, 0 for 0.

    Co-occurrence is counted in both directions over every pair of events at distance 1..window
    of the same sequence (CoSeRec's item correlation, counted rather than embedded)."""
    seg, pos, lens = _segments(offsets)
    n1 = num_items + 1
    pairs = []
    for d in range(1, window + 1):
        a = torch.arange(items.numel() - d, device=items.device) if items.numel() > d else items.new_zeros(0)
        a = a[seg[a] == seg[a + d]] if a.numel() else a
        x, y = items[a], items[a + d]
        ok = (x != y) & (x > 0) & (y > 0)
        pairs += [x[ok] * n1 + y[ok], y[ok] * n1 + x[ok]]
    best = torch.arange(n1, dtype=torch.int64, device=items.device)
    if not pairs:
        return best
    keys, counts = torch.unique(torch.cat(pairs), return_counts=True)
    src, dst = keys // n1, keys % n1
    # per source item, the destination with the largest count (ties: the smallest item id):
    # stable sorts by the minor keys first
    order = torch.argsort(dst, stable=True)
    order = order[torch.argsort(-counts[order], stable=True)]
    order = order[torch.argsort(src[order], stable=True)]
    src, dst = src[order], dst[order]
    first = torch.ones_like(src, dtype=torch.bool)
    first[1:] = src[1:] != src[:-1]
    best[src[first]] = dst[first]
    return best


OPERATORS = ("crop", "mask", "reorder", "substitute", "insert")


def augment(items: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, rates: Dict[str, float],
            mask_id: int = 0, similar: Optional[torch.Tensor] = None) -> Packed:
    """One operator per sequence, drawn uniformly (from its key) among ``rates``' operators
    (name -> rate, e.g. {"crop": 0.6, "mask": 0.3, "reorder": 0.2}), as CL4SRec augments each view.

    ``mask_id``: the token "mask" writes; ``similar``: the substitute table "substitute" and
    "insert" need (:func:`item_correlation`). Returns (items, offsets, src) like each operator."""
    unknown = sorted(set(rates) - set(OPERATORS))
    if unknown:
        raise ValueError(f"augment: unknown operator {unknown[0]!r}; have {', '.join(OPERATORS)}")
    if not rates:
        raise ValueError("augment: rates names no operator")
    if similar is None and {"substitute", "insert"} & set(rates):
        raise ValueError("augment: substitute and insert need the item table `similar` (see item_correlation)")
    names = sorted(rates, key=OPERATORS.index)
    choice = torch.floor(uniform(keys, torch.zeros_like(keys), 7) * len(names)).to(torch.int64)
    lens = offsets[1:] - offsets[:-1]
    seg_all, _, _ = _segments(offsets)
    outs_items, outs_src, outs_seq = [], [], []
    new_lens = torch.zeros_like(lens)
    for j, name in enumerate(names):
        seqs = torch.nonzero(choice == j).flatten()
        if seqs.numel() == 0:
            continue
        take = torch.nonzero(choice[seg_all] == j).flatten()  # the tokens of those sequences, in order
        sub_off = _offsets(lens[seqs])
        args = {"mask": (mask_id,), "substitute": (similar,), "insert": (similar,)}.get(name, ())
        it, off, src = globals()[name](items[take], sub_off, keys[seqs], rates[name], *args)
        new_lens[seqs] = off[1:] - off[:-1]
        outs_items.append(it)
        outs_src.append(take[src])
        outs_seq.append(torch.repeat_interleave(seqs, off[1:] - off[:-1]))
    if not outs_items:
        return items, offsets, torch.arange(items.numel(), device=items.device)
    seq = torch.cat(outs_seq)
    order = torch.argsort(seq, stable=True)  # back to the sequences' order; within one, the operator's
    return torch.cat(outs_items)[order], _offsets(new_lens), torch.cat(outs_src)[order]
