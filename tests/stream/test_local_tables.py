"""A worker trusts its local table files only after a clean stop: killed, it restores its tables from
their changelogs (the state any other member would get), not from files that may be ahead of them."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from rocksdict import Options, Rdict

from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.stream.local_tables import MARKER, mark_clean, open_tables
from tests.conftest import wait_for

INGEST = ("--role", "ingest")


def test_an_empty_or_missing_directory_is_new_and_a_marker_is_used_once(tmp_path):
    assert open_tables(tmp_path / "absent") == "new"
    (tmp_path / "t" / "x.db").mkdir(parents=True)
    mark_clean(tmp_path / "t")
    assert open_tables(tmp_path / "t") == "kept" and (tmp_path / "t" / "x.db").exists()
    assert not (tmp_path / "t" / MARKER).exists()


def _bump_local_read_count(db_path: str, by: int) -> int:
    """Write partition 0's meta record in the local files only, as a batch written locally whose
    changelog messages died with the process; returns the count the changelog has."""
    db = Rdict(db_path, options=Options(raw_mode=True))
    try:
        meta = orjson.loads(db[b'"0|m"'])
        db[b'"0|m"'] = orjson.dumps({**meta, "read": meta["read"] + by})
        return meta["read"]
    finally:
        db.close()


@pytest.mark.integration
def test_a_killed_worker_restores_its_tables_from_the_changelog_and_a_stopped_one_keeps_them(
        broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=60, days=1, seed=3), str(path))
    records = read_log(str(path))
    w = start_worker("w", extra=INGEST)
    asyncio.run(replay(broker.bootstrap, records, 4, end_of_log=False, progress=False))
    wait_for(lambda: w.processed() == len(records) or None, 120, "the log processed", proc=w)
    db = str(tmp_path / "w" / "v1" / "tables" / "attribution-0.db")

    w.kill9()
    stored = _bump_local_read_count(db, 1000)
    w = start_worker("w", extra=INGEST)
    wait_for(lambda: (w.view("/ingest/") or {}).get("0", {}).get("read") == stored or None, 60,
             "partition 0's count as its changelog has it", proc=w)
    assert "restored from their changelogs" in w.tail()

    assert w.stop() == "stopped on SIGTERM"
    assert (tmp_path / "w" / "v1" / "tables" / MARKER).exists()
    _bump_local_read_count(db, 1000)  # after a clean stop the local files are the worker's own state
    w = start_worker("w", extra=INGEST)
    wait_for(lambda: (w.view("/ingest/") or {}).get("0", {}).get("read") == stored + 1000 or None, 60,
             "partition 0's count from its local files", proc=w)
