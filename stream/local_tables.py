"""Local table files are trusted only after a clean stop.

Public surface: ``open_tables``, ``mark_clean``.

A Faust table writes each change to its local RocksDB file at once and to its changelog topic through
the producer. A worker killed (``kill -9``, the OOM killer, a power cut) between the two leaves local
files *ahead* of the changelog: the ingest role's last batch, written locally and never acknowledged
by the broker. Restarted on the same data dir, the worker recovers from those files and goes on; its
next batches write only the keys they change, so the changelog never gets the lost batch's other
writes. A member that later takes the partition over rebuilds it from the changelog alone, without
them: an impression stored only in the killed worker's files never closes, and its example is never
sent (found by ``tests/stream/test_exactly_once_integration.py`` under load: one example in 5,114
missing).

So, as Kafka Streams does under exactly-once after an unclean shutdown, a worker that did not stop
cleanly discards its local table files and restores every table from its changelog, the state every
other member would see. A clean stop (Faust stopped, its producer flushed) leaves a marker file next to
the tables; starting removes it, so any stop that does not reach the end of shutdown leaves none.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> (d / "attribution-0.db").mkdir()
>>> open_tables(d)  # no marker: the last run did not stop cleanly
'discarded'
>>> (d / "attribution-0.db").exists()
False
>>> (d / "attribution-0.db").mkdir(parents=True); mark_clean(d)
>>> open_tables(d)
'kept'
>>> open_tables(d)  # the marker went at the first start: a crash now leaves none
'discarded'
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["open_tables", "mark_clean", "MARKER"]

MARKER = "stopped-cleanly"


def open_tables(tabledir: str | os.PathLike) -> str:
    """Before the tables open: ``"kept"`` after a clean stop, ``"discarded"`` (the directory's table
    files removed, to be restored from their changelogs) after any other stop, ``"new"`` when there is
    nothing yet. Removes the marker either way."""
    d = Path(tabledir)
    marker = d / MARKER
    if marker.exists():
        marker.unlink()
        return "kept"
    if not d.exists() or not any(d.iterdir()):
        return "new"
    shutil.rmtree(d)
    return "discarded"


def mark_clean(tabledir: str | os.PathLike) -> None:
    """After a stop that flushed the producer and closed the tables: their files may be trusted."""
    d = Path(tabledir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write("the tables were closed after their changelogs were flushed\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MARKER)
