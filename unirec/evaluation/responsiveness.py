"""Responsiveness: how far one piece of feedback moves the next recommendation (docs/protocol.md,
"Feedback and responsiveness").

A counterfactual simulation on the test users, after "Learning from Negative User Feedback and
Measuring Responsiveness for Sequential Recommenders" (RecSys 2023). For each user with history H (the
events before the held-out test event) the model's top 10 is computed with H's items left out (the
evaluation protocol's masking). One item x of that top 10 other than the test item is drawn (seeded),
and one event on x is added to H:

- ``dislike``: x at the data's lowest rating, a token of the stream: what the model itself makes of it;
- ``neutral``: x at the middle rating (the control: both events make x a seen item, so the scorer's
  repeat offsets move it alike; what differs is the rating);
- ``dismiss``: "not interested" as the service applies it: x is never recommended again (even where seen
  items may be) and every item loses :func:`unirec.models.scorer.dismissal_demotion` (the user state
  itself does not change).

After each, the items are ranked again with H's items left out but x free to come back, and reported:
``item_in_top10`` (share of users whose x is still in the top 10), ``item_rank_median`` (x's rank),
``neighbours_left`` (of x's 5 nearest items by cosine of the item representations that were in the top
10, the share no longer there), and ``ndcg@10_positive`` (NDCG@10 of the test item, over the users whose
test item is rated above ``negative_max``: what the event costs the items the user does want), beside
its value before the event (``base``). A model with the dislike head ranks as it serves: the retrieval top
``rerank_depth`` re-ranked (:meth:`unirec.models.UniRec.rerank_catalogue`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..data import History, live_token_batch
from ..models.scorer import DEFAULT_DISMISS_DEMOTION, dismissal_demotion, item_covariance
from .metrics import ndcg_at_k

KINDS = ("dislike", "neutral", "dismiss")
# the counterfactual event comes a minute after the user's last one
EVENT_GAP_SECONDS = 60.0


def _scores(model, histories, item_rep: torch.Tensor, device) -> tuple:
    """(queries [B, D], scores [B, N] of items 1..N with the repeat offsets of each history's items)."""
    c = model.config
    b = live_token_batch(histories, c.max_len, c.num_time_buckets, device)
    q = model.predict(b, item_rep)["queries"]
    s = q @ item_rep[1:].T
    if model.scorer.repeat_raw is not None:
        r, it, hs = model.scorer.history_scores(q, item_rep, b.history_items, b.history_offsets)
        s[r, it - 1] = hs
    return q, s


def _ranks(s: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[B] 1-based rank of items[b] (1-based) in row b of scores [B, N], ties pessimistic."""
    return (s >= s.gather(1, (items - 1).view(-1, 1))).sum(1)


@torch.no_grad()
def responsiveness(model, split, *, seed: int = 0, k: int = 10, neighbours: int = 5,
                   demotion: float = DEFAULT_DISMISS_DEMOTION, negative_max: float = 2.0,
                   users: Optional[np.ndarray] = None, batch_size: int = 256, device="cpu") -> dict:
    """The counterfactual feedback simulation of the module docstring on ``split``'s test users (or
    ``users``, internal indices). Returns {"base": {"ndcg@10_positive"}, "dislike" / "neutral" / "dismiss":
    {"item_in_top10", "item_rank_median", "neighbours_left", "neighbours_in_top10", "ndcg@10_positive"},
    "num_users", "num_positive", "demotion", "neighbours", "seed"}."""
    if split.ratings is None:
        raise ValueError("responsiveness needs a data set with ratings (a dislike is the lowest rating)")
    was_training = model.training
    model.eval()
    lo, hi = float(split.ratings.min()), float(split.ratings.max())
    rating = {"dislike": lo, "neutral": 0.5 * (lo + hi)}
    item_rep = model.item_representations().float().to(device)
    N = item_rep.shape[0] - 1
    unit = torch.nn.functional.normalize(item_rep[1:], dim=1)
    cov = item_covariance(item_rep[1:])
    allowed = getattr(split.dataset, "target_items", None)
    blocked = None if allowed is None else ~torch.from_numpy(np.asarray(allowed, dtype=bool)[1:]).to(device)
    users = np.asarray(split.eval_users if users is None else users, dtype=np.int64)
    test_pos = split.stage_positions("test", users)
    targets, target_ratings = split.items[test_pos], split.ratings[test_pos]
    rng = np.random.default_rng(seed)
    draws = rng.random(len(users))
    acc = {kind: {"in": [], "rank": [], "left": 0, "near": 0, "ndcg": []} for kind in KINDS}
    base_ndcg, positive = [], []
    for start in range(0, len(users), batch_size):
        ub = users[start:start + batch_size]
        B = len(ub)
        hist = [History.of_user(split, int(u), "valid") for u in ub]
        tgt = torch.from_numpy(targets[start:start + B].astype(np.int64)).to(device)
        q0, s0 = _scores(model, hist, item_rep, device)
        seen = torch.zeros(B, N, dtype=torch.bool, device=device)
        for r, h in enumerate(hist):
            seen[r, torch.from_numpy(h.items - 1)] = True
        if blocked is not None:
            seen |= blocked
        masked0 = s0.masked_fill(seen, float("-inf"))
        ranked0 = model.rerank_catalogue(q0, item_rep, masked0)  # what the user is shown (re-ranked when the model does)
        top = ranked0.topk(k, dim=1).indices + 1                                      # [B, k] 1-based
        # x: a draw among the top k other than the test item
        cand = [row[row != t] for row, t in zip(top, tgt)]
        x = torch.stack([c[int(d * len(c))] for c, d in zip(cand, draws[start:start + B])])
        in_top0 = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter_(1, top, True)
        sim = unit[x - 1] @ unit.T
        sim[torch.arange(B), x - 1] = float("-inf")
        if blocked is not None:
            sim = sim.masked_fill(blocked, float("-inf"))
        near = sim.topk(neighbours, dim=1).indices + 1                              # [B, m] 1-based
        near_in = in_top0.gather(1, near)
        pos_r = torch.from_numpy(target_ratings[start:start + B] > negative_max).to(device)
        positive.append(pos_r)
        base_ndcg.append(ndcg_at_k(_ranks(ranked0, tgt), 10))
        for kind in KINDS:
            if kind == "dismiss":
                s = masked0 - dismissal_demotion(q0, unit, cov, x.view(-1, 1), demotion)
                s[torch.arange(B), x - 1] = float("-inf")
                s = model.rerank_catalogue(q0, item_rep, s)
            else:
                ts = [h.timestamps[-1] + EVENT_GAP_SECONDS if len(h) else math.nan for h in hist]
                ev = [History(np.array([int(i)]), np.array([rating[kind]], np.float32), np.array([t]))
                      for i, t in zip(x.tolist(), ts)]
                q, s = _scores(model, [h.concat(e) for h, e in zip(hist, ev)], item_rep, device)
                # H's items stay out; x itself (now seen too) may come back
                s = model.rerank_catalogue(q, item_rep, s.masked_fill(seen, float("-inf")))
            new_top = s.topk(k, dim=1).indices + 1
            in_top = torch.zeros(B, N + 1, dtype=torch.bool, device=device).scatter_(1, new_top, True)
            a = acc[kind]
            a["in"].append(in_top.gather(1, x.view(-1, 1))[:, 0])
            a["rank"].append(_ranks(s, x))
            a["near"] += int(near_in.sum())
            a["left"] += int((near_in & ~in_top.gather(1, near)).sum())
            a["ndcg"].append(ndcg_at_k(_ranks(s, tgt), 10))
    positive = torch.cat(positive) if positive else torch.zeros(0, dtype=torch.bool)

    def mean(x):
        return float(x.float().mean()) if x.numel() else math.nan
    out = {"base": {"ndcg@10_positive": mean(torch.cat(base_ndcg)[positive]) if base_ndcg else math.nan}}
    for kind, a in acc.items():
        cat = (lambda v: torch.cat(v)) if a["in"] else (lambda v: torch.zeros(0))
        ranks = cat(a["rank"]).float()
        out[kind] = {"item_in_top10": mean(cat(a["in"])),
                     "item_rank_median": float(ranks.median()) if ranks.numel() and kind != "dismiss" else math.nan,
                     "neighbours_left": a["left"] / a["near"] if a["near"] else math.nan,
                     "neighbours_in_top10": a["near"],
                     "ndcg@10_positive": mean(cat(a["ndcg"])[positive]) if a["ndcg"] else math.nan}
    out.update(num_users=int(len(users)), num_positive=int(positive.sum()), demotion=float(demotion),
               neighbours=int(neighbours), seed=int(seed))
    if was_training:
        model.train()
    return out


def format_responsiveness(r: dict) -> str:
    """A table: rows = the event, columns = the measures."""
    lines = [f"{'after':<10}{'item in top10':>15}{'item rank':>11}{'neighbours left':>17}{'ndcg@10 positive':>18}"]
    b = r["base"]["ndcg@10_positive"]
    lines.append(f"{'(before)':<10}{'1.0000':>15}{'-':>11}{'-':>17}{b:>18.4f}")
    for kind in KINDS:
        m = r[kind]
        rank = "-" if math.isnan(m["item_rank_median"]) else f"{m['item_rank_median']:.0f}"
        lines.append(f"{kind:<10}{m['item_in_top10']:>15.4f}{rank:>11}{m['neighbours_left']:>17.4f}"
                     f"{m['ndcg@10_positive']:>18.4f}")
    lines.append(f"one item of each of {r['num_users']} test users' top 10 (seed {r['seed']}); neighbours: its "
                 f"{r['neighbours']} nearest items that were in the top 10 ({r['dismiss']['neighbours_in_top10']}); "
                 f"dismiss demotion {r['demotion']}; ndcg over the {r['num_positive']} users whose test item is "
                 "rated > 2")
    return "\n".join(lines)


__all__ = ["KINDS", "responsiveness", "format_responsiveness"]
