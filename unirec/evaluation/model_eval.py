"""Evaluating a UniRec model per DESIGN.md section 7, with ``unirec.ops.topk_scores``.

Full ranking: the target's rank comes from the top ``kmax + 1`` unseen items plus, when the
history is not masked, the user's history items (with the model's repeat offsets), with ties
pessimistic as in :mod:`unirec.evaluation.metrics`: rank = 1 + #{other eligible items scoring
>= the target}. Ranks beyond ``kmax`` are reported as ``kmax + 1``, which leaves
NDCG/HR/MRR@K exact for every K <= kmax. No B x N score matrix is stored.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..models._impl import op_impl
from .metrics import DEFAULT_KS, auc, gauc, mae, ranking_metrics, rmse


def model_ranks(model, queries: torch.Tensor, item_rep: torch.Tensor, targets: torch.Tensor,
                history_items: torch.Tensor, history_offsets: torch.Tensor, mask_history: bool = True,
                kmax: int = 20) -> torch.Tensor:
    """Pessimistic ranks (clipped at kmax + 1) of each user's target under ``model``'s scores.

    Args:
        queries: [B, D] user states; item_rep: [N + 1, D]; targets: [B] int64 1-based item ids.
        history_items / history_offsets: CSR [H] / [B + 1] of the events before each target (1-based).
        mask_history: rank among items outside the history (the target always competes).
    The target's score includes its repeat offset when it is in the history (``UniRec.item_scores``);
    rank = 1 + #{unseen items scoring >= it} (from the top kmax + 1 of ``topk_scores`` with the
    history and the target excluded) + #{other history items scoring >= it} when not masked.
    """
    B = queries.shape[0]
    dev = queries.device
    t_score = model.item_scores(queries, item_rep, targets.view(-1, 1), history_items, history_offsets)[:, 0]
    ex_off = history_offsets + torch.arange(B + 1, device=dev)          # each row: history + target
    ex_idx = torch.empty(int(ex_off[-1]), dtype=torch.int64, device=dev)
    is_target = torch.zeros_like(ex_idx, dtype=torch.bool)
    is_target[ex_off[1:] - 1] = True
    ex_idx[is_target] = targets
    ex_idx[~is_target] = history_items
    items = item_rep[1:].float()
    k = min(kmax + 1, items.shape[0])
    vals, idx = ops.topk_scores(queries.float(), items, k, exclude_offsets=ex_off, exclude_indices=ex_idx - 1,
                                impl=op_impl(model.config.impl, "retrieval"))
    ahead = ((vals >= t_score.view(-1, 1)) & (idx >= 0)).sum(1)
    if not mask_history and history_items.numel():
        r, it, hs = model.history_scores(queries, item_rep, history_items, history_offsets)
        other = it != targets[r]
        ahead = ahead.index_add(0, r[other], (hs[other] >= t_score[r[other]]).long())
    return torch.clamp(1 + ahead, max=kmax + 1)


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
    users = builder.split.eval_users
    item_rep = model.item_representations().float()
    ranks, preds = [], {}
    gauc_stages = tuple(gauc_stages or ((stage,) if stage == "valid" else ("valid", "test")))
    for st in dict.fromkeys((stage,) + gauc_stages):
        rows = []
        for i in range(0, len(users), batch_size):
            b = builder.eval_batch(st, users[i:i + batch_size])
            b = b.to(device)
            p = model.predict(b, item_rep)
            if st == stage:
                r = model_ranks(model, p["queries"], p["item_rep"], b.targets, b.history_items, b.history_offsets,
                                mask_history, kmax=max(ks))
                ranks.append(r.cpu())
            if "rating" in p and b.cand_ratings is not None:
                rows.append((p["rating"].cpu(), p["like"].cpu(), b.cand_ratings.cpu(), b.users.cpu()))
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
