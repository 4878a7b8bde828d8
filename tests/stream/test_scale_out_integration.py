"""Scale-out of the stream roles (issue 15, item 3) on the real broker: three ingest workers and two
reach workers, each role one consumer group. The partitions split among the members; one ingest member
leaves mid-replay and rejoins; the fm ends with ``evaluate``'s numbers, and the two reach workers
together hold every partition once and count every impression once."""

from __future__ import annotations

import asyncio
import time

import pytest

from loopline.ops.evaluate import evaluate_records, ingest_outputs
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.state.quality_counts import QualityCounts
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 6  # two per ingest member, three per reach member
INGEST = ("--role", "ingest")
REACH = ("--role", "reach", "--reach-budget-users", "240")


def test_three_ingest_and_two_reach_workers_split_the_partitions_and_end_with_evaluates_numbers(
        broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=400, days=1.5, seed=13, malformed=0.01), str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, PARTITIONS, models=True)
    offline = QualityCounts({})  # what reach counts: the impressions among ingest's audience outputs
    for o in ingest_outputs(records, PARTITIONS, audience=True):
        if o.kind == "audience":
            offline.learn_one(o.value)
    impressions = offline.agg["impression_events"]
    assert impressions > 1000

    ings = [start_worker(f"ing{i}", partitions=PARTITIONS, extra=INGEST) for i in range(3)]
    fm = start_worker("fm", partitions=PARTITIONS, ready=False, extra=("--role", "fm"))
    reach = [start_worker(f"r{i}", partitions=PARTITIONS, ready=False, extra=REACH) for i in range(2)]

    def send(part) -> None:
        asyncio.run(replay(broker.bootstrap, part, PARTITIONS, end_of_log=False, progress=False))

    # the log in small pieces until every member has read some: the group settles while it runs (a member
    # that joined late would otherwise find the first members done with everything sent)
    sent, piece, deadline = 0, len(records) // 20, time.monotonic() + 120
    while not all(w.processed() > 0 for w in ings):
        assert time.monotonic() < deadline, f"not all three ingest members read: {[w.processed() for w in ings]}"
        if sent < len(records) // 2:
            send(records[sent:sent + piece])
            sent += piece
        time.sleep(1.0)
    assert ings[2].stop() == "stopped on SIGTERM"  # a member leaves mid-replay: its partitions move
    middle = sent + (len(records) - sent) // 2
    send(records[sent:middle])
    ings[2] = start_worker("ing2", partitions=PARTITIONS, extra=INGEST)  # and rejoins, from its offsets
    asyncio.run(replay(broker.bootstrap, records[middle:], PARTITIONS, progress=False))

    got = wait_for(lambda: (v := fm.view("/fm/") or {}).get("finished") and v, 300, "the fm to finish", proc=fm)
    assert got["models"] == expected["models"]
    assert got["counts"]["examples"] == expected["examples"]["total"]

    def reach_complete():
        views = [w.view("/reach") for w in reach]
        if not all(views):
            return None
        held = [set(v["partitions"]) for v in views]
        counted = sum(v["stats"].get("impressions", 0) for v in views)
        return views if held[0] | held[1] == set(range(PARTITIONS)) and counted == impressions else None
    views = wait_for(reach_complete, 120, "the two reach workers to count every impression", proc=reach[0])
    held = [set(v["partitions"]) for v in views]
    assert held[0] and held[1] and not held[0] & held[1]  # the group split the partitions, none twice
