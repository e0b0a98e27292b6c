"""`unirec serve`: token streams of live histories, the event store, the batcher, every endpoint,
bad inputs, event -> recommend freshness, concurrent writers, durability across kill -9, event
kinds and dismissals, overload (429) and deadlines (503), bounded reads and state, and model reloads
with requests in flight (admin endpoint and SIGHUP)."""
import asyncio
import concurrent.futures
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from unirec.cli import build_parser, main  # noqa: E402
from unirec.data import History, TokenBuilder, event_gaps, live_token_batch, time_buckets  # noqa: E402
from unirec.serving import (ApiError, EventStore, MicroBatcher, RecommendJob, Recommender, create_app,  # noqa: E402
                            load_run)
from unirec.serving.batcher import BatchCost, QueueFull  # noqa: E402

from conftest import SYNTHETIC, TINY_MODEL  # noqa: E402

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # max_len 8 < most users' 12 events: the window truncation is exercised
    out = tmp_path_factory.mktemp("serve") / "run"
    assert main(["train", *SYNTHETIC, *TINY_MODEL, "--epochs", "1", "--max-len", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir)


@pytest.fixture
def client(run_dir, tmp_path):
    # No admission bound or tight deadline: these tests check answers, not timing, and must hold on a
    # loaded machine (the bounds have their own tests below).
    with TestClient(create_app(run_dir, tmp_path / "state", max_wait_ms=1.0, max_latency_ms=None,
                               timeout_ms=60000.0)) as c:
        yield c


def _ids(answer):
    return [x["item_id"] for x in answer["items"]]


def _reference(model, split, hist: History, k: int, exclude: bool = True):
    """(item ids, scores) of the model's top k after ``hist``, computed directly."""
    b = live_token_batch([hist], model.config.max_len, model.config.num_time_buckets)
    with torch.no_grad():
        rep = model.item_representations().float()
        q = model.predict(b, rep)["queries"]
        vals, idx = model.scorer.topk(q, rep, k, b.history_items, b.history_offsets, exclude_history=exclude)
    vocab = split.dataset.item_vocab
    keep = idx[0] > 0
    return [str(vocab[i]) for i in idx[0][keep].tolist()], vals[0][keep].tolist()


# --------------------------------------------------------------------------- token streams


def test_gap_buckets_match_time_buckets():
    ts = np.array([10.0, 10.0, 12.0, 5.0, np.nan, 100.0, 1e9])
    got = time_buckets(event_gaps(ts, [0]), 24)
    want = [0] + [int(time_buckets(np.array([g]), 24)[0]) for g in (0.0, 2.0, 0.0)] + [0, 0] + \
        [int(time_buckets(np.array([1e9 - 100.0]), 24)[0])]
    assert got.tolist() == want


@pytest.mark.parametrize("stage", ["test", "valid"])
def test_live_token_batch_gives_token_builder_queries(loaded, stage):
    model, split, _ = loaded
    tb = TokenBuilder.for_config(split, model.config)
    lens = np.diff(split.user_offsets)
    users = [int(u) for u in np.nonzero(lens > model.config.max_len)[0][:3]] + \
        [int(u) for u in np.nonzero((lens > 0) & (lens <= model.config.max_len))[0][:2]]
    assert len(users) >= 4
    with torch.no_grad():
        rep = model.item_representations().float()
        live = live_token_batch([History.of_user(split, u, stage) for u in users], model.config.max_len,
                                model.config.num_time_buckets)
        q_live = model.predict(live, rep)["queries"]
        for j, u in enumerate(users):
            want = model.predict(tb.user_batch([u], stage), rep)["queries"][0]
            torch.testing.assert_close(q_live[j], want, atol=1e-5, rtol=1e-5)
            # the tokens themselves: the window of the last max_len events and their gap buckets
            ref = tb.user_batch([u], stage)
            s, e = int(live.offsets[j]), int(live.offsets[j + 1])
            assert torch.equal(live.items[s:e], ref.items) and torch.equal(live.gaps[s:e], ref.gaps)
    full = sum(len(History.of_user(split, u, stage)) for u in users)
    assert live.history_items.numel() == full


def test_live_token_batch_rejects_empty_history():
    with pytest.raises(ValueError, match="at least one event"):
        live_token_batch([History.of_items([])], 8, 24)


# --------------------------------------------------------------------------- store and batcher


def test_event_store_is_wal_synchronous_and_reopens(tmp_path):
    st = EventStore(tmp_path / "e.sqlite3")
    assert st._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    a = st.append("u1", "i1", 5.0, 4.0)
    b = st.append("u1", "i2")
    st.append("u2", "i1", 7.0)
    assert b.id > a.id and b.rating is None and abs(b.timestamp - time.time()) < 60
    st.close()
    st = EventStore(tmp_path / "e.sqlite3")
    ev = st.events("u1")
    assert [(e.item_id, e.timestamp, e.rating) for e in ev] == [("i1", 5.0, 4.0), ("i2", b.timestamp, None)]
    assert st.count() == 3 and st.events("nobody") == []
    st.close()


def test_micro_batcher_groups_and_isolates_failures():
    calls = []

    def fn(jobs):
        calls.append(list(jobs))
        return [ValueError(f"bad {j}") if j < 0 else j * 10 for j in jobs]

    async def go(max_batch):
        b = MicroBatcher(fn, max_batch=max_batch, max_wait_ms=20.0)
        b.start()
        res = await asyncio.gather(*(b.submit(j) for j in [1, 2, -3, 4, 5, 6, 7]), return_exceptions=True)
        await b.stop()
        return res

    res = asyncio.run(go(64))
    assert res[:2] == [10, 20] and isinstance(res[2], ValueError) and res[3:] == [40, 50, 60, 70]
    assert len(calls) == 1 and sorted(calls[0]) == [-3, 1, 2, 4, 5, 6, 7]
    calls.clear()
    asyncio.run(go(3))
    assert [len(c) for c in calls] == [3, 3, 1]
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(fn, max_batch=0)


def test_batched_answers_equal_single_answers(loaded, tmp_path):
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    st.append("u3", str(split.dataset.item_vocab[5]), 2e9, 5.0)
    st.append("newcomer", str(split.dataset.item_vocab[7]), 2e9)
    rec = Recommender(model, split, st, version, cache_size=0)
    cands = np.asarray([3, 9, 4, 11, 30], dtype=np.int64)
    jobs = [RecommendJob(k=5, user_id="u3"), RecommendJob(k=7, user_id="u4", exclude_seen=False),
            RecommendJob(k=3, history=[4, 8, 15]), RecommendJob(k=4, user_id="u3", candidates=cands),
            RecommendJob(k=5, user_id="newcomer"), RecommendJob(k=5, user_id="stranger"),
            RecommendJob(k=2, history=[], candidates=cands), RecommendJob(k=5, user_id="u3")]
    together = rec.run_batch(jobs)
    for job, got in zip(jobs, together):
        alone = rec.run_batch([job])[0]
        assert got.items == alone.items and got.source == alone.source
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5, atol=1e-5)
    assert together[4].source == "model" and together[4].known_user is False and together[4].history_length == 1
    assert together[5].source == "popular" and together[5].items == rec.popular[:5].tolist()
    assert together[6].items == cands[np.argsort(-rec.popularity[cands], kind="stable")][:2].tolist()
    assert set(together[3].items) <= set(cands.tolist()) and len(together[3].items) <= 4
    st.close()


def test_a_model_with_the_dislike_head_serves_its_reranked_top(loaded, tmp_path):
    """Whole-catalogue, candidate and dismissal answers re-rank the retrieval top ``rerank_depth`` as
    ``UniRec.recommend`` does; batched answers equal single ones."""
    from dataclasses import replace

    from unirec.models import UniRec
    model, split, version = loaded
    torch.manual_seed(1)
    cfg = replace(model.config, objectives={**model.config.objectives, "dislike": 1.0}, dislike_rerank=4.0,
                  rerank_depth=9)
    m = UniRec(cfg, model.schema)
    assert m.load_state_dict(model.state_dict(), strict=False).missing_keys  # the new head alone
    m.eval()
    with torch.no_grad():
        m.objectives["dislike"].mlp[-1].weight.mul_(20.0)
    st = EventStore(tmp_path / "e.sqlite3")
    rec = Recommender(m, split, st, version, cache_size=0)
    hist = History.of_user(split, split.dataset.user_index("u3"))
    b = live_token_batch([hist], cfg.max_len, cfg.num_time_buckets)
    with torch.no_grad():
        rep = m.item_representations().float()
        q = m.predict(b, rep)["queries"]
        seen = torch.from_numpy(np.unique(hist.items))
        v9, i9 = m.scorer.topk(q, rep, 9, seen, torch.tensor([0, seen.numel()]))
        f = m.rerank_scores(q, rep, i9, v9)[0]
    want = i9[0][f.argsort(descending=True)][:5].tolist()
    assert want != i9[0][:5].tolist()
    got = rec.run_batch([RecommendJob(k=5, user_id="u3")])[0]
    assert got.items == want
    np.testing.assert_allclose(got.scores, f.sort(descending=True).values[:5].tolist(), rtol=1e-5, atol=1e-5)
    cands = np.asarray(i9[0][:7].tolist() + [int(seen[0])], dtype=np.int64)
    jobs = [RecommendJob(k=5, user_id="u3"), RecommendJob(k=3, user_id="u3", candidates=cands),
            RecommendJob(k=4, user_id="u4", exclude_seen=False)]
    together = rec.run_batch(jobs)
    for job, t in zip(jobs, together):
        assert rec.run_batch([job])[0].items == t.items
    # the candidates: their top depth by retrieval score (the seen one dropped), then re-ranked
    with torch.no_grad():
        c = torch.from_numpy(cands[:7]).view(1, -1)
        fc = m.rerank_scores(q, rep, c, m.scorer.item_scores(q, rep, c))[0]
    assert together[1].items == cands[:7][fc.argsort(descending=True).numpy()][:3].tolist()
    # a dismissal: the item never returns, and the answer is still re-ranked
    st.append("u3", rec.item_ids[want[0]], kind="dismiss")
    rec.invalidate("u3")
    after = rec.run_batch([RecommendJob(k=5, user_id="u3")])[0]
    assert want[0] not in after.items and len(after.items) == 5
    st.close()


def test_cached_state_is_not_stored_when_an_event_arrives_meanwhile(loaded, tmp_path):
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    rec = Recommender(model, split, st, version)
    v, cached = rec._cached("u5")
    assert cached is None
    prep = rec._prepare(RecommendJob(k=3, user_id="u5"))
    rec.invalidate("u5")        # an event stored while the state was computed
    rec.run_batch([RecommendJob(k=3, user_id="u5")])  # computes with the new version: stored
    assert rec._cached("u5")[1] is not None
    from unirec.serving.engine import _State
    rec._remember("u5", _State(prep.version, torch.zeros(16), prep.view))  # stale: ignored
    assert rec._cached("u5")[1].version == rec._versions[rec._slot("u5")]
    st.close()


# --------------------------------------------------------------------------- endpoints in process


def test_every_endpoint(client, loaded):
    model, split, version = loaded
    ds = split.dataset
    items = [str(i) for i in ds.item_vocab[1:]]

    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model_version"] == version

    r = client.post("/v1/recommend", json={"user_id": "u3", "k": 6})
    a = r.json()
    assert r.status_code == 200 and a["source"] == "model" and a["known_user"] is True
    u = ds.user_index("u3")
    want_ids, want_scores = _reference(model, split, History.of_user(split, u), 6)
    assert _ids(a) == want_ids and a["model_version"] == version
    np.testing.assert_allclose([x["score"] for x in a["items"]], want_scores, rtol=1e-4, atol=1e-5)
    assert all(x["title"] == str(ds.item_text[ds.item_index(x["item_id"])]) for x in a["items"])
    assert a["history_length"] == len(History.of_user(split, u))

    r = client.post("/v1/recommend", json={"history": items[:3], "k": 4, "exclude_seen": False})
    assert r.status_code == 200 and r.json()["known_user"] is None
    assert _ids(r.json()) == _reference(model, split, History.of_items([1, 2, 3]), 4, exclude=False)[0]

    cands = items[10:20]
    r = client.post("/v1/recommend", json={"user_id": "u3", "k": 3, "candidates": cands + cands[:2]})
    got = r.json()
    assert r.status_code == 200 and len(got["items"]) == 3 and set(_ids(got)) <= set(cands)
    assert [x["score"] for x in got["items"]] == sorted((x["score"] for x in got["items"]), reverse=True)

    r = client.post("/v1/events", json={"user_id": "u3", "item_id": items[0], "timestamp": 2e9, "rating": 4})
    assert r.status_code == 201 and r.json()["item_id"] == items[0] and r.json()["rating"] == 4.0

    r = client.get("/v1/users/u3/history")
    h = r.json()
    assert r.status_code == 200 and h["known_user"] and h["events"][-1]["source"] == "live"
    assert [e["item_id"] for e in h["events"][:-1]] == [str(ds.item_vocab[i]) for i in History.of_user(split, u).items]

    r = client.get(f"/v1/items/{items[4]}/similar", params={"k": 5})
    s = r.json()
    assert r.status_code == 200 and len(s["items"]) == 5 and items[4] not in _ids(s)
    rep = torch.nn.functional.normalize(model.item_representations().float()[1:], dim=1)
    cos = rep @ rep[4]
    cos[4] = -math.inf
    assert _ids(s) == [items[i] for i in torch.topk(cos, 5).indices.tolist()]

    r = client.get("/v1/users/nobody/history")
    assert r.status_code == 200 and r.json() == {"user_id": "nobody", "known_user": False, "events": []}

    spec = client.get("/openapi.json").json()
    for path in ["/v1/recommend", "/v1/events", "/v1/items/{item_id}/similar", "/v1/users/{user_id}/history",
                 "/healthz", "/metrics"]:
        assert path in spec["paths"]

    m = client.get("/metrics")
    assert m.status_code == 200
    assert 'unirec_requests_total{endpoint="/v1/recommend",method="POST",status="200"} 3.0' in m.text
    assert "unirec_request_latency_seconds_bucket" in m.text and "unirec_batch_size_count" in m.text


def test_unknown_user_from_live_events_then_popular(client, loaded):
    model, split, _ = loaded
    items = [str(i) for i in split.dataset.item_vocab[1:]]
    r = client.post("/v1/recommend", json={"user_id": "brand-new", "k": 5}).json()
    pop = split.item_popularity()
    want = [items[i - 1] for i in (np.argsort(-pop[1:], kind="stable") + 1)[:5]]
    assert r["source"] == "popular" and r["known_user"] is False and r["history_length"] == 0 and _ids(r) == want
    assert client.post("/v1/events", json={"user_id": "brand-new", "item_id": items[6]}).status_code == 201
    r = client.post("/v1/recommend", json={"user_id": "brand-new", "k": 5}).json()
    assert r["source"] == "model" and r["history_length"] == 1
    # one event without a rating: the same stream as that one item given as a history
    same = client.post("/v1/recommend", json={"history": [items[6]], "k": 5}).json()
    assert _ids(r) == _ids(same)
    assert client.post("/v1/recommend", json={"history": [], "k": 2}).json()["source"] == "popular"


def test_event_then_recommend_is_fresh(client, loaded):
    model, split, _ = loaded
    ds = split.dataset
    u = ds.user_index("u7")
    hist = History.of_user(split, u)
    for step in range(4):
        before = client.post("/v1/recommend", json={"user_id": "u7", "k": 5}).json()
        top = before["items"][0]["item_id"]
        ts, rating = 2e9 + 3600 * step, float(1 + step)
        r = client.post("/v1/events", json={"user_id": "u7", "item_id": top, "timestamp": ts, "rating": rating})
        assert r.status_code == 201
        after = client.post("/v1/recommend", json={"user_id": "u7", "k": 5}).json()
        assert top not in _ids(after) and after["history_length"] == before["history_length"] + 1
        hist = hist.concat(History(np.asarray([ds.item_index(top)]), np.asarray([rating], np.float32),
                                   np.asarray([ts])))
        want_ids, want_scores = _reference(model, split, hist, 5)
        assert _ids(after) == want_ids
        np.testing.assert_allclose([x["score"] for x in after["items"]], want_scores, rtol=1e-4, atol=1e-5)


BAD = [
    ("post", "/v1/recommend", b'{"user_id": "u1", "k": ', 422, "body", "invalid JSON"),
    ("post", "/v1/recommend", b'["u1"]', 422, "body", "JSON object"),
    ("post", "/v1/recommend", {"user_id": "u1", "k": 0}, 422, "k", "greater than or equal to 1"),
    ("post", "/v1/recommend", {"user_id": "u1", "k": 1001}, 422, "k", "less than or equal to 1000"),
    ("post", "/v1/recommend", {"user_id": "u1", "k": "ten"}, 422, "k", "integer"),
    ("post", "/v1/recommend", {"user_id": "u1", "k": 2.5}, 422, "k", "integer"),
    ("post", "/v1/recommend", {"user_id": "u1", "exclude_seen": "yes"}, 422, "exclude_seen", "boolean"),
    ("post", "/v1/recommend", {"user_id": ["u1"]}, 422, "user_id", "string"),
    ("post", "/v1/recommend", {"history": "i1"}, 422, "history", "list"),
    ("post", "/v1/recommend", {"history": ["no-such-item"]}, 422, "history[0]", "unknown item id"),
    ("post", "/v1/recommend", {"user_id": "u1", "candidates": ["ITEM1", "no-such-item"]}, 422, "candidates[1]",
     "unknown item id"),
    ("post", "/v1/recommend", {"user_id": "u1", "candidates": []}, 422, "candidates", "at least 1"),
    ("post", "/v1/recommend", {"k": 3}, 422, "body", "exactly one of user_id or history"),
    ("post", "/v1/recommend", {"user_id": "u1", "kk": 3}, 422, "kk", "unknown field"),
    ("post", "/v1/events", {"user_id": "u1"}, 422, "item_id", "required"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "no-such-item"}, 422, "item_id", "unknown item id"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "ITEM1", "rating": "high"}, 422, "rating", "number"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "ITEM1", "rating": 9}, 422, "rating", "between"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "ITEM1", "timestamp": -5}, 422, "timestamp", "greater"),
    ("post", "/v1/events", b'{"user_id": "u1", "item_id": "ITEM1", "rating": NaN}', 422, "rating", "finite"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "ITEM1", "kind": "love"}, 422, "kind", "'dismiss'"),
    ("post", "/v1/events", {"user_id": "u1", "item_id": "ITEM1", "kind": "like", "rating": 5}, 422, "rating",
     "only an event of kind 'view'"),
    ("post", "/v1/admin/reload", {"run_dir": "/x"}, 403, "X-API-Key", "start the server with --api-key"),
    ("get", "/v1/items", None, 422, "q", "required"),
    ("get", "/v1/items?q=a&k=0", None, 422, "k", "greater than or equal to 1"),
    ("get", "/v1/items/no-such-item/similar", None, 404, "item_id", "unknown item id"),
    ("get", "/v1/items/ITEM1/similar?k=0", None, 422, "k", "greater than or equal to 1"),
    ("get", "/v1/items/ITEM1/similar?k=many", None, 422, "k", "integer"),
]


@pytest.mark.parametrize("method,path,body,status,field,text", BAD, ids=[f"{b[1]}-{b[4]}-{i}" for i, b in
                                                                         enumerate(BAD)])
def test_bad_inputs_get_4xx_naming_the_field(client, loaded, method, path, body, status, field, text):
    item1 = str(loaded[1].dataset.item_vocab[1])
    path = path.replace("ITEM1", item1)
    if isinstance(body, dict):
        body = json.dumps(body).replace("ITEM1", item1).encode()
    elif isinstance(body, bytes):
        body = body.replace(b"ITEM1", item1.encode())
    if method == "post":
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.get(path)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{field}: ") and text in detail, detail
    assert client.get("/healthz").status_code == 200  # still serving


def test_json_content_type_is_required_with_a_clear_message(client):
    r = client.post("/v1/recommend", content=b'{"user_id": "u1"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]


def test_api_key_guards_writes_and_body_limit(run_dir, tmp_path, loaded):
    item1 = str(loaded[1].dataset.item_vocab[1])
    app = create_app(run_dir, tmp_path / "state", api_key="s3cret", max_body_bytes=2000)
    with TestClient(app) as c:
        ev = {"user_id": "u1", "item_id": item1}
        r = c.post("/v1/events", json=ev)
        assert r.status_code == 401 and r.json()["detail"].startswith("X-API-Key: missing")
        # reading a history needs the key too; recommending does not
        assert c.get("/v1/users/u1/history").status_code == 401
        assert c.get("/v1/users/u1/history", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/users/u1/history", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = c.post("/v1/events", json=ev, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        assert c.post("/v1/events", json=ev, headers={"X-API-Key": "s3cret"}).status_code == 201
        assert c.post("/v1/recommend", json={"user_id": "u1"}).status_code == 200  # reads need no key
        big = {"history": [item1] * 1000}
        r = c.post("/v1/recommend", json=big)
        assert r.status_code == 413 and r.json()["detail"].startswith("body: request body of")
        # a body without Content-Length (chunked) is cut off while it streams in
        r = c.post("/v1/recommend", content=iter([json.dumps(big).encode()[i:i + 500] for i in range(0, 12000, 500)]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200
        text = c.get("/metrics").text
        assert 'status="413"' in text and 'status="401"' in text and 'status="500"' not in text


def test_concurrent_writers_to_one_user(client, loaded):
    split = loaded[1]
    items = [str(i) for i in split.dataset.item_vocab[1:21]]
    base = client.post("/v1/recommend", json={"user_id": "u2", "k": 3}).json()["history_length"]
    results, errors = [], []

    def writer(w):
        try:
            for j in range(15):
                r = client.post("/v1/events", json={"user_id": "u2", "item_id": items[(w + j) % 20],
                                                    "timestamp": 2e9 + w * 100 + j})
                results.append((r.status_code, r.json()["event_id"], w, j))
                if j % 5 == 0:  # readers interleaved with the writers
                    assert client.post("/v1/recommend", json={"user_id": "u2", "k": 3}).status_code == 200
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 90 and all(s == 201 for s, *_ in results)
    assert len({e for _, e, *_ in results}) == 90
    live = [e for e in client.get("/v1/users/u2/history").json()["events"] if e["source"] == "live"]
    assert sorted(e["timestamp"] for e in live) == sorted(2e9 + w * 100 + j for w in range(6) for j in range(15))
    # each writer's events are stored in the order it sent them
    for w in range(6):
        mine = [e["timestamp"] for e in live if 2e9 + w * 100 <= e["timestamp"] < 2e9 + w * 100 + 50]
        assert mine == sorted(mine)
    after = client.post("/v1/recommend", json={"user_id": "u2", "k": 3}).json()
    # the live events read are capped at the model's window (+1 for the first one's time gap)
    assert after["history_length"] == base + loaded[0].config.max_len + 1


def test_serve_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["serve"]
    for action in sub._actions:
        assert action.help
        for s in action.option_strings:
            assert s in text


# --------------------------------------------------------------------------- the real server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start(run_dir, state, port):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "unirec", "serve", str(run_dir), "--port", str(port),
                             "--state-dir", str(state)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if _call(port, "GET", "/healthz")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start in 120 s")


def _stop(proc):
    """SIGINT (a graceful shutdown), then SIGKILL if it has not exited in 20 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_acknowledged_events_survive_kill_9(run_dir, loaded, tmp_path):
    items = [str(i) for i in loaded[1].dataset.item_vocab[1:]]
    state, port = tmp_path / "state", _free_port()
    proc = _start(run_dir, state, port)
    sent = []
    try:
        for j in range(25):
            user = "u1" if j % 2 else "someone-new"
            st, ans = _call(port, "POST", "/v1/events", {"user_id": user, "item_id": items[j % len(items)],
                                                          "rating": 1 + j % 5})
            assert st == 201
            sent.append((user, ans["event_id"], ans["item_id"], ans["timestamp"]))
        window = loaded[0].config.max_len + 1  # live events read per request
        assert _call(port, "POST", "/v1/recommend", {"user_id": "someone-new", "k": 3})[1]["history_length"] == window
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _start(run_dir, state, port)  # the same port: SO_REUSEADDR
    try:
        for user in ("u1", "someone-new"):
            st, h = _call(port, "GET", f"/v1/users/{user}/history")
            live = [(e["item_id"], e["timestamp"]) for e in h["events"] if e["source"] == "live"]
            assert live == [(i, t) for u, _, i, t in sent if u == user]
        st, r = _call(port, "POST", "/v1/recommend", {"user_id": "someone-new", "k": 3})
        assert st == 200 and r["history_length"] == window and r["source"] == "model"
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- event kinds and dismissals


def test_event_kinds_shape_the_history(loaded, tmp_path):
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    vocab = [str(v) for v in split.dataset.item_vocab]
    for j, kind in enumerate(["view", "like", "dislike", "skip", "dismiss", "dismiss"]):
        st.append("fresh", vocab[1 + j], 2e9 + j, 3.0 if kind == "view" else None, kind)
    st.append("fresh", vocab[6], 2e9 + 9, None, "dismiss")  # twice: stored twice, dismissed once
    assert [e.kind for e in st.events("fresh")] == ["view", "like", "dislike", "skip", "dismiss", "dismiss", "dismiss"]
    assert sorted(st.dismissed("fresh")) == sorted([vocab[5], vocab[6]])
    with pytest.raises(ValueError, match="kind"):
        st.append("fresh", vocab[1], kind="love")
    rec = Recommender(model, split, st, version)
    v = rec.user_view("fresh")
    # view, like, dislike are tokens (like / dislike at the data's highest / lowest rating); skip, dismiss are not
    assert v.history.items.tolist() == [1, 2, 3] and v.known is False
    assert v.history.ratings.tolist() == [3.0, model.schema.rating_max, model.schema.rating_min]
    assert v.seen.tolist() == [4, 5, 6, 6] and sorted(v.dismissed.tolist()) == [5, 6]
    n = rec.num_items
    seen_all = rec.run_batch([RecommendJob(k=n, user_id="fresh")])[0]
    assert seen_all.source == "model" and not {1, 2, 3, 4, 5, 6} & set(seen_all.items)
    assert len(seen_all.items) == n - 6
    keep = rec.run_batch([RecommendJob(k=n, user_id="fresh", exclude_seen=False)])[0]
    assert set(keep.items) == set(range(1, n + 1)) - {5, 6}          # dismissed: never, even with exclude_seen off
    cands = np.asarray([1, 4, 5, 7], dtype=np.int64)
    assert 5 not in rec.run_batch([RecommendJob(k=4, user_id="fresh", candidates=cands, exclude_seen=False)])[0].items
    # a user with nothing but a dismissal gets the popular items, without it
    st.append("only-dismissed", vocab[int(rec.popular[0])], kind="dismiss")
    pop = rec.run_batch([RecommendJob(k=5, user_id="only-dismissed", exclude_seen=False)])[0]
    assert pop.source == "popular" and pop.items == rec.popular[1:6].tolist()
    st.close()


@pytest.mark.parametrize("demotion", [0.0, 0.7])
def test_dismiss_demotes_neighbours_by_cosine_times_spread(loaded, tmp_path, demotion):
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    rec = Recommender(model, split, st, version, cache_size=0, dismiss_demotion=demotion)
    n = rec.num_items
    before = rec.run_batch([RecommendJob(k=n, user_id="u9")])[0]
    score = dict(zip(before.items, before.scores))
    d = before.items[0]
    st.append("u9", rec.item_ids[d], kind="dismiss")
    rec.invalidate("u9")
    after = rec.run_batch([RecommendJob(k=n, user_id="u9")])[0]
    assert d not in after.items and set(after.items) == set(before.items) - {d}
    # expected: score - demotion * max(0, cos(item, d))^2 * std over the catalogue of the user's scores
    with torch.no_grad():
        rep = model.item_representations().float()[1:]
        b = live_token_batch([History.of_user(split, split.dataset.user_index("u9"))], model.config.max_len,
                             model.config.num_time_buckets)
        q = model.predict(b, model.item_representations().float())["queries"][0]
    spread = float((rep @ q).std(unbiased=False))
    unit = torch.nn.functional.normalize(rep, dim=1)
    cos = (unit @ unit[d - 1]).clamp_min(0) ** 2
    want = {i: score[i] - demotion * float(cos[i - 1]) * spread for i in score if i != d}
    got = dict(zip(after.items, after.scores))
    np.testing.assert_allclose([got[i] for i in want], [want[i] for i in want], rtol=1e-4, atol=1e-4)
    assert np.all(np.diff([want[i] for i in after.items]) <= 1e-4)  # ranked by the demoted scores
    st.close()


def test_dismiss_over_http_changes_the_next_answer(client, loaded):
    before = client.post("/v1/recommend", json={"user_id": "u11", "k": 10, "exclude_seen": False}).json()
    top = before["items"][0]["item_id"]
    r = client.post("/v1/events", json={"user_id": "u11", "item_id": top, "kind": "dismiss"})
    assert r.status_code == 201 and r.json()["kind"] == "dismiss"
    after = client.post("/v1/recommend", json={"user_id": "u11", "k": 10, "exclude_seen": False}).json()
    assert top not in _ids(after) and after["history_length"] == before["history_length"]  # not a token
    h = client.get("/v1/users/u11/history").json()["events"]
    assert h[-1]["kind"] == "dismiss" and h[-1]["item_id"] == top and h[-1]["source"] == "live"
    for kind in ("like", "dislike", "skip"):
        assert client.post("/v1/events", json={"user_id": "u11", "item_id": before["items"][1]["item_id"],
                                               "kind": kind}).status_code == 201
    assert 'unirec_events_stored_total{kind="dismiss"} 1.0' in client.get("/metrics").text


def test_item_search_and_the_page_files(client, loaded):
    ds = loaded[1].dataset
    title = str(ds.item_text[5])
    part = title[1:5].upper()
    r = client.get("/v1/items", params={"q": part, "k": 100})
    hits = r.json()["items"]
    assert r.status_code == 200 and str(ds.item_vocab[5]) in [h["item_id"] for h in hits]
    assert all(part.lower() in (h["title"] or "").lower() or h["item_id"] == part for h in hits)
    pops = [h["popularity"] for h in hits]
    assert pops == sorted(pops, reverse=True)
    assert client.get("/v1/items", params={"q": str(ds.item_vocab[3])}).json()["items"][0]["item_id"] == \
        str(ds.item_vocab[3])
    assert client.get("/v1/items", params={"q": "no such title at all"}).json() == {"items": []}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/app.js" in page.text
    for f in ("app.js", "style.css"):
        assert client.get(f"/static/{f}").status_code == 200
    assert client.get("/healthz").json()["example_users"][0] == str(ds.user_vocab[1])


# --------------------------------------------------------------------------- bounds


def test_history_read_is_capped_at_the_window(loaded, tmp_path):
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    vocab = [str(v) for v in split.dataset.item_vocab]
    for j in range(30):
        st.append("long", vocab[1 + j % 20], 2e9 + 60 * j)
    limits = []
    events = st.events
    st.events = lambda user, limit=None: limits.append(limit) or events(user, limit)
    rec = Recommender(model, split, st, version, cache_size=0)
    got = rec.run_batch([RecommendJob(k=5, user_id="long", exclude_seen=False)])[0]
    window = model.config.max_len + 1
    assert limits == [window] and got.history_length == window
    full = History(np.asarray([1 + j % 20 for j in range(30)]), np.full(30, np.nan, np.float32),
                   np.asarray([2e9 + 60 * j for j in range(30)]))
    # the model reads the same tokens (the window) as from the whole history
    want_ids, want_scores = _reference(model, split, History(full.items[-window:], full.ratings[-window:],
                                                             full.timestamps[-window:]), 5, exclude=False)
    assert [rec.item_ids[i] for i in got.items] == want_ids
    np.testing.assert_allclose(got.scores, want_scores, rtol=1e-4, atol=1e-5)
    st.close()


def test_version_map_stays_bounded_and_still_invalidates(loaded, tmp_path):
    from unirec.serving.engine import VERSION_SLOTS
    model, split, version = loaded
    st = EventStore(tmp_path / "e.sqlite3")
    rec = Recommender(model, split, st, version)
    rec.run_batch([RecommendJob(k=3, user_id="u5")])
    assert rec._cached("u5")[1] is not None
    for j in range(3 * VERSION_SLOTS):
        rec.invalidate(f"user-{j}")
    assert len(rec._versions) == VERSION_SLOTS
    rec.invalidate("u5")
    assert rec._cached("u5")[1] is None
    st.close()


def test_serve_without_the_serving_extra_says_what_to_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        main(["serve", str(run_dir)])
    assert "uvicorn" in str(e.value) and 'pip install -e ".[serve]"' in str(e.value)


class Gate:
    """Stands in for a recommender's run_batch: blocks each batch until released, counting jobs."""

    def __init__(self, rec):
        self.rec, self.run = rec, rec.run_batch
        self.started, self.release, self.jobs = threading.Event(), threading.Event(), []
        rec.run_batch = self

    def __call__(self, jobs):
        self.jobs += list(jobs)
        self.started.set()
        assert self.release.wait(60)
        return self.run(jobs)


def _until(cond, what):
    deadline = time.time() + 30
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("bound,why", [(dict(max_queue=1, max_latency_ms=None), "1 requests are queued already"),
                                       (dict(max_queue=100, max_latency_ms=50), "the oldest queued request has waited")])
def test_full_queue_gets_429_with_retry_after(run_dir, tmp_path, loaded, bound, why):
    item1 = str(loaded[1].dataset.item_vocab[1])
    app = create_app(run_dir, tmp_path / "state", max_batch=1, inline=False, **bound)  # gated in the model thread
    with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        gate = Gate(app.state.current())
        a = pool.submit(c.post, "/v1/recommend", json={"user_id": "u1"})
        assert gate.started.wait(30)                     # a is in the model thread: the queue is empty
        b = pool.submit(c.post, "/v1/recommend", json={"user_id": "u2"})
        _until(lambda: app.state.batcher.queued == 1, "b queued")
        time.sleep(0.1)                                  # b has waited longer than 50 ms
        r = c.post("/v1/recommend", json={"user_id": "u3"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["detail"].startswith("server busy: " + why)
        assert c.post("/v1/events", json={"user_id": "u3", "item_id": item1}).status_code == 201  # not queued
        gate.release.set()
        assert a.result().status_code == 200 and b.result().status_code == 200
        assert c.post("/v1/recommend", json={"user_id": "u3"}).status_code == 200
        assert 'status="429"' in c.get("/metrics").text


def test_deadline_gets_503_and_expired_jobs_are_not_run(run_dir, tmp_path):
    app = create_app(run_dir, tmp_path / "state", max_batch=1, timeout_ms=300, max_latency_ms=None, inline=False)
    with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        gate = Gate(app.state.current())
        a = pool.submit(c.post, "/v1/recommend", json={"user_id": "u1"})
        assert gate.started.wait(30)
        b = pool.submit(c.post, "/v1/recommend", json={"user_id": "u2"})  # queued behind a, expires there
        for f in (a, b):
            r = f.result()
            assert r.status_code == 503 and r.headers["Retry-After"] == "1" and r.json()["detail"].startswith(
                "deadline: not answered within 300 ms")
        gate.release.set()
        r = c.post("/v1/recommend", json={"user_id": "u3"})
        assert r.status_code == 200
        assert [j.user_id for j in gate.jobs] == ["u1", "u3"]  # u2 expired in the queue: never run


def test_micro_batcher_bounds():
    started, release = threading.Event(), threading.Event()

    def fn(jobs):
        started.set()
        release.wait(10)
        return list(jobs)

    async def go():
        b = MicroBatcher(fn, max_batch=1, max_queue=2, timeout_ms=5000, inline=False)
        b.start()
        first = asyncio.ensure_future(b.submit(0))
        while not started.is_set():  # the model thread takes job 0
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit(j)) for j in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(3)
        release.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out

    assert asyncio.run(go()) == [0, 1, 2]
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(lambda j: j, max_queue=0)
    with pytest.raises(ValueError, match="max_latency_ms"):
        MicroBatcher(lambda j: j, max_latency_ms=0)


# --------------------------------------------------------------------------- reload


def test_reload_with_requests_in_flight(run_dir, tmp_path, loaded, monkeypatch):
    import unirec.serving.app as app_module
    other = tmp_path / "run-v2"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("serving"))
    key = {"X-API-Key": "k"}
    app = create_app(run_dir, tmp_path / "state", api_key="k", max_batch=1, max_latency_ms=None, inline=False)
    with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(4) as pool:
        old = app.state.current()
        item = old.item_ids[3]
        assert c.post("/v1/events", json={"user_id": "u4", "item_id": item}, headers=key).status_code == 201
        app.state.store.append("u4", "an-item-no-model-knows", 2e9)  # as if the old catalogue had it
        c.post("/v1/recommend", json={"user_id": "u4"})
        assert len(old._cache) == 1
        gate = Gate(old)
        a = pool.submit(c.post, "/v1/recommend", json={"user_id": "u4"})
        assert gate.started.wait(30)                          # a: in the model thread, on the old model
        b = pool.submit(c.post, "/v1/recommend", json={"user_id": "u5"})
        _until(lambda: app.state.batcher.queued == 1, "b queued")  # b: waiting, bound to the old model
        assert c.post("/v1/admin/reload", json={"run_dir": str(other)}).status_code == 401
        r = c.post("/v1/admin/reload", json={"run_dir": str(other)}, headers=key)
        assert r.status_code == 200, r.text
        new_version = r.json()["model_version"]
        assert new_version.startswith("run-v2@") and r.json()["previous_version"] == old.version
        new = app.state.current()
        assert new is not old and len(new._cache) == 0          # cached user states dropped
        cfut = pool.submit(c.post, "/v1/recommend", json={"user_id": "u4"})  # after the swap: the new model
        gate.release.set()
        ra, rb, rc = a.result(), b.result(), cfut.result()
        assert [x.status_code for x in (ra, rb, rc)] == [200, 200, 200]
        assert ra.json()["model_version"] == rb.json()["model_version"] == old.version
        assert rc.json()["model_version"] == new_version and len(gate.jobs) == 2
        assert rc.json()["history_length"] == ra.json()["history_length"]  # the stored event kept, the unknown skipped
        h = c.get("/v1/users/u4/history", headers=key).json()["events"]
        assert [e["item_id"] for e in h if e["source"] == "live"] == [item, "an-item-no-model-knows"]
        assert h[-1]["title"] is None
        # the default reloads the server's own folder again; a bad folder keeps the serving model
        assert c.post("/v1/admin/reload", headers=key).json()["model_version"] == old.version
        r = c.post("/v1/admin/reload", json={"run_dir": str(tmp_path / "nowhere")}, headers=key)
        assert r.status_code == 422 and r.json()["detail"].startswith("run_dir: cannot load")
        assert c.get("/healthz").json()["model_version"] == old.version
        # one reload at a time
        loading, go = threading.Event(), threading.Event()
        real = app_module.load_run

        def slow(*a, **k):
            loading.set()
            assert go.wait(30)
            return real(*a, **k)

        monkeypatch.setattr(app_module, "load_run", slow)
        first = pool.submit(c.post, "/v1/admin/reload", headers=key)
        assert loading.wait(30)
        r = c.post("/v1/admin/reload", headers=key)
        assert r.status_code == 409 and "already running" in r.json()["detail"]
        go.set()
        assert first.result().status_code == 200
        assert 'unirec_model_reloads_total 3.0' in c.get("/metrics").text
        # nothing keeps a replaced model alive: memory stays flat over reloads
        gone = weakref.ref(old)
        del old, gate, new
        gc.collect()
        assert gone() is None


def test_sighup_reloads_the_run_folder(run_dir, tmp_path):
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    for d in (a, b):
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("serving"))
    link = tmp_path / "current"
    link.symlink_to(a)
    port = _free_port()
    proc = _start(link, tmp_path / "state", port)
    try:
        assert _call(port, "GET", "/healthz")[1]["model_version"].startswith("run-a@")
        link.unlink()
        link.symlink_to(b)  # a deploy: point the folder the server was started with at a new run, then HUP
        proc.send_signal(signal.SIGHUP)
        _until(lambda: _call(port, "GET", "/healthz")[1]["model_version"].startswith("run-b@"), "the reload")
        st, r = _call(port, "POST", "/v1/recommend", {"user_id": "u1", "k": 3})
        assert st == 200 and r["model_version"].startswith("run-b@")
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- items added at serving time

TWIN = {"title": "Twin Peaks Revisited", "genre": ["genre1", "genre4"], "release_year": 1972, "brand": "brand7"}


def _add(c, item_id, fields, **kw):
    return c.post("/v1/items", json={"item_id": item_id, "fields": fields}, **kw)


def test_bags_of_values_encode_raw_values_as_the_catalogue_was_encoded(loaded):
    ft = loaded[1].dataset.item_features
    ids = list(range(1, 21))
    rows = []
    for i in ids:  # each item's values back from its codes (a numeric one: its bucket's lower edge)
        row = {"title": "ignored"}
        for f in ft.features:
            codes = f.indices[f.offsets[i]:f.offsets[i + 1]].tolist()
            if f.kind == "multi":
                row[f.name] = [str(f.vocab[c]) for c in codes]
            elif f.kind == "numeric" and codes:
                row[f.name] = float(f.boundaries[codes[0] - 2]) if codes[0] >= 2 else float(f.boundaries[0]) - 1
            elif codes:
                row[f.name] = str(f.vocab[codes[0]])
        rows.append(row)
    got, want = ft.bags_of_values(rows, ignore=["title"]), ft.bags(torch.tensor(ids), include_id=False)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.offsets, want.offsets)
    assert torch.equal(got.table_offsets, want.table_offsets) and got.names == want.names
    skipped = []
    b = ft.bags_of_values([{"genre": "genre2"}, {"genre": ["genre2", "unheard-of"], "brand": "no-brand"}, {}],
                          skipped=skipped)
    assert skipped == [(1, "genre", "unheard-of"), (1, "brand", "no-brand")]
    assert b.offsets.numel() == len(ft.features) * 3 + 1 and b.indices.tolist()[:2] == [3, 3]  # genre2: row 3
    with pytest.raises(ValueError, match="title: unknown field"):
        ft.bags_of_values([{"title": "t"}])


BAD_ITEMS = [
    ({"item_id": "n0"}, "fields", "required"),
    ({"item_id": "n1", "fields": {}}, "fields.title", "required"),
    ({"item_id": "n2", "fields": {"title": "  "}}, "fields.title", "must not be empty"),
    ({"item_id": "n3", "fields": {"title": 5}}, "fields.title", "expected a string"),
    ({"item_id": "n4", "fields": {"title": "x" * 1001}}, "fields.title", "at most 1000"),
    ({"item_id": "n5", "fields": {"title": "t", "colour": "red"}}, "fields.colour", "unknown field"),
    ({"item_id": "n6", "fields": {"title": "t", "genre": ["genre1", 7]}}, "fields.genre[1]", "expected a string"),
    ({"item_id": "n7", "fields": {"title": "t", "genre": {"a": 1}}}, "fields.genre", "expected a list of strings"),
    ({"item_id": "n8", "fields": {"title": "t", "release_year": "1990"}}, "fields.release_year", "expected a number"),
    ({"item_id": "n9", "fields": {"title": "t", "release_year": True}}, "fields.release_year", "expected a number"),
    (b'{"item_id": "n10", "fields": {"title": "t", "release_year": NaN}}', "fields.release_year", "finite"),
    ({"item_id": "n11", "fields": {"title": "t", "brand": ""}}, "fields.brand", "empty string"),
    ({"item_id": "n12", "fields": ["title"]}, "fields", "dictionary"),
    ({"item_id": "", "fields": {"title": "t"}}, "item_id", "at least 1"),
    ({"item_id": "n13", "fields": {"title": "t"}, "score": 1}, "score", "unknown field"),
    # a model without item text knows a new item by its attribute values alone: none known is refused
    ({"item_id": "n14", "fields": {"title": "t", "genre": ["no-such-genre"]}}, "fields", "none of the attribute"),
]


@pytest.mark.parametrize("body,field,text", BAD_ITEMS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_ITEMS)])
def test_add_item_bad_fields_get_422_naming_the_field(client, body, field, text):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/items", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith(f"{field}: ") and text in detail, detail
    # nothing was stored or appended: the same id can still be added
    item_id = json.loads(raw.replace(b"NaN", b"0"))["item_id"] or "n-empty"
    assert _add(client, item_id, {"title": "fine", "genre": ["genre2"]}).status_code == 201
    assert client.get("/healthz").json()["added_items"] == 1


def test_added_item_is_similar_searchable_and_recommendable(client, loaded):
    model, split, _ = loaded
    a = _add(client, "twin-a", TWIN)
    assert a.status_code == 201, a.text
    got = a.json()
    n = split.dataset.num_items
    assert got["index"] == n + 1 and got["title"] == TWIN["title"] and got["text"] is None
    assert got["unknown_values"] == {} and 0 < got["seconds"] < 1
    b = _add(client, "twin-b", {**TWIN, "genre": TWIN["genre"] + ["unheard-of"]}).json()
    assert b["index"] == n + 2 and b["unknown_values"] == {"genre": ["unheard-of"]}
    # the model's own representation of the attributes, without an id row
    bags = split.dataset.item_features.bags_of_values([TWIN], ignore=["title"])
    with torch.no_grad():
        want = model.items.represent_new(1, None, (bags.indices, bags.offsets))[0]
        rep = model.item_representations().float()
    rec = client.app.state.current()
    torch.testing.assert_close(rec.item_rep[n + 1], want)
    torch.testing.assert_close(rec.item_rep[: n + 1], rep)            # the catalogue's rows unchanged
    # /similar: the twins (the unknown genre left out: the same vector) are each other's nearest
    s = client.get("/v1/items/twin-a/similar", params={"k": 4}).json()
    assert s["title"] == TWIN["title"] and s["items"][0]["item_id"] == "twin-b" and s["items"][0]["added"]
    assert s["items"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    unit = torch.nn.functional.normalize(torch.cat([rep[1:], want.view(1, -1)]), dim=1)
    cos = unit[:n] @ unit[n]
    assert _ids(s)[1:] == [str(split.dataset.item_vocab[i + 1]) for i in torch.topk(cos, 3).indices.tolist()]
    # and a catalogue item's neighbours include them, in their place
    nearest = _ids(s)[1]
    full = client.get(f"/v1/items/{nearest}/similar", params={"k": n + 5}).json()
    assert len(full["items"]) == n + 1 and {"twin-a", "twin-b"} <= set(_ids(full))
    assert [x.get("added", False) for x in full["items"]].count(True) == 2
    # search finds them by title (and by id), flagged as added
    hits = client.get("/v1/items", params={"q": "peaks revis"}).json()["items"]
    assert [h["item_id"] for h in hits] == ["twin-a", "twin-b"] and all(h["added"] for h in hits)
    assert client.get("/v1/items", params={"q": "twin-b"}).json()["items"][0]["item_id"] == "twin-b"
    assert "added" not in client.get("/v1/items", params={"q": str(split.dataset.item_vocab[3])}).json()["items"][0]
    # recommendable: ranked over the whole catalogue as the model scores its rows
    r = client.post("/v1/recommend", json={"user_id": "u6", "k": n + 2}).json()
    assert {"twin-a", "twin-b"} <= set(_ids(r))
    r = client.post("/v1/recommend", json={"user_id": "u6", "k": 3, "candidates": ["twin-a", "i1", "i2"],
                                                "exclude_seen": False}).json()
    assert set(_ids(r)) == {"twin-a", "i1", "i2"}
    # events on it are accepted, kept in the history with its title, and read as a history token
    e = client.post("/v1/events", json={"user_id": "u6", "item_id": "twin-a", "rating": 5, "timestamp": 2e9})
    assert e.status_code == 201
    h = client.get("/v1/users/u6/history").json()["events"]
    assert h[-1] == {"item_id": "twin-a", "title": TWIN["title"], "timestamp": 2e9, "rating": 5.0, "kind": "view",
                     "source": "live"}
    after = client.post("/v1/recommend", json={"user_id": "u6", "k": 5}).json()
    hist = History.of_user(split, split.dataset.user_index("u6")).concat(
        History(np.asarray([n + 1]), np.asarray([5.0], np.float32), np.asarray([2e9])))
    b = live_token_batch([hist], model.config.max_len, model.config.num_time_buckets)
    with torch.no_grad():
        grown = rec.item_rep
        q = model.predict(b, grown)["queries"]
        vals, idx = model.scorer.topk(q, grown, 5, b.history_items, b.history_offsets)
    assert "twin-a" not in _ids(after) and after["history_length"] == len(hist)
    assert _ids(after) == [rec.item_ids[i] for i in idx[0].tolist()]
    np.testing.assert_allclose([x["score"] for x in after["items"]], vals[0].tolist(), rtol=1e-4, atol=1e-5)
    g = client.post("/v1/recommend", json={"history": ["twin-a"], "k": 3}).json()
    assert g["source"] == "model" and g["history_length"] == 1


def test_add_item_conflicts_and_the_api_key(run_dir, tmp_path, loaded):
    item3 = str(loaded[1].dataset.item_vocab[3])
    with TestClient(create_app(run_dir, tmp_path / "state", api_key="k")) as c:
        key = {"X-API-Key": "k"}
        r = _add(c, "new-1", TWIN)
        assert r.status_code == 401 and r.json()["detail"].startswith("X-API-Key: missing")
        assert _add(c, "new-1", TWIN, headers=key).status_code == 201
        r = _add(c, "new-1", {"title": "another"}, headers=key)
        assert r.status_code == 409 and r.json()["detail"] == "item_id: item 'new-1' was already added"
        r = _add(c, item3, TWIN, headers=key)
        assert r.status_code == 409 and "already in the model's catalogue" in r.json()["detail"]
        assert c.get("/healthz").json()["added_items"] == 1


def test_added_items_survive_a_restart_and_a_reload(run_dir, tmp_path, loaded):
    other = tmp_path / "run-v2"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("serving"))
    state, key = tmp_path / "state", {"X-API-Key": "k"}
    with TestClient(create_app(run_dir, state, api_key="k")) as c:
        assert _add(c, "kept-1", TWIN, headers=key).status_code == 201
        assert _add(c, "kept-2", {"title": "Second Coming", "genre": ["genre3"]}, headers=key).status_code == 201
        assert c.post("/v1/events", json={"user_id": "u8", "item_id": "kept-2"}, headers=key).status_code == 201
        before = c.get("/v1/items/kept-1/similar", params={"k": 5}).json()
        rec_before = c.post("/v1/recommend", json={"user_id": "u8", "k": 5}).json()
    # a new process on the same state: the items are added again, in the same order, with the same vectors
    with TestClient(create_app(run_dir, state, api_key="k")) as c:
        rec = c.app.state.current()
        assert rec.added_items == 2 and rec.item_ids[-2:] == ["kept-1", "kept-2"]
        assert c.get("/v1/items/kept-1/similar", params={"k": 5}).json() == before
        assert c.post("/v1/recommend", json={"user_id": "u8", "k": 5}).json() == rec_before
        h = c.get("/v1/users/u8/history", headers=key).json()["events"]
        assert h[-1]["item_id"] == "kept-2" and h[-1]["title"] == "Second Coming"
        assert _add(c, "kept-1", TWIN, headers=key).status_code == 409
        # a reload (another run folder) adds them to the new model before it serves
        r = c.post("/v1/admin/reload", json={"run_dir": str(other)}, headers=key)
        assert r.status_code == 200
        new = c.app.state.current()
        assert new is not rec and new.version.startswith("run-v2@") and new.added_items == 2
        assert [x["item_id"] for x in c.get("/v1/items", params={"q": "second com"}).json()["items"]] == ["kept-2"]
        assert c.post("/v1/recommend", json={"user_id": "u8", "k": 5}).json()["history_length"] == \
            rec_before["history_length"]
        assert _add(c, "kept-3", {"title": "Third", "genre": ["genre5"]}, headers=key).status_code == 201
    with TestClient(create_app(other, state)) as c:
        assert c.app.state.current().item_ids[-3:] == ["kept-1", "kept-2", "kept-3"]


def test_adds_while_recommending_never_see_a_half_grown_catalogue(client, loaded):
    n = loaded[1].dataset.num_items
    stop, errors, seen = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                r = client.post("/v1/recommend", json={"user_id": "u5", "k": 1000, "exclude_seen": False})
                s = client.get("/v1/items/i1/similar", params={"k": 1000})
                assert r.status_code == 200 and s.status_code == 200, (r.text, s.text)
                # every answer ranks one whole catalogue: the trained one plus the items added so far
                seen.append((len(r.json()["items"]), len(s.json()["items"]) + 1))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            res = list(pool.map(lambda j: _add(client, f"c{j}", {"title": f"Concurrent {j}", "genre": [f"genre{j}"]}),
                                range(12)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert all(r.status_code == 201 for r in res)
    assert sorted(r.json()["index"] for r in res) == list(range(n + 1, n + 13))
    assert seen and all(n <= a <= n + 12 and n <= b <= n + 12 for a, b in seen)
    rec = client.app.state.current()
    assert rec.item_rep.shape[0] == rec.num_items + 1 == n + 13 and rec._unit_items.shape[0] == n + 12
    # an add builds a new catalogue: one a reader holds is never changed
    held = rec.catalogue
    assert _add(client, "c-last", {"title": "The last one", "brand": "brand3"}).status_code == 201
    assert rec.catalogue is not held and held.n == n + 12 and held.rep.shape[0] == n + 13
    assert held.unit.shape[0] == n + 12 and len(held.all_items) == len(held.popular) == n + 12


def test_events_stored_before_an_item_was_added_count_once_it_is(client):
    # e.g. events kept from a model whose catalogue had the item: skipped while unknown, read once added
    before = client.post("/v1/recommend", json={"user_id": "u9", "k": 3}).json()   # now cached
    client.app.state.store.append("u9", "back-again", 2e9, 4.0)
    client.app.state.current().invalidate("u9")
    assert client.post("/v1/recommend", json={"user_id": "u9", "k": 3}).json()["history_length"] == \
        before["history_length"]
    assert _add(client, "back-again", {"title": "Back Again", "genre": ["genre1"]}).status_code == 201
    after = client.post("/v1/recommend", json={"user_id": "u9", "k": 3}).json()  # the cached state was dropped
    assert after["history_length"] == before["history_length"] + 1 and "back-again" not in _ids(after)


def test_a_model_of_ids_alone_cannot_add_items(loaded, tmp_path):
    from unirec.models import UniRec, preset
    split = loaded[1]
    model = UniRec.from_dataset(split.dataset, preset("sasrec", dim=16, num_blocks=1, max_len=8)).eval()
    st = EventStore(tmp_path / "e.sqlite3")
    rec = Recommender(model, split, st)
    with pytest.raises(ApiError) as e:
        rec.add_item("x", TWIN)
    assert e.value.status == 422 and e.value.field == "model" and "by its id alone" in e.value.message
    assert st.items() == [] and rec.num_items == split.dataset.num_items
    st.add_item("stored-before", TWIN)  # e.g. stored under another model: kept, not restored
    assert rec.restore_items() == 0 and st.item("stored-before").fields == TWIN
    st.close()


# A model that knows items by their text alone, on synthetic data whose titles name their taste cluster
# ("item 7 genre3": cluster c owns genre c). The text encoder is stood in for by fixed vectors: each
# text is its cluster's direction plus a little noise of its own (the real encoder needs the text extra
# and its first load takes seconds); the service calls the same functions of unirec.data.text.
TEXT_DIM = 384
CLUSTER_DATA = {"num_users": 100, "num_items": 60, "num_clusters": 5, "mean_length": 10.0, "affinity": 0.9,
                "attr_signal": 1.0, "seed": 3}


def _cluster_text_vectors(texts, model="all-MiniLM-L6-v2", **kw):
    out = np.zeros((len(texts), TEXT_DIM), np.float32)
    for j, t in enumerate(texts):
        m = re.search(r"genre(\d+)", t)
        if m:
            v = np.random.default_rng(int(m.group(1))).standard_normal(TEXT_DIM) + \
                0.1 * np.random.default_rng(zlib.crc32(t.encode())).standard_normal(TEXT_DIM)
            out[j] = v / np.linalg.norm(v)
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    import unirec.data.text as text
    from unirec.data import DataConfig
    from unirec.models import preset
    from unirec.training import TrainConfig, train_run
    out = tmp_path_factory.mktemp("text") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text, "text_vectors", _cluster_text_vectors)
        mp.setattr(text, "load_text_encoder", lambda *a, **k: None)
        cfg = preset("unified", dim=16, num_blocks=1, num_heads=2, max_len=20, dropout=0.0, num_rank_candidates=2,
                     text="lm", use_item_ids=False, use_item_features=False)
        train_run(DataConfig("synthetic", CLUSTER_DATA), cfg,
                  TrainConfig(epochs=10, batch_size=32, lr=5e-3, device="cpu", time_budget_s=None), out,
                  progress=False, log=lambda msg: None, final_test=False)
        yield out


def test_a_new_item_is_recommended_to_the_users_its_text_matches(text_run, tmp_path):
    run = text_run
    with TestClient(create_app(run, tmp_path / "state")) as c:
        rec = c.app.state.current()
        assert rec.config.text == "lm" and not rec.model.items.with_ids
        genre = {i: re.search(r"genre(\d+)", rec.title(i)).group(1) for i in range(1, rec.num_items + 1)}
        clusters = sorted(set(genre.values()), key=int)
        assert len(clusters) == CLUSTER_DATA["num_clusters"]
        for g in clusters:
            r = _add(c, f"new-{g}", {"title": f"A fresh film genre{g}", "genre": [f"genre{g}"], "release_year": 1990})
            assert r.status_code == 201, r.text
            # the text the model's template makes of the fields, and what the encoder was given
            assert r.json()["text"] == f"A fresh film genre{g} (1990). Genres: genre{g}."
        for h in clusters:
            # a user whose history is in cluster h (its 6 most popular items): the new item of h is in the
            # top k = h's unseen items + 1 (at most 10), the other clusters' new items are not
            ours = sorted((i for i in genre if genre[i] == h), key=lambda i: -rec.popularity[i])
            k = len(ours) - 6 + 1
            assert k <= 10
            got = c.post("/v1/recommend", json={"history": [rec.item_ids[i] for i in ours[:6]], "k": 100}).json()
            rank = {g: _ids(got).index(f"new-{g}") + 1 for g in clusters}
            assert rank[h] <= k, (h, k, rank)
            assert all(rank[g] > k for g in clusters if g != h), (h, k, rank)
        for g in clusters:
            # its nearest items are its cluster's
            near = c.get(f"/v1/items/new-{g}/similar", params={"k": 5}).json()["items"]
            assert all(x["title"].endswith(f"genre{g}") for x in near), near


def test_text_model_adds_fast_and_says_what_to_install_without_the_text_extra(text_run, tmp_path):
    import unirec.data.text as text
    run = text_run
    with TestClient(create_app(run, tmp_path / "state")) as c:
        took = [(_add(c, f"speed-{j}", {"title": f"Speed test genre{j % 5}"}).json()["seconds"]) for j in range(20)]
        assert max(took) < 1.0 and float(np.median(took)) < 0.25, took
        with pytest.MonkeyPatch.context() as m2:
            def unavailable(*a, **k):
                raise text.TextFeaturesUnavailable("item text vectors need the 'text' extra; install it with: "
                                                   'pip install --no-build-isolation -e ".[text]"')
            m2.setattr(text, "text_vectors", unavailable)
            r = _add(c, "no-text", {"title": "Cannot embed genre1"})
            assert r.status_code == 503 and r.json()["detail"].startswith("text: item text features are unavailable")
            assert '.[text]' in r.json()["detail"]
        assert c.get("/v1/items", params={"q": "cannot embed"}).json() == {"items": []}
        assert _add(c, "no-text", {"title": "Cannot embed genre1"}).status_code == 201  # nothing was kept


# --------------------------------------------------------------------------- the fast path, admission, memory


def test_recommend_fast_path_answers_as_the_route(client, loaded):
    items = [str(i) for i in loaded[1].dataset.item_vocab[1:]]
    counts = client.app.state.fast_counts
    bodies = [{"user_id": "u3", "k": 6}, {"user_id": 7, "k": 3, "exclude_seen": False},
              {"history": items[:4], "k": 4}, {"user_id": "u3", "k": 3, "candidates": items[10:20]},
              {"user_id": "brand-new-user", "k": 2}]
    for body in bodies:
        data = json.dumps(body).encode()
        before = dict(counts)
        fast = client.post("/v1/recommend", content=data, headers={"Content-Type": "application/json; charset=utf-8"})
        assert counts["fast"] == before["fast"] + 1 and counts["routed"] == before["routed"]
        # FastAPI takes any application/*+json as JSON; the fast path leaves those to the route
        routed = client.post("/v1/recommend", content=data, headers={"Content-Type": "application/vnd.x+json"})
        assert counts["routed"] == before["routed"] + 1
        assert fast.status_code == routed.status_code == 200
        assert fast.content == routed.content and fast.headers["content-type"] == routed.headers["content-type"]
    # a bad body goes on to the route, which names the field
    before = dict(counts)
    r = client.post("/v1/recommend", json={"user_id": "u3", "k": 0})
    assert r.status_code == 422 and r.json()["detail"].startswith("k: ") and counts["routed"] == before["routed"] + 1
    # a valid body whose ids are unknown is refused by the fast path itself, as the route refuses it
    before = dict(counts)
    r = client.post("/v1/recommend", json={"history": [items[0], "no-such-item"]})
    assert r.status_code == 422 and r.json()["detail"].startswith("history[1]: unknown item id")
    assert counts["fast"] == before["fast"] + 1
    m = client.get("/metrics").text
    assert 'unirec_requests_total{endpoint="/v1/recommend",method="POST",status="422"}' in m


def test_batch_cost_fits_the_fixed_and_the_per_job_time():
    cost = BatchCost()
    for n in (1, 10, 64, 3, 40):                     # on the line 2.4 ms + 0.6 ms per job
        cost.add(n, 0.0024 + 0.0006 * n)
    assert cost(1) == pytest.approx(0.0030) and cost(32) == pytest.approx(0.0216)
    one_size = BatchCost()
    for t in (0.003, 0.005):                          # one size only: their (weighted) mean time, any size
        one_size.add(1, t)
    assert one_size(1) == pytest.approx(0.004, rel=0.01) and one_size(64) == one_size(1)
    for _ in range(200):                              # the machine slows down twofold: the fit follows
        for n in (1, 10, 64):
            cost.add(n, 2 * (0.0024 + 0.0006 * n))
    assert cost(32) == pytest.approx(2 * 0.0216, rel=1e-3)


def test_micro_batcher_refuses_a_job_that_would_be_answered_too_late():
    """A new job waits for the running batch, the full batches ahead of it and its own batch (100 ms
    each, the time of the last batch): past max_latency_ms it is refused, with that time in the reason."""
    release = threading.Event()

    def fn(jobs):
        if jobs[0] == 0:
            time.sleep(0.1)
        else:
            release.wait(10)
        return list(jobs)

    async def go():
        b = MicroBatcher(fn, max_batch=2, max_latency_ms=350)
        b.start()
        assert await b.submit(0) == 0                 # runs alone: a batch takes 100 ms
        running = asyncio.ensure_future(b.submit(1))
        while b.queued or not b._running:             # the model thread takes job 1 and blocks in it
            await asyncio.sleep(0.001)
        queued = []

        async def fill():
            while (why := b.full()) is None:
                queued.append(asyncio.ensure_future(b.submit(len(queued) + 2)))
                await asyncio.sleep(0)                # the job is queued
            return why

        # 100 ms left of job 1's batch, then 100 per full batch ahead and 100 for its own: the 1st and 2nd
        # jobs are answered in 200 ms, the 3rd and 4th in 300, a 5th in 400 > 350
        why = await fill()
        assert len(queued) == 4
        m = re.match(r"4 requests are queued; with a new one, the last of them would be answered "
                     r"(\d+) ms after it came", why)
        assert m and 350 < int(m.group(1)) < 500, why  # about 400: a loaded machine sleeps a little longer
        with pytest.raises(QueueFull):
            await b.submit(99)
        await asyncio.sleep(0.12)                     # job 1's batch should have ended: 100 ms less to wait
        await fill()
        assert len(queued) == 6
        release.set()
        out = await asyncio.gather(running, *queued)
        await b.stop()
        return out

    assert asyncio.run(go()) == [1, 2, 3, 4, 5, 6, 7]


def test_serve_turns_onednn_off(run_dir, tmp_path, monkeypatch):
    """Batches come in ever new shapes: the server runs ATen's kernels, not oneDNN's per-shape compiled ones."""
    import uvicorn
    import unirec.serving.app as app_module
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    threads, enabled = torch.get_num_threads(), torch.backends.mkldnn.enabled
    assert enabled  # torch's default: the test would prove nothing otherwise
    try:
        app_module.serve(run_dir, threads=threads, state_dir=tmp_path / "state")
        assert torch.backends.mkldnn.enabled is False
    finally:
        gc.unfreeze()
        torch.backends.mkldnn.enabled = enabled
    assert len(served) == 1 and isinstance(served[0], app_module.ServiceApp)


def test_a_lone_job_runs_in_the_callers_thread_and_a_busy_model_batches():
    threads, release = [], threading.Event()

    def fn(jobs):
        threads.append((threading.get_ident(), list(jobs)))
        if jobs[0] == "slow":
            time.sleep(0.2)
        if jobs[0] == "gate":
            assert release.wait(10)
        return [ValueError("bad") if j == "bad" else j for j in jobs]

    async def go(inline):
        threads.clear()
        release.clear()
        here = threading.get_ident()
        b = MicroBatcher(fn, max_batch=8, inline=inline)
        b.start()
        assert await b.submit("slow") == "slow"               # lone: in this thread when inline
        # just after a 200 ms batch the model is not idle for longer than a batch: the model thread
        gate = asyncio.ensure_future(b.submit("gate"))
        while not threads or threads[-1][1] != ["gate"]:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.submit(j)) for j in ("x", "bad", "y")]
        await asyncio.sleep(0.01)
        release.set()
        out = await asyncio.gather(gate, *rest, return_exceptions=True)
        await asyncio.sleep(0.25)                              # idle for longer than the last batch took
        with pytest.raises(ValueError, match="bad"):
            await b.submit("bad")                              # a lone job's exception is raised to its caller
        await b.stop()
        return here, out

    here, out = asyncio.run(go(True))
    assert out[:2] == ["gate", "x"] and isinstance(out[2], ValueError) and out[3] == "y"
    assert [(t == here, jobs) for t, jobs in threads] == [(True, ["slow"]), (False, ["gate"]),
                                                          (False, ["x", "bad", "y"]), (True, ["bad"])]
    here, out = asyncio.run(go(False))
    assert all(t != here for t, _ in threads) and len(threads) == 4
