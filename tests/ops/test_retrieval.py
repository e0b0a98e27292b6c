"""topk_scores: every backend against the reference (matmul, mask, torch.topk)."""
import pytest
import torch

import unirec  # noqa: F401
from unirec.ops import topk_scores
from unirec.ops.reference import topk_scores_ref

try:
    from conftest import DEVICES
except ImportError:  # pragma: no cover
    DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]

DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _skip(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 runs on CPU only")


def _poison_allocator(device):
    """Leave NaN/garbage in the caching allocator so unwritten outputs show."""
    if device == "cuda":
        torch.empty(1 << 24, device=device).fill_(float("nan"))


def _exclusions(B, N, device, all_of=None):
    """Random CSR exclusion lists: some empty, duplicates allowed; query `all_of` excludes every item."""
    lists = []
    for b in range(B):
        if b == all_of:
            lists.append(torch.randperm(N))
        else:
            n = int(torch.randint(0, max(1, N // 2) + 1, ()).item()) if b % 3 else 0
            lists.append(torch.randint(0, N, (n,)))
    lengths = torch.tensor([len(x) for x in lists])
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.cat(lists) if lists else torch.zeros(0, dtype=torch.long)
    return offsets.to(device), ids.long().to(device)


def _int_inputs(B, N, D, device, dtype, bias):
    # Small integers: every score is exact in every dtype, with many ties, so
    # values and indices must match the reference exactly.
    q = torch.randint(-2, 3, (B, D)).to(device=device, dtype=dtype)
    items = torch.randint(-2, 3, (N, D)).to(device=device, dtype=dtype)
    b = torch.randint(-2, 3, (N,)).to(device=device, dtype=dtype) if bias else None
    return q, items, b


SHAPES = [  # B, N, D, k
    (5, 300, 13, 10),
    (1, 1, 3, 1),  # a single item
    (4, 50, 8, 50),  # k = N
    (3, 40, 5, 60),  # k > N
    (6, 9000, 16, 7),  # several tiles (filter + merge path on CUDA)
    (3, 6000, 4, 1100),  # k above the GPU's ranking-merge limit
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
def test_exact_against_reference(device, dtype, shape, bias, exclude):
    _skip(device, dtype)
    B, N, D, k = shape
    q, items, b = _int_inputs(B, N, D, device, dtype, bias)
    off, ids = _exclusions(B, N, device, all_of=B - 1 if B > 1 else None) if exclude else (None, None)
    _poison_allocator(device)
    v, i = topk_scores(q, items, k, item_bias=b, exclude_offsets=off, exclude_indices=ids)
    vr, ir = topk_scores_ref(q, items, k, b, off, ids)
    assert v.dtype == dtype and i.dtype == torch.int64 and v.shape == (B, k) and i.shape == (B, k)
    torch.testing.assert_close(i, ir, rtol=0, atol=0)
    torch.testing.assert_close(v, vr, rtol=0, atol=0)
    if exclude and B > 1:  # the query that excludes everything
        assert (i[B - 1] == -1).all() and torch.isinf(v[B - 1]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_increasing_scores(device):
    # Every item beats all before it: each tile overflows the GPU's candidate
    # lists and takes the exact path.
    N, D, k = 12000, 4, 30
    items = torch.arange(N, dtype=torch.float32, device=device)[:, None].repeat(1, D) / N
    q = torch.ones(3, D, device=device)
    q[1] = -1.0
    v, i = topk_scores(q, items, k)
    vr, ir = topk_scores_ref(q, items, k)
    torch.testing.assert_close(i, ir, rtol=0, atol=0)
    torch.testing.assert_close(v, vr)


@pytest.mark.parametrize("device", DEVICES)
def test_all_scores_tied(device):
    q = torch.zeros(2, 3, device=device)
    items = torch.randn(5000, 3, device=device)
    off = torch.tensor([0, 2, 2], device=device)
    ids = torch.tensor([0, 3], device=device)
    v, i = topk_scores(q, items, 5, exclude_offsets=off, exclude_indices=ids)
    assert i[0].tolist() == [1, 2, 4, 5, 6] and i[1].tolist() == [0, 1, 2, 3, 4]
    assert (v == 0).all()


TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float64: (1e-10, 1e-10)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_floats(device, dtype):
    _skip(device, dtype)
    B, N, D, k = 7, 10000, 24, 20
    q = torch.randn(B, D, device=device, dtype=dtype)
    items = torch.randn(N, D, device=device, dtype=dtype)
    b = torch.randn(N, device=device, dtype=dtype)
    off, ids = _exclusions(B, N, device)
    v, i = topk_scores(q, items, k, item_bias=b, exclude_offsets=off, exclude_indices=ids)
    vr, _ = topk_scores_ref(q, items, k, b, off, ids)
    atol, rtol = TOL[dtype]
    # Values agree with the reference up to the GEMM's summation order; each
    # returned index scores its value (float64 recomputation) and is not excluded.
    torch.testing.assert_close(v.double(), vr.double(), atol=atol * 10, rtol=rtol * 10)
    exact = (q.double()[:, None, :] * items.double()[i]).sum(-1) + b.double()[i]
    torch.testing.assert_close(v.double(), exact, atol=atol * 10 + 0.05 * (dtype == torch.bfloat16), rtol=rtol * 10)
    assert (v[:, :-1] >= v[:, 1:]).all()
    for r in range(B):
        assert not set(i[r].tolist()) & set(ids[off[r]:off[r + 1]].tolist())
        assert len(set(i[r].tolist())) == k


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    q = torch.randn(0, 4, device=device)
    v, i = topk_scores(q, torch.randn(10, 4, device=device), 3)
    assert v.shape == (0, 3) and i.shape == (0, 3)
    v, i = topk_scores(torch.randn(2, 4, device=device), torch.randn(0, 4, device=device), 3)
    assert (i == -1).all() and torch.isinf(v).all() and (v < 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, items = torch.randn(3, 4, device=device), torch.randn(10, 4, device=device)
    off = torch.tensor([0, 1, 1, 2], device=device)
    with pytest.raises(ValueError, match="k must be >= 1"):
        topk_scores(q, items, 0)
    with pytest.raises(ValueError, match="share D"):
        topk_scores(q, torch.randn(10, 5, device=device), 2)
    with pytest.raises(ValueError, match="dtype"):
        topk_scores(q, items.double(), 2)
    with pytest.raises(ValueError, match="item_bias"):
        topk_scores(q, items, 2, item_bias=torch.randn(9, device=device))
    with pytest.raises(ValueError, match="outside|\\[0, N\\)"):
        topk_scores(q, items, 2, exclude_offsets=off, exclude_indices=torch.tensor([1, 10], device=device))
    with pytest.raises(ValueError, match="outside|\\[0, N\\)"):
        topk_scores(q, items, 2, exclude_offsets=off, exclude_indices=torch.tensor([-1, 3], device=device))
    with pytest.raises(ValueError, match="exclude_offsets"):
        topk_scores(q, items, 2, exclude_offsets=off[:3], exclude_indices=torch.tensor([1, 2], device=device))
    with pytest.raises(ValueError, match="together"):
        topk_scores(q, items, 2, exclude_offsets=off)
    with pytest.raises(ValueError, match="impl"):
        topk_scores(q, items, 2, impl="nope")
    if device == "cuda":
        with pytest.raises(ValueError, match="device"):
            topk_scores(q, items.cpu(), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, items, b = torch.randn(4, 6, device=device), torch.randn(30, 6, device=device), torch.randn(30, device=device)
    off = torch.tensor([0, 2, 2, 3, 5], device=device)
    ids = torch.tensor([1, 4, 0, 29, 29], device=device)
    q.requires_grad_()
    items.requires_grad_()
    torch.library.opcheck(torch.ops.unirec.topk_scores, (q, items, 5, b, off, ids))
    torch.library.opcheck(torch.ops.unirec.topk_scores, (q, items, 40, None, None, None))


def test_gradcheck_cpu():
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    items = torch.randn(20, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    off = torch.tensor([0, 2, 2, 3])
    ids = torch.tensor([1, 4, 7])

    def f(q, items, b):
        return topk_scores(q, items, 25, item_bias=b, exclude_offsets=off, exclude_indices=ids)[0].clamp_min(-1e3)

    torch.autograd.gradcheck(f, (q, items, b))
