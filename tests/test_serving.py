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
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from unirec.cli import build_parser, main  # noqa: E402
from unirec.data import History, TokenBuilder, event_gaps, live_token_batch, time_buckets  # noqa: E402
from unirec.serving import EventStore, MicroBatcher, RecommendJob, Recommender, create_app, load_run  # noqa: E402
from unirec.serving.batcher import QueueFull  # noqa: E402

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
    with TestClient(create_app(run_dir, tmp_path / "state", max_wait_ms=1.0)) as c:
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
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


@pytest.mark.parametrize("bound,why", [(dict(max_queue=1, max_queue_ms=None), "1 requests are queued already"),
                                       (dict(max_queue=100, max_queue_ms=50), "the oldest queued request has waited")])
def test_full_queue_gets_429_with_retry_after(run_dir, tmp_path, loaded, bound, why):
    item1 = str(loaded[1].dataset.item_vocab[1])
    app = create_app(run_dir, tmp_path / "state", max_batch=1, **bound)
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
    app = create_app(run_dir, tmp_path / "state", max_batch=1, timeout_ms=300, max_queue_ms=None)
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
        b = MicroBatcher(fn, max_batch=1, max_queue=2, timeout_ms=5000)
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
    with pytest.raises(ValueError, match="max_queue_ms"):
        MicroBatcher(lambda j: j, max_queue_ms=0)


# --------------------------------------------------------------------------- reload


def test_reload_with_requests_in_flight(run_dir, tmp_path, loaded, monkeypatch):
    import unirec.serving.app as app_module
    other = tmp_path / "run-v2"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("serving"))
    key = {"X-API-Key": "k"}
    app = create_app(run_dir, tmp_path / "state", api_key="k", max_batch=1, max_queue_ms=None)
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
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
