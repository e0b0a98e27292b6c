"""Self-supervised objectives against direct computations on small batches (value and gradient)."""
import pytest
import torch
import torch.nn.functional as F

from unirec.data import TokenBuilder, leave_one_out, synthetic
from unirec.data.augment import augment, sequence_keys
from unirec.models import UniRec, preset
from unirec.models import ssl


def setup(objectives, **kw):
    ds = synthetic(num_users=60, num_items=50, mean_length=12, seed=1)
    sp = leave_one_out(ds)
    torch.manual_seed(0)
    cfg = preset("unified", dim=16, num_blocks=1, max_len=20, dropout=0.0, objectives=objectives, **kw)
    m = UniRec.from_dataset(ds, cfg)
    b = TokenBuilder.for_config(sp, m.config).train_batch(sp.eval_users[:12], candidates=m.needs_candidates)
    return m, b


def materialised_info_nce(a, b, t, targets=None):
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    targets = torch.arange(a.shape[0]) if targets is None else targets
    return F.cross_entropy(a @ b.T / t, targets)


def test_info_nce_matches_the_materialised_matrix_value_and_gradient():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 8, generator=g, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(9, 8, generator=g).requires_grad_()
    tg = torch.randint(0, 9, (9,), generator=g)
    for targets in (None, tg):
        got = ssl.info_nce(a, b, 0.3, targets)
        ref = materialised_info_nce(a, b, 0.3, targets)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        ga = torch.autograd.grad(got, (a, b))
        gr = torch.autograd.grad(ref, (a, b))
        for x, y in zip(ga, gr):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_contrastive_equals_its_definition(monkeypatch):
    m, b = setup({"retrieval": 1.0, "contrastive": 0.5}, augment={"crop": 0.5, "mask": 0.4})
    monkeypatch.setattr(ssl, "_step_seed", lambda batch: 1234)
    obj = m.objectives["contrastive"]
    with torch.no_grad():
        obj.mask_token.normal_()
    enc = m.encode(b)
    loss, parts = obj.loss(enc, b, m)
    # by hand: the same keys, the augmented histories, the mask row appended to the item table
    rep = m.item_representations()
    table = torch.cat([rep, obj.mask_token.unsqueeze(0)])
    z = []
    for view in (1, 2):
        items, off, src = augment(b.items, b.offsets, sequence_keys(1234, 0, b.users, view),
                                  {"crop": 0.5, "mask": 0.4}, mask_id=rep.shape[0])
        v = ssl.history_only(b, items, off, src)
        assert torch.equal(v.gaps, b.gaps[src]) and v.cand_items.numel() == 0
        e = m.encode(v, table)
        z.append(e.hidden[e.last_pos])
    ref = 0.5 * (materialised_info_nce(z[0], z[1], 0.2) + materialised_info_nce(z[1], z[0], 0.2))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert parts["contrastive"] == pytest.approx(float(ref.detach()), rel=1e-5)
    g1 = torch.autograd.grad(loss, obj.mask_token, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, obj.mask_token)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert g1.abs().sum() > 0  # the mask token is trained


@pytest.mark.parametrize("shared_target", [False, True])
def test_duorec_dropout_views_and_same_target_positives(shared_target):
    m, b = setup({"retrieval": 1.0, "duorec": 0.3})
    if shared_target:  # rows 0, 3 and 7 predict the same next item
        last = b.offsets[1:] - 1
        b.next_items[last[[3, 7]]] = b.next_items[last[0]].clone()
    enc = m.encode(b)
    loss, _ = m.objectives["duorec"].loss(enc, b, m)
    z1 = enc.hidden[enc.last_pos]
    z2 = m.encode(b).hidden[enc.last_pos]  # dropout 0: the second view equals the first
    torch.testing.assert_close(z1, z2)
    tgt = b.next_items[b.offsets[1:] - 1]
    ref = 0.5 * (materialised_info_nce(z1, z2, 0.2) + materialised_info_nce(z2, z1, 0.2))
    B = len(tgt)
    rows, partners = [], []
    for i in range(B):
        js = [(j - i) % B for j in range(B) if j != i and tgt[j] == tgt[i]]
        if js:
            rows.append(i)
            partners.append((i + min(js)) % B)
    if shared_target:
        assert {0, 3, 7} <= set(rows) and partners[rows.index(0)] == 3 and partners[rows.index(7)] == 0
    if rows:
        ref = ref + materialised_info_nce(z1[rows], z2, 0.2, torch.tensor(partners))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_contrastive_trains_end_to_end_and_config_checks():
    m, b = setup({"retrieval": 1.0, "contrastive": 0.1})
    loss, parts = m(b)
    loss.backward()
    assert set(parts) >= {"retrieval", "contrastive"}
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("stream.blocks"))
    with pytest.raises(ValueError, match="augment"):
        preset("unified", augment={"shuffle": 0.2})
    with pytest.raises(ValueError, match="augment"):
        preset("unified", augment={"crop": 1.5})
    with pytest.raises(ValueError, match="ssl_temperature"):
        preset("unified", ssl_temperature=0.0)


def test_cloze_equals_cross_entropy_over_the_catalogue_at_masked_positions(monkeypatch):
    m, b = setup({"retrieval": 1.0, "cloze": 0.5}, cloze_rate=0.3)
    monkeypatch.setattr(ssl, "_step_seed", lambda batch: 77)
    obj = m.objectives["cloze"]
    with torch.no_grad():
        obj.mask_token.normal_()
    enc = m.encode(b)
    loss, parts = obj.loss(enc, b, m)
    rep = enc.item_rep
    items, hit = obj.masked(b, rep.shape[0], 77)
    lens = torch.diff(b.offsets).tolist()
    for s, n in zip(b.offsets[:-1].tolist(), lens):  # every stream has a masked event
        k = int(hit[s:s + n].sum())
        assert k == max(1, int(0.3 * n))
    assert torch.equal(items[~hit], b.items[~hit]) and torch.all(items[hit] == rep.shape[0])
    table = torch.cat([rep, obj.mask_token.unsqueeze(0)])
    e = m.encode(ssl.history_only(b, items, b.offsets, torch.arange(items.numel())), table, causal=False)
    h = e.hidden[e.hist_pos[hit]]
    ref = F.cross_entropy(h @ rep[1:].T, b.items[hit] - 1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g1 = torch.autograd.grad(loss, obj.mask_token, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, obj.mask_token)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    # the pass is not causal: the first event's state depends on the last event of its stream
    e_causal = m.encode(ssl.history_only(b, items, b.offsets, torch.arange(items.numel())), table)
    first = e.hist_pos[b.offsets[:-1]]
    assert not torch.allclose(e.hidden[first], e_causal.hidden[first])


def test_attribute_prediction_against_labels_from_the_data_set():
    ds = synthetic(num_users=60, num_items=50, mean_length=12, seed=1)
    sp = leave_one_out(ds)
    torch.manual_seed(0)
    m = UniRec.from_dataset(ds, preset("unified", dim=16, num_blocks=1, max_len=20, dropout=0.0,
                                       objectives={"retrieval": 1.0, "attributes": 1.0}))
    b = TokenBuilder.for_config(sp, m.config).train_batch(sp.eval_users[:10], candidates=True)
    enc = m.encode(b)
    loss, _ = m.objectives["attributes"].loss(enc, b, m)
    # labels by hand: the next item's value of each attribute, as rows of the packed attribute tables
    ft = ds.item_features
    sizes = [f.size for f in ft.features]
    base = [sum(sizes[:j]) for j in range(len(sizes))]
    keep = (b.next_items > 0).nonzero().flatten().tolist()
    labels = torch.zeros(len(keep), sum(sizes))
    for r, pos in enumerate(keep):
        item = int(b.next_items[pos])
        for j, f in enumerate(ft.features):
            for v in f.indices[f.offsets[item]:f.offsets[item + 1]]:
                labels[r, base[j] + int(v)] = 1.0
    tables = m.items.sources[0].tables
    attr = tables.weight[int(tables.table_offsets[1]):]
    h = enc.hidden[enc.hist_pos[keep]]
    ref = F.binary_cross_entropy_with_logits(m.objectives["attributes"].proj(h) @ attr.T, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert labels.sum(1).min() >= 1  # every next item has attributes here
    g = torch.autograd.grad(loss, m.objectives["attributes"].proj.weight)[0]
    assert g.abs().sum() > 0
    # ids only: no attribute tables, no loss
    m2 = UniRec.from_dataset(ds, preset("sasrec", dim=16, num_blocks=1, max_len=20,
                                        objectives={"retrieval": 1.0, "attributes": 1.0}))
    assert m2.objectives["attributes"].loss(m2.encode(b), b, m2) == (None, {})
