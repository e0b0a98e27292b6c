"""Self-supervised objectives: more signal from the same behaviour.

Each is an objective like those of :mod:`unirec.models.objectives` (listed in
``ModelConfig.objectives`` with its weight), but it encodes further views of the batch, so it is
given the model: ``loss(encoded, batch, model)`` (``needs_model = True``).

- ``contrastive`` (CL4SRec): two augmented views of each training window
  (:func:`unirec.data.augment.augment` with ``ModelConfig.augment``'s operators and rates), the
  state after each view's last event, InfoNCE between the two views of a user against the other
  users of the batch (in-batch negatives), both directions.
- ``cloze`` (BERT4Rec): masked-item prediction over the whole catalogue in a second, non-causal
  pass over the masked history.
- ``attributes`` (after S3Rec): each event's state predicts the next item's attribute values.
- ``duorec`` (DuoRec): the window encoded twice (two dropout masks) as positives, and as a second
  positive the other view of a window in the batch with the same next item (supervised positive).

Similarities are cosines over ``ModelConfig.ssl_temperature``; the B x B softmax runs on
``unirec.ops.softmax_cross_entropy`` (queries = one view's states, "catalogue" = the other's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..data import TokenBatch
from ..data.augment import augment, mask, sequence_keys
from .config import DataSchema, ModelConfig, register_objective
from .objectives import Loss
from .items import gather_bags
from .stream import Encoded, take_rows


def history_only(batch: TokenBatch, items: torch.Tensor, offsets: torch.Tensor, src: torch.Tensor) -> TokenBatch:
    """The batch's users with new history tokens (``items`` / ``offsets``; ratings and gaps taken at
    the input positions ``src``), no candidates and no next-item targets: a view to encode. It keeps
    the batch's ``seed``, so that its dropout masks are keyed per token as the batch's are."""
    B, dev = batch.batch_size, items.device
    zeros_b = torch.zeros(B, dtype=torch.int64, device=dev)
    return TokenBatch(
        users=batch.users, items=items, ratings=None if batch.ratings is None else batch.ratings[src],
        gaps=batch.gaps[src], offsets=offsets, next_items=torch.zeros_like(items), first_items=zeros_b,
        cand_items=items.new_zeros(0), cand_gaps=items.new_zeros(0),
        cand_offsets=torch.zeros(B + 1, dtype=torch.int64, device=dev),
        cand_ratings=None if batch.ratings is None else batch.ratings.new_zeros(0), seed=batch.seed)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, targets=None, impl: str = "auto") -> torch.Tensor:
    """Mean of CE(cos(a_i, b_j) / t over j, target_i) for the rows of ``a`` [B, D] against ``b`` [B, D];
    ``targets`` [B] default: i (the other view of the same row)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    if targets is None:
        targets = torch.arange(a.shape[0], device=a.device)
    return ops.softmax_cross_entropy(a / temperature, b, targets, impl=ops.resolve_impl(impl, "loss"))


def last_states(enc: Encoded) -> torch.Tensor:
    """[B, D] each stream's state after its last history event."""
    return take_rows(enc.hidden, enc.last_pos)


def _step_seed(batch: TokenBatch) -> int:
    """The batch's key (:class:`unirec.data.TrainBatches` sets it from (seed, epoch, step), the same in
    every process, so a user's views do not depend on how users are split across processes); else a
    draw from torch's generator."""
    return batch.seed if batch.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))


@register_objective("contrastive")
class SequenceContrastive(nn.Module):
    """CL4SRec's sequence-level contrastive objective (module docstring)."""

    needs_model = True

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        self.rates, self.temperature = dict(config.augment), config.ssl_temperature
        # the item vector of a masked event (row N + 1 of the views' item table)
        self.mask_token = nn.Parameter(torch.zeros(config.dim))

    def views(self, batch: TokenBatch, item_rep: torch.Tensor, seed: int):
        """The two augmented views of ``batch``'s histories and the item table they index."""
        mask_id = item_rep.shape[0]
        table = torch.cat([item_rep, self.mask_token.to(item_rep.dtype).unsqueeze(0)])
        out = []
        for view in (1, 2):
            keys = sequence_keys(seed, 0, batch.users, view)
            items, offsets, src = augment(batch.items, batch.offsets, keys, self.rates, mask_id=mask_id)
            out.append(history_only(batch, items, offsets, src))
        return out, table

    def loss(self, enc: Encoded, batch: TokenBatch, model) -> Loss:
        if batch.batch_size < 2:
            return None, {}
        (v1, v2), table = self.views(batch, enc.item_rep, _step_seed(batch))
        z1, z2 = last_states(model.encode(v1, table)), last_states(model.encode(v2, table))
        loss = 0.5 * (info_nce(z1, z2, self.temperature) + info_nce(z2, z1, self.temperature))
        return loss, {"contrastive": float(loss.detach())}


@register_objective("duorec")
class ModelContrastive(nn.Module):
    """DuoRec's model-level contrastive objective (module docstring)."""

    needs_model = True

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        self.temperature = config.ssl_temperature

    def loss(self, enc: Encoded, batch: TokenBatch, model) -> Loss:
        if batch.batch_size < 2:
            return None, {}
        z1 = last_states(enc)
        z2 = last_states(model.encode(batch, enc.item_rep))  # another dropout mask
        loss = 0.5 * (info_nce(z1, z2, self.temperature) + info_nce(z2, z1, self.temperature))
        # Supervised positive: a window of the batch with the same next item (the nearest such row
        # after i, cyclically); rows without one keep only the dropout positive.
        # (the next item of the last history event; with candidates, the first candidate)
        tgt = batch.next_items[batch.offsets[1:] - 1]
        B = batch.batch_size
        idx = torch.arange(B, device=z1.device)
        same = (tgt.view(-1, 1) == tgt.view(1, -1)) & (idx.view(-1, 1) != idx.view(1, -1)) & (tgt.view(-1, 1) > 0)
        has_pos = same.any(1)
        if has_pos.any():
            dist = torch.where(same, (idx.view(1, -1) - idx.view(-1, 1)) % B, B)
            partner = dist.argmin(1)
            sup = info_nce(z1[has_pos], z2, self.temperature, partner[has_pos])
            loss = loss + sup
        return loss, {"duorec": float(loss.detach())}


@register_objective("cloze")
class MaskedItem(nn.Module):
    """BERT4Rec's Cloze objective: ``cloze_rate`` of each history's events (at least one, the last
    when the rate gives none) replaced by a learned mask token, the stream run once more with
    ``causal=False`` (a masked event needs both sides), and each masked position's state predicting
    the hidden item over the whole catalogue with ``unirec.ops.softmax_cross_entropy``."""

    needs_model = True

    def __init__(self, config: ModelConfig, schema: DataSchema, impl: str = "auto"):
        super().__init__()
        self.rate, self.impl = config.cloze_rate, impl
        self.mask_token = nn.Parameter(torch.zeros(config.dim))

    def masked(self, batch: TokenBatch, mask_id: int, seed: int):
        """(masked items [L], which positions are masked [L] bool)."""
        items, _, _ = mask(batch.items, batch.offsets, sequence_keys(seed, 0, batch.users, 3), self.rate, mask_id)
        hit = items == mask_id
        lens = torch.diff(batch.offsets)
        seg = torch.repeat_interleave(torch.arange(lens.numel(), device=items.device), lens)
        count = torch.zeros_like(lens).index_add_(0, seg, hit.to(torch.int64))
        last = batch.offsets[1:][(count == 0) & (lens > 0)] - 1  # streams the rate left unmasked
        hit[last] = True
        return torch.where(hit, torch.full_like(items, mask_id), batch.items), hit

    def loss(self, enc: Encoded, batch: TokenBatch, model) -> Loss:
        if not batch.items.numel():
            return None, {}
        rep = enc.item_rep
        items, hit = self.masked(batch, rep.shape[0], _step_seed(batch))
        table = torch.cat([rep, self.mask_token.to(rep.dtype).unsqueeze(0)])
        view = history_only(batch, items, batch.offsets, torch.arange(items.numel(), device=items.device))
        e = model.encode(view, table, causal=False)
        h = take_rows(e.hidden, e.hist_pos[hit])
        loss = ops.softmax_cross_entropy(h, rep[1:].to(h.dtype), batch.items[hit] - 1,
                                         impl=ops.resolve_impl(self.impl, "loss"))
        return loss, {"cloze": float(loss.detach())}


@register_objective("attributes")
class AttributePrediction(nn.Module):
    """Associated-attribute prediction (after S3Rec): each history event's state h predicts the
    attributes of the item that comes next (its genres, release-year bucket, ...) as independent
    labels over every attribute value a: BCE(sigmoid(<W h, e_a>)), e_a the model's own attribute
    embeddings (this loss trains them too). A coarse next-item signal that shares the attribute
    tables with the item representations; no loss without item attributes."""

    needs_model = True

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.dim)

    def loss(self, enc: Encoded, batch: TokenBatch, model) -> Loss:
        src = model.items.sources[0]
        T = src.num_tables
        keep = batch.next_items > 0
        if T < 2 or not keep.any():
            return None, {}
        tables = src.tables
        start, end = int(tables.table_offsets[1]), int(tables.table_offsets[T])
        attr = tables.weight[start:end]                                          # [V, D] every attribute value
        h = take_rows(enc.hidden, enc.hist_pos[keep])                            # [M, D]
        nxt = batch.next_items[keep]
        ind, off = gather_bags(src.bag_indices, src.bag_offsets, T, src.num_entities, nxt)
        M = nxt.numel()
        # feature-major bags: skip table 0 (the id), make each value a row of `attr`
        lens = torch.diff(off)
        table_of = torch.repeat_interleave(torch.arange(T, device=nxt.device).repeat_interleave(M), lens)
        row_of = torch.repeat_interleave(torch.arange(M, device=nxt.device).repeat(T), lens)
        ok = table_of > 0
        cols = tables.table_offsets[table_of[ok]] + ind[ok] - start
        labels = torch.zeros(M, end - start, device=h.device)
        labels[row_of[ok], cols] = 1.0
        logits = self.proj(h).float() @ attr.float().T
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        return loss, {"attributes": float(loss.detach())}


__all__ = ["SequenceContrastive", "ModelContrastive", "MaskedItem", "AttributePrediction", "info_nce", "history_only", "last_states"]
