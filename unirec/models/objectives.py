"""Training objectives: each a module with ``loss(encoded, batch) -> (loss or None, parts)``.

The model config lists its objectives with weights (``ModelConfig.objectives``); the model's loss
is sum_o weight_o * loss_o. A new objective is a class here, registered under its name with
:func:`~unirec.models.config.register_objective`, and an entry in the config.

- ``retrieval``: every history token (and the profile token) predicts the next item against the
  whole catalogue (tied item representations) with ``unirec.ops.softmax_cross_entropy``. With the
  scorer's repeat offsets the softmax includes them exactly (:meth:`Retrieval.repeat_correction`).
  The catalogue may be restricted to a set of allowed items (:func:`restrict_training_items`; the
  cold-item protocol leaves the cold items out of the training softmax).
- ``sampled_retrieval``: the same over the batch's distinct targets only (in-batch negatives).
- ``ranking``: each candidate's hidden state -> MLP -> (rating, like logit); MSE + BCE.
- ``not_to_recommend``: with ``ModelConfig.negative_max_rating``, the next items rated at most it are
  no targets of ``retrieval`` but of -log(1 - p), p = their softmax probability over the same catalogue
  (with the same repeat offsets): the model learns to put what a user will dislike low ("Learning from
  Negative User Feedback and Measuring Responsiveness for Sequential Recommenders", RecSys 2023).

Every mean is over the targets of the whole global batch: under data parallelism each process
returns its share, sum over its own terms / the count over all processes
(:func:`unirec.distributed.mean_share`), so that n processes with batch B / n train as one process
with batch B; in one process it is the plain mean. Every process makes the same collectives in the
same order, whatever its batch holds.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..data import TokenBatch
from ..distributed import all_gather_rows, gather_rows, global_count, mean_share, rank, sum_grad
from ..distributed import sharded_softmax_cross_entropy
from ..nn.sharded import ShardedRows, item_rows
from .config import OBJECTIVES, DataSchema, ModelConfig, register_objective
from .scorer import recency_bucket
from .stream import Encoded, take_rows

Loss = Tuple[Optional[torch.Tensor], Dict[str, float]]


def next_item_queries(enc: Encoded, batch: TokenBatch):
    """(queries [M, D], 1-based targets [M], how many of the M are history tokens): the hidden state of
    every history token with a next item, then of every profile token, each with the item it predicts."""
    q_pos, tgt = [enc.hist_pos], [batch.next_items]
    if enc.profile_pos is not None:
        q_pos.append(enc.profile_pos)
        tgt.append(batch.first_items)
    q_pos, tgt = torch.cat(q_pos), torch.cat(tgt)
    keep = tgt > 0
    return take_rows(enc.hidden, q_pos[keep]), tgt[keep], int(keep[:enc.hist_pos.numel()].sum())


def feedback_targets(batch: TokenBatch, negative_max: Optional[float], negative: bool) -> TokenBatch:
    """The batch with only its positive (``negative`` False) or only its negative next-item and profile
    targets: a target whose rating is <= ``negative_max`` is negative, any other (unrated included)
    positive; the others become 0 (no target). ``negative_max`` None: every target is positive."""
    if negative_max is None or batch.next_ratings is None:
        return replace(batch, next_items=torch.zeros_like(batch.next_items),
                       first_items=torch.zeros_like(batch.first_items)) if negative else batch

    def keep(items, ratings):
        return torch.where((ratings <= negative_max) == negative, items, 0)  # NaN <= x is False: positive
    return replace(batch, next_items=keep(batch.next_items, batch.next_ratings),
                   first_items=keep(batch.first_items, batch.first_ratings))


def next_occurrence(items: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: the next position k > j of row b where items[b, j] occurs again, L where it does
    not. One sort of (row, item, position) keys: O(BL log BL), not the O(BL^2) all-pairs comparison."""
    B, L = items.shape
    if items.numel() == 0:
        return torch.full_like(items, L)
    pos = torch.arange(L, device=items.device).expand(B, L)
    group = torch.arange(B, device=items.device).view(-1, 1) * (int(items.max()) + 1) + items    # (row, item)
    key, order = torch.sort((group * L + pos).reshape(-1))
    nxt = torch.full_like(key, L)
    follows = (key[1:] // L) == (key[:-1] // L)           # the next key in order is the same (row, item)
    nxt[:-1] = torch.where(follows, key[1:] % L, L)
    out = torch.empty_like(nxt)
    out[order] = nxt
    return out.view(B, L)


def allowed_targets(allowed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based places in ``allowed`` (sorted 1-based item ids [A]) of the 1-based ``targets`` [M]; a
    ValueError when a target is not allowed (a restricted softmax has no term for it)."""
    at = torch.searchsorted(allowed, targets).clamp_(max=max(allowed.numel() - 1, 0))
    if targets.numel() and not bool((allowed[at] == targets).all()):
        bad = targets[allowed[at] != targets][:5].tolist()
        raise ValueError(f"training targets {bad} are not among the allowed items of the restricted softmax "
                         "(restrict_training_items)")
    return at


@register_objective("retrieval")
class Retrieval(nn.Module):
    """Next-item cross-entropy over the whole catalogue (module docstring). ``impl``: the loss backend.

    ``allowed_items`` (None, or sorted 1-based ids [A], set with :meth:`set_allowed_items`; not part of
    the checkpoint): the softmax runs over those items only, i.e. the loss of a target t is
    -z_t + log sum_{a in allowed} exp(z_a) (the repeat correction then assumes every history item is
    allowed, as in the cold-item protocol, where the history items are warm)."""

    allowed_items: Optional[torch.Tensor]

    def __init__(self, config: ModelConfig, schema: DataSchema, impl: str = "auto"):
        super().__init__()
        self.num_buckets, self.max_len, self.impl = config.num_repeat_buckets, config.max_len, impl
        self.negative_max = config.negative_max_rating
        self.register_buffer("allowed_items", None, persistent=False)

    def set_allowed_items(self, items: Optional[torch.Tensor]) -> None:
        """Restricts the softmax to ``items`` (1-based ids, any order, repeats ignored); None: the whole catalogue."""
        if items is None:
            self.allowed_items = None
            return
        items = torch.unique(torch.as_tensor(items, dtype=torch.int64).reshape(-1))
        if items.numel() == 0 or int(items[0]) < 1:
            raise ValueError("allowed items must be a non-empty set of 1-based item ids")
        dev = self.allowed_items.device if self.allowed_items is not None else None
        self.allowed_items = items.to(dev) if dev is not None else items

    def loss(self, enc: Encoded, batch: TokenBatch) -> Loss:
        total, count = self.target_losses(enc, feedback_targets(batch, self.negative_max, negative=False), "sum")
        ret = mean_share(total, count)
        return ret, {"retrieval": float(ret.detach())}

    def target_losses(self, enc: Encoded, batch: TokenBatch, reduction: str):
        """(loss, count): -log p of each next-item and profile target of ``batch`` (its softmax over the
        catalogue or the allowed items, with the repeat offsets), summed (``reduction`` "sum") or [M]
        float32 ("none"); count: the number of targets over all processes."""
        q, tgt, n_hist = next_item_queries(enc, batch)
        impl = ops.resolve_impl(self.impl, "loss")
        sharded = isinstance(enc.item_rep, ShardedRows)
        allowed = self.allowed_items
        if allowed is None:
            items = None if sharded else enc.item_rep[1:].to(q.dtype)
            tgt0 = tgt - 1
        elif sharded:
            raise NotImplementedError("a restricted retrieval softmax (allowed_items) does not take a sharded item "
                                      "table (shard_items)")
        else:
            allowed = allowed.to(q.device)
            items = take_rows(enc.item_rep, allowed).to(q.dtype)
            tgt0 = allowed_targets(allowed, tgt)
        count = global_count(tgt.numel(), q.device)
        if not sharded and enc.repeat_offsets is None and reduction == "sum":
            return ops.softmax_cross_entropy(q, items, tgt0, reduction="sum", impl=impl), count
        if sharded:
            per_row = self.sharded_loss(q, tgt, enc.item_rep)
        else:
            per_row = ops.softmax_cross_entropy(q, items, tgt0, reduction="none", impl=impl).float()
        if enc.repeat_offsets is not None:
            per_row = torch.cat([per_row[:n_hist] + self.repeat_correction(enc, batch, per_row[:n_hist]),
                                 per_row[n_hist:]])
        return (per_row.sum() if reduction == "sum" else per_row), count

    @staticmethod
    def sharded_loss(q: torch.Tensor, tgt: torch.Tensor, table: ShardedRows) -> torch.Tensor:
        """[M_r] loss of this process's rows against a sharded catalogue: every process's rows are
        gathered, the sharded loss (:func:`unirec.distributed.sharded_softmax_cross_entropy`) runs on
        them, each process keeps its own rows. ``sum_grad`` makes their gradients one again before the
        sharded backward (which needs the same gradient on every process)."""
        rows, offset = table.without_first_row()
        all_q = gather_rows(q)
        all_t, sizes = all_gather_rows(tgt)
        per_row = sum_grad(sharded_softmax_cross_entropy(all_q, rows.to(q.dtype), all_t - 1, offset=offset,
                                                         num_items=table.shape[0] - 1, reduction="none"))
        start = sum(sizes[:rank()])
        return per_row[start:start + q.shape[0]].float()

    def repeat_correction(self, enc: Encoded, batch: TokenBatch, loss0: torch.Tensor) -> torch.Tensor:
        """Exact change of each history token's softmax loss when seen items get beta[bucket].

        Token i of a stream has seen S_i = the distinct items at positions j <= i (d = i - j since
        the last occurrence). With l_i = loss without offsets, lse_i = l_i + z_i,target and
        p_ij = exp(z_ij - lse_i):  loss_i = l_i + log(1 + sum_{j in S_i} p_ij (e^beta_ij - 1))
        - beta_i,target [target in S_i].  Padded [B, Lmax, Lmax] over each stream's window.
        Returns [n] for the history tokens that have a target (in ``loss0``'s order).
        """
        items, off = batch.items, batch.offsets
        dev = items.device
        lens = torch.diff(off)
        Lm = int(lens.max()) if lens.numel() else 0
        ar = torch.arange(Lm, device=dev)
        valid = ar.view(1, -1) < lens.view(-1, 1)                               # [B, L]
        idx = torch.where(valid, off[:-1].view(-1, 1) + ar.view(1, -1), 0)
        it = torch.where(valid, items[idx], 0)                                   # [B, L], 0 = padding
        nxt = torch.where(valid, batch.next_items[idx], 0)
        h = take_rows(enc.hidden, enc.hist_pos[idx]).float()                    # [B, L, D]
        rep = enc.item_rep.float()
        z = torch.bmm(h, item_rows(rep, it).transpose(1, 2))                    # z[b, i, j] = <h_bi, e_it[b, j]>
        # (i, j) counts when j <= i and the item at j does not occur again in (j, i].
        next_occ = next_occurrence(it)                                           # [B, L]
        i_ = ar.view(1, -1, 1)
        j_ = ar.view(1, 1, -1)
        pair = (j_ <= i_) & (next_occ.unsqueeze(1) > i_) & valid.unsqueeze(1) & (it.unsqueeze(1) > 0)
        if self.allowed_items is not None:  # history items outside a restricted softmax add no mass to it
            pair = pair & torch.isin(it, self.allowed_items.to(dev)).unsqueeze(1)
        beta = enc.repeat_offsets[recency_bucket(i_ - j_, self.num_buckets, self.max_len)]
        rows = valid & (nxt > 0)                                                 # tokens with a target
        z_t = (h * item_rows(rep, nxt)).sum(-1)                                 # [B, L]
        lse = torch.zeros_like(z_t).masked_scatter(rows, loss0 + z_t[rows])
        p = torch.exp((z - lse.unsqueeze(2)).clamp(max=0.0)) * pair
        mass = (p * torch.expm1(beta)).sum(2)                                   # sum_j p_ij (e^beta - 1)
        hit = pair & (it.unsqueeze(1) == nxt.unsqueeze(2))
        corr = torch.log1p(mass.clamp_min(-1.0 + 1e-6)) - (beta * hit).sum(2)
        return corr[rows]


@register_objective("not_to_recommend")
class NotToRecommend(Retrieval):
    """-log(1 - p) of each negatively rated next item (rating <= ``negative_max_rating``), p its
    probability under the retrieval softmax (the same catalogue, allowed items and repeat offsets); the
    mean over those targets. In terms of the softmax loss l = -log p: -log(1 - e^-l)."""

    def loss(self, enc: Encoded, batch: TokenBatch) -> Loss:
        per_row, count = self.target_losses(enc, feedback_targets(batch, self.negative_max, negative=True), "none")
        # Decided on the count over all processes, so that every process takes the same branch.
        if not count > 0:
            return None, {}
        # 1 - p = -expm1(-l); l is clamped above 0 so that a target at p = 1 costs a large finite loss
        ret = mean_share(-torch.log(-torch.expm1(-per_row.clamp_min(1e-6))).sum(), count)
        return ret, {"not_to_recommend": float(ret.detach())}


@register_objective("dislike")
class Dislike(nn.Module):
    """P(the user dislikes the next item | it is the next item): an MLP on [h, h * e_t] of each next-item
    query h and its target's representation e_t -> a logit, BCE against rating <= ``dislike_max_rating``
    over the rated targets (unrated ones are skipped). The retrieval softmax keeps every target, so it
    still learns what the user will watch; ranking by log p(i) + b log(1 - P(dislike | i)) (the scorer's
    re-ranking of the top ``rerank_depth``) then ranks by what the user will watch and like."""

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        D = config.dim
        self.mlp = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 1))
        self.dislike_max = config.dislike_max_rating

    def logits(self, queries: torch.Tensor, item_rep: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Dislike logits [...] of queries [..., D] against the 1-based ``items`` [...] (broadcast to queries)."""
        e = item_rows(item_rep, items).to(queries.dtype)
        return self.mlp(torch.cat([queries.expand_as(e), queries * e], -1)).squeeze(-1).float()

    def loss(self, enc: Encoded, batch: TokenBatch) -> Loss:
        if batch.next_ratings is None:
            return None, {}
        q, tgt, n_hist = next_item_queries(enc, batch)
        r = [batch.next_ratings]
        if enc.profile_pos is not None:
            r.append(batch.first_ratings)
        r = torch.cat(r)
        r = r[torch.cat([batch.next_items, batch.first_items] if enc.profile_pos is not None
                        else [batch.next_items]) > 0]
        ok = ~torch.isnan(r)
        count = global_count(ok.sum(), q.device)
        if not count > 0:
            return None, {}
        logit = self.logits(q[ok], enc.item_rep, tgt[ok])
        ret = mean_share(F.binary_cross_entropy_with_logits(logit, (r[ok] <= self.dislike_max).float(),
                                                            reduction="sum"), count)
        return ret, {"dislike": float(ret.detach())}


@register_objective("sampled_retrieval")
class SampledRetrieval(nn.Module):
    """Next-item softmax over the batch's distinct positive targets (in-batch negatives, no logQ correction)."""

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        self.negative_max = config.negative_max_rating

    def loss(self, enc: Encoded, batch: TokenBatch) -> Loss:
        q, tgt, _ = next_item_queries(enc, feedback_targets(batch, self.negative_max, negative=False))
        uniq, inv = torch.unique(tgt, return_inverse=True)
        # The negatives are this process's batch's targets (a process sees only its own batch).
        total = F.cross_entropy((q @ item_rows(enc.item_rep, uniq).to(q.dtype).T).float(), inv, reduction="sum")
        ret = mean_share(total, global_count(tgt.numel(), q.device))
        return ret, {"sampled_retrieval": float(ret.detach())}


@register_objective("ranking")
class Ranking(nn.Module):
    """Candidates' rating (MSE) and like = rating >= ``like_threshold`` (BCE), from an MLP on
    [h, h * item] of each candidate's hidden state h; candidates without a rating are skipped."""

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        D = config.dim
        self.mlp = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 2))
        self.like_threshold = config.like_threshold
        self.rating_min, self.rating_max = schema.rating_min, schema.rating_max

    def outputs(self, enc: Encoded, cand_items: torch.Tensor):
        """(rating [C], like logit [C]) of the candidates."""
        hc = take_rows(enc.hidden, enc.cand_pos)
        ic = item_rows(enc.item_rep, cand_items).to(hc.dtype)
        out = self.mlp(torch.cat([hc, hc * ic], 1)).float()
        return 0.5 * (self.rating_min + self.rating_max) + out[:, 0], out[:, 1]

    def predict(self, enc: Encoded, cand_items: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"rating": [C] clamped to the data's range, "like": [C] probabilities}."""
        rating, like = self.outputs(enc, cand_items)
        return {"rating": rating.clamp(self.rating_min, self.rating_max), "like": torch.sigmoid(like)}

    def loss(self, enc: Encoded, batch: TokenBatch) -> Loss:
        if batch.cand_ratings is None:
            return None, {}
        rating, like_logit = self.outputs(enc, batch.cand_items)
        y = batch.cand_ratings.float()
        ok = ~torch.isnan(y)
        # Decided on the count over all processes, so that every process takes the same branch.
        count = global_count(ok.sum(), y.device)
        if not count > 0:
            return None, {}
        mse = mean_share(F.mse_loss(rating[ok], y[ok], reduction="sum"), count)
        bce = mean_share(F.binary_cross_entropy_with_logits(like_logit[ok], (y[ok] >= self.like_threshold).float(),
                                                            reduction="sum"), count)
        return mse + bce, {"rating": float(mse.detach()), "like": float(bce.detach())}


# Objectives that score their targets against the whole catalogue: a restricted training catalogue
# (the cold-item protocol) must reach each of them through ``set_allowed_items``.
CATALOGUE_OBJECTIVES = ("retrieval", "not_to_recommend", "cloze")


def restrict_training_items(model, items: Optional[torch.Tensor]) -> None:
    """Restricts every training softmax over the catalogue of ``model`` (a UniRec) to ``items`` (1-based
    ids; None: the whole catalogue again). Training only: what evaluation and serving rank is the data set's
    (``Dataset.target_items`` where set, else the whole catalogue).
    Objectives with in-batch or no item negatives (sampled_retrieval, ranking, contrastive, ...) need
    nothing. A ValueError names a catalogue objective of the model that cannot be restricted."""
    for name, objective in model.objectives.items():
        if hasattr(objective, "set_allowed_items"):
            objective.set_allowed_items(items)
        elif name in CATALOGUE_OBJECTIVES and items is not None:
            raise ValueError(f"objective {name!r} scores the whole catalogue and cannot leave items out of its "
                             "softmax yet (no set_allowed_items); the cold-item protocol needs that")


__all__ = ["OBJECTIVES", "CATALOGUE_OBJECTIVES", "Retrieval", "NotToRecommend", "SampledRetrieval", "Ranking",
           "allowed_targets", "feedback_targets", "next_item_queries", "restrict_training_items"]
