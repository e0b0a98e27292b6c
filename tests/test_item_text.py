"""The item sources of the model: text vectors through the adapter, the fusion modes, models without
ids, and representations of items outside the trained catalogue."""
import math

import numpy as np
import pytest
import torch

from conftest import small_split, tiny
from unirec.data import TokenBuilder
from unirec.models import ModelConfig, UniRec
from unirec.models.items import TableMix, TextAdapter, random_text_vectors


@pytest.fixture(scope="module")
def small():
    return small_split(num_users=80, num_items=90, num_clusters=4, mean_length=12, seed=5)


@pytest.mark.parametrize("experts", [1, 3])
def test_text_adapter_is_the_whitening_formula_and_trains(experts):
    a = TextAdapter(num_rows=7, width=12, dim=5, experts=experts)
    with torch.no_grad():
        a.centre.normal_()
        if a.gate is not None:
            a.gate.normal_()
    x = torch.randn(7, 12)
    x[0] = 0
    a.set_vectors(x)
    out = a()
    assert out.shape == (7, 1, 5) and torch.all(out[0] == 0)
    y = x[1:]
    h = torch.stack([(y - a.centre[k]) @ a.proj[k] for k in range(experts)], 1)             # [6, K, 5]
    g = torch.softmax(y @ a.gate, 1) if experts > 1 else torch.ones(6, 1)
    torch.testing.assert_close(out[1:, 0], (h * g.unsqueeze(2)).sum(1))
    out.square().sum().backward()
    assert a.vectors.grad is None and a.proj.grad.abs().sum() > 0 and a.centre.grad.abs().sum() > 0
    if experts > 1:
        assert a.gate.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="text vectors of shape"):
        a.set_vectors(torch.zeros(6, 12))


def test_every_fusion_mode_starts_as_the_sum_and_learns():
    pooled = torch.randn(9, 3, 4, requires_grad=True)
    for mode in ("sum", "mix", "gate"):
        f = TableMix(3, mode, 4)
        torch.testing.assert_close(f(pooled), pooled.sum(1))
        if mode != "sum":
            f(pooled).pow(3).sum().backward()
            grads = [p.grad for p in f.parameters()]
            assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kw", [dict(text="random"), dict(text="random", use_item_ids=False),
                                dict(text="random", use_item_ids=False, use_item_features=False),
                                dict(text="random", feature_mix="gate", text_experts=2),
                                dict(use_item_ids=False), dict(feature_mix="gate")])
def test_item_sources_train_and_round_trip(small, kw):
    ds, sp = small
    cfg = tiny(**kw)
    m = UniRec.from_dataset(ds, cfg)
    tb = TokenBuilder.for_config(sp, cfg)
    b = tb.train_batch(np.nonzero(sp.train_len >= 2)[0][:12], np.random.default_rng(0), candidates=m.needs_candidates)
    loss, _ = m(b)
    assert math.isfinite(loss.item())
    loss.backward()
    grads = {n: p.grad for n, p in m.items.named_parameters()}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads.keys()
    if cfg.text:
        assert m.items.text.proj.grad.abs().sum() > 0
    assert ("items.sources.0.tables.weight" in m.state_dict()) == (cfg.use_item_ids or cfg.use_item_features)
    m.eval()
    rep = m.item_representations()
    assert rep.shape == (ds.num_items + 1, 16) and torch.all(rep[0] == 0)
    # the checkpoint rebuilds the model with its text vectors, without the data set
    m2 = UniRec(ModelConfig.from_json(cfg.to_json()), m.schema)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.eval().item_representations(), rep)


def test_random_control_is_fixed_and_lm_vectors_come_from_the_text_module(small, monkeypatch):
    ds, _ = small
    a = UniRec.from_dataset(ds, tiny(text="random"))
    torch.testing.assert_close(a.items.text.vectors, random_text_vectors(ds.num_items + 1, 384))
    assert torch.all(a.items.text.vectors[0] == 0)
    assert torch.allclose(a.items.text.vectors[1:].norm(dim=1), torch.ones(ds.num_items))
    table = np.random.default_rng(0).standard_normal((ds.num_items + 1, 384)).astype(np.float32)
    seen = {}

    def fake(dataset, template=None, model="all-MiniLM-L6-v2", **kw):
        seen.update(template=template, model=model)
        return table

    import unirec.data.text as text
    monkeypatch.setattr(text, "dataset_text_vectors", fake)
    m = UniRec.from_dataset(ds, tiny(text="lm", text_template="{title}!"))
    assert seen == {"template": "{title}!", "model": "all-MiniLM-L6-v2"}
    torch.testing.assert_close(m.items.text.vectors, torch.from_numpy(table))


@pytest.mark.parametrize("with_ids", [True, False])
def test_new_items_are_represented_as_the_catalogue_without_its_id_rows(small, with_ids):
    ds, _ = small
    m = UniRec.from_dataset(ds, tiny(text="random", use_item_ids=with_ids, feature_mix="gate")).eval()
    with torch.no_grad():
        for p in m.items.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the initial state, where the gate is uniform
    ids = torch.tensor([3, 1, 17, 90])
    bags = ds.item_features.bags(ids, include_id=False)
    new = m.items.represent_new(4, m.items.text.vectors[ids], (bags.indices, bags.offsets))
    if with_ids:  # the same item without its id row: that table's pooled vector zeroed
        tables, text = m.items.tables(ids), m.items.text()[ids]
        tables[:, 0] = 0
        want = m.items.fusion(torch.cat([tables, text], 1))
    else:
        want = m.item_representations()[ids]
    torch.testing.assert_close(new, want)
    with pytest.raises(ValueError, match="text_vectors"):
        m.items.represent_new(4, None, (bags.indices, bags.offsets))
    with pytest.raises(ValueError, match="attribute_bags"):
        m.items.represent_new(3, m.items.text.vectors[ids[:3]], (bags.indices, bags.offsets))


def test_item_source_settings_are_checked():
    with pytest.raises(ValueError, match="text must be one of"):
        ModelConfig(text="bert")
    with pytest.raises(ValueError, match="use_item_ids=False needs"):
        ModelConfig(use_item_ids=False, use_item_features=False)
    with pytest.raises(ValueError, match="text_experts"):
        ModelConfig(text="lm", text_experts=0)
    with pytest.raises(ValueError, match="feature_mix"):
        ModelConfig(feature_mix="attention")
    with pytest.raises(ValueError, match="shard_items"):
        ModelConfig(text="lm", shard_items=True)


def test_item_id_dropout_leaves_out_whole_id_rows_in_training_only(small):
    ds, _ = small
    m = UniRec.from_dataset(ds, tiny(text="random", item_id_dropout=0.5))
    with torch.no_grad():
        full = m.items.eval()()
        tables, text = m.items.tables(), m.items.text()
        tables[:, 0] = 0
        no_ids = m.items.fusion(torch.cat([tables, text], 1))
        m.items.train()
        dropped = m.items()
    same_full = torch.isclose(dropped, full).all(1)
    same_no_ids = torch.isclose(dropped, no_ids).all(1)
    assert torch.all(same_full | same_no_ids)                       # a row keeps its id vector or loses it whole
    assert 0.3 < same_no_ids[1:].float().mean() < 0.7 and same_full[1:].any()
    assert UniRec.from_dataset(ds, tiny(item_id_dropout=0.5, use_item_features=False)).items.id_dropout == 0.0
    with pytest.raises(ValueError, match="item_id_dropout"):
        ModelConfig(item_id_dropout=1.0)
