"""dropout: the C++ mask generator bit for bit against its PyTorch definition, the statistics of the
masks, the forward/backward formula, and bad input."""
import math

import pytest
import torch

import unirec  # noqa: F401
from unirec.nn import Dropout
from unirec.ops import dropout
from unirec.ops.reference import dropout_mask_ref


def _kept(x, threshold, seed):
    return torch.ops.unirec.dropout_fwd(x, threshold, seed)[1] != 0


@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (7, 5), (4, 33, 9), (100_003,)])
@pytest.mark.parametrize("threshold", [1, 13107, 32768, 65535, 65536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fwd_matches_reference(shape, threshold, dtype):
    x = torch.randn(shape, dtype=dtype)
    for seed in (0, 1, 2 ** 62 - 1, int(torch.randint(0, 2 ** 62, ()))):
        out, mask = torch.ops.unirec.dropout_fwd(x, threshold, seed)
        want = dropout_mask_ref(x, threshold, seed).to(dtype) * torch.tensor(65536 / threshold, dtype=dtype)
        assert mask.dtype == dtype and mask.shape == x.shape
        assert torch.equal(mask, want)
        assert torch.equal(out, x * want)


def test_mask_is_independent_of_thread_count():
    x = torch.empty(1 << 20)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kept(x, 40000, 7)
        torch.set_num_threads(max(2, before))
        many = _kept(x, 40000, 7)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.854])
def test_mask_statistics(keep):
    """Kept fraction within 6 standard deviations of keep; neighbours and seeds uncorrelated."""
    n = 1 << 21
    thr = round(keep * 65536)
    q = thr / 65536
    m = _kept(torch.empty(n), thr, 12345).double()
    sd = math.sqrt(q * (1 - q) / n)
    assert abs(m.mean().item() - q) < 6 * sd
    for lag in (1, 2, 3, 4, 5, 8):  # within a 64-bit draw and across draws
        c = ((m[:-lag] - q) * (m[lag:] - q)).mean().item() / (q * (1 - q))
        assert abs(c) < 6 / math.sqrt(n)
    m2 = _kept(torch.empty(n), thr, 12346).double()
    c = ((m - q) * (m2 - q)).mean().item() / (q * (1 - q))
    assert abs(c) < 6 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_forward_backward_formula(dtype):
    x = torch.randn(513, 37, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.3, True, impl="cpp")
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    thr = round(0.7 * 65536)
    m = dropout_mask_ref(x, thr, seed).to(dtype) * (65536 / thr)
    torch.testing.assert_close(y, x.detach() * m)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * m)
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
        with pytest.raises(ValueError, match="threshold must lie in"):
            torch.ops.unirec.dropout_fwd(x, thr, 0)
    with pytest.raises(ValueError, match="input must be float"):
        torch.ops.unirec.dropout_fwd(torch.ones(3, dtype=torch.int64), 100, 0)
    with pytest.raises(ValueError, match="p must lie in"):
        Dropout(-0.1)


def test_opcheck():
    for x in (torch.randn(5, 6, requires_grad=True), torch.empty(0), torch.randn(3, 4, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.unirec.dropout_fwd.default, (x, 30000, 11))


def test_gradcheck():
    x = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.unirec.dropout_fwd(t, 40000, 5)[0], (x,))
