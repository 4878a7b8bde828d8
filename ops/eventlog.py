"""Reading an event log into the order both paths process it: event time, then position.

Public surface: ``LogRecord``, ``read_log``, ``order_records``, ``partition_for``.

Both ``loopline replay`` and ``loopline evaluate`` use this, so the broker path and the in-process path
see the same messages in the same order in the same partitions. Lines are ordered by event time with a
stable sort; a line whose ``ts`` cannot be read inherits the time of the line before it, so it stays
where it was. Blank lines are not events and are skipped. Partitions follow Kafka's default
partitioner (murmur2 of the key), so a user's own producers land events in the same partitions.

>>> recs = order_records([b'{"type":"x","ts":5}', b'garbage', b'{"type":"x","ts":1}'])
>>> [r.index for r in recs]
[2, 0, 1]
"""

from __future__ import annotations

import zlib
from typing import Iterable, NamedTuple

from aiokafka.partitioner import murmur2

from loopline.state.events import event_key

__all__ = ["LogRecord", "read_log", "order_records", "partition_for"]


class LogRecord(NamedTuple):
    ts: float  # event time used for ordering (inherited when unreadable)
    index: int  # position in the source
    key: bytes | None  # impression id, or None when unreadable
    raw: bytes


def partition_for(key: bytes | None, raw: bytes, partitions: int) -> int:
    """Kafka's default partitioner for keyed messages; a stable hash of the bytes for unkeyed ones."""
    if key is not None:
        return (murmur2(key) & 0x7FFFFFFF) % partitions
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


def read_log(path: str) -> list[LogRecord]:
    """Read a JSONL file as bytes (invalid UTF-8 included) and order it."""
    with open(path, "rb") as f:
        data = f.read()
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in data.split(b"\n")]
    return order_records(ln for ln in lines if ln.strip())
