"""Augmentation operators on packed sequences: invariants, repeatability, and the keyed randomness."""
import numpy as np
import pytest
import torch

from unirec.data import augment as A


def packed(lens, seed=0, num_items=50):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens, dtype=torch.int64)
    off = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(lens, 0, out=off[1:])
    items = torch.randint(1, num_items + 1, (int(off[-1]),), generator=g)
    return items, off


def seqs(items, off):
    return [items[off[b]:off[b + 1]].tolist() for b in range(off.numel() - 1)]


LENS = [0, 1, 2, 5, 17, 40, 3, 100]


def keys_for(n, seed=0, epoch=0, view=0):
    return A.sequence_keys(seed, epoch, torch.arange(n), view)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.6, 1.0])
def test_crop_keeps_a_contiguous_slice_in_order(rate):
    items, off = packed(LENS)
    out, o2, src = A.crop(items, off, keys_for(len(LENS)), rate)
    assert torch.equal(out, items[src])
    for b, (before, after) in enumerate(zip(seqs(items, off), seqs(out, o2))):
        n = len(before)
        assert len(after) == (min(n, max(1, int(np.ceil(rate * n)))) if n else 0)
        s = src[o2[b]:o2[b + 1]]
        assert torch.all(torch.diff(s) == 1)  # one contiguous run, order kept
        assert all(int(off[b]) <= int(i) < int(off[b + 1]) for i in s)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_mask_rate_and_positions(rate):
    items, off = packed(LENS)
    out, o2, src = A.mask(items, off, keys_for(len(LENS)), rate, mask_id=0)
    assert torch.equal(o2, off) and torch.equal(src, torch.arange(items.numel()))
    for before, after in zip(seqs(items, off), seqs(out, o2)):
        masked = sum(a == 0 for a in after)
        assert masked == int(np.floor(rate * len(before)))
        assert all(a == b for a, b in zip(after, before) if a != 0)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_reorder_keeps_the_multiset_and_moves_one_window(rate):
    items, off = packed(LENS, seed=3)
    out, o2, src = A.reorder(items, off, keys_for(len(LENS)), rate)
    assert torch.equal(o2, off) and torch.equal(out, items[src])
    for b, (before, after) in enumerate(zip(seqs(items, off), seqs(out, o2))):
        assert sorted(before) == sorted(after)
        moved = [p for p, s in enumerate(src[off[b]:off[b + 1]].tolist()) if s != int(off[b]) + p]
        if moved:  # the moved tokens lie in one window of floor(rate * n) slots
            assert max(moved) - min(moved) < int(np.floor(rate * len(before)))
    if rate == 1.0:
        assert not torch.equal(out, items)  # a long sequence is shuffled


def test_substitute_and_insert_use_the_similar_item():
    items, off = packed(LENS, seed=4, num_items=30)
    similar = A.item_correlation(items, off, 30)
    out, o2, src = A.substitute(items, off, keys_for(len(LENS)), 0.5, similar)
    assert torch.equal(o2, off)
    changed = out != items
    assert torch.equal(out[changed], similar[items[changed]])
    for before, after in zip(seqs(items, off), seqs(out, o2)):
        assert sum(a != b for a, b in zip(after, before)) <= int(np.floor(0.5 * len(before)))
    out, o2, src = A.insert(items, off, keys_for(len(LENS)), 0.5, similar)
    for b, (before, after) in enumerate(zip(seqs(items, off), seqs(out, o2))):
        n = len(before)
        assert len(after) == n + int(np.floor(0.5 * n))
        s = src[o2[b]:o2[b + 1]].tolist()
        assert sorted(set(s)) == list(range(int(off[b]), int(off[b + 1])))  # every token kept, in order
        assert s == sorted(s)
        dup = [p for p in range(1, len(s)) if s[p] == s[p - 1]]
        assert all(after[p] == int(similar[after[p - 1]]) for p in dup)  # the inserted item follows its source


def test_item_correlation_counts_neighbours_within_the_window():
    items = torch.tensor([1, 2, 3, 1, 2, 4, 5, 4])
    off = torch.tensor([0, 3, 5, 8])  # sequences [1 2 3], [1 2], [4 5 4]; nothing crosses a boundary
    sim = A.item_correlation(items, off, 6, window=1)
    assert sim.tolist() == [0, 2, 1, 2, 5, 4, 6]  # 6 has no neighbour: itself
    assert A.item_correlation(items, off, 6, window=2)[3].item() == 1  # ties: the smaller id (1 and 2 once each)


def test_same_keys_same_augmentation_whatever_the_batch():
    items, off = packed(LENS, seed=5)
    users = torch.arange(len(LENS)) * 7 + 3
    keys = A.sequence_keys(11, 2, users)
    rates = {"crop": 0.6, "mask": 0.3, "reorder": 0.4}
    full = A.augment(items, off, keys, rates, mask_id=0)
    again = A.augment(items, off, keys, rates, mask_id=0)
    assert all(torch.equal(x, y) for x, y in zip(full, again))
    # sequence 5 alone, with its own key: the same result as inside the batch
    b = 5
    one = A.augment(items[off[b]:off[b + 1]], torch.tensor([0, int(off[b + 1] - off[b])]), keys[b:b + 1], rates)
    assert one[0].tolist() == seqs(full[0], full[1])[b]
    other = A.augment(items, off, A.sequence_keys(11, 3, users), rates, mask_id=0)
    assert not torch.equal(other[0], full[0]) or not torch.equal(other[1], full[1])  # another epoch differs
    ops_used = set()
    for b in range(len(LENS)):
        ops_used.add(int(torch.floor(A.uniform(keys[b:b + 1], torch.zeros(1, dtype=torch.int64), 7) * 3)))
    assert len(ops_used) > 1


def test_uniform_is_uniform_enough():
    u = A.uniform(torch.arange(20000), torch.zeros(20000, dtype=torch.int64), 9)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert float(hist.min()) > 1800


def test_bad_arguments_are_named():
    items, off = packed([3, 4])
    k = keys_for(2)
    with pytest.raises(ValueError, match="rate must lie in"):
        A.crop(items, off, k, 1.5)
    with pytest.raises(ValueError, match="keys must have one entry per sequence"):
        A.mask(items, off, k[:1], 0.2, 0)
    with pytest.raises(ValueError, match="unknown operator 'shuffle'"):
        A.augment(items, off, k, {"shuffle": 0.2})
    with pytest.raises(ValueError, match="need the item table"):
        A.augment(items, off, k, {"insert": 0.2})


def test_empty_batch():
    items, off = torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    for out in (A.crop(items, off, keys_for(0), 0.5), A.mask(items, off, keys_for(0), 0.5, 0),
                A.reorder(items, off, keys_for(0), 0.5), A.augment(items, off, keys_for(0), {"crop": 0.5})):
        assert out[0].numel() == 0 and out[1].tolist() == [0]
