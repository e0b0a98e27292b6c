"""Evaluating a UniRec model per DESIGN.md section 7, with ``unirec.ops.topk_scores``.

Full ranking: the target's rank comes from the top ``kmax + 1`` items (excluding the
user's history other than the target when ``mask_history``), with ties pessimistic
as in :mod:`unirec.evaluation.metrics`: rank = 1 + #{other eligible items scoring
>= the target}. Ranks beyond ``kmax`` are reported as ``kmax + 1``, which leaves
NDCG/HR/MRR@K exact for every K <= kmax. No B x N score matrix is stored.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .. import ops
from .metrics import DEFAULT_KS, auc, gauc, mae, ranking_metrics, rmse


def topk_ranks(queries: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
               exclude_offsets: Optional[torch.Tensor] = None, exclude_indices: Optional[torch.Tensor] = None,
               kmax: int = 20, impl: str = "auto") -> torch.Tensor:
    """Pessimistic ranks (clipped at kmax + 1) of ``targets`` among ``items``.

    Args:
        queries: [B, D]; items: [N, D]; targets: [B] int64 in [0, N).
        exclude_offsets / exclude_indices: CSR [B + 1] / [E] items never ranked (must not hold the target).
    Returns:
        [B] int64 in [1, kmax + 1].
    """
    k = min(kmax + 1, items.shape[0])
    kw = {} if exclude_offsets is None else dict(exclude_offsets=exclude_offsets, exclude_indices=exclude_indices)
    vals, idx = ops.topk_scores(queries, items, k, impl=impl, **kw)
    t = targets.view(-1, 1)
    is_t = idx == t
    found = is_t.any(1)
    own = (queries * items[targets]).sum(1)
    t_score = torch.where(found, vals.masked_fill(~is_t, 0).sum(1), own)
    ahead = ((vals >= t_score.view(-1, 1)) & ~is_t & (idx >= 0)).sum(1)
    # If the target is missing from the list and every listed item beats it, it ranks after them all.
    return torch.clamp(1 + ahead, max=kmax + 1)


def _exclusions(history_items: torch.Tensor, history_offsets: torch.Tensor, targets: torch.Tensor):
    """History CSR without the target (0-based item ids for the items[1:] table)."""
    lens = torch.diff(history_offsets)
    rows = torch.repeat_interleave(torch.arange(lens.numel()), lens, output_size=history_items.numel())
    keep = history_items != targets[rows]
    new_lens = torch.zeros_like(lens).index_add_(0, rows[keep], torch.ones_like(rows[keep]))
    off = torch.zeros(lens.numel() + 1, dtype=torch.int64)
    torch.cumsum(new_lens, 0, out=off[1:])
    return off, history_items[keep] - 1


def _nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@torch.no_grad()
def evaluate_model(model, builder, stage: str = "test", *, mask_history: bool = True, ks: Sequence[int] = DEFAULT_KS,
                   batch_size: int = 256, device=None, gauc_stages: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Ranking (NDCG/HR/MRR@K) and, with a ranking head, rating (RMSE/MAE) and like (AUC) metrics.

    Args:
        model: a UniRec; builder: its TokenBuilder over the split.
        stage: "valid" or "test" (each user's held-out event of that stage, given the events before it).
        mask_history: exclude the user's earlier items (except the target) from the ranking.
        gauc_stages: stages whose events are pooled for GAUC (a user needs events of both classes, so one
            event per user is not enough); default (stage,) for "valid", ("valid", "test") for "test".
    Returns:
        {"ndcg@10": ..., "hr@10": ..., ..., "num_users", "mask_history", "stage",
         "rmse", "mae", "auc", "gauc", "gauc_stages"} (rating keys only with a ranking head; NaN -> None).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    impl = model.config.impl
    from ..models._impl import op_impl
    users = builder.split.eval_users
    item_rep = model.item_representations().float()
    ranks, preds = [], {}
    gauc_stages = tuple(gauc_stages or ((stage,) if stage == "valid" else ("valid", "test")))
    for st in dict.fromkeys((stage,) + gauc_stages):
        rows = []
        for i in range(0, len(users), batch_size):
            b = builder.eval_batch(st, users[i:i + batch_size])
            p = model.predict(b.to(device), item_rep)
            if st == stage:
                ex = _exclusions(b.history_items, b.history_offsets, b.targets) if mask_history else (None, None)
                r = topk_ranks(p["queries"], p["item_rep"][1:], b.targets.to(device) - 1,
                               *(x if x is None else x.to(device) for x in ex), kmax=max(ks),
                               impl=op_impl(impl, "retrieval"))
                ranks.append(r.cpu())
            if "rating" in p and b.cand_ratings is not None:
                rows.append((p["rating"].cpu(), p["like"].cpu(), b.cand_ratings, b.users))
        if rows:
            preds[st] = [torch.cat(x) for x in zip(*rows)]
    out: Dict[str, object] = dict(ranking_metrics(torch.cat(ranks), ks))
    out.update(num_users=int(len(users)), mask_history=bool(mask_history), stage=stage)
    if stage in preds:
        rating, like, y, u = preds[stage]
        thr = model.config.like_threshold
        out.update(rmse=rmse(rating, y), mae=mae(rating, y), auc=auc(like, y >= thr))
        g = [preds[s] for s in gauc_stages if s in preds]
        like_all, y_all, u_all = (torch.cat([x[i] for x in g]) for i in (1, 2, 3))
        out.update(gauc=gauc(like_all, y_all >= thr, u_all), gauc_stages="+".join(gauc_stages))
    if was_training:
        model.train()
    return _nan_to_none(out)


def popularity_baseline(split, stage: str = "test", mask_history: bool = True, ks: Sequence[int] = DEFAULT_KS):
    """Ranking metrics of scoring items by training popularity (a sanity floor for any model)."""
    from .metrics import evaluate_full_ranking
    pop = torch.from_numpy(split.item_popularity().astype(np.float32))
    targets = torch.from_numpy(split.targets(stage))
    hi, ho = split.history(stage)
    scores = lambda s, e: pop.expand(e - s, -1)  # noqa: E731
    return evaluate_full_ranking(scores, targets, torch.from_numpy(hi), torch.from_numpy(ho),
                                 mask_history=mask_history, ks=ks, num_items=pop.numel())
