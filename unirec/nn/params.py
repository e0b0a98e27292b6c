"""Run-time settings that walk a module tree: the kernel backend and weight-decay groups."""
from typing import Dict, List

from torch import nn


def set_impl(module: nn.Module, impl: str) -> nn.Module:
    """Sets the backend choice ``impl`` (see :func:`unirec.ops.resolve_impl`) on every submodule that calls
    an op (those with an ``impl`` attribute). Returns ``module``."""
    from ..ops import IMPLS
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl
    return module


def weight_decay_groups(module: nn.Module, weight_decay: float) -> List[Dict]:
    """Two optimizer parameter groups: decayed and not.

    Rule: a parameter with two or more dimensions (tables, dense weights) is decayed; vectors (biases,
    norms, offsets) are not; a module exempts its own tables by listing their names in a
    ``no_weight_decay`` attribute, relative to itself (e.g. "rating_emb.weight"). Names never decide it,
    so renaming a module cannot change regularisation."""
    exempt = {id(m.get_parameter(name)) for m in module.modules() for name in getattr(m, "no_weight_decay", ())}
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
