"""Evaluating a UniRec model on a leave-one-out split or on cold-item cases (docs/protocol.md).

Full ranking through the model's scorer (:meth:`unirec.models.Scorer.target_ranks`): the target's
rank comes from the top ``kmax + 1`` unseen items plus, when the history is not masked, the user's
history items (with the model's repeat offsets), with ties pessimistic as in
:mod:`unirec.evaluation.metrics`. Ranks beyond ``kmax`` are reported as ``kmax + 1``, which leaves
NDCG/HR/MRR@K exact for every K <= kmax. No B x N score matrix is stored. Every evaluation keeps
the per-user ranks, so that two runs can be compared user by user (:mod:`unirec.evaluation.compare`).

Every protocol evaluates cases, an event at a (user, position) pair given the user's events before it
(:meth:`unirec.data.TokenBuilder.case_batch`): leave-one-out has one per user and stage
(:func:`evaluate_model`, :func:`evaluate_split`), the cold-item split one per event on a cold item
(:func:`evaluate_cases`, :func:`evaluate_cold`).

A split of a target-domain data set (``split.dataset.target_items`` set; docs/protocol.md, "Genre domains
(cross-domain)") ranks each target among the target items only (:func:`target_ranks_within`): other items
never enter a top-k nor count in a rank, in every protocol here and in the popularity floor.

Under torch.distributed every process evaluates a contiguous part of the cases and the parts are
gathered, so each case is ranked exactly once and every process gets the same metrics.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .. import ops
from ..data import TokenBuilder
from ..distributed import all_gather_rows, rank, world_size
from ..nn.sharded import ShardedRows
from .metrics import DEFAULT_KS, auc, gauc, mae, ndcg_at_k, ranking_metrics, rmse


def _nan_to_none(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def target_ranks_within(scorer, queries: torch.Tensor, item_rep: torch.Tensor, targets: torch.Tensor,
                        history_items: torch.Tensor, history_offsets: torch.Tensor, allowed: torch.Tensor,
                        mask_history: bool = True, kmax: int = 20) -> torch.Tensor:
    """:meth:`unirec.models.Scorer.target_ranks` with the catalogue restricted to the ``allowed`` items.

    queries [B, D]; item_rep [N + 1, D]; targets [B] int64 1-based, each allowed; history CSR (items [H],
    offsets [B + 1]) of the events before each target (items of any domain: their recency still sets the
    repeat offsets); allowed: [N + 1] bool (row 0 False). rank = 1 + #{allowed unseen items scoring >= the
    target} + (unmasked) #{other allowed history items scoring >= it}, pessimistic, clipped at kmax + 1.
    Returns [B] int64.
    """
    if isinstance(item_rep, ShardedRows):
        raise NotImplementedError("ranking among target items does not take a sharded item table (shard_items)")
    dev = queries.device
    allowed = allowed.to(dev)
    if targets.numel() and not bool(allowed[targets].all()):
        bad = targets[~allowed[targets]][:5].tolist()
        raise ValueError(f"targets {bad} are not target items: they cannot be ranked among the target items")
    ids = allowed.nonzero().view(-1)                                         # [T] 1-based allowed items
    place = torch.full((allowed.numel(),), -1, dtype=torch.int64, device=dev)
    place[ids] = torch.arange(ids.numel(), device=dev)                       # item -> 0-based row of ids
    t_score = scorer.item_scores(queries, item_rep, targets.view(-1, 1), history_items, history_offsets)[:, 0]
    # exclusions of each row (0-based rows of ids): its allowed history items, then its target
    B = targets.numel()
    h_place = place[history_items]
    h_row = torch.repeat_interleave(torch.arange(B, device=dev), torch.diff(history_offsets),
                                    output_size=history_items.numel())
    ok = h_place >= 0
    lens = torch.bincount(h_row[ok], minlength=B) + 1
    ex_off = torch.zeros(B + 1, dtype=torch.int64, device=dev)
    torch.cumsum(lens, 0, out=ex_off[1:])
    ex_idx = torch.empty(int(ex_off[-1]), dtype=torch.int64, device=dev)
    is_target = torch.zeros_like(ex_idx, dtype=torch.bool)
    is_target[ex_off[1:] - 1] = True
    ex_idx[is_target] = place[targets]
    ex_idx[~is_target] = h_place[ok]                                         # h_row is sorted: rows stay in order
    k = min(kmax + 1, ids.numel())
    vals, idx = ops.topk_scores(queries.float(), item_rep[ids].float(), k, exclude_offsets=ex_off,
                                exclude_indices=ex_idx, impl=ops.resolve_impl(scorer.impl, "retrieval"))
    ahead = ((vals >= t_score.view(-1, 1)) & (idx >= 0)).sum(1)
    if not mask_history and history_items.numel():
        r, it, hs = scorer.history_scores(queries, item_rep, history_items, history_offsets)
        other = (it != targets[r]) & allowed[it]
        ahead = ahead.index_add(0, r[other], (hs[other] >= t_score[r[other]]).long())
    return torch.clamp(1 + ahead, max=kmax + 1)


def _target_mask(split, device) -> Optional[torch.Tensor]:
    """The [N + 1] bool target items of a target-domain split, on ``device``; None for any other split."""
    target = getattr(split.dataset, "target_items", None)
    return None if target is None else torch.from_numpy(np.asarray(target, dtype=bool)).to(device)


def _run_cases(model, builder, users: np.ndarray, positions: np.ndarray, item_rep, *, batch_size: int, device,
               rank_kw: Optional[dict]):
    """Runs the model over the cases (users [n], positions [n] into ``builder.split``'s events) in batches.

    Under torch.distributed each process takes a contiguous part of the cases and every process runs
    as many batches (a sharded model makes collectives in each); the results are gathered.
    Returns (ranks [n] int64 or None without ``rank_kw`` (the keyword arguments of
    ``Scorer.target_ranks``), preds [rating, like, label, user] tensors [n] or None). A target-domain
    split ranks among its target items (:func:`target_ranks_within`).
    """
    allowed = _target_mask(builder.split, device)
    world = world_size()
    idx = np.arange(len(users))
    part = np.array_split(idx, world)[rank()]
    num_batches = -(-len(np.array_split(idx, world)[0]) // batch_size)
    ranks, rows = [], []
    for chunk in np.array_split(part, num_batches) if num_batches else []:
        if len(chunk) == 0:
            continue
        b = builder.case_batch(users[chunk], positions[chunk]).to(device)
        p = model.predict(b, item_rep)
        if rank_kw is not None:
            if allowed is None and getattr(model, "reranks", False):
                r = model.reranked_target_ranks(p["queries"], p["item_rep"], b.targets, b.history_items,
                                                b.history_offsets, **rank_kw)
            elif allowed is None:
                r = model.scorer.target_ranks(p["queries"], p["item_rep"], b.targets, b.history_items,
                                              b.history_offsets, **rank_kw)
            else:
                r = target_ranks_within(model.scorer, p["queries"], p["item_rep"], b.targets, b.history_items,
                                        b.history_offsets, allowed, **rank_kw)
            ranks.append(r.cpu())
        if "rating" in p and b.cand_ratings is not None:
            rows.append((p["rating"].cpu(), p["like"].cpu(), b.cand_ratings.cpu(), b.users.cpu()))
    preds = [torch.cat(x) for x in zip(*rows)] if rows else None
    if world > 1 and "ranking" in model.objectives and builder.split.ratings is not None:
        cols = preds or [torch.zeros(0), torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.int64)]
        preds = [all_gather_rows(x)[0] for x in cols]
    out_ranks = None
    if rank_kw is not None:
        out_ranks = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.int64)
        if world > 1:
            out_ranks = all_gather_rows(out_ranks)[0]
    return out_ranks, preds


@torch.no_grad()
def evaluate_model(model, builder, stage: str = "test", *, mask_history: bool = True, ks: Sequence[int] = DEFAULT_KS,
                   batch_size: int = 256, device=None, gauc_stages: Optional[Sequence[str]] = None,
                   return_ranks: bool = False) -> Dict[str, object]:
    """Ranking (NDCG/HR/MRR@K) and, with a ranking head, rating (RMSE/MAE) and like (AUC) metrics.

    Args:
        model: a UniRec; builder: its TokenBuilder over the split.
        stage: "valid" or "test" (each user's held-out event of that stage, given the events before it).
        mask_history: exclude the user's earlier items (except the target) from the ranking.
        gauc_stages: stages whose events are pooled for GAUC (a user needs events of both classes, so one
            event per user is not enough); default (stage,) for "valid", ("valid", "test") for "test".
        return_ranks: also return "ranks", [E] int64 per user of ``builder.split.eval_users``.
    Returns:
        {"ndcg@10": ..., "hr@10": ..., ..., "num_users", "mask_history", "stage",
         "rmse", "mae", "auc", "gauc", "gauc_stages"} (rating keys only with a ranking head; NaN -> None).
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    split = builder.split
    users = split.eval_users
    item_rep = model.item_representations().float()
    preds = {}
    all_ranks = None
    gauc_stages = tuple(gauc_stages or ((stage,) if stage == "valid" else ("valid", "test")))
    for st in dict.fromkeys((stage,) + gauc_stages):
        rank_kw = dict(mask_history=mask_history, kmax=max(ks)) if st == stage else None
        r, p = _run_cases(model, builder, users, split.stage_positions(st, users), item_rep,
                          batch_size=batch_size, device=device, rank_kw=rank_kw)
        if r is not None:
            all_ranks = r
        if p is not None:
            preds[st] = p
    out: Dict[str, object] = dict(ranking_metrics(all_ranks, ks))
    out.update(num_users=int(len(users)), mask_history=bool(mask_history), stage=stage)
    if split.dataset.target_items is not None:
        out.update(num_ranked_items=int(split.dataset.target_items.sum()))
    if split.ratings is not None and len(users):
        out.update(feedback_metrics(all_ranks, split.ratings[split.stage_positions(stage, users)]))
    if stage in preds:
        rating, like, y, u = preds[stage]
        thr = model.config.like_threshold
        out.update(rmse=rmse(rating, y), mae=mae(rating, y), auc=auc(like, y >= thr))
        g = [preds[s] for s in gauc_stages if s in preds]
        like_all, y_all, u_all = (torch.cat([x[i] for x in g]) for i in (1, 2, 3))
        out.update(gauc=gauc(like_all, y_all >= thr, u_all), gauc_stages="+".join(gauc_stages))
    if was_training:
        model.train()
    out = _nan_to_none(out)
    if return_ranks:
        out["ranks"] = all_ranks
    return out


@torch.no_grad()
def evaluate_cases(model, builder, users, positions, *, stage: str = "cases", mask_history: bool = True,
                   ks: Sequence[int] = DEFAULT_KS, batch_size: int = 256, device=None,
                   return_ranks: bool = False) -> Dict[str, object]:
    """The metrics of :func:`evaluate_model` over arbitrary cases: the event at each (user, position) pair
    (``positions`` index ``builder.split``'s sorted events), ranked given all of the user's earlier events
    (e.g. the cold-item cases of :meth:`unirec.data.ColdItemSplit.cases`, with a builder over its ``full``
    split). A user may have several cases; GAUC pools each user's cases.

    Returns {"ndcg@10", "hr@10", ..., "num_cases", "mask_history", "stage", "neghit@10", ...,
    "rmse", "mae", "auc", "gauc"} (rating keys only with a ranking head and ratings; NaN -> None), and
    "ranks" [n] int64 in the cases' order with ``return_ranks``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if users.shape != positions.shape:
        raise ValueError(f"users {users.shape} and positions {positions.shape} must have the same length")
    item_rep = model.item_representations().float()
    ranks, preds = _run_cases(model, builder, users, positions, item_rep, batch_size=batch_size, device=device,
                              rank_kw=dict(mask_history=mask_history, kmax=max(ks)))
    out: Dict[str, object] = dict(ranking_metrics(ranks, ks))
    out.update(num_cases=int(len(users)), mask_history=bool(mask_history), stage=stage)
    split = builder.split
    if split.dataset.target_items is not None:
        out.update(num_ranked_items=int(split.dataset.target_items.sum()))
    if split.ratings is not None and len(users):
        out.update(feedback_metrics(ranks, split.ratings[positions]))
    if preds is not None:
        rating, like, y, u = preds
        thr = model.config.like_threshold
        out.update(rmse=rmse(rating, y), mae=mae(rating, y), auc=auc(like, y >= thr), gauc=gauc(like, y >= thr, u),
                   gauc_stages=stage)
    if was_training:
        model.train()
    out = _nan_to_none(out)
    if return_ranks:
        out["ranks"] = ranks
    return out


def feedback_groups(target_ratings, negative_max: float = 2.0):
    """(negative, positive) bool masks of targets: rated <= ``negative_max``, rated above it (unrated: neither)."""
    y = np.asarray(target_ratings, dtype=np.float32)
    return y <= negative_max, y > negative_max


def feedback_users(split, stage: str, negative: bool, negative_max: float = 2.0) -> np.ndarray:
    """The ids of the evaluated users whose ``stage`` ("valid" / "test") target is negative (or positive)
    feedback, as :func:`feedback_metrics` counts them; a ValueError when the data has no ratings."""
    if split.ratings is None:
        raise ValueError("the data set has no ratings: no user's target is liked or disliked")
    users = split.eval_users
    neg, pos = feedback_groups(split.ratings[split.stage_positions(stage, users)], negative_max)
    return split.dataset.user_vocab[users[neg if negative else pos]].astype(str)


def feedback_metrics(ranks: torch.Tensor, target_ratings, negative_max: float = 2.0, k: int = 10) -> dict:
    """Metrics that tell disliked targets from liked ones (``ranks`` [E] and ``target_ratings`` [E] of
    the same users): "neghit@10", the share of users whose target is rated <= ``negative_max`` that
    find it in their top k (lower is better: the model should not push what the user will dislike);
    "ndcg@10_positive", NDCG@k over the users whose target is rated above it (so that demoting
    disliked items is not counted as a loss); and how many users each covers. NaN without users."""
    neg, pos = (torch.from_numpy(m) for m in feedback_groups(target_ratings, negative_max))
    hit = (ranks <= k).float()
    return {f"neghit@{k}": float(hit[neg].mean()) if neg.any() else math.nan,
            f"ndcg@{k}_positive": float(ndcg_at_k(ranks[pos], k).mean()) if pos.any() else math.nan,
            "num_negative": int(neg.sum()), "num_positive": int(pos.sum())}


def evaluate_split(model, split, batch_size: int = 256, device="cpu", test: bool = True):
    """(metrics, per-user ranks) of a model on a split: validation (masked) and, with ``test``, test
    (masked and unmasked) plus the popularity floor on test.

    metrics: {"valid": {...}, "test": {...}, "test_unmasked": {...}, "popularity_test": {...}};
    ranks: {"users": [E] the data set's user ids, "valid" / "test" / "test_unmasked": [E] int64}.
    """
    b = TokenBuilder.for_config(split, model.config)
    stages = [("valid", "valid", True)] + ([("test", "test", True), ("test_unmasked", "test", False)] if test else [])
    metrics, ranks = {}, {"users": split.dataset.user_vocab[split.eval_users].astype(str)}
    for key, stage, mask in stages:
        m = evaluate_model(model, b, stage, mask_history=mask, batch_size=batch_size, device=device,
                           return_ranks=True)
        ranks[key] = m.pop("ranks").numpy()
        metrics[key] = m
    if test:
        metrics["popularity_test"] = {k: v for k, v in popularity_baseline(split, "test").items() if k != "ranks"}
    return metrics, ranks


def evaluate_cold(model, cold, batch_size: int = 256, device="cpu", test: bool = True):
    """(metrics, per-case ranks) of a model on a :class:`unirec.data.ColdItemSplit` (docs/protocol.md, "Cold
    items"): the cold validation cases and, with ``test``, the cold test cases, each ranked against the
    whole catalogue with the history masked.

    metrics: {"cold_valid": {...}, "cold_test": {...}} (:func:`evaluate_cases`);
    ranks: {"cold_valid_ids": [n] str case ids (:meth:`~unirec.data.ColdItemSplit.case_ids`), "cold_valid":
    [n] int64, and the same for "cold_test"}: the input of ``unirec compare --stage cold_test``.
    """
    b = TokenBuilder.for_config(cold.full, model.config)
    metrics, ranks = {}, {}
    for stage in ("cold_valid", "cold_test") if test else ("cold_valid",):
        m = evaluate_cases(model, b, *cold.cases(stage), stage=stage, batch_size=batch_size, device=device,
                           return_ranks=True)
        ranks[f"{stage}_ids"] = cold.case_ids(stage)
        ranks[stage] = m.pop("ranks").numpy()
        metrics[stage] = m
    return metrics, ranks


def popularity_baseline(split, stage: str = "test", mask_history: bool = True, ks: Sequence[int] = DEFAULT_KS):
    """Ranking metrics of scoring items by training popularity (a sanity floor for any model); a
    target-domain split ranks among its target items (the others score -inf)."""
    from .metrics import evaluate_full_ranking
    pop = torch.from_numpy(split.item_popularity().astype(np.float32))
    if split.dataset.target_items is not None:
        pop[torch.from_numpy(~np.asarray(split.dataset.target_items, dtype=bool))] = float("-inf")
    targets = torch.from_numpy(split.targets(stage))
    hi, ho = split.history(stage)
    scores = lambda s, e: pop.expand(e - s, -1)  # noqa: E731
    return evaluate_full_ranking(scores, targets, torch.from_numpy(hi), torch.from_numpy(ho),
                                 mask_history=mask_history, ks=ks, num_items=pop.numel())


def format_metrics(metrics: dict) -> str:
    """A table: rows = metric, columns = valid / test / test unmasked / popularity."""
    cols = [("valid", "valid"), ("test", "test"), ("test_unmasked", "test unmasked"), ("popularity_test", "popularity"),
            ("cold_valid", "cold valid"), ("cold_test", "cold test")]
    cols = [(k, n) for k, n in cols if k in metrics]
    keys = [f"{m}@{k}" for k in (5, 10, 20) for m in ("ndcg", "hr", "mrr")] + ["rmse", "mae", "auc", "gauc",
                                                                              "neghit@10", "ndcg@10_positive"]
    lines = [f"{'metric':<16}" + "".join(f"{n:>15}" for _, n in cols)]
    for key in keys:
        vals = [metrics[c].get(key) for c, _ in cols]
        if all(v is None for v in vals):
            continue
        lines.append(f"{key:<16}" + "".join(f"{v:>15.4f}" if isinstance(v, float) else f"{'-':>15}" for v in vals))
    ranked = next((metrics[c]["num_ranked_items"] for c, _ in cols if "num_ranked_items" in metrics[c]), None)
    catalogue = "full-catalogue ranking" if ranked is None else f"ranking among the {ranked} target-domain items"
    if any(c in metrics for c in ("valid", "test")):
        lines.append(f"history masked: valid yes, test yes, test unmasked no; ties pessimistic; {catalogue}")
    if any(c in metrics for c in ("cold_valid", "cold_test")):
        n = {c: metrics[c].get("num_cases") for c in ("cold_valid", "cold_test") if c in metrics}
        lines.append("cold items: each event on a cold item (never trained on) ranked given the user's earlier "
                     "events, history masked; ties pessimistic; full-catalogue ranking; cases: "
                     + ", ".join(f"{k} {v}" for k, v in n.items()))
    if any("neghit@10" in metrics[c] for c, _ in cols):
        lines.append("neghit@10: share of users whose held-out item is rated <= 2 that get it in their top 10 "
                     "(lower is better); ndcg@10_positive: over users whose held-out item is rated > 2")
    return "\n".join(lines)
