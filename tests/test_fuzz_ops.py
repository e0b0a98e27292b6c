"""Fuzzing the compiled ops: a malformed input ends in a ValueError naming the offending argument (the ops'
checks are TORCH_CHECK_VALUE and the wrappers raise ValueError), never in another exception, a crash, a hang
or a silently wrong result; a valid but odd input (empty, strided, NaN, huge k or max_seqlen) gives the
reference's result.

One driver runs every op of OPS: a case is a valid input from the op's maker, checked as it is against the
reference or changed by one mutation from the op's table (argument -> mutations). The ops run in a child process
(this file as a script), so a segfault or an abort fails the op's test and names the case. Cases are seeded
(UNIREC_TEST_SEED) and bounded per op in count (UNIREC_FUZZ_OPS_CASES) and time (UNIREC_FUZZ_OPS_SECONDS).
Replay one case with ``UNIREC_TEST_SEED=S python tests/test_fuzz_ops.py OP --case I``.
"""
import argparse
import faulthandler
import importlib.util
import os
import random
import re
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch

import unirec.ops as U
from unirec.ops.reference import (dropout_ref, embedding_bag_ref, jagged_attention_ref, softmax_cross_entropy_ref,
                                  tbe_forward_ref, topk_scores_ref)

CASES = int(os.environ.get("UNIREC_FUZZ_OPS_CASES", "300"))
SECONDS = float(os.environ.get("UNIREC_FUZZ_OPS_SECONDS", "1.0"))
SEED = int(os.environ.get("UNIREC_TEST_SEED", "0"))
FAILED = 3  # the child's exit status when cases failed; any other non-zero status is a crash
F16, BF16, F32, F64, I32, I64 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64
TOL = {F64: 1e-9, F32: 1e-4, BF16: 3e-2, F16: 3e-3}

# ---------------------------------------------------------------------------------------------- mutations
# A mutation is mutate(a, name, rng) -> whether it applied; it changes the input dict a (a copy), mostly a[name].


def strided(t):
    """t as a non-contiguous view (every other element of a wider tensor); None where that is contiguous."""
    if t.dim() == 0 or t.numel() == 0:
        return None
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return None if wide[..., ::2].is_contiguous() else wide[..., ::2]  # size-1 dimensions count as contiguous


def transform(f):
    """Mutation: the tensor replaced by f(tensor, rng), unless that is None (does not apply)."""
    def mutate(a, name, rng):
        new = f(a[name], rng) if isinstance(a[name], torch.Tensor) else None
        a[name] = new if new is not None else a[name]
        return new is not None
    return mutate


def one(value, where=lambda t, rng: rng.randrange(t.numel())):
    """Mutation: one element of the tensor (flat position where(t, rng), None: does not apply) set to value(a, t, i)."""
    def mutate(a, name, rng):
        t = a[name]
        i = where(t, rng) if isinstance(t, torch.Tensor) and t.numel() else None
        if i is not None:
            t = a[name] = t.contiguous().clone()
            t.view(-1)[i] = value(a, t, i)
        return i is not None
    return mutate


# By name; in a table "ok:NAME" marks a change that leaves the input valid (the op must match the reference).
NAMED = {k: transform(f) for k, f in {
    "to_int": lambda t, r: t.long(), "to_float": lambda t, r: t.float(), "to_int16": lambda t, r: t.short(),
    "to_int32": lambda t, r: t.int() if t.dtype != I32 else None,
    "other_index": lambda t, r: t.int() if t.dtype == I64 else t.long(),
    "other_float": lambda t, r: t.to(r.choice([d for d in (F32, F64, BF16) if d != t.dtype])),
    "meta": lambda t, r: t.to("meta"), "rank+": lambda t, r: t.unsqueeze(0),
    "flat": lambda t, r: t.reshape(-1) if t.dim() > 1 else None, "scalar": lambda t, r: t.reshape(-1)[:1].sum(),
    "len+": lambda t, r: torch.cat([t, t.new_zeros((1,) + t.shape[1:])]),
    "len-": lambda t, r: t[:-1] if t.shape[0] else None,
    "wide": lambda t, r: torch.cat([t, t.new_zeros(t.shape[:-1] + (1,))], -1),
    "empty": lambda t, r: t[:0], "strided": lambda t, r: strided(t),
}.items()}
NAMED.update({
    "neg": one(lambda a, t, i: -1), "huge": one(lambda a, t, i: 2**31 - 1 if t.dtype == I32 else 2**62),
    "-huge": one(lambda a, t, i: -(2**31) if t.dtype == I32 else -(2**62)),
    "first": one(lambda a, t, i: 1, where=lambda t, r: 0),
    "last+": one(lambda a, t, i: t[i] + 1, where=lambda t, r: t.numel() - 1),
    "dec": one(lambda a, t, i: t[i + 1] + 1,  # a decrease that stays in range
               where=lambda t, r: r.randrange(1, t.numel() - 1) if t.numel() > 2 else None),
    "nan": one(lambda a, t, i: float("nan") if t.is_floating_point() else t[i]),
})
OFFSETS = "rank+ empty neg huge first last+ dec meta ok:strided"


def bad(*values):
    """Mutation: the argument takes one of these invalid values."""
    return "bad", lambda a, name, rng: a.update({name: rng.choice(values)}) or True


def assign(label, when=lambda a: True, **values):
    """Mutation, where when(a) holds: arguments set to values (a callable value is a function of a)."""
    return label, lambda a, name, rng: bool(when(a)) and not a.update(
        {k: v(a) if callable(v) else v for k, v in values.items()})


def then(prep, names):
    """Mutations: prep(a) (e.g. the argument made present, or read), then one of the NAMED ones in names."""
    return [(n, lambda a, name, rng, m=NAMED[n]: prep(a) or m(a, name, rng)) for n in names.split()]


def mutations(entry):
    """A table entry -- strings of NAMED names, (label, mutate) pairs, lists of pairs -- as [(label, mutate)]."""
    out = []
    for m in entry:
        out += [(n, NAMED[n.removeprefix("ok:")]) for n in m.split()] if isinstance(m, str) else \
            m if isinstance(m, list) else [m]
    return out


class Op(NamedTuple):
    make: Callable  # rng -> a valid input: a dict of the arguments (and a few facts, e.g. "rows")
    call: Callable  # a -> the op's result
    ref: Callable  # a -> the reference's result (None entries of a tuple are not compared)
    table: dict  # argument -> its mutations (see mutations())
    alias: dict = {}  # argument -> other names a ValueError about it may give instead
    grad: tuple = ()  # the inputs call(a) is differentiable in: their gradients are checked too


def close(got, want, what):
    tol = TOL.get(got.dtype, 0)
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    assert torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True), \
        f"{what}: max |diff| {(got - want).abs().nan_to_num(0.0).max().item():.3g} (tol {tol})"


def check(op, a):
    """Runs op on the valid input a; asserts that it and its gradients match the reference (run first: an op may
    update its inputs in place)."""
    grad = [n for n in op.grad if a[n] is not None and a[n].dtype in (F32, F64)]
    b = dict(a, **{n: a[n].detach().requires_grad_() for n in grad})
    want, got = [x if isinstance(x, tuple) else (x,) for x in (op.ref(a), op.call(b))]
    for i, (g, w) in enumerate(zip(got, want)):
        if w is not None:
            close(g, w, f"output {i}")
    # NaN gradients may spread differently within a sequence or a row: only the outputs are compared.
    if grad and got[0].numel() and not any(a[n].isnan().any() for n in grad):
        g = torch.randn_like(got[0])
        got[0].backward(g)
        x = dict(a, **{n: a[n].detach().double().requires_grad_() for n in grad})
        want = op.ref(x)
        (want[0] if isinstance(want, tuple) else want).backward(g.double())
        for n in grad:
            close(b[n].grad if b[n].grad is not None else torch.zeros_like(b[n]), x[n].grad, f"grad {n}")


def vjp(fn, a, names, g):
    """The reference gradients of fn(a) in a[names] for the output gradient g, in float64 (None for None)."""
    x = dict(a, **{n: a[n].detach().double().requires_grad_() for n in names if a[n] is not None})
    fn(x).backward(g.double())
    return tuple(x[n].grad if x[n] is not None else None for n in names)


def offsets_of(lengths, dtype=I64):
    return torch.cat([torch.zeros(1, dtype=I64), torch.as_tensor(lengths, dtype=I64).cumsum(0)]).to(dtype)


# ---------------------------------------------------------------------------------------------- embedding


def tbe_make(rng, T=None):
    T, B = T or rng.randint(1, 3), rng.choice([0, 1, 2, 3, 5])
    rows, D = [rng.choice([0, 1, 2, 7]) for _ in range(T)], rng.choice([0, 1, 3, 8, 17, 64])
    dtype, pooling = rng.choice([F32, F32, F64, BF16, F16]), rng.choice(["sum", "mean"])
    lengths = [rng.randint(0, 3) if rows[t] else 0 for t in range(T) for _ in range(B)]
    indices = [rng.randrange(rows[t]) for t in range(T) for b in range(B) for _ in range(lengths[t * B + b])]
    idx_dtype = rng.choice([I64, I32])
    return dict(weight=torch.randn(sum(rows), D, dtype=dtype), table_offsets=offsets_of(rows),
                indices=torch.tensor(indices, dtype=idx_dtype), offsets=offsets_of(lengths, idx_dtype),
                per_sample_weights=torch.rand(len(indices), dtype=dtype) if pooling == "sum" and rng.random() < 0.4
                else None, pooling=pooling, grad_output=torch.randn(B, T, D, dtype=dtype), lr=0.5,
                # Not rowwise_adagrad on D = 0: the C++ kernel makes the state NaN there (a mean of no squares).
                optimizer=rng.choice(["sgd", "rowwise_adagrad"] if D else ["sgd"]),
                optimizer_state=torch.rand(sum(rows)), B=B, T=T, rows=rows)


TBE = ("weight", "table_offsets", "indices", "offsets", "per_sample_weights", "pooling")


def tbe_ref(a):
    return tbe_forward_ref(*[a[n] for n in TBE])


def tbe_grads(a):
    return vjp(tbe_ref, a, ["weight", "per_sample_weights"], a["grad_output"])


def update_ref(a):
    """(grad of per_sample_weights, weight, optimizer_state) after the update, by the reference."""
    gw, gp = tbe_grads(a)
    s = a["optimizer_state"].double() + (gw**2).mean(1) if a["optimizer"] == "rowwise_adagrad" else None
    return gp, a["weight"].double() - a["lr"] * gw / (s.sqrt()[:, None] + 1e-8 if s is not None else 1), s


def update_call(a):
    grad_psw = U.tbe_backward_update_(a["weight"], a["optimizer_state"], a["grad_output"], *[a[n] for n in TBE[1:]],
                                      a["optimizer"], a["lr"])
    return grad_psw, a["weight"], a["optimizer_state"]


def rows_of_bag(a, t, i):
    """The row count of the table whose bag holds position i of indices: the first index out of range."""
    bag = int(torch.searchsorted(a["offsets"].long().contiguous(), torch.tensor(i), right=True)) - 1
    return a["rows"][bag // a["B"]]


TBE_TABLE = {
    "weight": ["to_int flat rank+ meta ok:strided ok:nan"],
    "table_offsets": ["to_float to_int32 rank+ empty neg huge last+ dec meta", bad(torch.zeros(1, dtype=I64))],
    "indices": ["to_float to_int16 rank+ neg huge -huge meta ok:strided", ("bound", one(rows_of_bag))],
    "offsets": [OFFSETS + " other_index", assign("one bag more", lambda a: a["T"] >= 2,  # a count T does not divide
                                                  offsets=lambda a: torch.cat([a["offsets"], a["offsets"][-1:]]))],
    "per_sample_weights": ["other_float len+ rank+ meta ok:strided ok:nan",
                           assign("with mean", lambda a: a["per_sample_weights"] is not None, pooling="mean")],
    "pooling": [bad("max", "", "SUM")],
}
TBE_ALIAS = {"table_offsets": ("offsets",), "indices": ("offsets",), "offsets": ("indices",)}
GRAD_OUTPUT = ["flat len+ other_float meta ok:strided"]
BAG = ("weight", "indices", "offsets", "per_sample_weights", "pooling")
OPS = {
    "tbe_forward": Op(tbe_make, lambda a: U.table_batched_embedding(*[a[n] for n in TBE]), tbe_ref, TBE_TABLE,
                      TBE_ALIAS, grad=("weight", "per_sample_weights")),
    "embedding_bag": Op(lambda rng: tbe_make(rng, T=1), lambda a: U.embedding_bag(*[a[n] for n in BAG]),
                        lambda a: embedding_bag_ref(*[a[n] for n in BAG]), dict(
                            {k: v for k, v in TBE_TABLE.items() if k != "table_offsets"},
                            weight=TBE_TABLE["weight"] + ["scalar"]), dict(TBE_ALIAS, pooling=("mode",))),
    "tbe_backward": Op(tbe_make, lambda a: torch.ops.unirec.tbe_backward(a["grad_output"], *[a[n] for n in TBE]),
                       tbe_grads, dict(TBE_TABLE, grad_output=GRAD_OUTPUT), TBE_ALIAS),
    "tbe_backward_update_": Op(tbe_make, update_call, update_ref, dict(
        TBE_TABLE, weight=["to_int flat strided meta"], grad_output=GRAD_OUTPUT, optimizer=[bad("adam", "", "SGD")],
        optimizer_state=[then(lambda a: a.update(optimizer="rowwise_adagrad"),  # its one reader
                              "len+ other_float rank+ strided meta")]), TBE_ALIAS),
}

# ---------------------------------------------------------------------------------------------- attention


def attn_make(rng):
    lengths = [rng.choice([0, 1, 2, 5, 9]) for _ in range(rng.choice([0, 1, 2, 3]))]
    H, D, dtype = rng.randint(1, 3), rng.choice([1, 2, 5, 8, 16, 33]), rng.choice([F32, F32, F64, BF16])
    a = {n: torch.randn(sum(lengths), H, D, dtype=dtype) for n in ("q", "k", "v")}
    a.update(offsets=offsets_of(lengths), max_seqlen=max(lengths, default=0) + rng.choice([0, 0, 1, 3]),
             causal=rng.random() < 0.7, activation=rng.choice(["softmax", "silu"]), scale=rng.choice([None, 0.3]),
             impl="auto", lengths=lengths, rel_bias=None, num_targets=None if rng.random() < 0.6 else
             torch.tensor([rng.randint(0, n) for n in lengths], dtype=I64))
    if rng.random() < 0.3:
        a["rel_bias"] = torch.randn(H, a["max_seqlen"], dtype=dtype)
    return a


ATTN = ("max_seqlen", "causal", "num_targets", "activation", "rel_bias", "scale")


def attn_ref(a):
    # The reference pads every sequence to max_seqlen: "ref_max_seqlen" stands in for a huge one.
    kw = dict({n: a[n] for n in ATTN}, max_seqlen=a.get("ref_max_seqlen", a["max_seqlen"]))
    return jagged_attention_ref(a["q"], a["k"], a["v"], a["offsets"], **kw)


def head_dim(D):
    return assign(f"head dim {D}", **{n: lambda a, n=n: torch.randn(*a[n].shape[:2], D, dtype=a[n].dtype)
                                      for n in ("q", "k", "v")})


ATTN_TABLE = {
    "q": ["to_int flat scalar meta ok:strided ok:nan", head_dim(0), head_dim(257)],
    "k": ["len+ wide other_float meta ok:strided ok:nan"],
    "v": ["len+ wide other_float meta ok:strided"],
    "offsets": [OFFSETS + " to_int32"],
    "max_seqlen": [bad(-1, -(2**62)), assign("below a length", lambda a: max(a["lengths"], default=0) > 0,
                                              max_seqlen=lambda a: max(a["lengths"]) - 1),
                   # Valid: nothing may be sized by max_seqlen alone (softmax: the result does not depend on it).
                   assign("ok:2^40", lambda a: a["rel_bias"] is None and a["activation"] == "softmax",
                          max_seqlen=2**40, ref_max_seqlen=lambda a: max(a["lengths"], default=0))],
    "num_targets": ["len+ to_int32 rank+ neg huge meta",
                    then(lambda a: a.update(num_targets=torch.tensor(a["lengths"], dtype=I64)), "last+")],
    "rel_bias": ["wide other_float rank+ meta ok:strided ok:nan"],
    "activation": [bad("relu", "SOFTMAX", "")],
    "impl": [bad("fast", "", "CPP")],
}


def attn_bwd_make(rng):
    a = dict(attn_make(rng), activation="softmax", scale=0.5)
    a["out"], a["lse"] = torch.ops.unirec.jagged_attention_fwd(a["q"], a["k"], a["v"], a["offsets"],
                                                                *[a[n] for n in ATTN])
    return dict(a, grad_out=torch.randn_like(a["out"]))


OPS["jagged_attention"] = Op(attn_make, lambda a: U.jagged_attention(
    a["q"], a["k"], a["v"], a["offsets"], **{n: a[n] for n in ATTN + ("impl",)}), attn_ref, ATTN_TABLE,
    grad=("q", "k", "v", "rel_bias"))
OPS["jagged_attention_bwd"] = Op(attn_bwd_make, lambda a: torch.ops.unirec.jagged_attention_bwd(
    a["grad_out"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["offsets"], *[a[n] for n in ATTN]),
    lambda a: vjp(attn_ref, a, ["q", "k", "v", "rel_bias"], a["grad_out"]), dict(
        {n: ATTN_TABLE[n] for n in ("offsets", "max_seqlen", "num_targets")},
        # No NaN in q or k: out and lse are the forward's, of the clean input.
        q=["to_int flat scalar meta ok:strided"], k=["len+ wide other_float meta ok:strided"],
        grad_out=["flat len+ meta ok:strided"], out=["len- wide other_float meta ok:strided"],
        lse=["len- flat other_float meta"]))

# ---------------------------------------------------------------------------------------------- retrieval


def topk_make(rng):
    B, N, D = rng.choice([0, 1, 3, 6]), rng.choice([0, 1, 5, 20, 70]), rng.choice([1, 3, 8, 16])
    dtype = rng.choice([F32, F64, F64, BF16])
    a = dict(queries=torch.randn(B, D, dtype=dtype), items=torch.randn(N, D, dtype=dtype),
             k=rng.choice([1, 2, 5, N + 1, N + 7]), exclude_offsets=None, exclude_indices=None, impl="auto",
             item_bias=torch.randn(N, dtype=dtype) if rng.random() < 0.4 else None)
    if rng.random() < 0.6:
        lengths = [rng.randint(0, min(N, 4) + 2) if N else 0 for _ in range(B)]
        a.update(exclude_offsets=offsets_of(lengths), exclude_indices=torch.randint(0, max(N, 1), (sum(lengths),)))
    return a


def topk_ref(a):
    """The CPU kernel never returns a NaN score: those join the exclusions. Indices are compared in float64 only
    (lower precisions may order near-ties differently); elsewhere the values' -inf tail says where -1 must be."""
    q, it, bias = a["queries"], a["items"], a["item_bias"]
    excluded = (q.double() @ it.double().T + (bias.double() if bias is not None else 0)).isnan()
    if a["exclude_offsets"] is not None:
        excluded[torch.repeat_interleave(torch.arange(len(q)), a["exclude_offsets"].diff()), a["exclude_indices"]] = 1
    rows, cols = excluded.nonzero(as_tuple=True)
    v, i = topk_scores_ref(q, it, a["k"], bias, offsets_of(torch.bincount(rows, minlength=len(q))), cols)
    return v, i if q.dtype == F64 else None


OPS["topk_scores"] = Op(topk_make, lambda a: U.topk_scores(a["queries"], a["items"], a["k"], **{
    n: a[n] for n in ("item_bias", "exclude_offsets", "exclude_indices", "impl")}), topk_ref, {
    "queries": ["to_int flat rank+ meta ok:strided ok:nan"],
    "items": ["other_float wide flat meta ok:strided ok:nan"],
    "k": [bad(0, -1, -(2**62), 2**31, 2**62, 2**63 - 1), ("ok:100000", bad(100_000)[1])],
    "item_bias": ["len+ other_float rank+ meta ok:strided ok:nan"],
    "exclude_offsets": [OFFSETS + " to_int32 len+", assign("alone", lambda a: a["exclude_indices"] is not None,
                                                           exclude_indices=None)],
    "exclude_indices": ["to_int32 rank+ neg huge -huge meta ok:strided",
                        ("bound", one(lambda a, t, i: len(a["items"]))),
                        assign("alone", lambda a: a["exclude_offsets"] is not None, exclude_offsets=None)],
    "impl": [bad("fast", "", "CPP")],
}, {"exclude_offsets": ("exclude_indices",), "exclude_indices": ("exclude_offsets",)})

# ---------------------------------------------------------------------------------------------- loss


def ce_make(rng):
    M, N, D = rng.choice([0, 1, 3, 7]), rng.choice([1, 2, 9, 40]), rng.choice([1, 3, 8, 17])
    dtype = rng.choice([F32, F64, F64, BF16])
    targets = torch.randint(0, N, (M,))
    targets[torch.rand(M) < 0.25] = -100
    return dict(hidden=torch.randn(M, D, dtype=dtype), items=torch.randn(N, D, dtype=dtype), targets=targets,
                item_bias=torch.randn(N, dtype=dtype) if rng.random() < 0.4 else None, ignore_index=-100,
                label_smoothing=rng.choice([0.0, 0.0, 0.1, 1.0]), reduction=rng.choice(["mean", "sum", "none"]),
                impl="auto", keep_logit_grad=rng.choice([None, True, False]))


CE = ("item_bias", "ignore_index", "reduction", "label_smoothing")


def ce_ref(a):
    return softmax_cross_entropy_ref(a["hidden"], a["items"], a["targets"], *[a[n] for n in CE])


CE_TABLE = {
    "hidden": ["to_int flat rank+ meta ok:strided"],
    "items": ["other_float wide flat meta ok:strided",
              assign("no rows", lambda a: len(a["hidden"]), items=lambda a: a["items"][:0], item_bias=None)],
    "targets": ["to_int32 len+ rank+ neg huge -huge meta ok:strided", ("bound", one(lambda a, t, i: len(a["items"])))],
    "item_bias": ["len+ other_float rank+ meta ok:strided"],
    "label_smoothing": [bad(-0.1, 1.5, float("nan"), float("inf"))],
    "reduction": [bad("avg", "", None)],
    "impl": [bad("fast", "", "CPP")],
    "keep_logit_grad": [assign("off the C++ kernel", keep_logit_grad=True, impl="reference")],
}
OPS["softmax_cross_entropy"] = Op(ce_make, lambda a: U.softmax_cross_entropy(
    a["hidden"], a["items"], a["targets"], **{n: a[n] for n in CE + ("impl", "keep_logit_grad")}), ce_ref, dict(
        CE_TABLE, hidden=CE_TABLE["hidden"] + ["ok:nan"], items=CE_TABLE["items"] + ["ok:nan"]),
    {"items": ("targets",)}, grad=("hidden", "items", "item_bias"))


def ce_bwd_make(rng):
    a = ce_make(rng)
    keep = bool(a["keep_logit_grad"])
    loss, a["lse"], dz = torch.ops.unirec.softmax_ce_fwd(a["hidden"], a["items"], a["targets"], a["item_bias"],
                                                         a["ignore_index"], a["label_smoothing"], keep)
    return dict(a, grad_loss=torch.randn_like(loss), logit_grad=dz if keep else None, reduction="none")


def some_logit_grad(a):  # the kept gradient's faults, for either way of the backward
    if a["logit_grad"] is None:
        a["logit_grad"] = torch.zeros(len(a["hidden"]), len(a["items"]), dtype=a["lse"].dtype)


OPS["softmax_ce_bwd"] = Op(ce_bwd_make, lambda a: torch.ops.unirec.softmax_ce_bwd(
    a["grad_loss"], a["hidden"], a["items"], a["targets"], a["item_bias"], a["lse"], a["logit_grad"],
    a["ignore_index"], a["label_smoothing"]),
    lambda a: vjp(ce_ref, a, ["hidden", "items", "item_bias"], a["grad_loss"]),
    dict({n: CE_TABLE[n] for n in ("hidden", "targets", "item_bias")},  # no NaN: lse, logit_grad are of clean inputs
         items=["other_float wide flat meta"], grad_loss=["len+ rank+ meta ok:strided"],
         lse=["len+ rank+ other_float meta"], logit_grad=[then(some_logit_grad, "len+ flat other_float strided meta")]))

# ---------------------------------------------------------------------------------------------- dropout


def dropout_make(rng):
    shape = rng.choice([(0,), (1,), (7,), (3, 5), (2, 0, 3), (4099,), ()])
    return dict(x=torch.randn(shape, dtype=rng.choice([F32, F64, BF16, F16])), impl="auto",
                p=rng.choice([0.0, 0.3, 0.5, 1e-9, 1 - 1e-9, 1.0]), threshold=rng.choice([1, 30000, 65535, 65536]),
                seed=rng.randrange(-(2**63), 2**63))


def dropout_wrapper_ref(a):
    x, p, state = a["x"], a["p"], torch.get_rng_state()
    seed, threshold = int(torch.randint(0, 2**62, (), dtype=I64)), round((1.0 - p) * 65536)
    torch.set_rng_state(state)  # the op draws the same seed
    return x if p == 0.0 else x * 0.0 if threshold == 0 else dropout_ref(x, threshold, seed)


OPS["dropout"] = Op(dropout_make, lambda a: U.dropout(a["x"], a["p"], impl=a["impl"]), dropout_wrapper_ref, {
    "x": ["to_int ok:strided ok:nan"], "p": [bad(-0.1, 1.5, float("nan"))], "impl": [bad("fast", "", "CPP")]})
OPS["dropout_op"] = Op(dropout_make, lambda a: torch.ops.unirec.dropout(a["x"], a["threshold"], a["seed"]),
                       lambda a: dropout_ref(a["x"], a["threshold"], a["seed"]),
                       {"x": ["to_int ok:strided ok:nan"], "threshold": [bad(0, -1, 65537, 2**62, -(2**63))]},
                       {"x": ("input",)})

# ---------------------------------------------------------------------------------------------- driver


def describe(a):
    def show(v):
        if not isinstance(v, torch.Tensor):
            return repr(v)
        s = f"{str(v.dtype)[6:]}{list(v.shape)}{'' if v.device.type == 'cpu' else '@' + str(v.device)}"
        s += "" if v.is_contiguous() else "(strided)"
        return s + (f"={v.tolist()}" if v.device.type == "cpu" and v.numel() <= 12 else "")
    return ", ".join(f"{k}={show(v)}" for k, v in a.items() if k not in ("B", "T", "rows", "lengths"))


def make_case(op, rng):
    """(label, a, expect): expect holds the names one of which a ValueError must name; None for a valid input."""
    a = op.make(rng)
    while rng.random() > 0.25:  # else: the valid input as it is
        name = rng.choice(sorted(op.table))
        label, mutate = rng.choice(mutations(op.table[name]))
        b = dict(a)
        if mutate(b, name, rng):
            return f"{name}: {label}", b, None if label.startswith("ok:") else (name,) + op.alias.get(name, ())
    return "valid", a, None


def run_case(op, a, expect):
    """None if the case behaved, else what went wrong."""
    try:
        check(op, a) if expect is None else op.call(a)
    except AssertionError as exc:
        return f"wrong result: {exc}"
    except ValueError as exc:
        # "offsets" must not match inside "table_offsets" or "exclude_offsets".
        if expect and not any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", str(exc)) for n in expect):
            return f"ValueError does not name {' or '.join(expect)}: {exc}"
        return None if expect else f"valid input raised ValueError: {exc}"
    except Exception as exc:  # noqa: BLE001  (any other type is the finding)
        return f"{type(exc).__name__} instead of ValueError: {exc}\n" + "".join(traceback.format_exception(exc)[-3:])
    return f"no error; expected a ValueError naming {' or '.join(expect)}" if expect else None


def fuzz(names, only=None):
    """Runs the ops' cases, each printed before it runs (the last line names a crash's culprit), a failure's
    lines starting "! OP"; returns the exit status."""
    failed = 0
    for name in names:
        ran, start = 0, time.monotonic()
        for i in range(CASES) if only is None else [only]:
            if only is None and time.monotonic() - start > SECONDS:
                break
            s = zlib.crc32(f"{name}:{SEED}:{i}".encode())
            torch.manual_seed(s)
            label, a, expect = make_case(OPS[name], random.Random(s))
            print(f"case {name} {i} {label}: {describe(a)}", flush=True)
            problem, ran = run_case(OPS[name], a, expect), ran + 1
            if problem:
                failed += 1
                print(f"! {name} case {i} ({label}; replay: UNIREC_TEST_SEED={SEED} python {__file__} {name} --case "
                      f"{i})\n  input: {describe(a)}\n  {problem}".replace("\n", f"\n! {name} "), flush=True)
        print(f"done {name} after {ran} cases in {time.monotonic() - start:.1f} s", flush=True)
    return FAILED if failed else 0


def fuzz_children(names):
    """{op: None if it passed, else the report}. The ops run one after another in one child process (python and
    torch take seconds to start); when a case kills the child, its op fails and a new child takes the rest."""
    # The child imports the unirec this process imports (a source tree or another build on PYTHONPATH).
    root = str(Path(importlib.util.find_spec("unirec").origin).parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    results, todo = {}, list(names)
    while todo:
        timeout = len(todo) * SECONDS + float(os.environ.get("UNIREC_FUZZ_OPS_TIMEOUT", "120"))
        try:
            proc = subprocess.run([sys.executable, __file__, *todo], capture_output=True, text=True, timeout=timeout,
                                  env=env)
            lines, how = proc.stdout.splitlines(), f"died (status {proc.returncode})\n{proc.stderr[-6000:]}"
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout or b""
            lines, how = (out.decode() if isinstance(out, bytes) else out).splitlines(), f"gave no result in " \
                f"{timeout:.0f} s (a hang?)"
        report = {n: [ln[len(n) + 3:] for ln in lines if ln.startswith(f"! {n} ")] for n in todo}
        results.update({n: "\n".join(report[n]) or None for n in todo if f"done {n} after" in " ".join(lines)})
        todo = [n for n in todo if n not in results]
        if todo:  # the child ended inside todo[0]
            last = ([ln for ln in lines if ln.startswith("case ")] or ["case - - before the first case"])[-1]
            results[todo[0]] = "\n".join(report[todo[0]] + [
                f"the process {how} at {last[:2000]}",
                f"replay: UNIREC_TEST_SEED={SEED} python {__file__} {todo[0]} --case {last.split()[2]}"])
            todo = todo[1:]
    return results


@pytest.fixture(scope="module")
def fuzz_results(request):
    return fuzz_children([item.callspec.params["op"] for item in request.session.items
                          if item.originalname == "test_op_rejects_malformed_inputs"])


@pytest.mark.parametrize("op", sorted(OPS))
def test_op_rejects_malformed_inputs(op, fuzz_results):
    assert fuzz_results[op] is None, fuzz_results[op][-12000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ops", nargs="+", choices=sorted(OPS))
    parser.add_argument("--case", type=int, default=None, help="run this case only")
    faulthandler.enable()
    sys.exit(fuzz(parser.parse_args().ops, parser.parse_args().case))
