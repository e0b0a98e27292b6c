"""The token stream: one packed sequence of tokens per user, through the Transformer blocks.

Event token = item_rep[item] + E_rating(level) + E_gap(time bucket) + E_pos(distance from the end);
a candidate token = item_rep[item] + the candidate type vector + the "candidate" rating level + its
gap + E_pos(0); an optional profile token (the profile encoder's vector + the profile type vector)
leads the stream. Embedding LayerNorm and dropout, then pre-norm blocks of ``jagged_attention``
(candidates are its ``num_targets``: each sees the history and itself, never another candidate),
then a final LayerNorm.

In training batches (``batch.seed`` set) every dropout mask is keyed per token (:func:`token_keys`):
a token's mask depends on the call's seed, its user, its stream's history and its position in the
stream, not on where the stream sits in the batch, so it is the same however users are split
across processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..data import TokenBatch
from ..nn import Dropout
from ..nn.sharded import item_rows
from .blocks import Block
from .config import DataSchema, ModelConfig


def _s64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (wrapping multiplication, logical shifts by masking)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def token_keys(users: torch.Tensor, items: torch.Tensor, hist_offsets: torch.Tensor,
               offsets: torch.Tensor) -> torch.Tensor:
    """[S] int64 dropout key of each token of the packed streams (``offsets`` [B + 1] over S tokens):
    mix64(stream key + mix64(position in the stream)), stream key = mix64(users[b] * 1_000_003 +
    history hash), the history hash a wrapping sum of mix64(item * golden + j) over stream b's history
    items (``items`` [L], ``hist_offsets`` [B + 1]), j the position in the history. Nothing about the
    batch enters (its order, the other streams, the batch seed: each dropout call has its own seed),
    so a token is dropped alike in any split of the batch; the history hash tells apart two streams of
    one user in one batch (two windows, or a window and its augmented copy)."""
    dev = offsets.device
    B, L, S = users.numel(), items.numel(), int(offsets[-1])
    hl = torch.diff(hist_offsets)
    seg_h = torch.repeat_interleave(torch.arange(B, device=dev), hl, output_size=L)
    j_h = torch.arange(L, device=dev) - hist_offsets[seg_h]
    hist = torch.zeros(B, dtype=torch.int64, device=dev).index_add_(0, seg_h, _mix64(items * _GOLDEN + j_h))
    stream = _mix64(users.to(torch.int64) * 1_000_003 + hist)
    lens = torch.diff(offsets)
    seg = torch.repeat_interleave(torch.arange(B, device=dev), lens, output_size=S)
    pos = torch.arange(S, device=dev) - offsets[seg]
    return _mix64(stream[seg] + _mix64(pos + _GOLDEN))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an integer index of any shape, via index_select: its backward is an index_add,
    several times faster on CPU than the index_put of advanced indexing."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


@dataclass
class Encoded:
    """The stream after the blocks, and where each kind of token sits in it.

    item_rep: [N + 1, D] the item representations the stream was built from; hidden: [S, D] every
    token's final state; offsets: [B + 1] the streams in ``hidden``; hist_pos: [L] the row of each
    history token, cand_pos: [C] of each candidate, profile_pos: [B] of each profile token (or None),
    last_pos: [B] of the last history token; repeat_offsets: the scorer's offsets by recency bucket
    (or None), for objectives that score seen items as the scorer does.
    """

    item_rep: torch.Tensor
    hidden: torch.Tensor
    offsets: torch.Tensor
    hist_pos: torch.Tensor
    cand_pos: torch.Tensor
    profile_pos: Optional[torch.Tensor]
    last_pos: torch.Tensor
    repeat_offsets: Optional[torch.Tensor] = None


class TokenTypes(nn.Module):
    """Learned vectors marking the tokens that are not events: the candidates and (when there is one) the
    profile token. Both start at zero."""

    def __init__(self, dim: int, profile: bool):
        super().__init__()
        self.profile = nn.Parameter(torch.zeros(dim)) if profile else None
        self.candidate = nn.Parameter(torch.zeros(dim))


class TokenStream(nn.Module):
    """Builds the packed token streams of a batch and runs the blocks (see the module docstring).

    forward(batch, item_rep [N + 1, D], types, profile [B, D] or None, causal, last_only) -> :class:`Encoded`
    (``causal=False``: every token sees its whole stream, for the masked-item objective's pass).
    ``last_only=True`` (inference): the states of each stream's last history token and of its candidates
    alone, the rest of the last block skipped for the other tokens (a third of the work of 3 blocks);
    ``hidden`` is then [B + C, D]: ``last_pos`` = 0..B-1, ``cand_pos`` = B..B+C-1, ``hist_pos`` empty.
    """

    no_weight_decay = ()

    def __init__(self, config: ModelConfig, schema: DataSchema, with_profile: bool):
        super().__init__()
        c, D = config, config.dim
        self.config, self.with_profile = config, with_profile
        self.rating_min, self.rating_max = schema.rating_min, schema.rating_max
        # rating levels: 0 unknown, 1..L ratings, L + 1 candidate
        self.rating_emb = nn.Embedding(c.rating_levels + 2, D) if c.use_rating else None
        self.gap_emb = nn.Embedding(c.num_time_buckets + 1, D) if c.use_time else None
        self.pos_emb = nn.Embedding(c.max_len + 2, D) if c.positions else None
        for e in (self.rating_emb, self.gap_emb, self.pos_emb):
            if e is not None:
                nn.init.normal_(e.weight, std=0.02)
        # These tables describe the event, not the item or the user: not decayed.
        self.no_weight_decay = tuple(f"{n}.weight" for n in ("rating_emb", "gap_emb", "pos_emb")
                                     if getattr(self, n) is not None)
        self.emb_norm = nn.LayerNorm(D)
        self.emb_drop = Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(D, c.num_heads, c.max_seqlen, c.ffn_mult, c.dropout, c.attention,
                                          c.rel_bias) for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(D)

    def rating_levels(self, ratings: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
        """[n] rating level of each event: 0 unknown (None or NaN), else 1 + the rating's place among
        ``rating_levels`` even steps between the data set's lowest and highest rating."""
        c = self.config
        if ratings is None:
            return torch.zeros(n, dtype=torch.int64, device=device)
        span = max(self.rating_max - self.rating_min, 1e-6)
        lv = torch.round((ratings.float() - self.rating_min) / span * (c.rating_levels - 1)).clamp(0, c.rating_levels - 1)
        return torch.where(torch.isnan(ratings.float()), torch.zeros_like(lv), lv + 1).to(torch.int64)

    def forward(self, batch: TokenBatch, item_rep: torch.Tensor, types: TokenTypes,
                profile: Optional[torch.Tensor] = None, causal: bool = True, last_only: bool = False) -> Encoded:
        c, dev = self.config, batch.items.device
        B = batch.batch_size
        P = int(self.with_profile)
        hl = torch.diff(batch.offsets)
        cl = torch.diff(batch.cand_offsets)
        offsets = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        torch.cumsum(P + hl + cl, 0, out=offsets[1:])
        L, C = batch.items.numel(), batch.cand_items.numel()
        user_of_h = torch.repeat_interleave(torch.arange(B, device=dev), hl, output_size=L)
        user_of_c = torch.repeat_interleave(torch.arange(B, device=dev), cl, output_size=C)
        j_h = torch.arange(L, device=dev) - batch.offsets[user_of_h]
        j_c = torch.arange(C, device=dev) - batch.cand_offsets[user_of_c]
        hist_pos = offsets[user_of_h] + P + j_h
        cand_pos = offsets[user_of_c] + P + hl[user_of_c] + j_c

        # one lookup for both (with a sharded table: one all-to-all fetch)
        hc = item_rows(item_rep, torch.cat([batch.items, batch.cand_items]))
        h, ct = hc[:L], hc[L:] + types.candidate
        if self.rating_emb is not None:
            h = h + self.rating_emb(self.rating_levels(batch.ratings, L, dev))
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
            parts.append(profile + types.profile)
            dest.append(profile_pos)
        tokens = torch.cat(parts)
        perm = torch.empty_like(torch.cat(dest))
        perm[torch.cat(dest)] = torch.arange(perm.numel(), device=dev)
        keys = None  # (CUDA dropout is torch's own, unkeyed)
        if batch.seed is not None and self.training and c.dropout > 0 and dev.type == "cpu":
            keys = token_keys(batch.users, batch.items, batch.offsets, offsets)
        x = self.emb_drop(self.emb_norm(take_rows(tokens, perm)), keys)
        num_targets = cl if C else None
        last_pos = offsets[:-1] + P + hl - 1
        rows = torch.cat([last_pos, cand_pos]) if last_only else None
        for i, blk in enumerate(self.blocks):
            x = blk(x, offsets, num_targets, causal, keys, rows if i == len(self.blocks) - 1 else None)
        if last_only:
            if not len(self.blocks):
                x = x.index_select(0, rows)
            ar = torch.arange(B + C, device=dev)
            last_pos, cand_pos, hist_pos, profile_pos = ar[:B], ar[B:], hist_pos[:0], None
        x = self.final_norm(x)
        return Encoded(item_rep=item_rep, hidden=x, offsets=offsets, hist_pos=hist_pos, cand_pos=cand_pos,
                       profile_pos=profile_pos, last_pos=last_pos)
