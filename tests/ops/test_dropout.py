"""dropout: the C++ kernel bit for bit against its PyTorch definition, the statistics of the masks,
the forward/backward formula (the backward regenerates the mask, nothing is saved), and bad input;
the same with row keys (a row's mask a function of (seed, key, column): it follows its key)."""
import math

import pytest
import torch

import unirec  # noqa: F401
from unirec.nn import Dropout
from unirec.ops import dropout
from unirec.ops.reference import dropout_mask_ref, dropout_ref
from unirec.ops.reference.dropout import dropout_draws_ref, row_draws_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _kept(n, threshold, seed):
    return torch.ops.unirec.dropout(torch.ones(n), threshold, seed) != 0


# 2048 elements make one chunk (1024 hashes, low halves then high halves): sizes below, at and past
# one, and tails shorter (3 x 1000) and longer (100_003) than half a chunk.
@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (7, 5), (2048,), (3, 1000), (4, 33, 9), (100_003,)])
@pytest.mark.parametrize("threshold", [1, 13107, 32768, 65535, 65536])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["auto", "baseline"])  # the vectorised variant and the fallback
def test_matches_reference(monkeypatch, shape, threshold, dtype, isa):
    if isa != "auto":
        monkeypatch.setenv("UNIREC_CPU_ISA", isa)
    x = torch.randn(shape, dtype=dtype)
    for seed in (0, 1, 2 ** 62 - 1, int(torch.randint(0, 2 ** 62, ()))):
        out = torch.ops.unirec.dropout(x, threshold, seed)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, dropout_ref(x, threshold, seed))
        kept = dropout_mask_ref(x, threshold, seed)
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_non_contiguous_input():
    x = torch.randn(40, 70).t()
    torch.testing.assert_close(torch.ops.unirec.dropout(x, 30000, 9),
                               dropout_ref(x.contiguous(), 30000, 9), rtol=0, atol=0)


def test_mask_is_independent_of_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kept(1 << 20, 40000, 7)
        torch.set_num_threads(max(2, before))
        many = _kept(1 << 20, 40000, 7)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.854])
def test_mask_statistics(keep):
    """Kept fraction within 6 standard deviations of keep; neighbours, the two halves of one hash
    (lag 1024) and adjacent seeds uncorrelated."""
    n = 1 << 21
    thr = round(keep * 65536)
    q = thr / 65536
    m = _kept(n, thr, 12345).double()
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(m.mean().item() - q) < 6 * sd
    for lag in (1, 2, 3, 8, 1023, 1024, 1025, 2048):
        c = ((m[:-lag] - q) * (m[lag:] - q)).mean().item() / (q * (1 - q))
        assert abs(c) < 6 / math.sqrt(n), lag
    for other in (12346, 12345 ^ (1 << 61)):
        m2 = _kept(n, thr, other).double()
        c = ((m - q) * (m2 - q)).mean().item() / (q * (1 - q))
        assert abs(c) < 6 / math.sqrt(n), other


def test_draws_are_uniform():
    """Chi-square of the draws' high and low bytes (256 bins each) within 6 standard deviations of
    its mean; the kernel matches these draws bit for bit (test_matches_reference)."""
    n = 1 << 21
    d = dropout_draws_ref(n, 2024)
    for byte in (d >> 8, d & 0xFF):
        counts = torch.bincount(byte, minlength=256).double()
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
        assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_forward_backward_formula(dtype):
    x = torch.randn(513, 37, dtype=dtype, requires_grad=True)
    packed = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = dropout(x, 0.3, True, impl="cpp")
    assert packed == []  # the backward regenerates the mask: no tensor is saved
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    thr = round(0.7 * 65536)
    assert torch.equal(y, dropout_ref(x.detach(), thr, seed))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, dropout_ref(g, thr, seed))
    m = dropout_mask_ref(x, thr, seed).double() * (65536 / thr)
    tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-6)
    torch.testing.assert_close(x.grad.double(), g.double() * m, rtol=tol, atol=0)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3, True, impl="cpp"), y)  # the seed repeats the mask


def test_dropout_edge_cases_and_module():
    x = torch.randn(10, 4, requires_grad=True)
    assert dropout(x, 0.0, True) is x and dropout(x, 0.9, False) is x
    z = dropout(x, 1.0, True)
    assert torch.equal(z, torch.zeros_like(x)) and z.requires_grad
    assert dropout(torch.empty(0, 3), 0.5, True).shape == (0, 3)
    mod = Dropout(0.25)
    mod.eval()
    assert mod(x) is x
    mod.train()
    y = mod(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    ref = dropout(x, 0.25, True, impl="reference")  # F.dropout: same scaling rule
    torch.testing.assert_close(ref[ref != 0], x[ref != 0] / 0.75)


def test_dropout_bad_input():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="p must lie in"):
        dropout(x, 1.5)
    with pytest.raises(ValueError, match="impl must be one of"):
        dropout(x, 0.5, impl="cuda")
    for thr in (0, 70000):
        with pytest.raises(ValueError, match=r"threshold must lie in \[1, 65536\].*got " + str(thr)):
            torch.ops.unirec.dropout(x, thr, 0)
    with pytest.raises(ValueError, match="input must be float32, bfloat16, float16 or float64, got Long"):
        torch.ops.unirec.dropout(torch.ones(3, dtype=torch.int64), 100, 0)
    with pytest.raises(ValueError, match="p must lie in"):
        Dropout(-0.1)


def test_opcheck():
    for x in (torch.randn(5, 6, requires_grad=True), torch.empty(0), torch.randn(3, 4, dtype=torch.float64),
              torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True), torch.randn(6, 5).t()):
        torch.library.opcheck(torch.ops.unirec.dropout.default, (x, 30000, 11))


def test_gradcheck():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    f = lambda t: torch.ops.unirec.dropout(t, 40000, 5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


# ------------------------------------------------------------------------------------------ row keys

def _keys(rows, seed=0):
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (rows,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(seed))


def _rows(shape):
    r = 1
    for d in shape[:-1]:
        r *= d
    return r


# Rows shorter than, at and past one chunk (2048), odd lengths (one unpaired hash), empty tensors.
@pytest.mark.parametrize("shape", [(0,), (0, 5), (4, 0), (1,), (3,), (7, 5), (1, 96), (5, 2, 33), (3, 2048),
                                   (2, 2049), (2, 5001), (60, 96)])
@pytest.mark.parametrize("threshold", [1, 45875, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("isa", ["auto", "baseline"])
def test_keyed_matches_reference(monkeypatch, shape, threshold, dtype, isa):
    if isa != "auto":
        monkeypatch.setenv("UNIREC_CPU_ISA", isa)
    x = torch.randn(shape, dtype=dtype)
    keys = _keys(_rows(shape))
    for seed in (0, 2 ** 62 - 1, int(torch.randint(0, 2 ** 62, ()))):
        out = torch.ops.unirec.dropout(x, threshold, seed, keys)
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.equal(out, dropout_ref(x, threshold, seed, keys))
        kept = dropout_mask_ref(x, threshold, seed, keys)
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_row_draws_layout():
    """A short row takes ceil(cols / 2) hashes, both halves of each: the high halves of its first
    floor(cols / 2) counters decide its second half; a row past one chunk continues with the next."""
    keys = _keys(4, 1)
    d = row_draws_ref(keys, 4096 + 7, 99)
    short = row_draws_ref(keys, 7, 99)
    assert short.shape == (4, 7) and not torch.equal(short, d[:, :7])
    assert torch.equal(row_draws_ref(keys, 2048, 99), d[:, :2048])  # a full chunk: as in the long row
    assert torch.equal(row_draws_ref(keys[1:3], 7, 99), short[1:3])  # rows are independent of each other
    assert not torch.equal(row_draws_ref(keys, 7, 98), short)


def test_same_key_same_row_mask_anywhere():
    """Permuting the rows (with their keys) permutes the masks; equal keys give equal rows; the mask does
    not depend on the leading shape, only on rows x last dimension."""
    x = torch.ones(50, 96)
    keys = _keys(50, 2)
    out = torch.ops.unirec.dropout(x, 30000, 17, keys)
    perm = torch.randperm(50)
    assert torch.equal(torch.ops.unirec.dropout(x[perm], 30000, 17, keys[perm]), out[perm])
    rep = torch.ops.unirec.dropout(torch.ones(3, 96), 30000, 17, keys[[7, 7, 7]])
    assert torch.equal(rep, out[[7, 7, 7]])
    assert torch.equal(torch.ops.unirec.dropout(x.view(5, 10, 96), 30000, 17, keys).view(50, 96), out)
    sub = torch.ops.unirec.dropout(torch.ones(10, 96), 30000, 17, keys[20:30])
    assert torch.equal(sub, out[20:30])
    # the same rows without keys (flat index) or under another seed: other masks
    assert not torch.equal(torch.ops.unirec.dropout(x, 30000, 17), out)
    assert not torch.equal(torch.ops.unirec.dropout(x, 30000, 18, keys), out)


def test_keyed_mask_is_independent_of_thread_count():
    keys = _keys(4000, 3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.unirec.dropout(torch.ones(4000, 130), 40000, 7, keys)
        torch.set_num_threads(max(2, before))
        many = torch.ops.unirec.dropout(torch.ones(4000, 130), 40000, 7, keys)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("keep", [0.1, 0.7])
def test_keyed_mask_statistics(keep):
    """Kept fraction within 6 standard deviations, per column too (the two halves of a row); neighbours
    in a row, the two halves of one hash, the same column of adjacent keys and of one key under adjacent
    seeds uncorrelated."""
    rows, cols = 1 << 14, 96
    thr = round(keep * 65536)
    q = thr / 65536
    keys = torch.arange(rows, dtype=torch.int64) * 1_000_003  # structured keys, as a model makes them
    m = (torch.ops.unirec.dropout(torch.ones(rows, cols), thr, 12345, keys) != 0).double()
    n = m.numel()
    assert abs(m.mean().item() - q) < 6 * math.sqrt(q * (1 - q) / n)
    col = m.mean(0)
    assert ((col - q).abs() < 6 * math.sqrt(q * (1 - q) / rows)).all()

    def corr(a, b):
        return ((a - q) * (b - q)).mean().item() / (q * (1 - q))

    for lag in (1, 2, 48):  # 48: the high half of the same hash
        assert abs(corr(m[:, :-lag], m[:, lag:])) < 6 / math.sqrt(rows * (cols - lag)), lag
    assert abs(corr(m[:-1], m[1:])) < 6 / math.sqrt((rows - 1) * cols)
    m2 = (torch.ops.unirec.dropout(torch.ones(rows, cols), thr, 12346, keys) != 0).double()
    assert abs(corr(m, m2)) < 6 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keyed_forward_backward(dtype):
    x = torch.randn(37, 24, dtype=dtype, requires_grad=True)
    keys = _keys(37, 4)
    torch.manual_seed(5)
    y = dropout(x, 0.3, True, impl="cpp", row_keys=keys)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    thr = round(0.7 * 65536)
    assert torch.equal(y, dropout_ref(x.detach(), thr, seed, keys))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, dropout_ref(g, thr, seed, keys))
    # the module passes the keys; "reference" (F.dropout) takes them and ignores them
    mod = Dropout(0.3)
    torch.manual_seed(5)
    assert torch.equal(mod(x, row_keys=keys), y)
    ref = dropout(x, 0.3, True, impl="reference", row_keys=keys)
    assert ref.shape == x.shape
    assert dropout(x, 0.3, False, row_keys=keys) is x


def test_keyed_gradcheck_and_opcheck():
    keys = _keys(6, 5)
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    f = lambda t: torch.ops.unirec.dropout(t, 40000, 5, keys)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    for t, k in ((torch.randn(5, 6, requires_grad=True), _keys(5)), (torch.empty(0, 4), _keys(0)),
                 (torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True), _keys(6)),
                 (torch.randn(6, 5).t(), _keys(5)), (torch.randn(4, 6), _keys(8)[::2])):
        torch.library.opcheck(torch.ops.unirec.dropout.default, (t, 30000, 11, k))


def test_keyed_bad_input():
    x = torch.randn(4, 3)
    op = torch.ops.unirec.dropout
    cases = [(torch.zeros(4, dtype=torch.int32), r"row_keys must be int64, got (Int|torch\.int32)"),
             (torch.zeros(2, 2, dtype=torch.int64), r"row_keys must be 1-D, got shape \[2, 2\]"),
             (torch.zeros(12, dtype=torch.int64), r"row_keys must have one entry per row of input .* = 4 .*got 12")]
    for keys, msg in cases:
        with pytest.raises(ValueError, match=msg):
            op(x, 100, 0, keys)
        with pytest.raises(ValueError, match=msg):
            dropout(x, 0.5, row_keys=keys)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        op(torch.tensor(1.0), 100, 0, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="row_keys is on meta but input is on cpu"):
        dropout(x, 0.5, row_keys=torch.zeros(4, dtype=torch.int64, device="meta"))
