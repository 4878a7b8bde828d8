"""The malformed corpus through a real worker: each line dead-lettered with its reason, raw bytes kept,
the worker alive, every valid event still counted."""

from __future__ import annotations

import asyncio
import base64
import collections

import orjson
import pytest

from loopline.ops.eventlog import order_records
from loopline.ops.replay import read_topic, collect_results, replay
from loopline.state.sizes import MAX_DEADLETTER_RAW

from ..malformed_corpus import CASES, CONV, IMP, with_

INGEST = ("--role", "ingest")  # these tests check the join; the models' roles would only add load

pytestmark = pytest.mark.integration


def _valid_lines(n: int) -> list[bytes]:
    lines = []
    for i in range(n):
        ts = IMP["ts"] + 10 * i
        lines.append(with_(IMP, id=f"ok{i}", ts=ts, user=f"u{i % 7}"))
        if i % 3 == 0:
            lines.append(with_(CONV, id=f"okv{i}", ts=ts + 5, impression=f"ok{i}"))
    return lines


def test_every_malformed_line_is_dead_lettered_with_its_reason_and_the_worker_lives(broker, start_worker):
    valid = _valid_lines(300)
    bad = {raw: reason for _, raw, reason in CASES}
    dup_imp, dup_conv = valid[0], valid[1]  # exact copies, later in the log
    lines = valid[:150] + list(bad) + valid[150:] + [dup_imp, dup_conv]
    records = order_records(lines)
    w = start_worker(extra=INGEST)
    sent = asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    got = asyncio.run(collect_results(broker.bootstrap, 4, sent["run_id"], len(records), timeout=180))

    expected = collections.Counter(bad.values())
    expected.update(["duplicate_impression", "duplicate_conversion"])
    assert got["events"]["by_reason"] == dict(expected)
    assert got["events"]["accepted"] == len(valid)
    assert got["examples"] == {"total": 300, "positive": 100, "positive_rate": round(100 / 300, 6)}

    dead = [orjson.loads(m.value) for m in asyncio.run(read_topic(broker.bootstrap, "deadletter", 4))]
    by_raw = {base64.b64decode(d["raw_b64"]): d for d in dead}
    for raw, reason in bad.items():
        d = by_raw[raw[:MAX_DEADLETTER_RAW]]  # the raw bytes come back whole; the 1 MB line its first 512 KiB
        assert d["reason"] == reason and d["raw_len"] == len(raw), raw[:60]
        assert d["detail"]
    assert w.proc.poll() is None and w.ingest_counts() is not None, "the worker must survive bad input"
