"""The item side and the profile: attribute tables looked up with one table-batched embedding call.

:class:`AttributeTables` holds T tables of one entity kind (items: the id table and the attribute
tables; users: the attribute tables) in one :class:`unirec.nn.TableBatchedEmbedding`, with every
entity's bags kept as buffers. :class:`ItemEncoder` fuses its item-side sources into one vector per
catalogue item:

    item_rep[i] = sum_t w_t * pooled_t(i)      over the tables t of every source

(w_t = 1 for ``feature_mix="sum"``, learned for ``"mix"``, per item for ``"gate"``); row 0 (padding)
is zero. Each source is a module in ``ItemEncoder.sources`` returning [N + 1, T_s, D]: the
id + attribute tables, and the items' frozen text vectors behind a learned adapter
(:class:`TextAdapter`, ``ModelConfig.text``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .. import distributed
from ..nn import TableBatchedEmbedding
from ..nn.sharded import ShardedRows
from .config import DataSchema, ModelConfig


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


class AttributeTables(nn.Module):
    """T embedding tables of one entity kind and every entity's bags (feature-major CSR buffers).

    forward(ids [B] or None) -> [B, T, D] pooled (sum) bags of those entities, or of all
    ``num_entities`` when ids is None. Tables start at N(0, 0.02); ``optimizer`` / ``lr`` as in
    :class:`unirec.nn.TableBatchedEmbedding` (None: an ordinary parameter).
    """

    def __init__(self, table_sizes: Sequence[int], num_entities: int, nnz: int, dim: int,
                 optimizer: Optional[str] = None, lr: float = 0.05):
        super().__init__()
        self.num_entities = num_entities
        self.tables = TableBatchedEmbedding(table_sizes, dim, "sum", optimizer, lr, init_std=0.02)
        self.register_buffer("bag_indices", torch.zeros(nnz, dtype=torch.int64))
        self.register_buffer("bag_offsets", torch.zeros(len(table_sizes) * num_entities + 1, dtype=torch.int64))

    @property
    def num_tables(self) -> int:
        return self.tables.num_tables

    def set_bags(self, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        """Copies every entity's bags in (the layout of :meth:`unirec.data.FeatureTable.bags` over all ids)."""
        if indices.shape != self.bag_indices.shape or offsets.shape != self.bag_offsets.shape:
            raise ValueError(f"bags of shape {tuple(indices.shape)} / {tuple(offsets.shape)}, expected "
                             f"{tuple(self.bag_indices.shape)} / {tuple(self.bag_offsets.shape)}")
        with torch.no_grad():
            self.bag_indices.copy_(indices)
            self.bag_offsets.copy_(offsets)

    def forward(self, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if ids is None:
            return self.tables(self.bag_indices, self.bag_offsets)
        ind, off = gather_bags(self.bag_indices, self.bag_offsets, self.num_tables, self.num_entities, ids)
        return self.tables(ind, off)


class TableMix(nn.Module):
    """[N, T, D] -> [N, D], the fusion of T item sources: "sum" over tables; "mix", a learned weight per
    table; "gate", per-item weights T * softmax(W [pooled_1; ...; pooled_T] + c) over the tables (W = 0 at
    the start, so every mode starts as the sum)."""

    def __init__(self, num_tables: int, mode: str = "sum", dim: int = 0):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_tables)) if mode == "mix" else None
        self.gate = nn.Linear(num_tables * dim, num_tables) if mode == "gate" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            w = torch.softmax(self.gate(pooled.flatten(1)), dim=1) * pooled.shape[1]
            return (pooled * w.unsqueeze(2)).sum(1)
        if self.weights is None:
            return pooled.sum(1)
        return (pooled * self.weights.view(1, -1, 1)).sum(1)


def text_width(model_name: str) -> int:
    """The width of a text model's vectors (:data:`unirec.data.text.TEXT_MODELS`)."""
    from ..data.text import TEXT_MODELS
    if model_name not in TEXT_MODELS:
        raise ValueError(f"text_model must be one of {sorted(TEXT_MODELS)}, got {model_name!r}")
    return TEXT_MODELS[model_name]


def random_text_vectors(num_rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """[num_rows, width] unit Gaussian directions, row 0 (padding) zero: the "random" text control, fixed
    by ``seed`` whatever the training seed."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.functional.normalize(torch.randn(num_rows, width, generator=g), dim=1)
    v[0] = 0
    return v


class TextAdapter(nn.Module):
    """Frozen item text vectors x [N + 1, E] (a buffer, saved with the weights) into the model's width,
    with UniSRec's parametric whitening and, for ``experts`` > 1, its mixture of experts:

        out(x) = sum_k g_k(x) (x - b_k) W_k,    g(x) = softmax(x G)    (one expert: g = 1)

    b_k [E], W_k [E, D], G [E, K] learned. forward() -> [N + 1, 1, D] for the
    catalogue (row 0, padding, = 0); :meth:`adapt` maps any vectors [M, E] -> [M, D] (new items)."""

    no_weight_decay = ("centre",)

    def __init__(self, num_rows: int, width: int, dim: int, experts: int = 1):
        super().__init__()
        self.register_buffer("vectors", torch.zeros(num_rows, width))
        self.centre = nn.Parameter(torch.zeros(experts, width))
        self.proj = nn.Parameter(torch.randn(experts, width, dim) * 0.02)
        self.gate = nn.Parameter(torch.zeros(width, experts)) if experts > 1 else None

    def set_vectors(self, vectors: torch.Tensor) -> None:
        if tuple(vectors.shape) != tuple(self.vectors.shape):
            raise ValueError(f"text vectors of shape {tuple(vectors.shape)}, expected {tuple(self.vectors.shape)} "
                             "(one row per catalogue item + the padding row)")
        with torch.no_grad():
            self.vectors.copy_(vectors)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.dtype)
        h = torch.einsum("mke,ked->mkd", x.unsqueeze(1) - self.centre, self.proj)          # [M, K, D]
        if self.gate is None:
            return h[:, 0]
        return (h * torch.softmax(x @ self.gate, dim=1).unsqueeze(2)).sum(1)

    def forward(self) -> torch.Tensor:
        out = self.adapt(self.vectors[1:])
        return torch.cat([out.new_zeros(1, out.shape[1]), out]).unsqueeze(1)


class ItemEncoder(nn.Module):
    """Every catalogue item's representation, [N + 1, D] (row 0 = padding = 0), from its sources fused by
    :class:`TableMix` (see the module docstring): the id and attribute tables as one
    :class:`AttributeTables` (one TBE call for the whole catalogue; ``use_item_ids=False`` leaves the id
    table out) and, with ``text``, the items' text vectors through a :class:`TextAdapter`."""

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        with_attrs = config.use_item_features and bool(schema.item_feature_sizes)
        self.with_ids, self.with_attributes = config.use_item_ids, with_attrs
        rows = schema.num_items + 1
        sizes = ([rows] if self.with_ids else []) + (list(schema.item_feature_sizes) if with_attrs else [])
        nnz = (schema.num_items if self.with_ids else 0) + \
            (schema.item_bag_nnz - schema.num_items if with_attrs else 0)
        sources = [AttributeTables(sizes, rows, nnz, config.dim, config.item_optimizer, config.item_lr)] if sizes else []
        if config.text:
            sources.append(TextAdapter(rows, text_width(config.text_model), config.dim, config.text_experts))
        self.sources = nn.ModuleList(sources)
        self._has_tables, self._has_text = bool(sizes), bool(config.text)
        self._register_load_state_dict_pre_hook(self._drop_aliases)
        self.fusion = TableMix(len(sizes) + (1 if config.text else 0), config.feature_mix, config.dim)
        self.id_dropout = config.item_id_dropout if self.with_ids and len(sizes) + bool(config.text) > 1 else 0.0
        self.id_lora = None  # a LoRARows update of the id table (add_id_lora), for fine-tuning

    def add_id_lora(self, rank: int, alpha: Optional[float] = None) -> None:
        """Adds a rank-``rank`` LoRA update of the item id table (:class:`unirec.nn.lora.LoRARows`):
        r parameters per item and one shared [r, D], the id table itself frozen or not by the caller."""
        from ..nn.lora import LoRARows
        if not self.with_ids:
            raise ValueError("the model has no item id table to adapt (use_item_ids=False)")
        self.id_lora = LoRARows(self.tables.num_entities, self.tables.tables.dim, rank, alpha).to(
            self.tables.tables.weight.device)

    def _id_rows(self) -> torch.Tensor:
        w, off = self.tables.tables.weight, self.tables.tables.table_offsets
        return w[int(off[0]):int(off[1])]  # the id table is table 0

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Folds the id table's LoRA update into the table (serving: no extra work per call)."""
        if self.id_lora is not None and not self.id_lora.merged:
            self._id_rows().add_(self.id_lora.delta().to(self.tables.tables.weight.dtype))
            self.id_lora.merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        if self.id_lora is not None and self.id_lora.merged:
            self._id_rows().sub_(self.id_lora.delta().to(self.tables.tables.weight.dtype))
            self.id_lora.merged = False

    @property
    def tables(self) -> Optional[AttributeTables]:
        """The id + attribute tables (``sources[0]``), or None. A property, not a second registered name,
        so that the state dict holds each table once."""
        return self.sources[0] if self._has_tables else None

    @property
    def text(self) -> Optional[TextAdapter]:
        """The text adapter (``sources[-1]``), or None."""
        return self.sources[-1] if self._has_text else None

    @staticmethod
    def _drop_aliases(state, prefix, *args):
        # Checkpoints written while the sources were registered under two names hold each table twice.
        for key in [k for k in state if k.startswith((prefix + "tables.", prefix + "text."))]:
            del state[key]

    def set_bags(self, item_features) -> None:
        """Fills the id (+ attribute) bags from a :class:`unirec.data.FeatureTable` (None: ids only)."""
        if self.tables is None:
            return
        ids = torch.arange(self.tables.num_entities)
        if item_features is not None and self.with_attributes:
            b = item_features.bags(ids, include_id=self.with_ids)
            self.tables.set_bags(b.indices, b.offsets)
        else:
            self.tables.set_bags(ids[1:].clone(), torch.cat([torch.zeros(1, dtype=torch.int64), ids]))

    def set_text(self, vectors: torch.Tensor) -> None:
        """Copies every item's text vector in, [N + 1, E] (row 0 = padding)."""
        if self.text is None:
            raise ValueError("the model has no text source (ModelConfig.text is None)")
        self.text.set_vectors(vectors)

    def forward(self) -> torch.Tensor:
        pooled = [s() for s in self.sources]
        if self.id_lora is not None and not self.id_lora.merged:  # item i's id bag is row i alone
            p = pooled[0]
            pooled[0] = torch.cat([p[:, :1] + self.id_lora.delta().to(p.dtype).unsqueeze(1), p[:, 1:]], 1)
        if self.training and self.id_dropout > 0:
            # no rescaling: an item keeps its whole id row at inference, and a new item has none
            n, T = pooled[0].shape[:2]
            scale = torch.ones(n, T, 1, device=pooled[0].device, dtype=pooled[0].dtype)
            scale[:, 0, 0] = (torch.rand(n, device=scale.device) >= self.id_dropout).to(scale.dtype)
            pooled[0] = pooled[0] * scale
        return self.fusion(pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1))

    @torch.no_grad()
    def represent_new(self, count: int, text_vectors: Optional[torch.Tensor] = None,
                      attribute_bags: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """[count, D] representations of items outside the trained catalogue (no id row), fused as the
        catalogue's are from: ``attribute_bags`` (indices, offsets [A * count + 1]) over the A attribute
        tables, feature-major as :meth:`unirec.data.FeatureTable.bags` with ``include_id=False`` gives
        them (None: no attributes), and ``text_vectors`` [count, E], which a model with a text source needs."""
        dev = next(self.parameters()).device
        parts = []
        if self.tables is not None:
            T = self.tables.num_tables
            A = T - int(self.with_ids)
            if attribute_bags is None or not self.with_attributes:
                ind, off = torch.zeros(0, dtype=torch.int64), torch.zeros(T * count + 1, dtype=torch.int64)
            else:
                ind, off = attribute_bags
                if off.numel() != A * count + 1:
                    raise ValueError(f"attribute_bags: offsets of {off.numel()} entries, expected {A * count + 1} "
                                     f"({A} attribute tables x {count} items + 1)")
                if self.with_ids:  # the id table's bags come first, all empty
                    off = torch.cat([torch.zeros(count, dtype=off.dtype), off])
            parts.append(self.tables.tables(ind.to(dev), off.to(dev)).float())
        if self.text is not None:
            if text_vectors is None or tuple(text_vectors.shape) != (count, self.text.vectors.shape[1]):
                raise ValueError(f"text_vectors: expected [{count}, {self.text.vectors.shape[1]}], got "
                                 f"{None if text_vectors is None else tuple(text_vectors.shape)}")
            parts.append(self.text.adapt(text_vectors.to(dev)).unsqueeze(1).float())
        return self.fusion(torch.cat(parts, 1))


class ShardedItemEncoder(nn.Module):
    """The item representations with the id table split by rows across the processes
    (``ModelConfig.shard_items``, row-wise as TorchRec shards a table): rank r of n holds the id rows
    [b_r, b_{r+1}) of the N + 1 (:func:`unirec.distributed.shard_bounds`) and makes only those items'
    representations; the attribute tables (a few rows each) are replicated like the rest of the model.

    forward() -> the [N + 1, D] tensor in one process, else a :class:`unirec.nn.sharded.ShardedRows`
    of this rank's rows. The state dict holds the whole id table (:meth:`full_state`), so a checkpoint
    loads with any number of processes, one included; each process keeps its rows on load.
    """

    SHARDED = "ids."  # the parameters and buffers that differ between processes (left out by DDP)

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        with_attrs = config.use_item_features and bool(schema.item_feature_sizes)
        rows, world = schema.num_items + 1, distributed.world_size()
        self.rank, self.bounds = distributed.rank(), distributed.shard_bounds(rows, world)
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.with_attributes = with_attrs
        self.ids = AttributeTables([hi - lo], hi - lo, hi - lo - (lo == 0), config.dim, config.item_optimizer,
                                   config.item_lr)
        self.ids.set_bags(*self._id_bags(lo, hi))
        self.attrs = AttributeTables(schema.item_feature_sizes, rows, schema.item_bag_nnz - schema.num_items,
                                     config.dim) if with_attrs else None
        self.fusion = TableMix(1 + (len(schema.item_feature_sizes) if with_attrs else 0), config.feature_mix,
                               config.dim)
        self._register_load_state_dict_pre_hook(self._keep_own_rows)

    @staticmethod
    def _id_bags(lo: int, hi: int):
        """Each local row's id bag: [row] (local ids), empty for the padding row 0."""
        ids = torch.arange(max(lo, 1), hi) - lo
        lens = torch.ones(hi - lo, dtype=torch.int64)
        if lo == 0 and hi > 0:
            lens[0] = 0
        return ids, torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])

    def set_bags(self, item_features) -> None:
        """Fills the attribute bags from a :class:`unirec.data.FeatureTable` (the id bags are fixed)."""
        if item_features is not None and self.attrs is not None:
            b = item_features.bags(torch.arange(self.attrs.num_entities), include_id=False)
            self.attrs.set_bags(b.indices, b.offsets)

    def forward(self):
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        pooled = [self.ids()]
        if self.attrs is not None:
            pooled.append(self.attrs(torch.arange(lo, hi, device=self.ids.bag_offsets.device)))
        rep = self.fusion(torch.cat(pooled, 1))
        return rep if len(self.bounds) == 2 else ShardedRows(rep, self.bounds, self.rank)

    def full_state(self, state: dict, prefix: str) -> dict:
        """``state`` (this module's entries under ``prefix``) with the whole id table gathered from every
        process and the id bags of one process: what a checkpoint holds. Every process must call it."""
        if len(self.bounds) == 2:
            return state
        state[prefix + "ids.tables.weight"] = distributed.all_gather_rows(self.ids.tables.weight.detach())[0]
        state[prefix + "ids.tables.table_offsets"] = torch.tensor([0, self.bounds[-1]])
        ind, off = self._id_bags(0, self.bounds[-1])
        state[prefix + "ids.bag_indices"], state[prefix + "ids.bag_offsets"] = ind, off
        return state

    def _keep_own_rows(self, state, prefix, *args):
        key = prefix + "ids.tables.weight"
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        if key in state and state[key].shape[0] == self.bounds[-1] and hi - lo != self.bounds[-1]:
            state[key] = state[key][lo:hi]
            state[prefix + "ids.tables.table_offsets"] = self.ids.tables.table_offsets
            state[prefix + "ids.bag_indices"], state[prefix + "ids.bag_offsets"] = self.ids.bag_indices, self.ids.bag_offsets


class ProfileEncoder(nn.Module):
    """forward(users [B]) -> [B, D]: each user's attribute embeddings (age, gender, ...) pooled and summed."""

    def __init__(self, config: ModelConfig, schema: DataSchema):
        super().__init__()
        self.attributes = AttributeTables(schema.user_feature_sizes, schema.num_users + 1, schema.user_bag_nnz,
                                          config.dim)

    def set_bags(self, user_features) -> None:
        b = user_features.bags(torch.arange(self.attributes.num_entities), include_id=False)
        self.attributes.set_bags(b.indices, b.offsets)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.attributes(users).sum(1)
