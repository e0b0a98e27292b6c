"""Dropout forward, and forward + backward: unirec's counter-based kernel (the backward regenerates
the mask from the seed) against stock F.dropout, provider "torch_dropout" (torch's Bernoulli
sampling on CPU; on CUDA both run torch's fused Philox kernel).

Shapes: the unified model's activations on MovieLens-100K ([2700, 96] after attention and the
embeddings, [2700, 384] inside the feed-forward layer) and a larger layer ([16384, 1024]);
p = 0.15, float32. Bytes: read x, write out (forward); plus read grad, write the input gradient
(backward).
"""
import pytest
import torch
import torch.nn.functional as F

import unirec

from conftest import bench_device, measure

SHAPES = [(2700, 96), (2700, 384), (16384, 1024)]
P = 0.15


def _drop(provider):
    if provider == "unirec":
        return lambda t: unirec.ops.dropout(t, P, True)
    return lambda t: F.dropout(t, P, True)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "torch_dropout"])
def test_dropout_fwd(benchmark, shape, provider):
    device = bench_device()
    x = torch.randn(shape, device=device)
    drop = _drop(provider)
    measure(benchmark, lambda: drop(x), device=device, group=f"dropout fwd {shape[0]}x{shape[1]}",
            provider=provider, bytes_moved=2 * x.numel() * 4, params=dict(rows=shape[0], cols=shape[1], p=P))


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("provider", ["unirec", "torch_dropout"])
def test_dropout_fwd_bwd(benchmark, shape, provider):
    device = bench_device()
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    drop = _drop(provider)

    def fn():
        x.grad = None
        drop(x).backward(g)
    measure(benchmark, fn, device=device, group=f"dropout fwd+bwd {shape[0]}x{shape[1]}", provider=provider,
            bytes_moved=4 * x.numel() * 4, params=dict(rows=shape[0], cols=shape[1], p=P))
