"""Load test of `unirec serve` on loopback: lone-request latency, throughput with and without batching,
overload with a reload, a soak, and the effect of a dismissal on the recommendations.

    python benchmarks/bench_serving.py RUN                       # everything, with the default settings
    python benchmarks/bench_serving.py RUN --rates 200,400 --duration 5 --soak 0 --overload 0
    python benchmarks/bench_serving.py RUN --modes none --soak 0 --overload 20 --capacity 1200

Lone: N requests one after another (nothing else in flight) on one keep-alive connection, cache
off, against GET /healthz and against the same computation in this process
(`Recommender.run_batch` of one job): the medians show what the HTTP path adds, and so does the
median of the per-user differences (each user's job in process, then over HTTP).

Overload: the server with its defaults (and --server-args) but the cache off (every request runs
the model) and an API key, at twice the capacity (--capacity, else the batched sweep's highest sustained rate, else
a short saturating probe) for --overload seconds: 5xx, unanswered, the 429 share, p50/p99 of the
accepted requests, the server's RSS every second, and a POST /v1/admin/reload halfway (the run
folder again: a full load and swap) whose requests in flight must all be answered.

Dismiss: in process, for --dismiss-users random users: the top 10, dismiss one of them at random,
the top 10 again at each demotion; the share of the dismissed item's 5 nearest neighbours (by
cosine, as GET /v1/items/{id}/similar) that were in the top 10 and left it, and how many other
items left it.

Starts the real server (`python -m unirec serve RUN`) as a subprocess per mode on 127.0.0.1,
drives it with a bounded open-loop load generator (Poisson arrivals at each offered rate, a raw
asyncio HTTP/1.1 keep-alive client; latency is measured from each request's scheduled time, so a
server that falls behind is charged for the queue), and stops by itself. Every request count and
wait is bounded; nothing but 127.0.0.1 is contacted.

Throughput: POST /v1/recommend {"user_id": <random MovieLens user>, "k": 10} with the server's
user-state cache off (--cache-size 0), so every request runs the model: batched (--max-batch 64)
against batch size 1 (--max-batch 1); then "cached", batched with the cache on (its default), where
a repeated user costs only the ranking. Per offered rate: achieved req/s, p50/p90/p99 latency,
mean model batch size (from /metrics), non-2xx answers; a rate is sustained when p99 < 50 ms,
every answer is 2xx and the achieved rate is within 5% of the offered one.

Soak: N mixed requests (recommend by user / history / candidates, events of every kind, similar
items, history, health, and malformed inputs of each kind) against a server with its defaults (cache on): every
bad input must get a 4xx, nothing a 5xx; the server's RSS is read from /proc before and after.

Not a pytest benchmark (no test functions): `pytest benchmarks/ --benchmark-only` skips it.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

HOST = "127.0.0.1"


# --------------------------------------------------------------------------- a cheap HTTP/1.1 client


class Conn:
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.open = reader, writer, True

    @classmethod
    async def connect(cls, port: int) -> "Conn":
        r, w = await asyncio.open_connection(HOST, port)
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(r, w)

    async def request(self, data: bytes) -> Tuple[int, bytes]:
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await self.reader.readexactly(int(m.group(1))) if m else b""
        if re.search(rb"(?i)\r\nconnection: *close", head):
            self.close()
        return status, body

    def close(self) -> None:
        self.open = False
        self.writer.close()


class Pool:
    """Keep-alive connections to one port, opened on demand up to ``limit``."""

    def __init__(self, port: int, limit: int):
        self.port, self.limit, self.count = port, limit, 0
        self.idle: asyncio.LifoQueue = asyncio.LifoQueue()

    async def warm(self, n: int) -> None:
        for _ in range(min(n, self.limit)):
            self.count += 1
            self.idle.put_nowait(await Conn.connect(self.port))

    async def _conn(self) -> Conn:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if not conn.reader.at_eof():
                return conn
            conn.close()  # the server closed it (keep-alive timeout)
            self.count -= 1
        if self.count < self.limit:
            self.count += 1
            try:
                return await Conn.connect(self.port)
            except BaseException:
                self.count -= 1
                raise
        return await self.idle.get()

    async def request(self, data: bytes) -> Tuple[int, bytes]:
        for attempt in (0, 1):
            conn = await self._conn()
            try:
                status, body = await conn.request(data)
            except (ConnectionError, asyncio.IncompleteReadError):
                conn.close()
                self.count -= 1
                if attempt:
                    raise
                continue  # a kept-alive connection the server had just closed: once more on another
            except BaseException:
                conn.close()
                self.count -= 1
                raise
            if conn.open:
                self.idle.put_nowait(conn)
            else:
                self.count -= 1
            return status, body

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait().close()


def http_bytes(method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None) -> bytes:
    """A raw HTTP/1.1 request (JSON content type when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        if not any(k.lower() == "content-type" for k in (headers or {})):
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def post_json(path: str, obj) -> bytes:
    return http_bytes("POST", path, json.dumps(obj).encode())


async def open_loop(port: int, make: Callable[[int], bytes], rate: float, n: int, seed: int = 0,
                    max_conns: int = 512, timeout_s: float = 30.0, side=None) -> dict:
    """Sends n requests at Poisson times of mean rate ``rate``; latency from the scheduled time.
    ``side``: a coroutine run beside the load (its result is returned as "side").
    Returns {"latency": [n] s (NaN = failed / timed out), "status": [n], "seconds": wall time}."""
    loop = asyncio.get_running_loop()
    side_task = None if side is None else loop.create_task(side)
    pool = Pool(port, max_conns)
    await pool.warm(min(64, max_conns))
    # Poisson arrivals, rescaled so that the n-th falls at n / rate: the offered rate is exact
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))
    arrivals *= (n / rate) / arrivals[-1]
    lat = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int64)
    reqs = [make(i) for i in range(n)]

    async def one(i: int, t_sched: float):
        try:
            st, _ = await pool.request(reqs[i])
            status[i] = st
            lat[i] = loop.time() - t_sched
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status[i] = -1

    t0 = loop.time() + 0.05
    tasks = []
    for i in range(n):
        t = t0 + arrivals[i]
        d = t - loop.time()
        if d > 0:
            await asyncio.sleep(d)
        tasks.append(loop.create_task(one(i, t)))
    # one deadline for all (a per-request wait_for would cost a task each); late requests count as failed
    done, late = await asyncio.wait(tasks, timeout=max(0.0, t0 + arrivals[-1] + timeout_s - loop.time()))
    for t in late:
        t.cancel()
    seconds = loop.time() - t0
    pool.close()
    out = {"latency": lat, "status": status, "seconds": seconds}
    if side_task is not None:
        out["side"] = await side_task
    return out


# --------------------------------------------------------------------------- the server under test


class Server:
    """`python -m unirec serve RUN` on a free loopback port, in a fresh state folder."""

    def __init__(self, run: str, *args: str, state_dir: Optional[str] = None):
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.own_state = state_dir is None
        self.state = state_dir or tempfile.mkdtemp(prefix="unirec-bench-state-")
        cmd = [sys.executable, "-m", "unirec", "serve", run, "--host", HOST, "--port", str(self.port),
               "--state-dir", self.state, *args]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode()[-2000:]}")
            try:
                if self.get("/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /healthz within 180 s")
            time.sleep(0.2)

    def get(self, path: str) -> Tuple[int, str]:
        with socket.create_connection((HOST, self.port), timeout=10) as s:
            s.sendall(http_bytes("GET", path, headers={"Connection": "close"}))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head[9:12]), body.decode()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def batch_stats(self) -> Tuple[float, float]:
        """(sum, count) of the unirec_batch_size histogram."""
        text = self.get("/metrics")[1]
        s = re.search(r"^unirec_batch_size_sum (\S+)", text, re.M)
        c = re.search(r"^unirec_batch_size_count (\S+)", text, re.M)
        return float(s.group(1)), float(c.group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.own_state:
            shutil.rmtree(self.state, ignore_errors=True)


def data_ids(run: str) -> Tuple[List[str], List[str]]:
    """(user ids, item ids) of the run's data set."""
    from unirec.serving import load_run
    _, split, _ = load_run(run)
    ds = split.dataset
    return [str(u) for u in ds.user_vocab[1:]], [str(i) for i in ds.item_vocab[1:]]


# --------------------------------------------------------------------------- throughput


def summarise(res: dict, rate: float) -> dict:
    lat, st = res["latency"], res["status"]
    ok = (st >= 200) & (st < 300)
    good = lat[ok] * 1000
    q = np.percentile(good, [50, 90, 99]) if len(good) else [np.nan] * 3
    return {"offered": rate, "achieved": float(ok.sum() / res["seconds"]), "p50": float(q[0]),
            "p90": float(q[1]), "p99": float(q[2]), "non2xx": int((~ok).sum()), "5xx": int((st >= 500).sum()),
            "n": len(st)}


def sweep(run: str, users: List[str], mode: str, mode_args: List[str], rates: List[float], duration: float,
          p99_ms: float, seed: int) -> List[dict]:
    srv = Server(run, *mode_args)
    rows = []
    try:
        rng = random.Random(seed)
        bodies = [post_json("/v1/recommend", {"user_id": u, "k": 10}) for u in users]
        make = lambda i: bodies[rng.randrange(len(bodies))]  # noqa: E731
        _run(open_loop(srv.port, make, 100, 200, seed))           # warm-up
        misses = 0
        for rate in rates:
            b0 = srv.batch_stats()
            res = _run(open_loop(srv.port, make, rate, int(rate * duration), seed))
            b1 = srv.batch_stats()
            row = summarise(res, rate)
            row["mean_batch"] = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)
            row["sustained"] = row["p99"] < p99_ms and row["non2xx"] == 0 and row["achieved"] >= 0.95 * rate
            rows.append(row)
            print(fmt_row(mode, row), flush=True)
            misses = 0 if row["sustained"] else misses + 1
            if misses >= 2:   # two rates in a row over the bound: higher ones only queue up more
                break
    finally:
        srv.stop()
    return rows


def fmt_row(mode, r) -> str:
    return (f"| {mode} | {r['offered']:.0f} | {r['achieved']:.0f} | {r['p50']:.1f} | {r['p90']:.1f} | "
            f"{r['p99']:.1f} | {r['mean_batch']:.1f} | {r['non2xx']} | {'yes' if r['sustained'] else 'no'} |")


# --------------------------------------------------------------------------- soak


def soak_requests(users: List[str], items: List[str], n: int, seed: int) -> Tuple[List[bytes], List[str]]:
    """n requests of a mix, each with its kind ("ok" answers must be 2xx, "bad" ones 4xx)."""
    rng = random.Random(seed)
    reqs, kinds = [], []
    new_users = [f"new-{i}" for i in range(200)]
    for _ in range(n):
        x = rng.random()
        u = rng.choice(users if rng.random() < 0.8 else new_users)
        if x < 0.45:
            reqs.append(post_json("/v1/recommend", {"user_id": u, "k": rng.randint(1, 50),
                                                    "exclude_seen": rng.random() < 0.8}))
            kinds.append("ok")
        elif x < 0.50:
            reqs.append(post_json("/v1/recommend", {"history": rng.sample(items, rng.randint(0, 30)), "k": 10}))
            kinds.append("ok")
        elif x < 0.55:
            reqs.append(post_json("/v1/recommend", {"user_id": u, "k": 5, "candidates": rng.sample(items, 20)}))
            kinds.append("ok")
        elif x < 0.75:
            ev = {"user_id": u, "item_id": rng.choice(items),
                  "kind": rng.choice(["view", "view", "view", "like", "dislike", "dismiss", "skip"])}
            if ev["kind"] == "view" and rng.random() < 0.5:
                ev["rating"] = rng.randint(1, 5)
            reqs.append(post_json("/v1/events", ev))
            kinds.append("ok")
        elif x < 0.80:
            reqs.append(http_bytes("GET", f"/v1/items/{rng.choice(items)}/similar?k={rng.randint(1, 20)}"))
            kinds.append("ok")
        elif x < 0.85:
            reqs.append(http_bytes("GET", f"/v1/users/{u}/history"))
            kinds.append("ok")
        elif x < 0.87:
            reqs.append(http_bytes("GET", "/healthz"))
            kinds.append("ok")
        else:
            bad = rng.choice([
                http_bytes("POST", "/v1/recommend", b'{"user_id": "1", "k": '),               # malformed JSON
                post_json("/v1/recommend", {"user_id": u, "k": 0}),                            # k out of range
                post_json("/v1/recommend", {"user_id": u, "k": 5000}),
                post_json("/v1/recommend", {"user_id": u, "k": "ten"}),                        # wrong type
                post_json("/v1/recommend", {"history": ["no-such-item"]}),                     # unknown item
                post_json("/v1/recommend", {"user_id": u, "candidates": ["no-such-item"]}),
                post_json("/v1/recommend", {"k": 3}),                                          # neither source
                post_json("/v1/events", {"user_id": u, "item_id": "no-such-item"}),
                post_json("/v1/events", {"user_id": u, "item_id": items[0], "rating": "high"}),
                post_json("/v1/events", {"user_id": [u], "item_id": items[0]}),
                post_json("/v1/events", {"user_id": u, "item_id": items[0], "kind": "love"}),          # unknown kind
                post_json("/v1/events", {"user_id": u, "item_id": items[0], "kind": "skip", "rating": 3}),
                http_bytes("POST", "/v1/events", b"not json at all"),
                http_bytes("GET", "/v1/items/no-such-item/similar"),
                http_bytes("GET", "/v1/items/1/similar?k=-3"),
                post_json("/v1/recommend", {"history": ["1"] * 60000}),                         # body too large
            ])
            reqs.append(bad)
            kinds.append("bad")
    return reqs, kinds


def soak(run: str, users, items, n: int, rate: float, seed: int) -> dict:
    srv = Server(run)
    try:
        reqs, kinds = soak_requests(users, items, n, seed)
        warm = reqs[: min(1000, n)]
        _run(open_loop(srv.port, lambda i: warm[i], rate, len(warm), seed))   # warm-up, not counted
        rss0 = srv.rss_mb()
        half = n // 2
        a = _run(open_loop(srv.port, lambda i: reqs[i], rate, half, seed))
        rss_mid = srv.rss_mb()
        b = _run(open_loop(srv.port, lambda i: reqs[half + i], rate, n - half, seed + 1))
        rss1 = srv.rss_mb()
        st = np.concatenate([a["status"], b["status"]])
        lat = np.concatenate([a["latency"], b["latency"]])
        kinds = np.asarray(kinds)
        ok = kinds == "ok"
        return {"n": n, "rate": rate, "5xx": int((st >= 500).sum()), "failed": int((st < 0).sum()),
                "ok_not_2xx": int((ok & ((st < 200) | (st >= 300)) & (st != 429)).sum()),
                "refused_429": int((st == 429).sum()),
                "bad_not_4xx": int((~ok & ((st < 400) | (st >= 500))).sum()), "bad": int((~ok).sum()),
                "p99": float(np.nanpercentile(lat, 99) * 1000), "rss_start": rss0, "rss_mid": rss_mid,
                "rss_end": rss1, "events_stored": _metric(srv, "unirec_events_stored_total")}
    finally:
        srv.stop()


def _metric(srv: Server, name: str) -> float:
    """A metric's value, summed over its labels."""
    vals = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)", srv.get("/metrics")[1], re.M)
    return sum(float(v) for v in vals) if vals else float("nan")


# --------------------------------------------------------------------------- lone requests


def _sync_request(sock: socket.socket, data: bytes) -> int:
    sock.sendall(data)
    buf = b""
    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, body = buf.partition(b"\r\n\r\n")
    n = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
    while len(body) < n:
        body += more()
    return int(head[9:12])


def lone(run: str, users: List[str], n: int, server_args: List[str], seed: int) -> dict:
    """Medians (ms) of n lone requests over HTTP (recommend, healthz) and of the same jobs in process,
    interleaved (in process, then over HTTP, then healthz, for each user), so that a shared machine's
    changing load falls on all three alike."""
    import torch
    from unirec.serving import EventStore, RecommendJob, Recommender, load_run
    rng = random.Random(seed)
    picks = [rng.choice(users) for _ in range(n + 50)]   # the first 50: warm-up
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as in `unirec serve`
    model, split, version = load_run(run)
    state = tempfile.mkdtemp(prefix="unirec-bench-lone-")
    store = EventStore(Path(state) / "e.sqlite3")
    rec = Recommender(model, split, store, version, cache_size=0)
    srv = Server(run, "--cache-size", "0", *server_args)
    times = {"in_process": [], "recommend": [], "healthz": []}
    try:
        with socket.create_connection((HOST, srv.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            health = http_bytes("GET", "/healthz")
            for u in picks:
                t = time.perf_counter()
                rec.run_batch([RecommendJob(k=10, user_id=u)])
                times["in_process"].append(time.perf_counter() - t)
                for name, req in (("recommend", post_json("/v1/recommend", {"user_id": u, "k": 10})),
                                  ("healthz", health)):
                    time.sleep(0.002)  # lone: the server is idle when the request arrives
                    t = time.perf_counter()
                    assert _sync_request(s, req) == 200
                    times[name].append(time.perf_counter() - t)
    finally:
        srv.stop()
        store.close()
        shutil.rmtree(state, ignore_errors=True)
    out = {k: float(np.median(v[50:]) * 1000) for k, v in times.items()}
    out["overhead"] = out["recommend"] - out["in_process"]
    # the lower decile: on a machine shared with other work, the closest to an unloaded figure
    out.update({f"{k}_p10": float(np.percentile(v[50:], 10) * 1000) for k, v in times.items()})
    out["overhead_p10"] = out["recommend_p10"] - out["in_process_p10"]
    # per user (the same job both ways, one right after the other): the history length's effect cancels
    out["overhead_paired"] = float(np.median(np.subtract(times["recommend"][50:], times["in_process"][50:])) * 1000)
    return out


# --------------------------------------------------------------------------- overload with a reload


def probe_capacity(run: str, users: List[str], rate: float, seconds: float, seed: int) -> float:
    """2xx answers per second of a server (cache off) offered ``rate`` for ``seconds``."""
    srv = Server(run, "--cache-size", "0")
    try:
        bodies = [post_json("/v1/recommend", {"user_id": u, "k": 10}) for u in users]
        rng = random.Random(seed)
        _run(open_loop(srv.port, lambda i: bodies[rng.randrange(len(bodies))], 100, 200, seed))
        res = _run(open_loop(srv.port, lambda i: bodies[rng.randrange(len(bodies))], rate, int(rate * seconds), seed))
        return float(((res["status"] >= 200) & (res["status"] < 300)).sum() / res["seconds"])
    finally:
        srv.stop()


def overload(run: str, users: List[str], rate: float, seconds: float, seed: int, server_args=()) -> dict:
    """``rate`` req/s for ``seconds`` against the server (cache off, API key), a reload halfway."""
    key = "bench-key"
    srv = Server(run, "--cache-size", "0", "--api-key", key, *server_args)
    try:
        bodies = [post_json("/v1/recommend", {"user_id": u, "k": 10}) for u in users]
        rng = random.Random(seed)
        _run(open_loop(srv.port, lambda i: bodies[rng.randrange(len(bodies))], 100, 200, seed))  # warm-up
        v0 = json.loads(srv.get("/healthz")[1])["model_version"]

        async def beside():
            rss, reload = [], None
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                rss.append(srv.rss_mb())
                if reload is None and time.perf_counter() - t0 >= seconds / 2:
                    conn = await Conn.connect(srv.port)
                    t = time.perf_counter()
                    st, body = await conn.request(http_bytes("POST", "/v1/admin/reload", b"{}", {"X-API-Key": key}))
                    conn.close()
                    reload = {"status": st, "seconds": time.perf_counter() - t, "answer": json.loads(body)}
                await asyncio.sleep(1.0)
            return {"rss": rss, "reload": reload}

        res = _run(open_loop(srv.port, lambda i: bodies[rng.randrange(len(bodies))], rate, int(rate * seconds),
                             seed, side=beside()))
        st, lat = res["status"], res["latency"]
        ok = (st >= 200) & (st < 300)
        acc = lat[ok] * 1000
        q = np.percentile(acc, [50, 99]) if len(acc) else [np.nan, np.nan]
        rss = res["side"]["rss"]
        warm = rss[min(5, len(rss) - 1):]
        return {"offered": rate, "seconds": seconds, "n": len(st), "2xx": int(ok.sum()),
                "429": int((st == 429).sum()), "share_429": float((st == 429).mean()), "5xx": int((st >= 500).sum()),
                "unanswered": int((st <= 0).sum()), "other": int((~ok & (st != 429) & (st > 0) & (st < 500)).sum()),
                "accepted_per_s": float(ok.sum() / res["seconds"]), "p50": float(q[0]), "p99": float(q[1]),
                "rss_first": rss[0], "rss_after_5s_min": min(warm), "rss_after_5s_max": max(warm),
                "rss_last": rss[-1], "rss": rss, "reload": res["side"]["reload"], "version_before": v0,
                "version_after": json.loads(srv.get("/healthz")[1])["model_version"],
                "reloads_metric": _metric(srv, "unirec_model_reloads_total")}
    finally:
        srv.stop()


# --------------------------------------------------------------------------- dismissals


def dismiss_effect(run: str, n_users: int, demotions: List[float], seed: int) -> List[dict]:
    """Per demotion: the share of the dismissed item's 5 nearest neighbours that were in a user's top 10
    and left it, and the mean number of other items that left it (see the module docstring)."""
    import torch
    from unirec.serving import EventStore, RecommendJob, Recommender, load_run
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False  # as in `unirec serve`
    model, split, version = load_run(run)
    rng = np.random.default_rng(seed)
    users = [str(u) for u in rng.choice(split.dataset.user_vocab[1:], n_users, replace=False)]
    state = tempfile.mkdtemp(prefix="unirec-bench-dismiss-")
    store = EventStore(Path(state) / "e.sqlite3")
    try:
        base = Recommender(model, split, store, version, cache_size=0, dismiss_demotion=0)
        before = base.run_batch([RecommendJob(k=10, user_id=u) for u in users])
        picks = []
        for u, b in zip(users, before):
            d = b.items[int(rng.integers(len(b.items)))]
            picks.append((d, set(base.similar(d, 5)[0]) & set(b.items)))
            store.append(u, base.item_ids[d], kind="dismiss")
        rows = []
        for dem in demotions:
            rec = Recommender(model, split, store, version, cache_size=0, dismiss_demotion=dem)
            after = rec.run_batch([RecommendJob(k=10, user_id=u) for u in users])
            near = left = others = users_with = users_half = 0
            for (d, nn), a, b in zip(picks, after, before):
                gone = nn - set(a.items)
                near, left = near + len(nn), left + len(gone)
                others += len(set(b.items) - set(a.items) - {d} - nn)
                users_with += bool(nn)
                users_half += bool(nn) and 2 * len(gone) >= len(nn)
            rows.append({"demotion": dem, "users": n_users, "users_with_neighbours_in_top10": users_with,
                         "neighbours_in_top10": near, "left": left, "share_left": left / max(near, 1),
                         "users_half_left": users_half, "others_left_per_user": others / n_users})
        return rows
    finally:
        store.close()
        shutil.rmtree(state, ignore_errors=True)


# --------------------------------------------------------------------------- main


def cpu_model_number() -> Tuple[str, str]:
    """(cpu family, model) from /proc/cpuinfo: "AMD EPYC" names several generations whose speed differs."""
    fam = mod = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "cpu family" and fam == "?":
                fam = val.strip()
            elif key.strip() == "model" and mod == "?":
                mod = val.strip()
    except OSError:
        pass
    return fam, mod


def _run(coro):
    """asyncio.run on uvloop when it is installed (uvicorn[standard] brings it): a cheaper client. The
    cyclic garbage collector is off meanwhile, so that its pauses are not counted as server latency."""
    gc.collect()
    gc.disable()
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
    finally:
        gc.enable()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder written by `unirec train` (MovieLens-100K for the recorded figures)")
    p.add_argument("--rates", default="300,350,400,450,500,600,800,900,1000,1100,1200,1400,1600,2000",
                   help="offered rates, requests/s (default: %(default)s)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per offered rate (default: %(default)s)")
    p.add_argument("--p99-ms", type=float, default=50.0, help="latency bound for 'sustained' (default: %(default)s)")
    p.add_argument("--modes", default="batched,single,cached",
                   help="batched (--max-batch 64, no user-state cache), single (--max-batch 1, no cache), cached "
                        "(batched with the cache on, its default); none = no sweep (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64, help="the batched mode's --max-batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="the batched mode's --max-wait-ms (default: %(default)s)")
    p.add_argument("--lone", type=int, default=300,
                   help="lone requests timed one by one, 0 = none (default: %(default)s)")
    p.add_argument("--server-args", default="", help="extra `unirec serve` arguments of the lone, sweep and "
                                                    "overload servers, space-separated (default: none)")
    p.add_argument("--overload", type=float, default=60.0,
                   help="seconds of the overload run at twice the capacity, 0 = none (default: %(default)s)")
    p.add_argument("--capacity", type=float, default=None,
                   help="capacity (req/s) to double for the overload run (default: the batched sweep's highest "
                        "sustained rate, else a 5 s probe at --probe-rate)")
    p.add_argument("--probe-rate", type=float, default=2500.0, help="offered rate of the capacity probe "
                                                                    "(default: %(default)s)")
    p.add_argument("--dismiss-users", type=int, default=200, help="users of the dismissal measurement, 0 = none "
                                                                  "(default: %(default)s)")
    p.add_argument("--demotions", default="0,0.5,1,1.5,2,3", help="demotions it tries (default: %(default)s)")
    p.add_argument("--soak", type=int, default=10000, help="soak requests, 0 = no soak (default: %(default)s)")
    p.add_argument("--soak-rate", type=float, default=300.0, help="soak offered rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and request mix (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    users, items = data_ids(args.run)
    from conftest import git_commit, machine_info  # benchmarks/conftest.py: the machine facts every record carries
    machine = dict(machine_info("cpu"), cpu_model=cpu_model_number(), commit=git_commit())
    out = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count(), "machine": machine}
    print(f"{machine['cpu']} (family {machine['cpu_model'][0]} model {machine['cpu_model'][1]}, {machine['cpu_flags']}), "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {len(users)} users, {len(items)} items")
    extra = args.server_args.split()
    if args.lone:
        lo = lone(args.run, users, args.lone, extra, args.seed)
        out["lone"] = lo
        print(f"lone requests ({args.lone}, medians): recommend over HTTP {lo['recommend']:.2f} ms, the same in "
              f"process {lo['in_process']:.2f} ms (HTTP adds {lo['overhead']:.2f} ms), /healthz {lo['healthz']:.2f} ms; "
              f"lower deciles {lo['recommend_p10']:.2f} / {lo['in_process_p10']:.2f} (adds {lo['overhead_p10']:.2f}) / "
              f"{lo['healthz_p10']:.2f} ms; median of the per-user differences {lo['overhead_paired']:.2f} ms")
    batched = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *extra]
    modes = {"batched": batched + ["--cache-size", "0"], "single": ["--max-batch", "1", "--cache-size", "0", *extra],
             "cached": batched}
    best = {}
    sweeps = [m for m in args.modes.split(",") if m in modes]
    if sweeps:
        print("| mode | offered req/s | achieved req/s | p50 ms | p90 ms | p99 ms | mean batch | non-2xx | sustained |")
        print("|---|---|---|---|---|---|---|---|---|")
    for mode in sweeps:
        rows = sweep(args.run, users, mode, modes[mode], rates, args.duration, args.p99_ms, args.seed)
        out[mode] = rows
        ok = [r["achieved"] for r in rows if r["sustained"]]
        best[mode] = max(ok) if ok else 0.0
    for mode, v in best.items():
        print(f"{mode}: highest sustained {v:.0f} req/s with p99 < {args.p99_ms:g} ms")
    if best.get("single") and "batched" in best:
        print(f"batching / batch size 1: {best.get('batched', 0) / best['single']:.2f}x")
    out["best"] = best
    if args.soak:
        s = soak(args.run, users, items, args.soak, args.soak_rate, args.seed)
        out["soak"] = s
        print(f"soak: {s['n']} mixed requests at {s['rate']:.0f}/s ({s['bad']} bad inputs): {s['5xx']} 5xx, "
              f"{s['failed']} failed, {s['refused_429']} refused (429), {s['ok_not_2xx']} other valid not 2xx, "
              f"{s['bad_not_4xx']} bad not 4xx; p99 "
              f"{s['p99']:.1f} ms; server RSS {s['rss_start']:.0f} -> {s['rss_mid']:.0f} -> {s['rss_end']:.0f} MB")
    if args.overload:
        cap = args.capacity or best.get("batched") or probe_capacity(args.run, users, args.probe_rate, 5.0, args.seed)
        o = overload(args.run, users, 2 * cap, args.overload, args.seed, extra)
        out["overload"] = dict(o, capacity=cap)
        print(f"overload: {o['offered']:.0f} req/s (2 x {cap:.0f}) for {o['seconds']:.0f} s, {o['n']} requests: "
              f"{o['5xx']} 5xx, {o['unanswered']} unanswered, {o['other']} other non-2xx, 429 share "
              f"{o['share_429']:.3f}; accepted {o['accepted_per_s']:.0f}/s, p50 {o['p50']:.1f} ms, "
              f"p99 {o['p99']:.1f} ms; "
              f"RSS {o['rss_first']:.0f} MB at the start, {o['rss_after_5s_min']:.0f}-{o['rss_after_5s_max']:.0f} MB "
              f"after 5 s, {o['rss_last']:.0f} MB at the end; reload halfway: {o['reload']}; version "
              f"{o['version_before']} -> {o['version_after']}, reloads {o['reloads_metric']:.0f}")
    if args.dismiss_users:
        rows = dismiss_effect(args.run, args.dismiss_users, [float(x) for x in args.demotions.split(",")], args.seed)
        out["dismiss"] = rows
        print("| demotion | users with a neighbour in the top 10 | neighbours in the top 10 | left | share left | "
              "users with >= half left | other items out per user |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['demotion']:g} | {r['users_with_neighbours_in_top10']} / {r['users']} | "
                  f"{r['neighbours_in_top10']} | {r['left']} | {r['share_left']:.2f} | {r['users_half_left']} | "
                  f"{r['others_left_per_user']:.2f} |")
    out["load_average_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
