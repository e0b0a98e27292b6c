"""UniRec: one token stream per user, one Transformer, a retrieval head and a ranking head.

Item representation (all N + 1 catalogue rows at once, one ``table_batched_embedding`` call):
``item_rep[i] = sum_t w_t * E_t(bag_t(i))`` over the id table and the attribute tables
(w_t = 1 for ``feature_mix="sum"``, learned for ``"mix"``); row 0 (padding) is zero.

Event token = item_rep[item] + E_rating(level) + E_gap(time bucket) + E_pos(distance from
the end); a candidate token uses the "candidate" rating level. An optional profile token
(pooled user attribute embeddings, from the same kind of call) leads the stream.

Heads:
- retrieval: the hidden state of each history token (and the profile token) scores the
  next item against item_rep (tied): full-catalogue ``softmax_cross_entropy``, or a sampled
  softmax over the batch's targets (in-batch negatives);
- ranking: each candidate's hidden state (candidates are ``num_targets`` of
  ``jagged_attention``) -> MLP -> (rating, like logit); loss MSE + BCE.

Repeat-aware scoring (``repeat_bias``): score(u, i) = <h_u, item_rep[i]> + beta[bucket(d_ui)]
when i is in u's history (d_ui = events since i's last occurrence), else <h_u, item_rep[i]>.
In training the offsets enter the full-catalogue softmax exactly, through a correction of the
fused loss's log-sum-exp over the (few) history items; :meth:`UniRec.topk_items` and
:meth:`UniRec.item_scores` apply them at inference.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import Dropout
from ._impl import op_impl
from .config import UniRecConfig
from .inputs import TokenBatch
from .layers import Block


def _tbe_impl(impl: str) -> str:
    return op_impl(impl, "embedding")


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape, via index_select: its backward is an index_add,
    several times faster on CPU than the index_put of advanced indexing."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def gather_bags(all_indices: torch.Tensor, all_offsets: torch.Tensor, num_tables: int, num_rows: int,
                ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bags of entities ``ids`` [B] from a feature-major layout over all ``num_rows`` entities.

    all_offsets: [num_tables * num_rows + 1]; bag (t, r) = all_indices[all_offsets[t*R + r] : ...+1].
    Returns (indices [nnz], offsets [num_tables * B + 1]) in the same feature-major layout.
    """
    rows = (torch.arange(num_tables, device=ids.device).unsqueeze(1) * num_rows + ids.unsqueeze(0)).reshape(-1)
    start, lens = all_offsets[rows], all_offsets[rows + 1] - all_offsets[rows]
    total = int(lens.sum())
    first = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=ids.device) + torch.repeat_interleave(start - first, lens, output_size=total)
    offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(lens, 0, out=offsets[1:])
    return all_indices[pos], offsets


def recency_bucket(distance: torch.Tensor, num_buckets: int, max_len: int) -> torch.Tensor:
    """floor(log2(1 + min(d, max_len - 1))) clipped to num_buckets - 1, for d >= 0 events back (0 = the
    latest event). Training sees distances up to max_len - 1 only (its window), so an item seen further
    back shares the bucket of the window's far end instead of an offset that never trained."""
    d = distance.clamp(0, max_len - 1).double()
    return torch.floor(torch.log2(1.0 + d)).long().clamp(0, num_buckets - 1)


def distinct_history(history_items: torch.Tensor, history_offsets: torch.Tensor):
    """Each row's distinct items and how many events ago each last occurred.

    history_items: [H] item ids (any order of rows' events is time order); history_offsets: [B + 1].
    Returns (rows [U], items [U], distance [U]) with U distinct (row, item) pairs, sorted by (row, item);
    distance = (row length - 1) - position of the item's last occurrence in the row.
    """
    dev = history_items.device
    lens = torch.diff(history_offsets)
    H = history_items.numel()
    rows = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=H)
    pos = torch.arange(H, device=dev) - history_offsets[rows]
    span = int(history_items.max()) + 1 if H else 1
    keys, inv = torch.unique(rows * span + history_items, return_inverse=True)
    last = torch.full((keys.numel(),), -1, dtype=torch.int64, device=dev).scatter_reduce_(0, inv, pos, "amax")
    r = keys // span
    return r, keys % span, lens[r] - 1 - last


class UniRec(nn.Module):
    """The unified recommender (see the module docstring). Build with :meth:`from_dataset`,
    or ``UniRec(config)`` then ``load_state_dict`` (the bag buffers are in the state dict)."""

    REPEAT_SCALE = 20.0

    def __init__(self, config: UniRecConfig):
        super().__init__()
        c = self.config = config
        D = c.dim
        item_sizes = [c.num_items + 1] + (list(c.item_feature_sizes) if c.use_item_features else [])
        self.item_tables = len(item_sizes)
        self.register_buffer("item_table_offsets", torch.cumsum(torch.tensor([0] + item_sizes), 0))
        self.item_weight = nn.Parameter(torch.randn(sum(item_sizes), D) * 0.02)
        self.register_buffer("item_bag_indices", torch.zeros(c.item_bag_nnz, dtype=torch.int64))
        self.register_buffer("item_bag_offsets", torch.zeros(self.item_tables * (c.num_items + 1) + 1,
                                                             dtype=torch.int64))
        self.item_mix = nn.Parameter(torch.ones(self.item_tables)) if c.feature_mix == "mix" else None
        self.use_profile = c.use_profile and len(c.user_feature_sizes) > 0
        if self.use_profile:
            self.register_buffer("user_table_offsets", torch.cumsum(torch.tensor([0] + list(c.user_feature_sizes)), 0))
            self.user_weight = nn.Parameter(torch.randn(sum(c.user_feature_sizes), D) * 0.02)
            self.register_buffer("user_bag_indices", torch.zeros(c.user_bag_nnz, dtype=torch.int64))
            self.register_buffer("user_bag_offsets", torch.zeros(len(c.user_feature_sizes) * (c.num_users + 1) + 1,
                                                                 dtype=torch.int64))
            self.profile_type = nn.Parameter(torch.zeros(D))
        # rating levels: 0 unknown, 1..L ratings, L + 1 candidate
        self.rating_emb = nn.Embedding(c.rating_levels + 2, D) if c.use_rating else None
        self.gap_emb = nn.Embedding(c.num_time_buckets + 1, D) if c.use_time else None
        self.cand_emb = nn.Parameter(torch.zeros(D))  # marks candidate tokens (always on)
        self.pos_emb = nn.Embedding(c.max_len + 2, D) if c.positions else None
        for e in (self.rating_emb, self.gap_emb, self.pos_emb):
            if e is not None:
                nn.init.normal_(e.weight, std=0.02)
        self.emb_norm = nn.LayerNorm(D)
        self.emb_drop = Dropout(c.dropout, op_impl(c.impl, "dropout"))
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.max_seqlen, c.ffn_mult, c.dropout, c.attention,
                                          c.rel_bias, c.impl) for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(D)
        self.rank_mlp = nn.Sequential(nn.Linear(2 * D, D), nn.GELU(), nn.Linear(D, 2)) if c.ranking_head else None
        # Stored as beta / REPEAT_SCALE: one offset shared by every user has to travel several units,
        # and Adam's steps are about lr in the stored value whatever its scale.
        self.repeat_raw = nn.Parameter(torch.zeros(c.num_repeat_buckets)) if c.repeat_bias else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dataset(cls, dataset, config: UniRecConfig) -> "UniRec":
        """Fills ``config``'s data-dependent fields from ``dataset`` and copies its feature bags in."""
        c = config
        c.num_items, c.num_users = dataset.num_items, dataset.num_users
        ift, uft = dataset.item_features, dataset.user_features
        c.item_feature_names = [f.name for f in ift.features] if ift is not None else []
        c.item_feature_sizes = [f.size for f in ift.features] if ift is not None else []
        c.user_feature_names = [f.name for f in uft.features] if uft is not None else []
        c.user_feature_sizes = [f.size for f in uft.features] if uft is not None else []
        if dataset.rating is not None and len(dataset.rating):
            c.rating_min, c.rating_max = float(dataset.rating.min()), float(dataset.rating.max())
        ids = torch.arange(c.num_items + 1)
        if ift is not None and c.use_item_features:
            ib = ift.bags(ids, include_id=True)
            ii, io = ib.indices, ib.offsets
        else:
            ii, io = ids[1:].clone(), torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(c.num_items + 1)])
        c.item_bag_nnz = ii.numel()
        ui = uo = None
        if uft is not None and uft.features and c.use_profile:
            ub = uft.bags(torch.arange(c.num_users + 1), include_id=False)
            ui, uo = ub.indices, ub.offsets
            c.user_bag_nnz = ui.numel()
        model = cls(c)
        with torch.no_grad():
            model.item_bag_indices.copy_(ii)
            model.item_bag_offsets.copy_(io)
            if model.use_profile:
                model.user_bag_indices.copy_(ui)
                model.user_bag_offsets.copy_(uo)
        return model

    # ------------------------------------------------------------------ embeddings

    def item_representations(self) -> torch.Tensor:
        """[N + 1, D] every catalogue item's representation (row 0 = padding = 0), one TBE call."""
        pooled = ops.table_batched_embedding(self.item_weight, self.item_table_offsets, self.item_bag_indices,
                                             self.item_bag_offsets, None, "sum",
                                             impl=_tbe_impl(self.config.impl))  # [N + 1, T, D]
        if self.item_mix is not None:
            return (pooled * self.item_mix.view(1, -1, 1)).sum(1)
        return pooled.sum(1)

    def profile_tokens(self, users: torch.Tensor) -> torch.Tensor:
        """[B, D] pooled user attribute embeddings + the profile type vector."""
        T = len(self.config.user_feature_sizes)
        ind, off = gather_bags(self.user_bag_indices, self.user_bag_offsets, T, self.config.num_users + 1, users)
        pooled = ops.table_batched_embedding(self.user_weight, self.user_table_offsets, ind, off, None, "sum",
                                             impl=_tbe_impl(self.config.impl))
        return pooled.sum(1) + self.profile_type

    def _rating_levels(self, ratings: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
        c = self.config
        if ratings is None:
            return torch.zeros(n, dtype=torch.int64, device=device)
        span = max(c.rating_max - c.rating_min, 1e-6)
        lv = torch.round((ratings.float() - c.rating_min) / span * (c.rating_levels - 1)).clamp(0, c.rating_levels - 1)
        return torch.where(torch.isnan(ratings.float()), torch.zeros_like(lv), lv + 1).to(torch.int64)

    # ------------------------------------------------------------------ the stream

    def encode(self, batch: TokenBatch, item_rep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Runs the Transformer over the batch's streams.

        Returns a dict with item_rep [N + 1, D]; hidden [S, D] (S = all tokens); offsets [B + 1];
        hist_pos [L] (row of each history token), cand_pos [C], profile_pos [B] (or None),
        last_pos [B] (the last non-candidate token of each stream).
        """
        c, dev = self.config, batch.items.device
        if item_rep is None:
            item_rep = self.item_representations()
        B = batch.batch_size
        P = int(self.use_profile)
        hl = torch.diff(batch.offsets)
        cl = torch.diff(batch.cand_offsets)
        seq = P + hl + cl
        offsets = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        torch.cumsum(seq, 0, out=offsets[1:])
        L, C = batch.items.numel(), batch.cand_items.numel()
        user_of_h = torch.repeat_interleave(torch.arange(B, device=dev), hl, output_size=L)
        user_of_c = torch.repeat_interleave(torch.arange(B, device=dev), cl, output_size=C)
        j_h = torch.arange(L, device=dev) - batch.offsets[user_of_h]
        j_c = torch.arange(C, device=dev) - batch.cand_offsets[user_of_c]
        hist_pos = offsets[user_of_h] + P + j_h
        cand_pos = offsets[user_of_c] + P + hl[user_of_c] + j_c

        h = take_rows(item_rep, batch.items)
        ct = take_rows(item_rep, batch.cand_items) + self.cand_emb
        if self.rating_emb is not None:
            h = h + self.rating_emb(self._rating_levels(batch.ratings, L, dev))
            ct = ct + self.rating_emb.weight[c.rating_levels + 1]
        if self.gap_emb is not None:
            h = h + self.gap_emb(batch.gaps)
            ct = ct + self.gap_emb(batch.cand_gaps)
        if self.pos_emb is not None:
            h = h + self.pos_emb((hl[user_of_h] - j_h).clamp(max=c.max_len))  # 1 = most recent
            ct = ct + self.pos_emb.weight[0]
        parts, dest = [h, ct], [hist_pos, cand_pos]
        profile_pos = None
        if P:
            profile_pos = offsets[:-1]
            parts.append(self.profile_tokens(batch.users))
            dest.append(profile_pos)
        tokens = torch.cat(parts)
        perm = torch.empty_like(torch.cat(dest))
        perm[torch.cat(dest)] = torch.arange(perm.numel(), device=dev)
        x = self.emb_drop(self.emb_norm(take_rows(tokens, perm)))
        num_targets = cl if C else None
        for blk in self.blocks:
            x = blk(x, offsets, num_targets)
        x = self.final_norm(x)
        last_pos = offsets[:-1] + P + hl - 1
        return dict(item_rep=item_rep, hidden=x, offsets=offsets, hist_pos=hist_pos, cand_pos=cand_pos,
                    profile_pos=profile_pos, last_pos=last_pos)

    # ------------------------------------------------------------------ heads

    def rank_outputs(self, enc: Dict[str, torch.Tensor], cand_items: torch.Tensor):
        """(rating [C], like_logit [C]) of the candidates; None when there is no ranking head."""
        if self.rank_mlp is None:
            return None
        hc = take_rows(enc["hidden"], enc["cand_pos"])
        ic = take_rows(enc["item_rep"], cand_items).to(hc.dtype)
        out = self.rank_mlp(torch.cat([hc, hc * ic], 1)).float()
        mid = 0.5 * (self.config.rating_min + self.config.rating_max)
        return mid + out[:, 0], out[:, 1]

    def loss(self, batch: TokenBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Training loss: retrieval cross-entropy (+ ranking_weight * (MSE + BCE) with the ranking head).

        Returns (scalar loss, {"retrieval": ..., "rating": ..., "like": ...} as floats).
        """
        c = self.config
        enc = self.encode(batch)
        q_pos, tgt = [enc["hist_pos"]], [batch.next_items]
        if enc["profile_pos"] is not None:
            q_pos.append(enc["profile_pos"])
            tgt.append(batch.first_items)
        q_pos, tgt = torch.cat(q_pos), torch.cat(tgt)
        keep = tgt > 0
        q = take_rows(enc["hidden"], q_pos[keep])
        tgt = tgt[keep]
        items = enc["item_rep"][1:]
        if c.retrieval_loss == "full" and self.repeat_raw is not None:
            per_row = ops.softmax_cross_entropy(q, items.to(q.dtype), tgt - 1, reduction="none",
                                                impl=op_impl(c.impl, "loss")).float()
            n_hist = int(keep[:enc["hist_pos"].numel()].sum())
            per_row = torch.cat([per_row[:n_hist] + self._repeat_correction(enc, batch, per_row[:n_hist]),
                                 per_row[n_hist:]])
            ret = per_row.sum() / max(per_row.numel(), 1)
        elif c.retrieval_loss == "full":
            ret = ops.softmax_cross_entropy(q, items.to(q.dtype), tgt - 1, impl=op_impl(c.impl, "loss"))
        else:
            uniq, inv = torch.unique(tgt, return_inverse=True)
            ret = F.cross_entropy((q @ enc["item_rep"][uniq].to(q.dtype).T).float(), inv)
        parts = {"retrieval": float(ret.detach())}
        total = ret
        ro = self.rank_outputs(enc, batch.cand_items)
        if ro is not None and batch.cand_ratings is not None and batch.cand_items.numel():
            rating, like_logit = ro
            y = batch.cand_ratings.float()
            ok = ~torch.isnan(y)
            if ok.any():
                mse = F.mse_loss(rating[ok], y[ok])
                bce = F.binary_cross_entropy_with_logits(like_logit[ok], (y[ok] >= c.like_threshold).float())
                total = total + c.ranking_weight * (mse + bce)
                parts.update(rating=float(mse.detach()), like=float(bce.detach()))
        return total, parts

    def _repeat_correction(self, enc: Dict[str, torch.Tensor], batch: TokenBatch, loss0: torch.Tensor) -> torch.Tensor:
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
        h = take_rows(enc["hidden"], enc["hist_pos"][idx]).float()              # [B, L, D]
        rep = enc["item_rep"].float()
        z = torch.bmm(h, take_rows(rep, it).transpose(1, 2))                    # z[b, i, j] = <h_bi, e_it[b, j]>
        # (i, j) counts when j <= i and the item at j does not occur again in (j, i].
        same = (it.unsqueeze(2) == it.unsqueeze(1)) & (ar.view(1, 1, -1) > ar.view(1, -1, 1))  # [b, j, k]: k > j
        next_occ = torch.where(same, ar.view(1, 1, -1), Lm).amin(2)             # [B, L] next position of it[b, j]
        i_ = ar.view(1, -1, 1)
        j_ = ar.view(1, 1, -1)
        pair = (j_ <= i_) & (next_occ.unsqueeze(1) > i_) & valid.unsqueeze(1) & (it.unsqueeze(1) > 0)
        beta = self.repeat_offsets()[recency_bucket(i_ - j_, self.repeat_raw.numel(), self.config.max_len)]
        rows = valid & (nxt > 0)                                                 # tokens with a target
        z_t = (h * take_rows(rep, nxt)).sum(-1)                                 # [B, L]
        lse = torch.zeros_like(z_t).masked_scatter(rows, loss0 + z_t[rows])
        p = torch.exp((z - lse.unsqueeze(2)).clamp(max=0.0)) * pair
        mass = (p * torch.expm1(beta)).sum(2)                                   # sum_j p_ij (e^beta - 1)
        hit = pair & (it.unsqueeze(1) == nxt.unsqueeze(2))
        corr = torch.log1p(mass.clamp_min(-1.0 + 1e-6)) - (beta * hit).sum(2)
        return corr[rows]

    @torch.no_grad()
    def predict(self, batch: TokenBatch, item_rep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Inference: {"queries": [B, D] float32 user states after the history, "item_rep": [N + 1, D] float32,
        "rating": [C], "like": [C] probabilities (when the model has a ranking head)}."""
        enc = self.encode(batch, item_rep)
        out = {"queries": enc["hidden"][enc["last_pos"]].float(), "item_rep": enc["item_rep"].float()}
        ro = self.rank_outputs(enc, batch.cand_items)
        if ro is not None:
            out["rating"] = ro[0].clamp(self.config.rating_min, self.config.rating_max)
            out["like"] = torch.sigmoid(ro[1])
        return out

    # ------------------------------------------------------------------ scoring (inference)

    def repeat_offsets(self) -> Optional[torch.Tensor]:
        """beta [num_repeat_buckets]: the score offset of a seen item by recency bucket (None without)."""
        return None if self.repeat_raw is None else self.repeat_raw * self.REPEAT_SCALE

    def history_scores(self, queries: torch.Tensor, item_rep: torch.Tensor, history_items: torch.Tensor,
                       history_offsets: torch.Tensor):
        """Scores of each row's distinct history items, repeat offsets included.

        queries [B, D]; item_rep [N + 1, D]; history CSR (items [H] 1-based, offsets [B + 1]).
        Returns (rows [U], items [U] 1-based, scores [U] float32), sorted by (row, item).
        """
        r, it, d = distinct_history(history_items, history_offsets)
        s = (queries[r].float() * item_rep[it].float()).sum(1)
        if self.repeat_raw is not None:
            s = s + self.repeat_offsets().float()[recency_bucket(d, self.repeat_raw.numel(), self.config.max_len)]
        return r, it, s

    @torch.no_grad()
    def item_scores(self, queries: torch.Tensor, item_rep: torch.Tensor, items: torch.Tensor,
                    history_items: Optional[torch.Tensor] = None,
                    history_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """score[b, c] = <queries[b], item_rep[items[b, c]]> (+ the repeat offset when items[b, c] is in row
        b's history). queries [B, D], items [B, C] 1-based; returns [B, C] float32."""
        s = torch.einsum("bd,bcd->bc", queries.float(), item_rep.float()[items])
        if self.repeat_raw is not None and history_items is not None and history_items.numel():
            r, it, hs = self.history_scores(queries, item_rep, history_items, history_offsets)
            span = max(int(it.max()), int(items.max()) if items.numel() else 0) + 1
            keys = r * span + it                                           # sorted
            want = torch.arange(items.shape[0], device=items.device).view(-1, 1) * span + items
            at = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
            seen = keys[at] == want
            s = torch.where(seen, hs[at], s)
        return s

    @torch.no_grad()
    def topk_items(self, queries: torch.Tensor, item_rep: torch.Tensor, k: int,
                   history_items: Optional[torch.Tensor] = None, history_offsets: Optional[torch.Tensor] = None,
                   exclude_history: bool = True):
        """Top-k of the whole catalogue for each query, with ``unirec.ops.topk_scores``.

        queries [B, D] (user states from :meth:`predict`); item_rep [N + 1, D]; history CSR (items [H]
        1-based, offsets [B + 1]) or None. ``exclude_history`` drops the history's items; otherwise they
        compete with their repeat offsets (the best unseen k and every seen item, merged).
        Returns (scores [B, k] float32, items [B, k] int64 1-based; -inf / -1 past the catalogue).
        """
        has_hist = history_items is not None and history_items.numel() > 0
        # Seen items compete with their offsets: the best k unseen ones, then every seen one, merged.
        merge = has_hist and not exclude_history and self.repeat_raw is not None
        ex = dict(exclude_offsets=history_offsets, exclude_indices=history_items - 1) \
            if has_hist and (exclude_history or merge) else {}
        vals, idx = ops.topk_scores(queries.float(), item_rep[1:].float(), k,
                                    impl=op_impl(self.config.impl, "retrieval"), **ex)
        if not merge:
            return vals, torch.where(idx >= 0, idx + 1, idx)
        r, it, hs = self.history_scores(queries, item_rep, history_items, history_offsets)
        B = queries.shape[0]
        count = torch.bincount(r, minlength=B)
        start = torch.cumsum(count, 0) - count
        col = torch.arange(r.numel(), device=r.device) - start[r]
        width = int(count.max())
        seen_v = torch.full((B, width), float("-inf"), device=vals.device)
        seen_i = torch.full((B, width), -1, dtype=torch.int64, device=vals.device)
        seen_v[r, col], seen_i[r, col] = hs, it - 1
        v, j = torch.cat([vals, seen_v], 1).topk(k, dim=1)
        i = torch.cat([idx, seen_i], 1).gather(1, j)
        return v, torch.where(i >= 0, i + 1, i)

    @torch.no_grad()
    def recommend(self, batch: TokenBatch, k: int = 10, exclude_history: bool = True):
        """Top-k items per user after their history: (scores [B, k], items [B, k] int64, -1 = none).
        The history is ``batch.history_items`` when given, else the batch's own history tokens."""
        p = self.predict(batch)
        hist = (batch.history_items, batch.history_offsets) if batch.history_items is not None else \
            (batch.items, batch.offsets)
        return self.topk_items(p["queries"], p["item_rep"], k, *hist, exclude_history=exclude_history)
