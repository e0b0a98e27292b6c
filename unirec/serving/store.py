"""The service's durable state: users' live events in SQLite.

WAL journal with ``synchronous=FULL``: a commit is on disk (the WAL fsynced) before
:meth:`EventStore.append` returns, so an event acknowledged with a 2xx survives a
kill -9 of the server, or a power cut. One writer connection, used under a lock (SQLite
has one writer at a time anyway); readers get one connection per thread and, in WAL
mode, never block the writer nor see a half-written transaction.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    timestamp REAL NOT NULL,
    rating REAL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, id);
"""


@dataclass
class Event:
    """One stored event; ids are the data set's own (strings); rating None when not given."""

    id: int
    user_id: str
    item_id: str
    timestamp: float
    rating: Optional[float]


class EventStore:
    """Append-only event log in ``path`` (an SQLite file, created if missing)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: List[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._writer = self._connect()
        self._writer.execute("PRAGMA journal_mode=WAL")
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
               rating: Optional[float] = None) -> Event:
        """Stores one event (timestamp defaults to now, in seconds) and returns it once it is durable."""
        now = time.time()
        ts = now if timestamp is None else float(timestamp)
        with self._write_lock:
            cur = self._writer.execute(
                "INSERT INTO events (user_id, item_id, timestamp, rating, received_at) VALUES (?, ?, ?, ?, ?)",
                (user_id, item_id, ts, rating, now))
            return Event(int(cur.lastrowid), user_id, item_id, ts, rating)

    def events(self, user_id: str) -> List[Event]:
        """The user's events in the order they were stored."""
        rows = self._reader().execute(
            "SELECT id, user_id, item_id, timestamp, rating FROM events WHERE user_id = ? ORDER BY id",
            (user_id,)).fetchall()
        return [Event(*r) for r in rows]

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
