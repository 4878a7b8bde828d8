"""The fm role through a real worker on the real broker gives the FM numbers of ``loopline evaluate``.
A kill -9 of the fm after a snapshot, and the standby's takeover, are ``loopline chaos`` scenarios
(``kills``, ``corrupt_snapshot``, ``standby``: tests/ops/test_chaos.py)."""

from __future__ import annotations

import asyncio
import shutil
import time

import orjson
import pytest

from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import read_topic, replay
from loopline.state.history import EMBEDDING, HistoryStore
from loopline.stream.app import control_of

from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def test_fm_worker_metrics_and_das_outputs_match_evaluate(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=500, days=3, seed=2, malformed=0.01), str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, models=True)
    assert expected["fm_stage"]["augmented"] > 0
    w = start_worker()
    asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    deadline = time.monotonic() + 300
    while not (w.view("/fm/") or {}).get("finished"):
        assert time.monotonic() < deadline and w.proc.poll() is None, w.tail()
        time.sleep(0.5)
    got = w.view("/fm/")
    assert got["models"] == expected["models"]
    def data(topic):  # without the fmstep marks (the vm role's clock)
        return [m for m in asyncio.run(read_topic(broker.bootstrap, topic, 4)) if control_of(m.headers) is None]
    augmented, embeddings = data("examples.augmented"), data("fm.embeddings")
    assert {orjson.loads(m.value)["id"] for m in data("model.scores")} == \
        {orjson.loads(m.value)["id"] for m in augmented}  # every example has its score row
    assert len(augmented) == expected["fm_stage"]["augmented"]
    assert len(embeddings) == expected["fm_stage"]["embeddings"]

    assert w.stop() == "stopped on SIGTERM"

    # another machine with nothing: it starts over from the topics and ends with the same store
    w2 = start_worker("w2")
    deadline = time.monotonic() + 300
    while not (w2.view("/fm/") or {}).get("finished"):
        assert time.monotonic() < deadline and w2.proc.poll() is None, w2.tail()
        time.sleep(0.5)
    assert w2.view("/fm/")["models"] == expected["models"]
    assert w2.stop() == "stopped on SIGTERM"

    # another machine with the snapshots but no history store rebuilds the store from the topics
    shutil.copytree(tmp_path / "w1" / "fm-snapshots", tmp_path / "w3" / "fm-snapshots")
    w3 = start_worker("w3")
    deadline = time.monotonic() + 120
    while not (w3.view("/fm/") or {}).get("ready"):
        assert time.monotonic() < deadline and w3.proc.poll() is None, w3.tail()
        time.sleep(0.5)
    assert w3.view("/fm/")["rebuilt"]["embeddings"]["appended"] == expected["fm_stage"]["embeddings"]
    assert w3.stop() == "stopped on SIGTERM"
    stores = [HistoryStore(str(tmp_path / w / "fm-history")) for w in ("w1", "w2", "w3")]
    try:
        items = [list(h.raw_items()) for h in stores]
        assert items[0] == items[1] == items[2] and len(list(stores[0].raw_items(EMBEDDING))) > 0
    finally:
        for h in stores:
            h.close()


def test_a_finished_fm_reports_again_when_a_new_runs_marks_and_its_end_come_in_one_batch(broker, start_worker,
                                                                                        tmp_path):
    """After a run's end, ingest's marks of a new log and that log's end can reach the fm in one batch
    (a log whose events were all sent before: nothing but marks). The fm resumes on the first mark below
    the end and announces the new end on ``models.status``; it used to look only at the batch's last
    watermark, stay finished, and leave ``replay --wait`` without the models."""
    from aiokafka import AIOKafkaProducer

    from loopline.stream.app import CONTROL_HEADER, STATUS_TOPIC

    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=60, days=2, seed=3), str(path))
    w = start_worker()
    asyncio.run(replay(broker.bootstrap, read_log(str(path)), 4, progress=False))
    deadline = time.monotonic() + 300
    while not (w.view("/fm/") or {}).get("finished"):
        assert time.monotonic() < deadline and w.proc.poll() is None, w.tail()
        time.sleep(0.5)

    def finished_reports():
        return [m for m in asyncio.run(read_topic(broker.bootstrap, STATUS_TOPIC, 1))
                if orjson.loads(m.value).get("role") == "fm" and orjson.loads(m.value).get("event") == "finished"]
    before = len(finished_reports())
    assert before >= 1

    async def marks_then_end():  # every (topic, partition, ingest partition): a mark, then the end, unawaited
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            sent = []
            for topic in ("history.events", "examples"):
                for q in range(4):
                    for p in range(4):
                        for control in (f"watermark:{p}:{1.0e9!r}", f"end_of_log:{p}"):
                            sent.append(await producer.send(topic, b"", partition=q,
                                                            headers=[(CONTROL_HEADER, control.encode())]))
            await asyncio.gather(*sent)
        finally:
            await producer.stop()
    asyncio.run(marks_then_end())
    deadline = time.monotonic() + 60
    while len(finished_reports()) == before:
        assert time.monotonic() < deadline and w.proc.poll() is None, "no second end announced: " + w.tail()
        time.sleep(0.5)
    assert w.view("/fm/")["finished"]
    assert w.stop() == "stopped on SIGTERM"


def _fm_when(w, *keys: str) -> dict | None:
    """The worker's /fm/ view once every one of ``keys`` is set in it (``finished``, ``restored``), else None."""
    v = w.view("/fm/") or {}
    return v if all(v.get(k) for k in keys) else None


def test_a_two_rank_fm_worker_gives_evaluates_models_and_its_snapshot_resumes_on_one_rank(broker, start_worker,
                                                                                           tmp_path):
    """``worker --fm-ranks 2`` (the worker launches rank 1): the FM numbers of one rank up to float order;
    its snapshot, gathered from the shards, loads into a one-rank worker on another machine."""
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=300, days=3, seed=4), str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, models=True)
    w = start_worker(extra=("--fm-ranks", "2"))
    asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    # (the run's last snapshot comes just after it reports finished)
    got = wait_for(lambda: _fm_when(w, "finished", "snapshot_at"), 300, "the 2-rank fm's last snapshot", proc=w)
    assert got["ranks"] == 2
    assert all(got["counts"][k] == expected["fm_stage"][k] for k in ("examples", "augmented", "embeddings"))
    for name in ("fm", "lr", "das"):
        assert abs(got["models"][name]["auc"] - expected["models"][name]["auc"]) < 0.005, name
    assert w.stop() == "stopped on SIGTERM"
    shutil.copytree(tmp_path / "w1" / "fm-snapshots", tmp_path / "w2" / "fm-snapshots")
    w2 = start_worker("w2")
    resumed = wait_for(lambda: _fm_when(w2, "restored"), 120, "the snapshot to load", proc=w2)
    assert resumed["ranks"] == 1 and resumed["finished"] and resumed["models"] == got["models"]
    assert resumed["snapshot_at"] == got["snapshot_at"] > 0


def test_a_worker_with_a_managed_user_table_gives_evaluates_numbers(broker, start_worker, tmp_path):
    from loopline.model.fm_settings import UserTableConfig
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=300, days=2, seed=6), str(path))
    records = read_log(str(path))
    managed = UserTableConfig("managed", managed_rows=100)
    expected = evaluate_records(records, models=True, user_table=managed)
    w = start_worker(extra=("--embeddings", "managed", "--managed-rows", "100"))
    asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    got = wait_for(lambda: _fm_when(w, "finished"), 300, "the fm to finish", proc=w)
    assert got["models"] == expected["models"]
    tables = {k: v for k, v in got["tables"].items() if k != "mch_bytes"}  # (history buffers: size differs)
    assert tables == {k: v for k, v in expected["fm_stage"]["fm_tables"].items() if k != "mch_bytes"}
    assert tables["evicted"] > 0
