"""Table-batched embedding: unirec against the reference and F.embedding_bag once per table.

B=512 samples, T tables of 10^5 rows, bags of 20 ids drawn Zipf(1.15) over
each table (hot rows scattered by one random permutation, the same in every
batch); the forward takes 8 such batches in turn.
"""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import unirec
from unirec.ops.reference import tbe_forward_ref

from conftest import measure

B, ROWS, BAG, ALPHA = 512, 100_000, 20, 1.15


@functools.lru_cache(maxsize=2 * 8)
def zipf_bags(T, rows, device, seed=0):
    """One batch: T*B bags of BAG ids, Zipf ranks drawn with `seed`. Rank r is row perm[r] of its
    table, one fixed permutation for every batch: the same rows are hot in every batch."""
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(2**31 - 1))
    p = torch.arange(1, rows + 1, dtype=torch.float64) ** -ALPHA
    ranks = torch.multinomial(p, T * B * BAG, replacement=True, generator=torch.Generator().manual_seed(seed))
    indices = perm[ranks].to(device)
    offsets = torch.arange(0, T * B * BAG + 1, BAG, device=device)
    table_offsets = torch.arange(0, (T + 1) * rows, rows, device=device)
    return table_offsets, indices, offsets


@functools.lru_cache(maxsize=1)
def packed_weight(T, D, rows, device):
    """The rows as TableBatchedEmbedding holds them (unirec.ops.empty_table: on a CPU,
    transparent huge pages); every provider reads this same memory."""
    return unirec.ops.empty_table(T * rows, D, device=device).normal_(std=0.1)


def per_table_inputs(table_offsets, indices, offsets, T):
    """What a user of F.embedding_bag holds: one indices/offsets pair per table."""
    out = []
    for t in range(T):
        off = offsets[t * B:(t + 1) * B + 1]
        out.append((indices[off[0]:off[-1]], off - off[0]))
    return out


FWD_SHAPES = [(T, D) for T in (1, 8, 32) for D in (32, 64, 128)]


# The forward cycles through several batches, as training does: one batch
# repeated would leave its distinct rows in the last-level cache between calls.
BATCHES = 8


@pytest.mark.parametrize("T,D", FWD_SHAPES, ids=[f"T{T}-D{D}" for T, D in FWD_SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "reference", "torch_per_table"])
def test_forward(benchmark, device, T, D, provider):
    batches = [zipf_bags(T, ROWS, device, seed) for seed in range(BATCHES)]
    weight = packed_weight(T, D, ROWS, device)
    step = itertools.count()
    if provider == "unirec":
        fn = lambda: unirec.ops.table_batched_embedding(weight, *batches[next(step) % BATCHES])  # noqa: E731
    elif provider == "reference":
        fn = lambda: tbe_forward_ref(weight, *batches[next(step) % BATCHES])  # noqa: E731
    else:
        tables = [weight[t * ROWS:(t + 1) * ROWS] for t in range(T)]
        inputs = [per_table_inputs(*batch, T) for batch in batches]
        fn = lambda: [F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)  # noqa: E731
                      for w, (i, o) in zip(tables, inputs[next(step) % BATCHES])]
    idx = batches[0][1]
    bytes_moved = (idx.numel() * D + B * T * D) * weight.element_size()
    measure(benchmark, fn, device=device, group=f"tbe forward B{B} T{T} D{D}", provider=provider,
            bytes_moved=bytes_moved)


FWD_BWD_SHAPES = [(8, 64), (32, 64)]


@pytest.mark.parametrize("T,D", FWD_BWD_SHAPES, ids=[f"T{T}-D{D}" for T, D in FWD_BWD_SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "reference", "torch_per_table"])
def test_forward_backward(benchmark, device, T, D, provider):
    toff, idx, off = zipf_bags(T, ROWS, device)
    grad = torch.randn(B, T, D, device=device)
    if provider == "torch_per_table":
        base = packed_weight(T, D, ROWS, device)
        tables = [base[t * ROWS:(t + 1) * ROWS].clone().requires_grad_() for t in range(T)]
        inputs = per_table_inputs(toff, idx, off, T)

        def fn():
            outs = [F.embedding_bag(i, w, o, mode="sum", include_last_offset=True) for w, (i, o) in zip(tables, inputs)]
            torch.autograd.backward(outs, [grad[:, t] for t in range(T)])
            for w in tables:
                w.grad = None
    else:
        weight = packed_weight(T, D, ROWS, device).clone().requires_grad_()
        op = unirec.ops.table_batched_embedding if provider == "unirec" else tbe_forward_ref

        def fn():
            op(weight, toff, idx, off).backward(grad)
            weight.grad = None
    measure(benchmark, fn, device=device, group=f"tbe forward+backward B{B} T{T} D{D}", provider=provider)


OPT_ROWS, OPT_D, OPT_LR = 1_000_000, 64, 0.05


@pytest.mark.parametrize("provider", ["unirec_fused_rowwise_adagrad", "torch_adagrad_dense", "reference_adagrad_dense"])
def test_optimizer_step(benchmark, device, provider):
    """One training step of a 10^6-row table: forward, backward and Adagrad update."""
    toff, idx, off = zipf_bags(1, OPT_ROWS, device)
    grad = torch.randn(B, 1, OPT_D, device=device)
    init = torch.randn(OPT_ROWS, OPT_D, device=device) * 0.1
    if provider == "unirec_fused_rowwise_adagrad":
        module = unirec.nn.TableBatchedEmbedding([OPT_ROWS], OPT_D, optimizer="rowwise_adagrad", lr=OPT_LR,
                                                 device=device)
        module.weight.copy_(init)
        fn = lambda: module(idx, off).backward(grad)  # noqa: E731
    else:
        weight = init.clone().requires_grad_()
        opt = torch.optim.Adagrad([weight], lr=OPT_LR)
        if provider == "torch_adagrad_dense":
            forward = lambda: F.embedding_bag(idx, weight, off, mode="sum", include_last_offset=True)[:, None]  # noqa
        else:
            forward = lambda: tbe_forward_ref(weight, toff, idx, off)  # noqa: E731

        def fn():
            forward().backward(grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
    measure(benchmark, fn, device=device, group=f"tbe train step rows1e6 B{B} D{OPT_D}", provider=provider)
