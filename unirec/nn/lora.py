"""Low-rank adaptation (LoRA, Hu et al. 2021) of the model's linear layers.

    y = x W^T + b + (alpha / r) (x A^T) B^T,    A [r, in], B [out, r]

A starts Kaiming-uniform and B at zero, so an adapted layer starts as its base; fine-tuning trains A
and B with W and b frozen. :meth:`LoRALinear.merge` folds the update into W for serving (one matmul,
no extra cost) and :meth:`LoRALinear.unmerge` takes it back out.

Written here rather than taken from the ``peft`` library: :class:`LoRALinear` is an ``nn.Linear``, so
the base weights keep their names in the state dict (``...qkv.weight``) and a pretrained run's
checkpoint loads into an adapted model as it is, where peft renames them (``...qkv.base_layer.weight``);
and the core install stays free of peft's dependencies (accelerate, huggingface-hub) for some fifty lines.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a rank-``rank`` update (see the module docstring); ``rank=0`` is the base
    layer. Parameters: ``weight``, ``bias`` (the base's) and ``lora_a`` [r, in], ``lora_b`` [out, r]."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = None, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank if rank else 0.0
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        if rank:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.merged = False

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float = None) -> "LoRALinear":
        """A LoRALinear holding ``linear``'s weight and bias (the same tensors)."""
        out = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None)
        out.weight, out.bias = linear.weight, linear.bias
        return out.to(linear.weight.device)

    def delta(self) -> torch.Tensor:
        """[out, in] the update scale * B A."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.rank and not self.merged:
            y = y + self.scale * F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B A; the forward then skips the low-rank path."""
        if self.rank and not self.merged:
            self.weight += self.delta().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * B A (undoes :meth:`merge`)."""
        if self.rank and self.merged:
            self.weight -= self.delta().to(self.weight.dtype)
            self.merged = False


class LoRARows(nn.Module):
    """A rank-``rank`` update of an embedding table's ``rows`` x ``dim`` rows (LoRA on an embedding, as
    peft adapts one): delta = scale * A B, A [rows, r] starting at zero (so the table starts as its
    base), B [r, dim] Gaussian; row 0 (padding) stays zero. Few parameters per row (r), one shared
    [r, dim]: each row moves in a learned r-dimensional subspace."""

    def __init__(self, rows: int, dim: int, rank: int, alpha: float = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.zeros(rows, rank))
        self.lora_b = nn.Parameter(torch.randn(rank, dim))
        self.merged = False

    def delta(self) -> torch.Tensor:
        """[rows, dim] the update, row 0 zero."""
        d = self.scale * (self.lora_a @ self.lora_b)
        return torch.cat([d.new_zeros(1, d.shape[1]), d[1:]])


def add_lora(module: nn.Module, targets: Iterable[str], rank: int, alpha: float = None) -> List[str]:
    """Replaces each ``nn.Linear`` of ``module`` whose name ends with one of ``targets`` (e.g. "attn.qkv",
    "ffn.0") by a :class:`LoRALinear` over the same weights; returns the replaced names (ValueError when
    none matches)."""
    targets = tuple(targets)
    names = [n for n, m in module.named_modules() if type(m) is nn.Linear and n.endswith(targets)]
    if not names:
        raise ValueError(f"no linear layer of the model ends with any of {targets}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear.wrap(getattr(parent, child), rank, alpha))
    return names


def _mergeable(module: nn.Module):
    """The modules of ``module`` that fold a low-rank update into their weights: LoRALinear layers and
    modules with ``merge_lora`` / ``unmerge_lora`` methods (the item encoder's id table)."""
    return [m for m in module.modules() if isinstance(m, LoRALinear) or hasattr(m, "merge_lora")]


def merge_lora(module: nn.Module) -> int:
    """Merges every LoRA update of ``module`` into its base weights (see :meth:`LoRALinear.merge`);
    returns how many modules merged."""
    layers = _mergeable(module)
    for m in layers:
        m.merge() if isinstance(m, LoRALinear) else m.merge_lora()
    return len(layers)


def unmerge_lora(module: nn.Module) -> int:
    """Takes every merged LoRA update of ``module`` back out of its base weights."""
    layers = _mergeable(module)
    for m in layers:
        m.unmerge() if isinstance(m, LoRALinear) else m.unmerge_lora()
    return len(layers)
