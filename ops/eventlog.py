"""Reading an event log into the order both paths process it: event time, then position.

Public surface: ``LogRecord``, ``LogFile``, ``read_log``, ``order_records``, ``partition_for``.

Both ``loopline replay`` and ``loopline evaluate`` use this, so the broker path and the in-process path
see the same messages in the same order in the same partitions. Lines are ordered by event time with a
stable sort; a line whose ``ts`` cannot be read inherits the time of the line before it, so it stays
where it was. Blank lines are not events and are skipped. Partitions follow Kafka's default
partitioner (murmur2 of the key), so a user's own producers land events in the same partitions.

``read_log`` streams: one pass over the file keeps, per line, its sort time, byte offset and length
(numpy arrays, 24 bytes a line, plus 8 for the sort order), never the bytes; iterating reads the lines
back in event-time order, one at a time (sequential reads for a log written in order, a seek per line
otherwise). So memory is bounded by the number of lines, not their bytes, and no line longer than
``EventLimits.max_line_bytes`` (which only gets dead-lettered) is held during the scan.

>>> recs = order_records([b'{"type":"x","ts":5}', b'garbage', b'{"type":"x","ts":1}'])
>>> [r.index for r in recs]
[2, 0, 1]
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Sequence
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from loopline.state.events import EventLimits, event_key, key_partition

__all__ = ["LogRecord", "LogFile", "read_log", "order_records", "partition_for"]

_CHUNK = 1 << 16  # bytes read at a time while skipping an over-long line


class LogRecord(NamedTuple):
    ts: float  # event time used for ordering (inherited when unreadable)
    index: int  # position in the source
    key: bytes | None  # impression id, or None when unreadable
    raw: bytes


def partition_for(key: bytes | None, raw: bytes, partitions: int) -> int:
    """Kafka's default partitioner for keyed messages; a stable hash of the bytes for unkeyed ones."""
    if key is not None:
        return key_partition(key, partitions)
    return zlib.crc32(raw) % partitions


def order_records(lines: Iterable[bytes]) -> list[LogRecord]:
    out = []
    last_ts = 0.0
    for i, raw in enumerate(lines):
        key, ts = event_key(raw)
        if ts is None or ts < 0:
            ts = last_ts
        last_ts = ts
        out.append(LogRecord(ts, i, key, raw))
    out.sort(key=lambda r: (r.ts, r.index))
    return out


def _scan(f, cap: int) -> Iterator[tuple[int, int, bytes | None]]:
    """``(offset, length, line or None)`` of every non-blank line, without its ``\\n`` and one trailing
    ``\\r`` (as ``bytes.split(b"\\n")`` then the ``\\r`` strip would give); the line is None when it is
    longer than ``cap`` + 2 bytes: it is then only measured, never held whole."""
    pos = 0
    while True:
        piece = f.readline(cap + 2)
        if not piece:
            return
        line: bytes | None = piece
        n, blank, tail = len(piece), not piece.strip(), piece[-2:]
        while not piece.endswith(b"\n"):  # an over-long line (or the last one): read the rest in chunks
            piece = f.readline(_CHUNK)
            if not piece:
                break
            line = None
            n, blank, tail = n + len(piece), blank and not piece.strip(), (tail + piece)[-2:]
        start, pos = pos, pos + n
        if tail.endswith(b"\n"):
            n, tail = n - 1, tail[:-1]
        if tail.endswith(b"\r"):
            n -= 1
        if not blank:
            yield start, n, (line[:n] if line is not None else None)


class LogFile(Sequence):
    """A JSONL event log in event-time order, read lazily: a sequence of :class:`LogRecord` (the same
    records, in the same order, as ``order_records`` of its lines). The file must not change while in use."""

    def __init__(self, path: str):
        self.path = path
        ts, off, length = array("d"), array("q"), array("q")
        last_ts = 0.0
        cap = EventLimits.max_line_bytes  # event_key gives no time to a longer line
        with open(path, "rb") as f:
            for start, n, line in _scan(f, cap):
                t = event_key(line)[1] if line is not None else None
                if t is None or t < 0:
                    t = last_ts
                last_ts = t
                ts.append(t)
                off.append(start)
                length.append(n)
        self._ts = np.frombuffer(ts, dtype=np.float64) if len(ts) else np.zeros(0)
        self._off = np.frombuffer(off, dtype=np.int64) if len(off) else np.zeros(0, np.int64)
        self._len = np.frombuffer(length, dtype=np.int64) if len(length) else np.zeros(0, np.int64)
        self._order = np.argsort(self._ts, kind="stable")  # ties keep file order

    def __len__(self) -> int:
        return len(self._order)

    def _record(self, f, i: int) -> LogRecord:
        if f.tell() != self._off[i]:
            f.seek(int(self._off[i]))
        raw = f.read(int(self._len[i]))
        return LogRecord(float(self._ts[i]), i, event_key(raw)[0], raw)

    def __iter__(self) -> Iterator[LogRecord]:
        with open(self.path, "rb", buffering=1 << 20) as f:
            for i in self._order.tolist():
                yield self._record(f, i)

    def __getitem__(self, k):
        if isinstance(k, slice):
            with open(self.path, "rb") as f:
                return [self._record(f, i) for i in self._order[k].tolist()]
        with open(self.path, "rb") as f:
            return self._record(f, int(self._order[k]))


def read_log(path: str) -> LogFile:
    """Read a JSONL file as bytes (invalid UTF-8 included) and order it, streamed (module docstring)."""
    return LogFile(path)
