"""dropout: the C++ kernel bit for bit against its PyTorch definition, the statistics of the masks,
the forward/backward formula (the backward regenerates the mask, nothing is saved), and bad input."""
import math

import pytest
import torch

import unirec  # noqa: F401
from unirec.nn import Dropout
from unirec.ops import dropout
from unirec.ops.reference import dropout_mask_ref, dropout_ref
from unirec.ops.reference.dropout import dropout_draws_ref

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
