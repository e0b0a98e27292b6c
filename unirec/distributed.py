"""Distributed training on torch.distributed: the process group, collectives, and the catalogue's
ops across processes.

Data parallelism: ``torchrun --nproc_per_node=N -m unirec train ...`` starts N processes; each calls
:func:`init_from_env`, which joins the process group that torchrun's environment describes (gloo
for CPU tensors, nccl for CUDA ones) with a bounded timeout, so a collective that one process never
reaches fails instead of hanging.

Sharded catalogue (model parallelism, row-wise as TorchRec shards a table): rank r holds the rows
[offset_r, offset_r + N_r) of an [N, D] item table (:func:`shard_bounds`). The loss and the top-k
take each rank's shard and combine partial results with collectives:

- :func:`sharded_softmax_cross_entropy`: the fused loss kernel's per-row log-sum-exp of each shard,
  combined as lse_i = m_i + log sum_r exp(lse_ir - m_i) with m_i = max_r lse_ir; the target logit
  from the rank that owns the target;
- :func:`sharded_topk_scores`: each shard's fused top-k, all-gathered and merged.

Both equal the single-process ops (:func:`unirec.ops.softmax_cross_entropy`,
:func:`unirec.ops.topk_scores`) in value and gradient. Their row inputs (``hidden``, ``queries``,
``targets``, the exclusions) are *replicated*: the same on every rank. Gradient convention of this
module's replicated region: a replicated input gets its complete gradient on every rank (the
shards' parts are all-reduced in the backward); a sharded input gets the gradient of its own rows.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import ops
from .ops.loss import reduce_rows

# Seconds a collective may wait for the other processes before it fails (UNIREC_DIST_TIMEOUT overrides).
DEFAULT_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------- the process group


def env_world_size() -> int:
    """WORLD_SIZE of torchrun's environment (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu", timeout_s: Optional[float] = None) -> bool:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, LOCAL_RANK): backend nccl for a CUDA ``device`` (each process on cuda:LOCAL_RANK),
    else gloo. Every collective fails after ``timeout_s`` (default ``UNIREC_DIST_TIMEOUT`` or
    :data:`DEFAULT_TIMEOUT_S`) instead of waiting forever. Returns whether training is distributed
    (WORLD_SIZE > 1); a single process (no torchrun, or WORLD_SIZE=1) joins nothing.
    """
    if env_world_size() <= 1 or is_distributed():
        return is_distributed()
    if timeout_s is None:
        timeout_s = float(os.environ.get("UNIREC_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def local_device(device: str) -> str:
    """The device of this process: cuda:LOCAL_RANK for a plain "cuda" under torchrun, else ``device``."""
    if str(device) == "cuda" and env_world_size() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    """Leaves the process group (nothing when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process belongs to a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def is_main_env() -> bool:
    """Rank 0 by torchrun's environment (RANK), also after the process group is gone."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a picklable object; the object itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """sum over ranks of ``x`` (a new tensor; ``x`` itself in one process)."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_rows(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, List[int]]:
    """(cat over ranks of each rank's ``x`` [n_r, ...] in rank order, [n_0, n_1, ...]); the rows may
    differ in number between ranks (padded to the largest for the collective)."""
    w = world_size(group)
    if w == 1:
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    pad = x.new_zeros((top, *x.shape[1:]))
    pad[:x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(w)]
    dist.all_gather(parts, pad.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, in rank order. Backward: this rank's rows of the gradient (the
    gradient of a replicated tensor is complete on every rank; see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        out, sizes = all_gather_rows(x, group)
        r = rank(group)
        ctx.start, ctx.n = sum(sizes[:r]), sizes[r]
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.n], None


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable :func:`all_gather_rows`: [sum_r n_r, ...]. Its backward hands each rank the
    rows of the (replicated, complete) gradient that belong to its own ``x``."""
    if world_size(group) == 1:
        return x
    return _GatherRows.apply(x, group)


class _SumGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce_(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.group), None


def sum_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward; the backward sums the ranks' gradients. Between a replicated result (the
    sharded loss of every rank's rows) and the rows each rank then takes, it turns the ranks'
    different gradients into the one complete gradient that the replicated region expects."""
    return x if world_size(group) == 1 else _SumGrad.apply(x, group)


# --------------------------------------------------------------------------- data-parallel losses


def global_count(n, device=None) -> torch.Tensor:
    """The number of loss terms (targets) of all ranks' batches: ``n`` summed over ranks (float64)."""
    t = torch.as_tensor(n, dtype=torch.float64, device=device).reshape(())
    return all_reduce_sum(t)


def mean_share(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a mean over every rank's terms: total / count.

    ``total``: the sum of this rank's terms; ``count``: the number of terms of all ranks
    (:func:`global_count`). The shares of
    the ranks add up to the global mean, in value and in gradient, so with gradients *summed* across
    ranks (:func:`sum_gradients_hook`) n processes with batch B / n train as one with batch B; in one
    process it is the plain mean (0 with no terms).
    """
    return total / count.clamp_min(1).to(total.dtype)


def sum_gradients_hook(process_group, bucket):
    """A DistributedDataParallel communication hook that sums the ranks' gradients (the default hook
    averages them). The losses are shares of one global mean (:func:`mean_share`), so their gradients
    add up."""
    buf = bucket.buffer()
    fut = dist.all_reduce(buf, group=process_group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# --------------------------------------------------------------------------- sharded catalogue


def shard_bounds(n: int, world: int) -> List[int]:
    """Row bounds [b_0 = 0, b_1, ..., b_world = n] of a row-wise split of n rows: rank r holds rows
    [b_r, b_{r+1}), the first n mod world ranks one row more than the others."""
    q, rem = divmod(int(n), int(world))
    b = [0]
    for r in range(world):
        b.append(b[-1] + q + (1 if r < rem else 0))
    return b


def _shard_sizes(n_local: int, device, group) -> List[int]:
    if world_size(group) == 1:
        return [n_local]
    t = torch.tensor([n_local], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(t) for _ in range(world_size(group))]
    dist.all_gather(parts, t, group=group)
    return [int(p) for p in parts]


def _all_reduce_(x: torch.Tensor, op, group) -> torch.Tensor:
    if world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _ShardedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, items, item_bias, targets, offset, num_items, ignore_index, eps, group):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        M, n = hidden.shape[0], items.shape[0]
        valid = targets != ignore_index
        local_t = targets - offset
        owned = valid & (local_t >= 0) & (local_t < n)
        # Every row gets a valid local target (0 where another rank owns it, or ignored): the kernel
        # then makes the log-sum-exp of every row, and the backward below undoes the dummy target.
        lt = torch.where(owned, local_t, torch.zeros_like(local_t))
        h = hidden.detach().to(acc)
        if n > 0 and M > 0:
            _, lse_r, _ = torch.ops.unirec.softmax_ce_fwd(hidden.detach(), items.detach(), lt,
                                                          None if item_bias is None else item_bias.detach(),
                                                          int(ignore_index), 0.0, False)
            e = items.detach().to(acc)
            zt = (h * e.index_select(0, lt)).sum(1)
            zs = h @ e.sum(0) if eps > 0 else torch.zeros(M, dtype=acc, device=h.device)
            if item_bias is not None:
                b = item_bias.detach().to(acc)
                zt = zt + b.index_select(0, lt)
                if eps > 0:
                    zs = zs + b.sum()
            zt = torch.where(owned, zt, torch.zeros_like(zt))
        else:
            lse_r = torch.full((M,), float("-inf"), dtype=acc, device=hidden.device)
            zt = zs = torch.zeros(M, dtype=acc, device=hidden.device)
        # lse_i = m_i + log sum_r exp(lse_ir - m_i), m_i = max_r lse_ir; a row of -inf shifts by 0.
        m = _all_reduce_(lse_r.clone(), dist.ReduceOp.MAX, group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        stats = _all_reduce_(torch.stack([(lse_r - m).exp(), zt, zs]), dist.ReduceOp.SUM, group)
        lse = stats[0].log() + m
        loss = lse - (1.0 - eps) * stats[1]
        if eps > 0:
            loss = loss - (eps / num_items) * stats[2]
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        ctx.save_for_backward(hidden, items, item_bias, lt, owned, valid, lse)
        ctx.args = (ignore_index, eps, num_items, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, items, item_bias, lt, owned, valid, lse = ctx.saved_tensors
        ignore_index, eps, num_items, group = ctx.args
        acc = lse.dtype
        M, n = hidden.shape[0], items.shape[0]
        g = torch.where(valid, grad_loss.to(acc), torch.zeros((), dtype=acc, device=lse.device))
        h = hidden.detach().to(acc)
        e = items.detach().to(acc)
        if n > 0 and M > 0:
            # The kernel's gradient with the global lse and eps = 0: g_i (p_ij - [j = lt_i]).
            dh, de, db = torch.ops.unirec.softmax_ce_bwd(g, hidden.detach(), items.detach(), lt,
                                                         None if item_bias is None else item_bias.detach(),
                                                         lse, None, int(ignore_index), 0.0)
            dh, de = dh.to(acc), de.to(acc)
            db = db.to(acc) if item_bias is not None else None
            if de.data_ptr() == items.data_ptr():
                de = de.clone()
            # The target term should be -(1 - eps) g_i at the owned target and nothing at the dummy
            # target of the other rows: add back g_i where not owned and eps * g_i where owned.
            # In place: de is the kernel's own [N_r, D] output, and a copy would double the shard's memory.
            back = torch.where(owned, eps * g, g)
            dh = dh + back.unsqueeze(1) * e.index_select(0, lt)
            de.index_add_(0, lt, back.unsqueeze(1) * h)
            if db is not None:
                db.index_add_(0, lt, back)
            if eps > 0:
                u = g * (eps / num_items)
                dh = dh - u.unsqueeze(1) * e.sum(0)
                de.sub_((u @ h).unsqueeze(0))
                if db is not None:
                    db.sub_(u.sum())
        else:
            dh = torch.zeros_like(h)
            de = torch.zeros_like(e)
            db = torch.zeros(n, dtype=acc, device=e.device) if item_bias is not None else None
        dh = _all_reduce_(dh.contiguous(), dist.ReduceOp.SUM, group)
        return (dh.to(hidden.dtype), de.to(items.dtype), None if db is None else db.to(item_bias.dtype),
                None, None, None, None, None, None)


def sharded_softmax_cross_entropy(
    hidden: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    *,
    offset: int,
    num_items: Optional[int] = None,
    item_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    group=None,
) -> torch.Tensor:
    """:func:`unirec.ops.softmax_cross_entropy` over a catalogue split by rows across the ranks.

    Rank r holds ``items`` = rows [offset_r, offset_r + N_r) of the [N, D] table (``item_bias``
    likewise); ``hidden`` [M, D] and ``targets`` [M] (global ids in [0, N) or ``ignore_index``) are
    the same on every rank. Each rank runs the fused kernel on its shard for lse_ir =
    log sum_{j in shard r} exp(z_ij); then, with all-reduces,

        lse_i = m_i + log sum_r exp(lse_ir - m_i),   m_i = max_r lse_ir,
        loss_i = lse_i - (1 - eps) z_{i, t_i} - eps/N sum_j z_ij

    (z_{i, t_i} from the rank that owns t_i). Returns the same value on every rank: [M] for
    reduction "none", else the sum or the mean over non-ignored rows (0 when all are ignored).
    Backward: the kernel's blockwise gradient against the global lse; ``hidden`` gets the complete
    gradient on every rank (all-reduced), ``items`` / ``item_bias`` the gradient of this shard.
    No [M, N] logits are stored; memory per rank is that of its shard. ``num_items`` (N) is
    all-reduced from the shard sizes when not given. An empty shard (N_r = 0) is allowed.
    """
    if reduction not in ops.loss.REDUCTIONS:
        raise ValueError(f"reduction must be one of {ops.loss.REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if hidden.dim() != 2 or items.dim() != 2 or hidden.shape[1] != items.shape[1]:
        raise ValueError(f"hidden [M, D] and items [N_r, D] must be 2-D with one D, got "
                         f"{tuple(hidden.shape)} and {tuple(items.shape)}")
    if num_items is None:
        num_items = sum(_shard_sizes(items.shape[0], items.device, group))
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_items))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside [0, N) with N = {num_items} "
                         f"and is not ignore_index ({ignore_index})")
    per_row = _ShardedCE.apply(hidden, items, item_bias, targets, int(offset), int(num_items), int(ignore_index),
                               float(label_smoothing), group)
    return reduce_rows(per_row, targets, ignore_index, reduction).to(hidden.dtype)


def shard_exclusions(exclude_offsets: torch.Tensor, exclude_indices: torch.Tensor, offset: int,
                     n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exclusions (CSR of global ids) that fall in the shard [offset, offset + n), as local ids:
    (offsets [B + 1], indices [nnz_r])."""
    keep = (exclude_indices >= offset) & (exclude_indices < offset + n)
    B = exclude_offsets.numel() - 1
    rows = torch.repeat_interleave(torch.arange(B, device=exclude_indices.device), torch.diff(exclude_offsets),
                                   output_size=exclude_indices.numel())
    counts = torch.bincount(rows[keep], minlength=B)
    off = torch.zeros(B + 1, dtype=torch.int64, device=exclude_indices.device)
    torch.cumsum(counts, 0, out=off[1:])
    return off, exclude_indices[keep] - offset


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best of candidate lists [B, C] (values, global indices; -1 = none): by value descending,
    equal values by the smaller index, the (-inf, -1) entries last, as ``topk_scores`` orders them."""
    big = torch.iinfo(torch.int64).max
    none = indices < 0
    order = torch.sort(torch.where(none, big, indices), dim=1, stable=True).indices
    v, i, none = values.gather(1, order), indices.gather(1, order), none.gather(1, order)
    order = torch.sort(v + 0.0, dim=1, descending=True, stable=True).indices  # -0.0 ties +0.0
    v, i, none = v.gather(1, order), i.gather(1, order), none.gather(1, order)
    order = torch.sort(none.to(torch.int8), dim=1, stable=True).indices
    v, i = v.gather(1, order)[:, :k], i.gather(1, order)[:, :k]
    if v.shape[1] < k:
        v = torch.cat([v, v.new_full((v.shape[0], k - v.shape[1]), float("-inf"))], 1)
        i = torch.cat([i, i.new_full((i.shape[0], k - i.shape[1]), -1)], 1)
    return v, i


class _ShardedTopk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, items, item_bias, k, offset, ex_off, ex_idx, group):
        B, n = queries.shape[0], items.shape[0]
        if n > 0:
            ex = {}
            if ex_off is not None:
                lo, li = shard_exclusions(ex_off, ex_idx, offset, n)
                ex = dict(exclude_offsets=lo, exclude_indices=li)
            v, i = ops.topk_scores(queries.detach(), items.detach(), min(k, n),
                                   item_bias=None if item_bias is None else item_bias.detach(), **ex)
            i = torch.where(i >= 0, i + offset, i)
        else:
            v = queries.new_empty(B, 0)
            i = torch.empty(B, 0, dtype=torch.int64, device=queries.device)
        w = world_size(group)
        if w > 1:
            kk = torch.tensor([v.shape[1]], dtype=torch.int64, device=v.device)
            width = int(_all_reduce_(kk, dist.ReduceOp.MAX, group))
            pv = v.new_full((B, width), float("-inf"))
            pi = i.new_full((B, width), -1)
            pv[:, :v.shape[1]], pi[:, :i.shape[1]] = v, i
            vs, is_ = [torch.empty_like(pv) for _ in range(w)], [torch.empty_like(pi) for _ in range(w)]
            dist.all_gather(vs, pv, group=group)
            dist.all_gather(is_, pi, group=group)
            v, i = torch.cat(vs, 1), torch.cat(is_, 1)
        values, indices = merge_topk(v, i, k)
        ctx.save_for_backward(queries, items, indices)
        ctx.args = (offset, item_bias is not None, group)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        queries, items, indices = ctx.saved_tensors
        offset, has_bias, group = ctx.args
        acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
        n = items.shape[0]
        local = indices - offset
        mine = (indices >= 0) & (local >= 0) & (local < n)
        idx = torch.where(mine, local, torch.zeros_like(local))
        g = torch.where(mine, grad_values.to(acc), torch.zeros((), dtype=acc, device=grad_values.device))
        e = items.detach().to(acc)
        dq = torch.einsum("bk,bkd->bd", g, e[idx]) if n > 0 else torch.zeros(queries.shape, dtype=acc,
                                                                              device=queries.device)
        dq = _all_reduce_(dq.contiguous(), dist.ReduceOp.SUM, group)
        di = torch.zeros(items.shape, dtype=acc, device=items.device)
        di.index_add_(0, idx.reshape(-1), (g[:, :, None] * queries.detach().to(acc)[:, None, :]).reshape(-1, items.shape[1]))
        db = None
        if has_bias:
            db = torch.zeros(n, dtype=acc, device=items.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            db = db.to(queries.dtype)
        return dq.to(queries.dtype), di.to(items.dtype), db, None, None, None, None, None


def sharded_topk_scores(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    *,
    offset: int,
    item_bias: Optional[torch.Tensor] = None,
    exclude_offsets: Optional[torch.Tensor] = None,
    exclude_indices: Optional[torch.Tensor] = None,
    group=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`unirec.ops.topk_scores` over a catalogue split by rows across the ranks.

    Rank r holds ``items`` = rows [offset_r, offset_r + N_r) (and ``item_bias`` likewise);
    ``queries`` [B, D] and the exclusions (CSR ``exclude_offsets`` [B + 1], ``exclude_indices``
    global ids in [0, N)) are the same on every rank. Each rank runs the fused top-k on its shard
    with the exclusions that fall in it (remapped to local ids), the [B, min(k, N_r)] lists are
    all-gathered and merged: by score descending, equal scores by the smaller global index, then the
    (-inf, -1) tail when fewer than k items remain, exactly as the single-process op orders them.
    Returns (values [B, k], indices [B, k] int64 global) on every rank; values are differentiable
    (``queries``' gradient complete on every rank, ``items`` / ``item_bias`` that of this shard).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if (exclude_offsets is None) != (exclude_indices is None):
        raise ValueError("exclude_offsets and exclude_indices go together")
    return _ShardedTopk.apply(queries, items, item_bias, int(k), int(offset), exclude_offsets, exclude_indices,
                              group)


# --------------------------------------------------------------------------- rows from their owners


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group):
    dist.all_to_all_single(out, inp.contiguous(), list(out_splits), list(in_splits), group=group)
    return out


class _FetchRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, ids, bounds, group):
        w = len(bounds) - 1
        r = rank(group)
        b = torch.as_tensor(bounds, dtype=torch.int64, device=ids.device)
        flat = ids.reshape(-1)
        owner = torch.searchsorted(b[1:], flat, right=True)
        order = torch.argsort(owner, stable=True)
        send = torch.bincount(owner, minlength=w)
        recv = torch.empty_like(send)
        _a2a(recv, send, [1] * w, [1] * w, group)
        send_l, recv_l = send.tolist(), recv.tolist()
        asked = _a2a(flat.new_empty(sum(recv_l)), flat[order], recv_l, send_l, group) - bounds[r]
        rows = local.detach().index_select(0, asked)
        got = _a2a(rows.new_empty((flat.numel(), local.shape[1])), rows, send_l, recv_l, group)
        out = torch.empty_like(got)
        out[order] = got
        ctx.save_for_backward(order, asked)
        ctx.args = (send_l, recv_l, local.shape[0], group)
        return out.view(*ids.shape, local.shape[1])

    @staticmethod
    def backward(ctx, grad):
        order, asked = ctx.saved_tensors
        send_l, recv_l, n, group = ctx.args
        g = grad.reshape(-1, grad.shape[-1])[order]
        back = _a2a(g.new_empty((sum(recv_l), g.shape[1])), g, recv_l, send_l, group)
        d = torch.zeros((n, g.shape[1]), dtype=grad.dtype, device=grad.device).index_add_(0, asked, back)
        return d, None, None, None


def fetch_rows(local: torch.Tensor, ids: torch.Tensor, bounds: Sequence[int], group=None) -> torch.Tensor:
    """Rows ``ids`` (global row ids, any shape) of a table split by rows across the ranks, fetched from
    the ranks that own them with two all-to-alls (ids out, rows back), as TorchRec's row-wise sharding
    does; the table is never gathered. ``local``: this rank's rows [bounds[r], bounds[r + 1]).
    Returns [*ids.shape, D]; the backward sends each row's gradient back to its owner (added into
    ``local``'s gradient). Every rank must call it (with its own ids, possibly none)."""
    if world_size(group) == 1:
        return local.index_select(0, ids.reshape(-1)).view(*ids.shape, local.shape[1])
    return _FetchRows.apply(local, ids, list(bounds), group)
