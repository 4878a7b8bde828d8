"""Issue 13, item 4, through a real worker: a backlog of max-size bad lines in one partition (its batches
then hold many of them) and lines of 1 MiB go through; no changelog or output message outgrows
``MAX_VALUE_BYTES`` and no send fails."""

from __future__ import annotations

import asyncio
import base64
import zlib

import orjson
import pytest

from loopline.ops.broker import create_topics
from loopline.ops.eventlog import order_records
from loopline.ops.replay import collect_results, replay
from loopline.state.events import EventLimits
from loopline.state.sizes import MAX_DEADLETTER_RAW, MAX_VALUE_BYTES
from loopline.stream.app import TOPICS, WorkerConfig, group_id, read_topic

from ..malformed_corpus import IMP, with_

INGEST = ("--role", "ingest")

pytestmark = pytest.mark.integration


def _bad_lines_of_partition_0(n: int, size: int, tag: bytes) -> list[bytes]:
    """``n`` distinct unparseable lines of ``size`` bytes that the replay sends to partition 0."""
    out, i = [], 0
    while len(out) < n:
        head = b"{%s%d " % (tag, i)
        raw = head + b"x" * (size - len(head))
        if zlib.crc32(raw) % 4 == 0:  # replay's partitioner for unkeyed lines (ops/eventlog.partition_for)
            out.append(raw)
        i += 1
    return out


def test_a_backlog_of_max_size_bad_lines_goes_through_without_a_failed_send(broker, start_worker):
    big = _bad_lines_of_partition_0(300, EventLimits().max_line_bytes, b"b")  # 300 x 64 KiB: 25 MiB of dead letters
    huge = _bad_lines_of_partition_0(12, 1024 * 1024, b"h")  # the twelve 1 MiB lines
    valid = [with_(IMP, id=f"ok{i}", ts=IMP["ts"] + i, user=f"u{i % 5}") for i in range(40)]
    records = order_records(valid[:20] + big + huge + valid[20:])
    create_topics(broker.bootstrap, {t: 4 for t in TOPICS})
    sent = asyncio.run(replay(broker.bootstrap, records, 4, progress=False))  # a backlog before the worker
    w = start_worker(extra=INGEST)
    got = asyncio.run(collect_results(broker.bootstrap, 4, sent["run_id"], len(records), timeout=240))

    assert got["events"]["by_reason"] == {"bad_json": 300, "line_too_long": 12}, got["events"]
    assert got["events"]["accepted"] == 40 and got["examples"]["total"] == 40
    view = w.ingest_counts()
    assert view is not None and w.proc.poll() is None, w.tail()
    assert view["sends"]["failed"] == 0, view["sends"]
    log = w.tail(200_000)
    assert "MessageSizeTooLarge" not in log and "Traceback" not in log, log[-4000:]

    changelog = f"{group_id(WorkerConfig(role='ingest'))}-attribution-changelog"
    values = [m.value for m in asyncio.run(read_topic(broker.bootstrap, changelog, 4))]
    assert values and max(len(v) for v in values if v is not None) <= MAX_VALUE_BYTES  # 11 MB before chunking
    for topic in ("deadletter", "examples", "audience"):
        assert max(len(m.value or b"") for m in asyncio.run(read_topic(broker.bootstrap, topic, 4))) <= MAX_VALUE_BYTES
    dead = {base64.b64decode(orjson.loads(m.value)["raw_b64"])[:16]: orjson.loads(m.value)
            for m in asyncio.run(read_topic(broker.bootstrap, "deadletter", 4))}
    for raw in huge:  # a 1 MiB line keeps its first bytes and says how long it was
        d = dead[raw[:16]]
        assert d["raw_len"] == len(raw) and len(base64.b64decode(d["raw_b64"])) == MAX_DEADLETTER_RAW
