"""Table-batched embedding: unirec against FBGEMM, stock PyTorch and the reference.

B=512 samples, T tables of 10^5 rows, bags of 20 ids drawn Zipf(1.15) over
each table (hot rows scattered by one random permutation, the same in every
batch); the forward takes 8 such batches in turn.

Providers: ``unirec`` (the C++ kernel), ``fbgemm`` (FBGEMM's
SplitTableBatchedEmbeddingBagsCodegen on the CPU: EmbeddingLocation.HOST,
ComputeDevice.CPU, sum pooling; ``pip install --no-deps 'fbgemm-gpu-cpu==1.8.0'``
for torch 2.13, see the ``peers`` extra; skipped with the import error when
fbgemm_gpu does not import), ``torch_packed`` (one F.embedding_bag on the
packed weight with global ids, the table offsets added ahead of time and not
timed), ``torch_per_table`` (F.embedding_bag once per table) and the
``reference``. Every provider reads the same memory
(unirec.ops.empty_table: transparent huge pages on a CPU); FBGEMM's weight
is pointed at it.

The train step (forward, backward, update) pits unirec's fused row-wise
Adagrad (TableBatchedEmbedding(optimizer="rowwise_adagrad")) against FBGEMM's
fused EXACT_ROWWISE_ADAGRAD, configured to the same rule (below), and against
stock PyTorch: F.embedding_bag(sparse=True) + torch.optim.Adagrad on the
sparse gradient, and the dense gradient + torch.optim.Adagrad. torch has no
row-wise Adagrad: its Adagrad keeps one accumulator per element, D times the
state of the row-wise rule, so the stock rows do the same job by a different
(heavier) rule.

The row-wise rule, both libraries (unirec: csrc/cpu/embedding.cpp; FBGEMM:
its CPU rowwise_adagrad update): for each row r used in the batch, g = the
row's gradient summed over every bag that used it ("exact": duplicates are
summed first, the row updated once), h[r] += mean_d(g_d^2),
w[r] -= lr * g / (sqrt(h[r]) + eps). FBGEMM adds weight decay on request;
it is configured off (weight_decay=0, WeightDecayMode.NONE), as unirec has
none. Before FBGEMM is timed, ``check_fbgemm`` asserts that it and unirec
agree within 1e-5 on the pooled output and, after one step from the same
weights, on every row and the row-wise state; ``test_fbgemm_matches_unirec``
runs the same check as a test (``pytest benchmarks/bench_embedding.py``).
"""
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

import unirec
from unirec.ops.reference import tbe_forward_ref

from conftest import measure

try:
    import fbgemm_gpu  # noqa: F401
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, EmbeddingLocation, PoolingMode, SplitTableBatchedEmbeddingBagsCodegen, WeightDecayMode)
    FBGEMM_MISSING = None
except Exception as exc:  # ImportError, or an fbgemm_gpu built for another torch (OSError)
    FBGEMM_MISSING = (f"fbgemm_gpu does not import ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                      "pip install --no-deps 'fbgemm-gpu-cpu==1.8.0' (torch 2.13)")

B, ROWS, BAG, ALPHA = 512, 100_000, 20, 1.15
LR, EPS = 0.05, 1e-8


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


def global_ids(table_offsets, indices, offsets):
    """Ids into the packed weight: each table's first row added to its ids (done once, ahead of time)."""
    per_table = offsets[::B].diff()  # ids per table: bags are table-major, B per table
    return indices + table_offsets[:-1].repeat_interleave(per_table)


def fbgemm_tbe(T, D, rows, weight):
    """FBGEMM's CPU table-batched embedding over `weight` [T * rows, D] (shared, and updated in
    place by its fused optimizer), with unirec's row-wise Adagrad rule (see the module doc)."""
    if FBGEMM_MISSING:
        pytest.skip(FBGEMM_MISSING)
    if weight.device.type != "cpu":
        pytest.skip("the fbgemm provider is FBGEMM's CPU build (fbgemm-gpu-cpu)")
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=LR, eps=EPS, weight_decay=0.0,
        weight_decay_mode=WeightDecayMode.NONE, pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32, output_dtype=SparseType.FP32)
    # FBGEMM packs the tables the same way (table t from row t * rows): point it at our memory.
    emb.weights_host = torch.nn.Parameter(weight.view(-1))
    return emb


def unirec_tbe(T, D, rows, weight):
    module = unirec.nn.TableBatchedEmbedding([rows] * T, D, optimizer="rowwise_adagrad", lr=LR, eps=EPS,
                                             device=weight.device)
    module.weight.copy_(weight)
    return module


@functools.lru_cache(maxsize=None)
def check_fbgemm(T, D, rows, device, tol=1e-5):
    """FBGEMM and unirec agree within `tol` on the pooled output [B, T, D] and, after one step from
    the same weights, on the updated rows and the row-wise state; raises otherwise. Returns the
    largest absolute differences and the fraction of the tolerance used, for the record (the
    row-wise state sums squared gradients of hot rows into the thousands: its float32 rounding
    shows in the absolute figure, not in the relative one)."""
    toff, idx, off = zipf_bags(T, rows, device)
    init = packed_weight(T, D, rows, device)
    w_fb = unirec.ops.empty_table(T * rows, D, device=device).copy_(init)
    fb, ur = fbgemm_tbe(T, D, rows, w_fb), unirec_tbe(T, D, rows, init)
    grad = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1)).to(device)
    out_fb, out_ur = fb(idx, off), ur(idx, off)
    out_fb.backward(grad.view(B, T * D))
    out_ur.backward(grad)
    state_fb = torch.cat([s[0] for s in fb.split_optimizer_states()])
    pairs = {"pooled": (out_fb.detach().view(B, T, D), out_ur.detach()), "weight": (w_fb, ur.weight),
             "rowwise_state": (state_fb, ur.optimizer_state)}
    if torch.equal(w_fb, init) or not state_fb.any():
        raise AssertionError("FBGEMM's step left the weight or its state unchanged: nothing was compared")
    out = {}
    for name, (a, b) in pairs.items():
        diff, used = compare(a, b, tol)
        if not used <= 1:  # also catches NaN
            raise AssertionError(f"FBGEMM vs unirec, {name}: max |diff| {diff:.3g}, {used:.3g}x the tolerance {tol}")
        out[f"check_max_abs_diff_{name}"], out[f"check_tolerance_used_{name}"] = diff, used
    return out


def compare(a, b, tol, block=1 << 18):
    """(max |a - b|, max |a - b| / (tol + tol * |b|)) -- assert_close's criterion, <= 1 passes --
    a block of rows at a time: the tables run to gigabytes, their temporaries would too."""
    diff = used = 0.0
    for i in range(0, a.shape[0], block):
        d = (a[i:i + block] - b[i:i + block]).abs()
        diff = max(diff, float(d.max()))
        used = max(used, float((d / (tol + tol * b[i:i + block].abs())).max()))
    return diff, used


def test_fbgemm_matches_unirec():
    """The check the benchmark runs before timing FBGEMM, at a small shape (not a benchmark)."""
    check_fbgemm(3, 64, 1000, "cpu")
    check_fbgemm(2, 24, 1000, "cpu")  # a width without unirec's compile-time loop


FWD_SHAPES = [(T, D) for T in (1, 8, 32) for D in (32, 64, 128)]


# The forward cycles through several batches, as training does: one batch
# repeated would leave its distinct rows in the last-level cache between calls.
BATCHES = 8


@pytest.mark.parametrize("T,D", FWD_SHAPES, ids=[f"T{T}-D{D}" for T, D in FWD_SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "fbgemm", "torch_packed", "torch_per_table", "reference"])
def test_forward(benchmark, device, T, D, provider):
    batches = [zipf_bags(T, ROWS, device, seed) for seed in range(BATCHES)]
    weight = packed_weight(T, D, ROWS, device)
    step = itertools.count()
    info = {}
    if provider == "unirec":
        fn = lambda: unirec.ops.table_batched_embedding(weight, *batches[next(step) % BATCHES])  # noqa: E731
    elif provider == "fbgemm":
        info = check_fbgemm(T, D, ROWS, device)
        emb = fbgemm_tbe(T, D, ROWS, weight)

        def fn():
            with torch.no_grad():  # a lookup, as the other providers' (their weight needs no grad)
                return emb(*batches[next(step) % BATCHES][1:])
    elif provider == "torch_packed":
        inputs = [(global_ids(*batch), batch[2]) for batch in batches]

        def fn():
            gidx, off = inputs[next(step) % BATCHES]
            return F.embedding_bag(gidx, weight, off, mode="sum", include_last_offset=True)
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
            bytes_moved=bytes_moved, params=dict(B=B, T=T, D=D, rows=ROWS, bag=BAG, zipf=ALPHA), **info)


FWD_BWD_SHAPES = [(8, 64), (32, 64)]


@pytest.mark.parametrize("T,D", FWD_BWD_SHAPES, ids=[f"T{T}-D{D}" for T, D in FWD_BWD_SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "torch_packed", "torch_per_table", "reference"])
def test_forward_backward(benchmark, device, T, D, provider):
    """Forward and backward to a dense weight gradient (no optimizer)."""
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
    elif provider == "torch_packed":
        weight = packed_weight(T, D, ROWS, device).clone().requires_grad_()
        gidx, grad_tb = global_ids(toff, idx, off), grad.transpose(0, 1).reshape(T * B, D)

        def fn():
            F.embedding_bag(gidx, weight, off, mode="sum", include_last_offset=True).backward(grad_tb)
            weight.grad = None
    else:
        weight = packed_weight(T, D, ROWS, device).clone().requires_grad_()
        op = unirec.ops.table_batched_embedding if provider == "unirec" else tbe_forward_ref

        def fn():
            op(weight, toff, idx, off).backward(grad)
            weight.grad = None
    measure(benchmark, fn, device=device, group=f"tbe forward+backward B{B} T{T} D{D}", provider=provider,
            params=dict(B=B, T=T, D=D, rows=ROWS, bag=BAG, zipf=ALPHA))


# (T, D, rows per table): the 10^6-row table of the README, and the forward's shapes.
TRAIN_SHAPES = [(1, 64, 1_000_000), (32, 64, ROWS), (8, 128, ROWS), (1, 64, ROWS)]
TRAIN_PROVIDERS = ["unirec_fused_rowwise_adagrad", "fbgemm_exact_rowwise_adagrad", "torch_sparse_adagrad",
                   "torch_adagrad_dense", "reference_adagrad_dense"]


def _train_cases():
    # The dense gradient only on the README's table: at T=32 a dense step takes seconds
    # (a 0.8 GB gradient and accumulator) and sparse=True is the stronger stock way anyway.
    return [(shape, p) for shape in TRAIN_SHAPES for p in TRAIN_PROVIDERS
            if "dense" not in p or shape[2] == 1_000_000]


@pytest.mark.parametrize("shape,provider", _train_cases(),
                         ids=[f"T{T}-D{D}-rows{R:.0e}-{p}".replace("+0", "") for (T, D, R), p in _train_cases()])
def test_train_step(benchmark, device, shape, provider):
    """One training step: forward, backward and the Adagrad update, same ids, lr and eps throughout;
    the steps cycle through the forward's 8 batches, as training does."""
    T, D, rows = shape
    batches = [zipf_bags(T, rows, device, seed) for seed in range(BATCHES)]
    grad = torch.randn(B, T, D, device=device)
    init = packed_weight(T, D, rows, device)
    step = itertools.count()
    info = {}
    if provider == "unirec_fused_rowwise_adagrad":
        module = unirec_tbe(T, D, rows, init)

        def fn():
            _, idx, off = batches[next(step) % BATCHES]
            module(idx, off).backward(grad)
    elif provider == "fbgemm_exact_rowwise_adagrad":
        info = check_fbgemm(T, D, rows, device)
        emb = fbgemm_tbe(T, D, rows, unirec.ops.empty_table(T * rows, D, device=device).copy_(init))
        grad_flat = grad.view(B, T * D)  # FBGEMM's output is [B, T * D]

        def fn():
            _, idx, off = batches[next(step) % BATCHES]
            emb(idx, off).backward(grad_flat)
    else:
        weight = unirec.ops.empty_table(T * rows, D, device=device).copy_(init).requires_grad_()
        opt = torch.optim.Adagrad([weight], lr=LR, eps=EPS)
        gids = [global_ids(*batch) for batch in batches]
        grad_tb = grad.transpose(0, 1).reshape(T * B, D)  # embedding_bag's bags are table-major

        def fn():
            i = next(step) % BATCHES
            toff, idx, off = batches[i]
            if provider == "reference_adagrad_dense":
                tbe_forward_ref(weight, toff, idx, off).backward(grad)
            else:
                F.embedding_bag(gids[i], weight, off, mode="sum", include_last_offset=True,
                                sparse=provider == "torch_sparse_adagrad").backward(grad_tb)
            opt.step()
            opt.zero_grad(set_to_none=True)
    measure(benchmark, fn, device=device, group=f"tbe train step B{B} T{T} D{D} rows{rows:.0e}".replace("+0", ""),
            provider=provider, params=dict(B=B, T=T, D=D, rows=rows, bag=BAG, zipf=ALPHA, lr=LR, eps=EPS), **info)
