"""A production ingest worker (not started for evaluation) on the real broker: an ``end_of_log`` header
closes nothing, and a restart re-sends only outputs that were never acknowledged."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from loopline.ops.eventlog import order_records, read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.stream.app import control_of, read_topic
from loopline.stream.ingest import route_of
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

INGEST = ("--role", "ingest")
OUTPUTS = ("examples", "history.events", "audience", "deadletter")


def _output_ids(bootstrap: str) -> dict[str, list]:
    """Every output on the output topics, by an identity (control marks left out)."""
    def ident(topic, v):
        if topic == "examples":
            return v["id"]
        if topic == "history.events":
            return v[5]
        if topic == "audience":
            return v.get("id") or orjson.dumps(v)
        return tuple(v["src"])
    return {t: [ident(t, orjson.loads(m.value)) for m in asyncio.run(read_topic(bootstrap, t, 4))
                if control_of(m.headers) is None] for t in OUTPUTS}


def test_end_of_log_is_ignored_and_a_restart_resends_only_what_was_not_acknowledged(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=40, days=1, seed=2, malformed=0.02), str(path))
    records = read_log(str(path))
    w = start_worker("w1", extra=INGEST, evaluation=False)
    asyncio.run(replay(broker.bootstrap, records, 4, end_of_log=True, run_id="intruder", progress=False))
    def settled(w, n, ignored):
        v = w.view("/ingest/") or {}  # one answer for every figure (a second call may be fresher)
        read = sum(c["read"] + c["redelivered"] for k, c in v.items() if k.isdigit())
        done = read == n and v.get("control_ignored") == ignored and v["sends"]["acked"] == v["sends"]["sent"]
        return v if done else None

    view = wait_for(lambda: settled(w, len(records), 4), 120, "the log and the control messages processed", proc=w)
    # nothing closed: no end-of-log status, no window closed at the end, only watermarks to the fm role
    assert asyncio.run(read_topic(broker.bootstrap, "ingest.status", 4)) == []
    assert all(view[str(p)]["stats"]["closed_at_end"] == 0 for p in range(4))
    marks = {control_of(m.headers).split(":")[0] for m in asyncio.run(read_topic(broker.bootstrap, "examples", 4))
             if control_of(m.headers) is not None}
    assert marks == {"watermark"}
    # a batch's counters are flushed before its outputs are sent, so a view can show every event read
    # and none of that batch's sends yet (seen under load): wait until the topics and the view agree
    def outputs_sent():
        ids = _output_ids(broker.bootstrap)
        sends = (w.view("/ingest/") or {}).get("sends", {})
        return ids if sum(map(len, ids.values())) == sends.get("sent") == sends.get("acked") else None

    before = wait_for(outputs_sent, 60, "every output counted as sent and acknowledged", proc=w)
    assert sum(map(len, before.values())) > 0

    assert w.stop() == "stopped on SIGTERM"
    w2 = start_worker("w1", extra=INGEST, evaluation=False)  # the same data dir
    # one new impression per partition, so that every partition takes a batch (and re-sends its outbox)
    t = max(r.ts for r in records) + 1.0
    fresh, i = {}, 0
    while len(fresh) < 4:
        raw = orjson.dumps({"type": "impression", "id": f"after-{i}", "ts": t, "user": "u-new", "ad": "a",
                            "campaign": "c", "vertical": "feed"})
        fresh.setdefault(route_of(raw, 4)[1], raw)
        i += 1
    asyncio.run(replay(broker.bootstrap, order_records(fresh.values()), 4, end_of_log=False, progress=False))
    view2 = wait_for(lambda: settled(w2, len(records) + 4, 0), 120, "the new events", proc=w2)
    assert view2["sends"]["resent"] == 0, "acknowledged outputs came back after the restart"
    after = _output_ids(broker.bootstrap)
    for topic in OUTPUTS:
        assert len(after[topic]) == len(set(after[topic])), f"{topic}: an output was sent twice"
        assert set(before[topic]) <= set(after[topic])
    assert len(after["audience"]) == len(before["audience"]) + 4
