"""The model's configuration: hyper-parameters (:class:`ModelConfig`), the sizes it takes from a data set
(:class:`DataSchema`), and the named presets. Both round-trip through JSON; an unknown key is an error
naming it (:func:`unirec.data.strict_from_dict`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from ..data import strict_from_dict

ATTENTIONS = ("softmax", "silu")
FEATURE_MIXES = ("sum", "mix", "gate")
ITEM_TEXTS = (None, "lm", "random")
ITEM_OPTIMIZERS = (None, "sgd", "rowwise_adagrad")
# name -> objective class, filled by @register_objective in unirec.models.objectives (imported with the package)
OBJECTIVES: Dict[str, type] = {}


def register_objective(name: str):
    """Class decorator: makes an objective available to ``ModelConfig.objectives`` under ``name``."""
    def add(cls):
        OBJECTIVES[name] = cls
        return cls
    return add


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`unirec.models.UniRec`.

    ``objectives``: name -> weight of each training objective (:data:`OBJECTIVES`):
    "retrieval" (next item, full-catalogue softmax), "sampled_retrieval" (softmax over the batch's
    targets), "ranking" (candidates' rating and like), "not_to_recommend" (negatively rated next
    items pushed down), "dislike" (P(rating <= ``dislike_max_rating`` | next item), a head on the
    next-item states). The loss is sum_o weight_o * loss_o.

    ``negative_max_rating``: negative feedback. None: every event is a positive next-item target (a
    low rating is still a token of the history, through its rating level). A number (2 on
    MovieLens' 1-5 stars): an event rated at most this stays a token of the history but is no target
    of "retrieval"; "not_to_recommend" takes it as a target of -log(1 - p), p its softmax
    probability over the catalogue (Wang et al., RecSys 2023).

    ``dislike_rerank``: with the "dislike" objective, every ranking (evaluation, ``recommend``, serving)
    takes the retrieval top ``rerank_depth`` and orders it by score + dislike_rerank x log(1 -
    P(dislike | item)): the retrieval softmax still learns every event, the head pushes down what
    the user would dislike. 0: retrieval order. The default, 7, was chosen on ML-100K validation (1.5 on
    ML-1M, its data preset): the largest b that costs the users who liked their next item at most 2%
    of NDCG@10; on other data choose it on validation (``unirec evaluate RUN --dislike-rerank B``).

    The SASRec-equivalent baseline is ``use_item_features=False, use_rating=False, use_time=False,
    use_profile=False, attention="softmax", objectives={"retrieval": 1.0}, repeat_bias=False``
    (see :func:`preset`).

    ``repeat_bias``: the score of an item the user has already interacted with gets a learned
    offset beta[bucket(d)], d = events since its last occurrence (bucket = floor(log2(1 + min(d,
    max_len - 1))), at most ``num_repeat_buckets - 1``), in training (inside the full-catalogue
    softmax) and in every ranking. It learns whether and how soon people come back to an item:
    strongly negative on data without repeats, positive on re-consumption data.

    ``item_optimizer``: None trains the item tables with the model's optimizer (AdamW); "sgd" or
    "rowwise_adagrad" updates them inside the backward with ``item_lr`` (the fused
    ``unirec.nn.TableBatchedEmbedding`` path: no dense gradient of the tables).

    ``augment``: operator -> rate of the views that the self-supervised objectives ("contrastive")
    build (:func:`unirec.data.augment.augment`: one operator per view, drawn among these);
    ``ssl_temperature``: their InfoNCE temperature over cosine similarities. ``cloze_rate``: the share
    of history events the masked-item objective ("cloze") hides (at least one per stream).

    ``text``: an item source from each item's text (:mod:`unirec.data.text`): "lm" the frozen vectors of
    ``text_model`` over the text ``text_template`` makes of the item's fields (None: the data set's
    default), "random" a fixed random vector per item of the same width (the control that tells the
    language model's content from the extra parameters); both enter through a learned adapter
    (:class:`~unirec.models.items.TextAdapter`, ``text_experts`` whitening experts). ``use_item_ids=False``
    drops the id table: items are their attributes and text alone. ``item_id_dropout``: in training, each
    step leaves out the id row of this share of the items (as DropoutNet does), so that the other sources
    learn to stand for an item alone, as they must for an item with no trained id row (a new item).

    ``feature_mix``: how the item sources are fused: "sum", "mix" (one learned weight per table) or
    "gate" (per-item softmax weights over the tables from their concatenation).

    ``shard_items``: under torch.distributed, split the item id table by rows across the processes
    (:class:`~unirec.models.items.ShardedItemEncoder`); the retrieval loss and top-k run on the shards
    (:mod:`unirec.distributed`), so the catalogue is bounded by the processes' memory together. The
    same model as without it in one process.
    """

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
    use_item_ids: bool = True
    item_id_dropout: float = 0.0
    feature_mix: str = "sum"
    text: Optional[str] = None
    text_model: str = "all-MiniLM-L6-v2"
    text_template: Optional[str] = None
    text_experts: int = 1
    use_rating: bool = True
    rating_levels: int = 5
    use_time: bool = True
    num_time_buckets: int = 24
    use_profile: bool = True
    # objectives and their inputs
    objectives: Dict[str, float] = field(default_factory=lambda: {"retrieval": 1.0, "ranking": 0.1})
    num_rank_candidates: int = 4
    rank_shift: int = 4
    like_threshold: float = 4.0
    negative_max_rating: Optional[float] = None
    dislike_max_rating: float = 2.0
    dislike_rerank: float = 7.0
    rerank_depth: int = 100
    # self-supervised objectives (unirec.models.ssl): the views' operators and rates, the InfoNCE temperature
    augment: Dict[str, float] = field(default_factory=lambda: {"crop": 0.6, "mask": 0.3, "reorder": 0.6})
    ssl_temperature: float = 0.2
    cloze_rate: float = 0.2
    # scoring
    repeat_bias: bool = False
    num_repeat_buckets: int = 8
    # item tables' optimizer
    item_optimizer: object = None
    item_lr: float = 0.05
    # the item table split by rows across processes
    shard_items: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.feature_mix not in FEATURE_MIXES:
            raise ValueError(f"feature_mix must be one of {FEATURE_MIXES}, got {self.feature_mix!r}")
        if self.text not in ITEM_TEXTS:
            raise ValueError(f"text must be one of {ITEM_TEXTS}, got {self.text!r}")
        if not 0.0 <= self.item_id_dropout < 1.0:
            raise ValueError(f"item_id_dropout must lie in [0, 1), got {self.item_id_dropout}")
        if self.text_experts < 1:
            raise ValueError(f"text_experts must be >= 1, got {self.text_experts}")
        if not self.use_item_ids and not (self.use_item_features or self.text):
            raise ValueError("use_item_ids=False needs another item source: use_item_features or text")
        if self.shard_items and (self.text or not self.use_item_ids):
            raise ValueError("shard_items shards the item id table; it does not take text or use_item_ids=False")
        if self.item_optimizer not in ITEM_OPTIMIZERS:
            raise ValueError(f"item_optimizer must be one of {ITEM_OPTIMIZERS}, got {self.item_optimizer!r}")
        if not isinstance(self.objectives, dict) or not self.objectives:
            raise ValueError(f"objectives must map objective names to weights, got {self.objectives!r}")
        for name, w in self.objectives.items():
            if name not in OBJECTIVES:
                raise ValueError(f"objectives: unknown objective {name!r}; have {sorted(OBJECTIVES)}")
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"objectives: the weight of {name!r} must be a number >= 0, got {w!r}")
        if "not_to_recommend" in self.objectives and self.negative_max_rating is None:
            raise ValueError("objectives: 'not_to_recommend' needs negative_max_rating (the highest rating that "
                             "counts as negative feedback, e.g. 2 on MovieLens)")
        from ..data.augment import OPERATORS
        bad = [k for k, v in dict(self.augment).items() if k not in OPERATORS or not 0.0 <= float(v) <= 1.0]
        if bad:
            raise ValueError(f"augment: {bad[0]!r} must be one of {OPERATORS} with a rate in [0, 1], "
                             f"got {self.augment!r}")
        if {"substitute", "insert"} & set(self.augment):
            raise ValueError("augment: substitute and insert are data augmentation (unirec.data.augment), "
                             "not yet views of the contrastive objectives")
        if not 0.0 < self.cloze_rate <= 1.0:
            raise ValueError(f"cloze_rate must lie in (0, 1], got {self.cloze_rate}")
        if self.ssl_temperature <= 0:
            raise ValueError(f"ssl_temperature must be > 0, got {self.ssl_temperature}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.max_len < 1 or self.num_blocks < 0 or self.num_rank_candidates < 1 or self.num_repeat_buckets < 1:
            raise ValueError("max_len, num_rank_candidates and num_repeat_buckets must be >= 1, num_blocks >= 0")

    @property
    def ranking(self) -> bool:
        """Whether candidates are appended to training streams (the ranking objective is on)."""
        return "ranking" in self.objectives

    @property
    def max_seqlen(self) -> int:
        """Longest token sequence the model builds: profile + history + candidates."""
        return int(self.use_profile) + self.max_len + (self.num_rank_candidates if self.ranking else 1)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return strict_from_dict(cls, d, "model config")

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))


@dataclass
class DataSchema:
    """What the model takes from its data set: catalogue and user counts, the attribute tables' names and
    sizes (row 0 of each is padding), the bags' total lengths and the rating range. Filled by
    :meth:`from_dataset`; saved with the weights so a checkpoint rebuilds without the data."""

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

    @classmethod
    def from_dataset(cls, dataset) -> "DataSchema":
        """Sizes of ``dataset`` (a :class:`unirec.data.Dataset`); the bag lengths count every item's
        id + attribute bags and every user's attribute bags."""
        import torch
        ift, uft = dataset.item_features, dataset.user_features
        s = cls(num_items=dataset.num_items, num_users=dataset.num_users)
        if ift is not None:
            s.item_feature_names = [f.name for f in ift.features]
            s.item_feature_sizes = [f.size for f in ift.features]
            s.item_bag_nnz = int(ift.bags(torch.arange(s.num_items + 1), include_id=True).indices.numel())
        if uft is not None and uft.features:
            s.user_feature_names = [f.name for f in uft.features]
            s.user_feature_sizes = [f.size for f in uft.features]
            s.user_bag_nnz = int(uft.bags(torch.arange(s.num_users + 1), include_id=False).indices.numel())
        if dataset.rating is not None and len(dataset.rating):
            s.rating_min, s.rating_max = float(dataset.rating.min()), float(dataset.rating.max())
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSchema":
        return strict_from_dict(cls, d, "data schema")


# The presets carry the hyper-parameters `unirec tune` chose on MovieLens-100K validation NDCG@10
# (24 trials each, docs/model-results.md); "hstu" shares the unified search's values.
_TUNED_UNIFIED = dict(dim=96, num_blocks=3, max_len=50, dropout=0.146)
PRESETS = {
    "unified": dict(use_item_features=True, use_rating=True, use_time=True, use_profile=True, attention="softmax",
                    objectives={"retrieval": 1.0, "ranking": 0.1}, repeat_bias=True, **_TUNED_UNIFIED),
    "sasrec": dict(use_item_features=False, use_rating=False, use_time=False, use_profile=False,
                   attention="softmax", rel_bias=False, objectives={"retrieval": 1.0}, repeat_bias=False,
                   dim=96, num_blocks=3, max_len=100, dropout=0.301),
    "hstu": dict(use_item_features=True, use_rating=True, use_time=True, use_profile=True, attention="silu",
                 rel_bias=True, objectives={"retrieval": 1.0, "ranking": 0.1}, repeat_bias=True, **_TUNED_UNIFIED),
}
# AdamW settings found by the same searches (TrainConfig fields).
PRESET_TRAINING = {
    "unified": dict(lr=2.38e-3, weight_decay=0.0771),
    "sasrec": dict(lr=1.77e-3, weight_decay=0.0442),
    "hstu": dict(lr=2.38e-3, weight_decay=0.0771),
}
# Data sets whose defaults differ from MovieLens-100K's: preset name -> ModelConfig overrides, and the
# TrainConfig fields of every preset. MovieLens-1M: histories of up to 200 events as in its published
# rows, the same width and depth for every preset (not yet searched on ML-1M validation), and a
# 40-minute training budget so that `unirec train --data ml-1m` ends within 45 minutes on 2 CPU cores,
# and every 200-event window of the long histories trains (validation NDCG@10 0.2076 against 0.2021).
# The dislike head's re-ranking weight b, chosen like ML-100K's 7 on validation (docs/model-results.md,
# "The dislike head").
_ML1M_MODEL = dict(dim=64, num_blocks=2, num_heads=2, max_len=200, dropout=0.2, dislike_rerank=1.5)
DATA_PRESETS = {"ml-1m": {name: dict(_ML1M_MODEL) for name in PRESETS}}
DATA_TRAINING = {"ml-1m": dict(lr=2e-3, weight_decay=0.05, batch_size=128, epochs=80, patience=10,
                               time_budget_s=2400.0, windows="all")}


def preset_training(name: str, data: Optional[str] = None) -> dict:
    """TrainConfig fields to train config ``name`` on data set ``data`` with: the data set's defaults
    (:data:`DATA_TRAINING`), else the preset's searched lr and weight decay, else (a config file)
    2e-3 and 0.05."""
    if data in DATA_TRAINING:
        return dict(DATA_TRAINING[data])
    return {"lr": 2e-3, "weight_decay": 0.05, **PRESET_TRAINING.get(name, {})}


def preset(name: str, data: Optional[str] = None, **overrides) -> ModelConfig:
    """A named configuration ("unified", "sasrec" = the SASRec-equivalent baseline, "hstu"), with the
    data set's overrides (:data:`DATA_PRESETS`) when ``data`` has some, then ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; have {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **DATA_PRESETS.get(data, {}).get(name, {}), **overrides})


def upgrade_flat_config(d: dict):
    """(ModelConfig, DataSchema) of a flat ``UniRecConfig`` dict, the model_config.json of run folders
    written before the model was built from parts (data sizes, hyper-parameters and ``impl`` in one)."""
    d = dict(d)
    d.pop("impl", None)
    schema = DataSchema.from_dict({k: d.pop(k) for k in list(d) if k in DataSchema.__dataclass_fields__})
    objectives = {"sampled_retrieval" if d.pop("retrieval_loss", "full") == "sampled" else "retrieval": 1.0}
    ranking_weight = d.pop("ranking_weight", 0.1)
    if d.pop("ranking_head", True):
        objectives["ranking"] = ranking_weight
    return ModelConfig.from_dict({**d, "objectives": objectives}), schema
