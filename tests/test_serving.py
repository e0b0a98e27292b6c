"""`unirec serve`: token streams of live histories, the event store, the batcher, every endpoint,
bad inputs, event -> recommend freshness, concurrent writers, and durability across kill -9."""
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
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
    rec._remember("u5", _State(prep.version, torch.zeros(16), prep.history.items, True))  # stale: ignored
    assert rec._cached("u5")[1].version == rec._versions["u5"]
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
    assert after["history_length"] == base + 90


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
        assert _call(port, "POST", "/v1/recommend", {"user_id": "someone-new", "k": 3})[1]["history_length"] == 13
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
        assert st == 200 and r["history_length"] == 13 and r["source"] == "model"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
