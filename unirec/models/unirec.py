"""UniRec: one token stream per user, one Transformer, objectives and a scorer, built from parts.

- ``items`` (:class:`~unirec.models.items.ItemEncoder`): every catalogue item's representation from
  its id and attribute tables (one ``table_batched_embedding`` call) and, with ``text``, its text
  vectors through an adapter, [N + 1, D];
- ``profile`` (:class:`~unirec.models.items.ProfileEncoder`): the user's attributes pooled into the
  profile token (when the config and the data have one);
- ``token_types``: the vectors that mark candidate and profile tokens;
- ``scorer`` (:class:`~unirec.models.scorer.Scorer`): scores, top-k and ranks of user states, with the
  learned repeat offsets;
- ``stream`` (:class:`~unirec.models.stream.TokenStream`): the tokens and the blocks;
- ``objectives``: the config's training objectives (:mod:`unirec.models.objectives`).

``forward(batch)`` is the training loss, sum_o weight_o * loss_o, and its parts; ``predict`` and
``recommend`` are inference. The kernel backend is a run-time choice (:meth:`UniRec.set_impl`), not
part of the config or the checkpoint.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import TokenBatch
from ..nn import set_impl, weight_decay_groups
from .config import DataSchema, ModelConfig, upgrade_flat_config
from .items import ItemEncoder, ProfileEncoder, ShardedItemEncoder, random_text_vectors, text_width
from .objectives import OBJECTIVES
from .scorer import Scorer
from .stream import Encoded, TokenStream, TokenTypes


def item_text_table(dataset, config: ModelConfig) -> torch.Tensor:
    """[N + 1, E] the text vectors of ``dataset``'s items for ``config.text``: "lm", the cached vectors of
    ``config.text_model`` over the texts of ``config.text_template`` (:mod:`unirec.data.text`); "random",
    the control's fixed random vectors."""
    if config.text == "random":
        return random_text_vectors(dataset.num_items + 1, text_width(config.text_model))
    from ..data.text import dataset_text_vectors
    return torch.from_numpy(dataset_text_vectors(dataset, config.text_template, config.text_model))


class UniRec(nn.Module):
    """The unified recommender (see the module docstring). Build with :meth:`from_dataset`, or
    ``UniRec(config, schema)`` then ``load_state_dict`` (the feature bags are in the state dict)."""

    def __init__(self, config: ModelConfig, schema: DataSchema, impl: str = "auto"):
        super().__init__()
        self.config, self.schema = config, schema
        with_profile = config.use_profile and len(schema.user_feature_sizes) > 0
        # The order of the parts is the order of the parameters (and of the random initialisation).
        self.items = ShardedItemEncoder(config, schema) if config.shard_items else ItemEncoder(config, schema)
        self.profile = ProfileEncoder(config, schema) if with_profile else None
        self.token_types = TokenTypes(config.dim, with_profile)
        self.scorer = Scorer(config.repeat_bias, config.num_repeat_buckets, config.max_len)
        self.stream = TokenStream(config, schema, with_profile)
        self.objectives = nn.ModuleDict({name: OBJECTIVES[name](config, schema) for name in config.objectives})
        self.weights = dict(config.objectives)
        self.set_impl(impl)

    @classmethod
    def from_dataset(cls, dataset, config: ModelConfig, impl: str = "auto") -> "UniRec":
        """A model for ``dataset`` (a :class:`unirec.data.Dataset`) with its feature bags copied in."""
        model = cls(config, DataSchema.from_dataset(dataset), impl)
        model.items.set_bags(dataset.item_features)
        if config.text:
            model.items.set_text(item_text_table(dataset, config))
        if model.profile is not None:
            model.profile.set_bags(dataset.user_features)
        return model

    def set_impl(self, impl: str) -> "UniRec":
        """Runs every op of the model on backend ``impl`` ("auto", "cpp", "cuda", "triton", "reference";
        each op family takes it when it has it, see :func:`unirec.ops.resolve_impl`)."""
        return set_impl(self, impl)

    def sharded_parameters(self):
        """Names of the parameters and buffers that differ between processes (the item id table's rows
        and bags with ``shard_items``): data parallelism leaves them out."""
        prefix = getattr(self.items, "SHARDED", None)
        if prefix is None:
            return []
        names = [n for n, _ in self.items.named_parameters()] + [n for n, _ in self.items.named_buffers()]
        return [f"items.{n}" for n in names if n.startswith(prefix)]

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """The state dict of a checkpoint: ``state_dict()`` with a sharded item table gathered whole
        (every process must call it), so that it loads with any number of processes."""
        state = self.state_dict()
        if isinstance(self.items, ShardedItemEncoder):
            sub = {k: v for k, v in state.items() if k.startswith("items.")}
            state.update(self.items.full_state(sub, "items."))
        return state

    @property
    def needs_candidates(self) -> bool:
        """Whether training streams carry candidates (an objective ranks them)."""
        return self.config.ranking

    def param_groups(self, weight_decay: float):
        """Optimizer groups: the tables and dense weights decayed, the rest not (see
        :func:`unirec.nn.weight_decay_groups`)."""
        return weight_decay_groups(self, weight_decay)

    # ------------------------------------------------------------------ the stream

    def item_representations(self) -> torch.Tensor:
        """[N + 1, D] every catalogue item's representation (row 0 = padding = 0)."""
        return self.items()

    def encode(self, batch: TokenBatch, item_rep: Optional[torch.Tensor] = None, causal: bool = True,
               last_only: bool = False) -> Encoded:
        """Runs the Transformer over the batch's streams (see :class:`~unirec.models.stream.Encoded`);
        ``causal=False`` lets each token see its whole stream; ``last_only`` computes the states of the
        last history tokens and the candidates alone (inference, see :class:`~unirec.models.stream.TokenStream`)."""
        if item_rep is None:
            item_rep = self.item_representations()
        profile = self.profile(batch.users) if self.profile is not None else None
        enc = self.stream(batch, item_rep, self.token_types, profile, causal, last_only)
        enc.repeat_offsets = self.scorer.repeat_offsets()
        return enc

    def forward(self, batch: TokenBatch) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Training loss sum_o weight_o * loss_o over the config's objectives, and its parts as floats
        (e.g. {"retrieval": ..., "rating": ..., "like": ...})."""
        enc = self.encode(batch)
        total, parts = None, {}
        for name, objective in self.objectives.items():
            # self-supervised objectives encode further views with the model itself
            loss, p = objective.loss(enc, batch, self) if getattr(objective, "needs_model", False) \
                else objective.loss(enc, batch)
            parts.update(p)
            if loss is None:
                continue
            w = self.weights[name]
            term = loss if w == 1.0 else w * loss
            total = term if total is None else total + term
        return total, parts

    @torch.no_grad()
    def predict(self, batch: TokenBatch, item_rep: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Inference: {"queries": [B, D] float32 user states after the history, "item_rep": [N + 1, D] float32,
        "rating": [C], "like": [C] probabilities of the candidates (when the model ranks)}."""
        enc = self.encode(batch, item_rep, last_only=True)
        out = {"queries": enc.hidden[enc.last_pos].float(), "item_rep": enc.item_rep.float()}
        if "ranking" in self.objectives:
            out.update(self.objectives["ranking"].predict(enc, batch.cand_items))
        return out

    @property
    def reranks(self) -> bool:
        """Whether rankings re-rank the retrieval top ``rerank_depth`` by the dislike head."""
        return "dislike" in self.objectives and self.config.dislike_rerank != 0

    @torch.no_grad()
    def rerank_scores(self, queries: torch.Tensor, item_rep: torch.Tensor, items: torch.Tensor,
                      scores: torch.Tensor) -> torch.Tensor:
        """scores + b log(1 - P(dislike | item)), b = ``dislike_rerank``: log p(item) + b log P(not disliked
        | item), up to each user's constant. queries [B, D]; items [B, K] 1-based (< 1: none); scores [B, K]."""
        if not self.reranks:
            return scores
        logit = self.objectives["dislike"].logits(queries.unsqueeze(1), item_rep, items.clamp(min=0))
        return scores + self.config.dislike_rerank * F.logsigmoid(-logit)

    @torch.no_grad()
    def rerank_top(self, queries: torch.Tensor, item_rep: torch.Tensor, scores: torch.Tensor, items: torch.Tensor,
                   k: int):
        """The top k of a retrieval top list (scores [B, K], items [B, K] 1-based, < 1 = none) after
        :meth:`rerank_scores`: (scores [B, k'], items [B, k']), k' = min(k, K), -inf / -1 past the list."""
        if not self.reranks:
            return scores[:, :k], items[:, :k]
        f = torch.where(items > 0, self.rerank_scores(queries, item_rep, items, scores), float("-inf"))
        v, j = f.topk(min(k, f.shape[1]), dim=1)
        return v, torch.where(torch.isfinite(v), items.gather(1, j), -1)

    @torch.no_grad()
    def rerank_catalogue(self, queries: torch.Tensor, item_rep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[B, N] explicit scores of items 1..N (-inf: not ranked) as the re-ranking orders them: each row's
        top ``rerank_depth`` get :meth:`rerank_scores`, every other item keeps its retrieval order below them."""
        if not self.reranks or scores.shape[1] == 0:
            return scores
        v, j = scores.topk(min(self.config.rerank_depth, scores.shape[1]), dim=1)
        f = torch.where(torch.isfinite(v), self.rerank_scores(queries, item_rep, j + 1, v), v)
        lowest = torch.where(torch.isfinite(f), f, float("inf")).amin(1, keepdim=True)
        top = torch.where(torch.isfinite(v), v, float("-inf")).amax(1, keepdim=True)
        shift = torch.where(torch.isfinite(lowest) & torch.isfinite(top), top - lowest + 1.0, 0.0)
        return (scores - shift).scatter(1, j, f)

    @torch.no_grad()
    def reranked_target_ranks(self, queries: torch.Tensor, item_rep: torch.Tensor, targets: torch.Tensor,
                              history_items: torch.Tensor, history_offsets: torch.Tensor, mask_history: bool = True,
                              kmax: int = 20) -> torch.Tensor:
        """Ranks (clipped at kmax + 1) of each target after re-ranking (:meth:`rerank_scores`) the retrieval
        top ``rerank_depth`` of the items the ranking holds (the unseen ones and the target when
        ``mask_history``, else all): a target outside that top gets kmax + 1. Ties count against the
        target, as in :meth:`Scorer.target_ranks`. Arguments as there."""
        depth = self.config.rerank_depth
        t_score = self.scorer.item_scores(queries, item_rep, targets.view(-1, 1), history_items, history_offsets)
        vals, items = self.scorer.topk(queries, item_rep, depth, history_items, history_offsets,
                                       exclude_history=mask_history)
        others = (items != targets.view(-1, 1)) & (items > 0)
        first = others & (torch.cumsum(others.long(), 1) <= depth - 1)          # the top depth - 1 others
        inside = ((vals >= t_score) & others).sum(1) <= depth - 1               # the target is in the top depth
        f = self.rerank_scores(queries, item_rep, items, vals)
        f_t = self.rerank_scores(queries, item_rep, targets.view(-1, 1), t_score)
        ahead = ((f >= f_t) & first).sum(1)
        return torch.where(inside, 1 + ahead, kmax + 1).clamp(max=kmax + 1)

    @torch.no_grad()
    def recommend(self, batch: TokenBatch, k: int = 10, exclude_history: bool = True):
        """Top-k items per user after their history: (scores [B, k], items [B, k] int64, -1 = none), the
        retrieval top ``rerank_depth`` re-ranked when the model :attr:`reranks`. The history is ``batch.history_items`` when given, else the batch's own history tokens."""
        p = self.predict(batch)
        hist = (batch.history_items, batch.history_offsets) if batch.history_items is not None else \
            (batch.items, batch.offsets)
        depth = max(k, self.config.rerank_depth) if self.reranks else k
        vals, items = self.scorer.topk(p["queries"], p["item_rep"], depth, *hist, exclude_history=exclude_history)
        return self.rerank_top(p["queries"], p["item_rep"], vals, items, k)


# Names of the single-class model's state (before it was built from parts) -> the parts' names.
_LEGACY_NAMES = [
    ("item_weight", "items.sources.0.tables.weight"), ("item_table_offsets", "items.sources.0.tables.table_offsets"),
    ("item_bag_indices", "items.sources.0.bag_indices"), ("item_bag_offsets", "items.sources.0.bag_offsets"),
    ("item_mix", "items.fusion.weights"),
    ("user_weight", "profile.attributes.tables.weight"),
    ("user_table_offsets", "profile.attributes.tables.table_offsets"),
    ("user_bag_indices", "profile.attributes.bag_indices"), ("user_bag_offsets", "profile.attributes.bag_offsets"),
    ("profile_type", "token_types.profile"), ("cand_emb", "token_types.candidate"),
    ("repeat_raw", "scorer.repeat_raw"), ("rank_mlp.", "objectives.ranking.mlp."),
    ("rating_emb.", "stream.rating_emb."), ("gap_emb.", "stream.gap_emb."), ("pos_emb.", "stream.pos_emb."),
    ("emb_norm.", "stream.emb_norm."), ("blocks.", "stream.blocks."), ("final_norm.", "stream.final_norm."),
]


def upgrade_legacy(flat_config: dict, state: Dict[str, torch.Tensor]):
    """(ModelConfig, DataSchema, state dict) of a checkpoint written by the single-class model
    (a flat model_config.json and its state dict): the same weights under the parts' names."""
    config, schema = upgrade_flat_config(flat_config)
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_NAMES:
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    return config, schema, out
