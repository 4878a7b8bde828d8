"""Ingest and attribution through a real worker on the real broker, against ``loopline evaluate``."""

from __future__ import annotations

import asyncio
import time

import pytest

from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import collect_results, replay

INGEST = ("--role", "ingest")  # these tests check the join; the models' roles would only add load

pytestmark = pytest.mark.integration

COMPARED = ("events", "examples")


def _compare(broker_side: dict, in_process: dict) -> None:
    for section in COMPARED:
        assert broker_side[section] == in_process[section], section


@pytest.fixture(scope="module")
def generated_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "events.jsonl"
    summary = write_log(GenerateConfig(users=600, days=6, seed=7, malformed=0.02), str(path))
    records = read_log(str(path))
    assert len(records) >= 10_000, f"the log should have >= 10,000 events, has {len(records)}"
    assert sum(summary["malformed"].values()) > 50
    return records


def test_worker_counts_match_evaluate_on_generated_log(broker, start_worker, generated_log):
    expected = evaluate_records(generated_log, partitions=4)
    assert expected["events"]["deadletter"] > 50 and expected["examples"]["positive"] > 0
    start_worker(extra=INGEST)
    sent = asyncio.run(replay(broker.bootstrap, generated_log, 4, progress=False))
    got = asyncio.run(collect_results(broker.bootstrap, 4, sent["run_id"], len(generated_log), timeout=240))
    _compare(got, expected)
    assert got["attribution"] == expected["attribution"]
    assert got["duplicates_removed"] == {"examples": 0, "deadletter": 0}


def test_kill9_midway_and_restart_gives_the_same_counts(broker, start_worker, generated_log):
    expected = evaluate_records(generated_log, partitions=4)
    w = start_worker("w1", extra=INGEST)
    asyncio.run(replay(broker.bootstrap, generated_log, 4, end_of_log=False, progress=False))
    deadline = time.monotonic() + 120
    while w.processed() < len(generated_log) // 3:  # let it get part of the way
        assert time.monotonic() < deadline, w.tail()
        time.sleep(0.05)
    done_before_kill = w.processed()
    w.kill9()
    assert done_before_kill < len(generated_log), "the worker finished before it could be killed"
    w2 = start_worker("w1", extra=INGEST)  # same data dir: local RocksDB state plus the changelog
    sent = asyncio.run(_end_of_log(broker.bootstrap, 4))
    got = asyncio.run(collect_results(broker.bootstrap, 4, sent, len(generated_log), timeout=240))
    _compare(got, expected)
    assert w2.proc.poll() is None
    # at-least-once: whatever was delivered twice is removed, and reported
    assert set(got["duplicates_removed"]) == {"examples", "deadletter"}


async def _end_of_log(bootstrap: str, partitions: int) -> str:
    from aiokafka import AIOKafkaProducer
    from loopline.ops.replay import send_end_of_log
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        await send_end_of_log(p, partitions, "after-restart")
    finally:
        await p.stop()
    return "after-restart"
