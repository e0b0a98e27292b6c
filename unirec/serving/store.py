"""The service's durable state: users' live events in SQLite.

WAL journal with ``synchronous=FULL``: a commit is on disk (the WAL fsynced) before
:meth:`EventStore.append` returns, so an event acknowledged with a 2xx survives a
kill -9 of the server, or a power cut. One writer connection, used under a lock (SQLite
has one writer at a time anyway); readers get one connection per thread and, in WAL
mode, never block the writer nor see a half-written transaction.

Every event has a kind (:data:`KINDS`). Dismissed items are also kept in their own table,
one row per (user, item), written in the event's transaction: the set a request must exclude
is read whole, while the event log it comes from may grow without bound.

Items added at serving time (``POST /v1/items``) are kept in the table ``items``: the item id, its
fields as given (JSON) and when it was added, committed like an event before the add is answered;
the service adds them again to every model it loads.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..data.readers import EVENT_KINDS as KINDS  # view, like, dislike, dismiss ("not interested"), skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    rating REAL,
    received_at REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'view'
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, id);
CREATE TABLE IF NOT EXISTS dismissed (
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    PRIMARY KEY (user_id, item_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    item_id TEXT PRIMARY KEY,
    fields TEXT NOT NULL,
    added_at REAL NOT NULL
);
"""


@dataclass
class Event:
    """One stored event; ids are the data set's own (strings); rating None when not given; kind one of KINDS."""

    id: int
    user_id: str
    item_id: str
    timestamp: float
    rating: Optional[float]
    kind: str = "view"


@dataclass
class StoredItem:
    """An item added at serving time: its id, its fields (title, attribute values) and when (epoch seconds)."""

    item_id: str
    fields: Dict[str, Any]
    added_at: float


class ItemExists(KeyError):
    """An item with this id is stored already."""


class EventStore:
    """Append-only event log in ``path`` (an SQLite file, created if missing; a file written before
    events had kinds gets the column, its events are views)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: List[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
        cols = [r[1] for r in self._writer.execute("PRAGMA table_info(events)")]
        if cols and "kind" not in cols:
            self._writer.execute("ALTER TABLE events ADD COLUMN kind TEXT NOT NULL DEFAULT 'view'")
        self._writer.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: the writer is used from several threads, always under _write_lock.
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA synchronous=FULL")
        return con

    def _reader(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._connect()
            with self._readers_lock:
                self._readers.append(con)
        return con

    def append(self, user_id: str, item_id: str, timestamp: Optional[float] = None,
               rating: Optional[float] = None, kind: str = "view") -> Event:
        """Stores one event (timestamp defaults to now, in seconds) and returns it once it is durable."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        now = time.time()
        ts = now if timestamp is None else float(timestamp)
        with self._write_lock:
            con = self._writer
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute("INSERT INTO events (user_id, item_id, timestamp, rating, received_at, kind) "
                                  "VALUES (?, ?, ?, ?, ?, ?)", (user_id, item_id, ts, rating, now, kind))
                if kind == "dismiss":
                    con.execute("INSERT OR IGNORE INTO dismissed (user_id, item_id) VALUES (?, ?)", (user_id, item_id))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            return Event(int(cur.lastrowid), user_id, item_id, ts, rating, kind)

    def events(self, user_id: str, limit: Optional[int] = None) -> List[Event]:
        """The user's events in the order they were stored; only the newest ``limit`` when given."""
        cols = "id, user_id, item_id, timestamp, rating, kind"
        if limit is None:
            rows = self._reader().execute(f"SELECT {cols} FROM events WHERE user_id = ? ORDER BY id",
                                          (user_id,)).fetchall()
        else:
            rows = self._reader().execute(f"SELECT {cols} FROM events WHERE user_id = ? ORDER BY id DESC LIMIT ?",
                                          (user_id, max(int(limit), 0))).fetchall()[::-1]
        return [Event(*r) for r in rows]

    def dismissed(self, user_id: str) -> List[str]:
        """The item ids the user has dismissed (each once)."""
        return [r[0] for r in self._reader().execute("SELECT item_id FROM dismissed WHERE user_id = ?", (user_id,))]

    def add_item(self, item_id: str, fields: Dict[str, Any]) -> StoredItem:
        """Stores an added item (``fields`` must be JSON-serialisable) and returns it once it is durable;
        :class:`ItemExists` when the id is stored already."""
        text = json.dumps(fields, ensure_ascii=False, allow_nan=False)
        now = time.time()
        with self._write_lock:
            con = self._writer
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute("INSERT INTO items (item_id, fields, added_at) VALUES (?, ?, ?)", (item_id, text, now))
                con.execute("COMMIT")
            except sqlite3.IntegrityError:
                con.execute("ROLLBACK")
                raise ItemExists(item_id) from None
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return StoredItem(item_id, json.loads(text), now)

    def item(self, item_id: str) -> Optional[StoredItem]:
        """The stored added item ``item_id``, or None."""
        r = self._reader().execute("SELECT item_id, fields, added_at FROM items WHERE item_id = ?",
                                   (item_id,)).fetchone()
        return None if r is None else StoredItem(r[0], json.loads(r[1]), r[2])

    def items(self) -> List[StoredItem]:
        """Every stored added item, in the order they were added."""
        rows = self._reader().execute("SELECT item_id, fields, added_at FROM items ORDER BY rowid").fetchall()
        return [StoredItem(r[0], json.loads(r[1]), r[2]) for r in rows]

    def count(self) -> int:
        """Number of stored events."""
        return int(self._reader().execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def close(self) -> None:
        """Closes every connection (the readers of all threads and the writer)."""
        with self._readers_lock:
            for con in self._readers:
                con.close()
            self._readers.clear()
        with self._write_lock:
            self._writer.close()
