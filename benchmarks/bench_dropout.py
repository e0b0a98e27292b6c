"""Dropout forward + backward: unirec's counter-based mask kernel against F.dropout (torch's
Bernoulli sampling on CPU; on CUDA both run torch's fused Philox kernel).

Shapes: the unified model's FFN activations on MovieLens-100K ([3500, 192]) and a larger layer
([16384, 1024]); p = 0.15. Bytes: read x, write out and mask (forward), read grad and mask, write
the input gradient (backward), all float32.
"""
import pytest
import torch
import torch.nn.functional as F

import unirec

from conftest import bench_device, measure

SHAPES = [(3500, 192), (16384, 1024)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "torch"])
def test_dropout_fwd_bwd(benchmark, shape, provider):
    device = bench_device()
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    drop = (lambda t: unirec.ops.dropout(t, 0.15, True)) if provider == "unirec" else \
        (lambda t: F.dropout(t, 0.15, True))

    def fn():
        x.grad = None
        drop(x).backward(g)
    measure(benchmark, fn, device=device, group=f"dropout fwd+bwd {shape[0]}x{shape[1]}", provider=provider,
            bytes_moved=6 * x.numel() * 4)
