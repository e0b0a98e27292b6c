"""Transfer of a pretrained model to another data set, and the parameter-efficient fine-tuning methods.

:func:`transfer_weights` fills a model built for a target data set from a base model built for
another: every weight outside the per-entity tables (the blocks, embeddings of ratings, gaps and
positions, token types, scorer, objectives, the text adapter) is copied by name; the item id table's
rows are copied for the target items that match a base item (:func:`unirec.data.matching.match_items`,
title and year), attribute tables' rows for values that match (genres, years, gender...), and every
other row starts at zero, so that an unmatched item is its attributes and text alone until it trains.
Users need not overlap: the profile is built from the users' attributes, never their ids.

:data:`METHODS` say what fine-tuning trains (:func:`apply_method`):

- "full": every parameter;
- "frozen": the item side only (id and attribute tables, their fusion, the text adapter), the
  Transformer frozen;
- "adapter": the text adapter only (UniSRec's parameter-efficient mode);
- "lora": rank-r LoRA updates of the attention projections (and of the feed-forward layers with
  ``lora_ffn``) and of the item id table (:class:`unirec.nn.lora.LoRARows`: r numbers per item, so
  that items can move where the new data puts them), nothing else;
- "lora+adapter": LoRA and the text adapter.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from ..nn.lora import add_lora

METHODS = ("full", "frozen", "adapter", "lora", "lora+adapter")
LORA_ATTENTION = ("attn.qkv", "attn.out")
LORA_FFN = ("ffn.0", "ffn.3")


@dataclass
class FinetuneSpec:
    """How a fine-tuned run is made from its base (the ``finetune`` section of its config.json):
    the base run folder and the sha256 of its model.pt, the method, LoRA's rank, alpha and whether it
    adapts the feed-forward layers too."""

    base: str
    base_sha256: str
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    lora_ffn: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}")

    @property
    def uses_lora(self) -> bool:
        return self.method.startswith("lora")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneSpec":
        from ..data import strict_from_dict
        return strict_from_dict(cls, d, "finetune config")


def _table_rows(table_sizes: List[int], offsets: torch.Tensor, t: int) -> slice:
    return slice(int(offsets[t]), int(offsets[t + 1]))


def _copy_rows(dst: torch.Tensor, src: torch.Tensor, rows: np.ndarray) -> int:
    """dst[j] = src[rows[j]] where rows[j] > 0, else 0; returns how many rows were copied."""
    rows = torch.from_numpy(rows)
    hit = rows > 0
    dst.zero_()
    dst[hit] = src[rows[hit]].to(dst.dtype)
    return int(hit.sum())


def _transfer_tables(dst_module, src_module, dst_table_rows: List[np.ndarray], src_tables: List[Optional[int]]) -> None:
    """Row-mapped copy between two AttributeTables: target table t takes rows from base table
    ``src_tables[t]`` (None: all zero) through ``dst_table_rows[t]``."""
    dw, do = dst_module.tables.weight, dst_module.tables.table_offsets
    sw, so = src_module.tables.weight, src_module.tables.table_offsets
    for t, (rows, s) in enumerate(zip(dst_table_rows, src_tables)):
        dst = dw[int(do[t]):int(do[t + 1])]
        if s is None:
            dst.zero_()
        else:
            _copy_rows(dst, sw[int(so[s]):int(so[s + 1])], rows)


@torch.no_grad()
def transfer_weights(base_model, base_ds, model, ds) -> Dict[str, object]:
    """Fills ``model`` (built for ``ds``) from ``base_model`` (built for ``base_ds``), as the module
    docstring says; returns a report {"copied": tensors copied by name, "fresh": names that start
    anew, "matched_items", "num_items", "features": {target feature: base feature or None}}."""
    from ..data.matching import match_items, match_values, matching_feature
    own, base = model.state_dict(), base_model.state_dict()
    # per-entity state, whose rows follow the data set: the tables (mapped below), bags and text vectors
    entity = ["profile.attributes."]
    if model.items.tables is not None:
        entity.append("items.sources.0.")
    if model.items.text is not None:
        entity.append(f"items.sources.{len(model.items.sources) - 1}.vectors")
    copied, fresh = 0, []
    for name, value in own.items():
        if name.startswith(tuple(entity)):
            continue
        if name in base and base[name].shape == value.shape:
            value.copy_(base[name])
            copied += 1
        elif value.is_floating_point():
            fresh.append(name)
    report = {"copied": copied, "fresh": fresh, "features": {}}
    # the item side: [id table] + attribute tables, each mapped row by row
    mi, bi = model.items.tables, base_model.items.tables
    matched = match_items(base_ds, ds)
    report.update(matched_items=int((matched[1:] > 0).sum()), num_items=ds.num_items)
    if mi is not None and bi is not None:
        rows, src = [], []
        feats = ds.item_features.features if model.items.with_attributes else []
        base_feats = base_ds.item_features.features if base_model.items.with_attributes else []
        if model.items.with_ids:
            rows.append(matched)
            src.append(0 if base_model.items.with_ids else None)
        for f in feats:
            g = matching_feature(base_ds.item_features if base_feats else None, f)
            report["features"][f.name] = g.name if g is not None else None
            rows.append(match_values(g, f) if g is not None else np.zeros(f.size, dtype=np.int64))
            src.append(int(base_model.items.with_ids) + base_feats.index(g) if g is not None else None)
        _transfer_tables(mi, bi, rows, src)
    if model.profile is not None and base_model.profile is not None:
        rows, src = [], []
        base_feats = base_ds.user_features.features
        for f in ds.user_features.features:
            g = matching_feature(base_ds.user_features, f)
            report["features"][f.name] = g.name if g is not None else None
            rows.append(match_values(g, f) if g is not None else np.zeros(f.size, dtype=np.int64))
            src.append(base_feats.index(g) if g is not None else None)
        _transfer_tables(model.profile.attributes, base_model.profile.attributes, rows, src)
    elif model.profile is not None:
        model.profile.attributes.tables.weight.zero_()
    return report


def apply_method(model, spec: FinetuneSpec) -> List[str]:
    """Sets which parameters of ``model`` train for ``spec.method`` (adding the LoRA layers first for the
    LoRA methods); returns the trainable parameters' names. ValueError when the method needs a part the
    model lacks (the adapter methods need a text source)."""
    if spec.method in ("adapter", "lora+adapter") and model.items.text is None:
        raise ValueError(f"method {spec.method!r} trains the text adapter, but the base model has no text source "
                         "(pretrain it with --text)")
    if spec.uses_lora:
        add_lora(model.stream, LORA_ATTENTION + (LORA_FFN if spec.lora_ffn else ()), spec.lora_rank, spec.lora_alpha)
        if getattr(model.items, "with_ids", False):
            model.items.add_id_lora(spec.lora_rank, spec.lora_alpha)
    text_prefix = "items.sources.%d." % (len(model.items.sources) - 1)
    for name, p in model.named_parameters():
        lora = ".lora_" in name
        text = model.items.text is not None and name.startswith(text_prefix)
        p.requires_grad_({"full": True, "frozen": name.startswith("items."), "adapter": text, "lora": lora,
                          "lora+adapter": lora or text}[spec.method])
    return [n for n, p in model.named_parameters() if p.requires_grad]


def parameter_counts(model) -> Dict[str, int]:
    """{"trainable": parameters that train, "total": every parameter of the fine-tuned model}."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def trained_state(model) -> Dict[str, torch.Tensor]:
    """The trainable parameters' entries of the state dict: what a fine-tuned checkpoint holds."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def build_finetuned(base_model, base_ds, ds, spec: FinetuneSpec, config=None, impl: str = "auto"):
    """(model for ``ds`` filled from the base and set up for ``spec``, transfer report). ``config``:
    the target's ModelConfig (default: the base's). The construction is seeded, so it repeats exactly:
    a fine-tuned checkpoint stores only what trained and is rebuilt on top of this."""
    from .unirec import UniRec
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UniRec.from_dataset(ds, config or base_model.config, impl)
        report = transfer_weights(base_model, base_ds, model, ds)
        report["trainable"] = apply_method(model, spec)
    return model, report
