"""UniRecConfig: every hyper-parameter of the model, a dataclass that round-trips through JSON."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import List

ATTENTIONS = ("softmax", "silu")
FEATURE_MIXES = ("sum", "mix")
RETRIEVAL_LOSSES = ("full", "sampled")


@dataclass
class UniRecConfig:
    """Configuration of :class:`unirec.models.UniRec`.

    Data-dependent sizes (``num_items`` ... ``rating_max``) are filled by
    :meth:`UniRec.from_dataset`; the rest are hyper-parameters.

    The SASRec-equivalent baseline is ``use_item_features=False, use_rating=False,
    use_time=False, use_profile=False, attention="softmax", ranking_head=False,
    repeat_bias=False`` (see :func:`preset`).

    ``repeat_bias``: the score of an item the user has already interacted with gets a
    learned offset beta[bucket(d)], d = events since its last occurrence (bucket =
    floor(log2(1 + min(d, max_len - 1))), at most ``num_repeat_buckets - 1``), in training (inside the
    full-catalogue softmax) and in every ranking. It learns whether and how soon people
    come back to an item: strongly negative on data without repeats, positive on
    re-consumption data.
    """

    # data-dependent
    num_items: int = 0
    num_users: int = 0
    item_feature_names: List[str] = field(default_factory=list)
    item_feature_sizes: List[int] = field(default_factory=list)
    item_bag_nnz: int = 0
    user_feature_names: List[str] = field(default_factory=list)
    user_feature_sizes: List[int] = field(default_factory=list)
    user_bag_nnz: int = 0
    rating_min: float = 1.0
    rating_max: float = 5.0
    # architecture
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    ffn_mult: int = 2
    dropout: float = 0.2
    max_len: int = 200
    attention: str = "softmax"
    rel_bias: bool = False
    positions: bool = True
    # token content
    use_item_features: bool = True
    feature_mix: str = "sum"
    use_rating: bool = True
    rating_levels: int = 5
    use_time: bool = True
    num_time_buckets: int = 24
    use_profile: bool = True
    # heads
    retrieval_loss: str = "full"
    ranking_head: bool = True
    num_rank_candidates: int = 4
    rank_shift: int = 4
    ranking_weight: float = 0.1
    like_threshold: float = 4.0
    # repeat-aware scoring: a learned score offset for items already in the history, by recency
    repeat_bias: bool = False
    num_repeat_buckets: int = 8
    # kernels
    impl: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.feature_mix not in FEATURE_MIXES:
            raise ValueError(f"feature_mix must be one of {FEATURE_MIXES}, got {self.feature_mix!r}")
        if self.retrieval_loss not in RETRIEVAL_LOSSES:
            raise ValueError(f"retrieval_loss must be one of {RETRIEVAL_LOSSES}, got {self.retrieval_loss!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.max_len < 1 or self.num_blocks < 0 or self.num_rank_candidates < 1 or self.num_repeat_buckets < 1:
            raise ValueError("max_len, num_rank_candidates and num_repeat_buckets must be >= 1, num_blocks >= 0")

    @property
    def max_seqlen(self) -> int:
        """Longest token sequence the model builds: profile + history + candidates."""
        return int(self.use_profile) + self.max_len + (self.num_rank_candidates if self.ranking_head else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "UniRecConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UniRecConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "UniRecConfig":
        return cls.from_dict(json.loads(text))


# The presets carry the hyper-parameters `unirec tune` chose on MovieLens-100K validation NDCG@10
# (24 trials each, docs/model-results.md); "hstu" shares the unified search's values.
_TUNED_UNIFIED = dict(dim=96, num_blocks=3, max_len=50, dropout=0.146)
PRESETS = {
    "unified": dict(use_item_features=True, use_rating=True, use_time=True, use_profile=True, attention="softmax",
                    ranking_head=True, repeat_bias=True, **_TUNED_UNIFIED),
    "sasrec": dict(use_item_features=False, use_rating=False, use_time=False, use_profile=False,
                   attention="softmax", rel_bias=False, ranking_head=False, repeat_bias=False,
                   dim=96, num_blocks=3, max_len=100, dropout=0.301),
    "hstu": dict(use_item_features=True, use_rating=True, use_time=True, use_profile=True, attention="silu",
                 rel_bias=True, ranking_head=True, repeat_bias=True, **_TUNED_UNIFIED),
}
# AdamW settings found by the same searches (TrainConfig fields).
PRESET_TRAINING = {
    "unified": dict(lr=2.38e-3, weight_decay=0.0771),
    "sasrec": dict(lr=1.77e-3, weight_decay=0.0442),
    "hstu": dict(lr=2.38e-3, weight_decay=0.0771),
}


def preset_training(name: str) -> dict:
    """{"lr", "weight_decay"} to train config ``name`` with: the preset's searched values, else
    (a config file) 2e-3 and 0.05."""
    return {"lr": 2e-3, "weight_decay": 0.05, **PRESET_TRAINING.get(name, {})}


def preset(name: str, **overrides) -> UniRecConfig:
    """A named configuration ("unified", "sasrec" = the SASRec-equivalent baseline, "hstu") with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; have {sorted(PRESETS)}")
    return UniRecConfig(**{**PRESETS[name], **overrides})
