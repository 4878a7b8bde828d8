"""Broker resets are never silent (stream/broker_watch.py): the embedded broker restarted under a running
worker makes it stop loudly with its state kept; with ``--on-broker-reset reset`` a restart starts over
and counts the new stream exactly as ``evaluate`` does."""

from __future__ import annotations

import asyncio
import os

import pytest

from loopline.ops.broker import EmbeddedBroker, create_topics
from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import collect_results, replay
from loopline.ops.worker import WorkerProcess
from loopline.stream.app import TOPICS
from loopline.stream.broker_watch import EXIT_BROKER_RESET, IDENTITY_FILE, BrokerWatch
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

INGEST = ("--role", "ingest")


def test_the_comparison_names_the_sign_of_a_reset():
    same = {"cluster_id": "c1"}
    assert BrokerWatch.compare(None, same, {"events/0": 10}, {"events/0": 10}) is None
    assert "cluster id changed" in BrokerWatch.compare(same, {"cluster_id": "c2"}, {}, {})
    assert "events/1 ends at offset 3" in BrokerWatch.compare(same, same, {"events/1": 500}, {"events/1": 3})
    assert BrokerWatch.compare(same, same, {"events/1": 500}, {"events/1": 3}, slack=1000) is None


def test_a_broker_restart_stops_the_worker_loudly_and_reset_starts_over(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_log(GenerateConfig(users=300, days=1, seed=21), str(first))
    write_log(GenerateConfig(users=300, days=1, seed=22), str(second))
    recs_a, recs_b = read_log(str(first)), read_log(str(second))
    broker = EmbeddedBroker(log_path=str(tmp_path / "tansu.log")).start()
    workers = []
    try:
        create_topics(broker.bootstrap, {t: 4 for t in TOPICS})
        data = str(tmp_path / "ing")
        w = WorkerProcess(broker.url, data, extra=INGEST).start()
        workers.append(w)
        w.wait_ready()
        asyncio.run(replay(broker.bootstrap, recs_a, 4, end_of_log=False, progress=False))
        wait_for(lambda: w.processed() >= len(recs_a) or None, 120, "the first log", proc=w)
        recorded = BrokerWatch(broker.bootstrap, data).recorded()
        assert recorded and recorded["cluster_id"].startswith("loopline-")

        broker.stop()  # everything the broker held is gone; the worker's RocksDB still has its offsets
        broker = EmbeddedBroker(port=broker.port, log_path=str(tmp_path / "tansu2.log")).start()
        create_topics(broker.bootstrap, {t: 4 for t in TOPICS})
        assert w.proc.wait(60) == EXIT_BROKER_RESET
        assert "broker reset detected: the broker's cluster id changed" in w.tail()
        assert os.path.exists(os.path.join(data, IDENTITY_FILE)) and len(os.listdir(data)) > 1  # state kept

        again = WorkerProcess(broker.url, data, extra=INGEST).start()  # the default policy stops again
        workers.append(again)
        assert again.proc.wait(60) == EXIT_BROKER_RESET

        fresh = WorkerProcess(broker.url, data, extra=(*INGEST, "--on-broker-reset", "reset")).start()
        workers.append(fresh)
        fresh.wait_ready()
        sent = asyncio.run(replay(broker.bootstrap, recs_b, 4, progress=False))
        got = asyncio.run(collect_results(broker.bootstrap, 4, sent["run_id"], len(recs_b), timeout=120))
        expected = evaluate_records(recs_b, models=False)
        assert got["events"] == expected["events"]
        assert got["examples"] == expected["examples"]
        assert "discarding this worker's state" in fresh.tail()
    finally:
        for w in workers:
            w.stop()
        broker.stop()
