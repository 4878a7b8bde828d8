"""The quality agent in real ``reach`` workers on the real broker: two members split the partitions, and
the per-partition counts they serve at ``/quality``, summed by ``loopline quality --workers``, give the
report of the offline pass over the same log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from loopline.ops.eventlog import read_log
from loopline.ops.generate import QUALITY_SOURCES, GenerateConfig, write_log
from loopline.ops.replay import replay

pytestmark = pytest.mark.integration


def _strip_times(report: dict) -> dict:
    for row in report["sources"]:
        for m in row.get("methods", {}).values():
            m.pop("seconds", None)
    return report


def test_two_reach_workers_quality_equals_offline(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    summary = write_log(GenerateConfig(users=300, days=2, seed=3, campaigns=12, malformed=0.01,
                                       quality_sources=QUALITY_SOURCES), str(path))
    start_worker("ingest", extra=("--role", "ingest"))
    reach = [start_worker(f"reach{i}", ready=False, extra=("--role", "reach")) for i in (1, 2)]
    asyncio.run(replay(broker.bootstrap, read_log(str(path)), 4, progress=False))
    want_reports = summary["quality"]["truth_reports"]
    deadline = time.monotonic() + 120
    views = None
    while time.monotonic() < deadline:  # the two members split the partitions; wait until all are counted
        views = [w.view("/quality") for w in reach]
        if all(v is not None for v in views):
            held = [set(v["partitions"]) for v in views]
            parts = [p for v in views for p in v["partitions"].values()]
            if held[0] and held[1] and not held[0] & held[1] and held[0] | held[1] == {"0", "1", "2", "3"} \
                    and sum(p["truth_received"] for p in parts) >= want_reports \
                    and sum(p["impression_events"] for p in parts) >= summary["impressions"]:
                break
        time.sleep(0.5)
    else:
        pytest.fail(f"the reach workers did not catch up: {json.dumps(views)[:300]}\n{reach[0].tail()}")
    assert all(v["stats"]["bad_values"] == 0 for v in views)
    run = [sys.executable, "-m", "loopline.ops.cli", "quality", "--json", "--bootstrap", "100"]
    urls = ",".join(f"127.0.0.1:{w.port}" for w in reach)
    online = subprocess.run(run + ["--workers", urls], capture_output=True, text=True, timeout=60)
    offline = subprocess.run(run + ["--events", str(path)], capture_output=True, text=True, timeout=60)
    assert online.returncode == 0 and offline.returncode == 0, online.stderr + offline.stderr
    on, off = json.loads(online.stdout), json.loads(offline.stdout)
    assert on["workers"]["missing_partitions"] == [] and on["workers"]["duplicate_partitions"] == []
    assert _strip_times(on["report"]) == _strip_times(off["report"])
    assert [r["source"] for r in on["report"]["sources"]][0] == "s_good"
