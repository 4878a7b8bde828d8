"""Offsets a consumer skipped are read back from the broker, and the ingest role applies them: a
committed offset ahead of the state loses nothing."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from loopline.ops.broker import create_topics
from loopline.ops.eventlog import read_log
from loopline.ops.evaluate import evaluate_records
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.stream.gaps import GapReader
from loopline.stream.role import Msg, with_skipped
from tests.conftest import wait_for

pytestmark = pytest.mark.integration


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await prod.start()
    try:
        for v in values:
            await prod.send_and_wait(topic, v, partition=0)
    finally:
        await prod.stop()


def test_a_range_of_offsets_comes_back_in_order_and_an_empty_range_costs_nothing(broker):
    create_topics(broker.bootstrap, {"g": 1})
    asyncio.run(_produce(broker.bootstrap, "g", [f"m{i}".encode() for i in range(10)]))

    async def read():
        reader = GapReader(broker.bootstrap, timeout_s=20)
        try:
            mid = [(r.offset, r.value) for r in await reader.read("g", 0, 3, 7)]
            empty = await reader.read("g", 0, 5, 5)
            return mid, empty, dict(reader.counts)
        finally:
            await reader.close()
    mid, empty, counts = asyncio.run(read())
    assert mid == [(i, f"m{i}".encode()) for i in range(3, 7)]
    assert empty == [] and counts == {"ranges": 1, "recovered": 4, "empty_offsets": 0}


def test_a_batch_gets_the_messages_skipped_before_and_between_its_own(broker):
    create_topics(broker.bootstrap, {"g": 1, "h": 1})
    asyncio.run(_produce(broker.bootstrap, "g", [f"m{i}".encode() for i in range(10)]))
    batch = [Msg("g", 0, 5, [], b"m5"), Msg("g", 0, 8, [], b"m8"), Msg("h", 0, 7, [], b"h7")]

    async def fill():
        reader = GapReader(broker.bootstrap, timeout_s=20)
        try:  # g/0 applied up to offset 2; h/0 has no known position: taken as it comes
            return await with_skipped(reader, batch, {"g/0": 2})
        finally:
            await reader.close()
    got = asyncio.run(fill())
    assert [(m.topic, m.offset) for m in got] == [("g", i) for i in range(2, 9)] + [("h", 7)]
    assert [m.value for m in got if m.topic == "g"] == [f"m{i}".encode() for i in range(2, 9)]


async def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit ``offsets`` for ``group`` as a consumer that skipped messages would have."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in offsets]
        c.assign(tps)
        await c.commit({tp: OffsetAndMetadata(offsets[tp.partition], "") for tp in tps})
    finally:
        await c.stop()


def test_ingest_applies_offsets_its_consumer_group_committed_without_processing(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=50, days=1, seed=5), str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, partitions=4)
    create_topics(broker.bootstrap, {"events": 4})
    asyncio.run(replay(broker.bootstrap, records, 4, end_of_log=False, progress=False))
    # the group's committed offsets run ahead of any state: five messages of each partition were
    # never processed (what Faust's consumer does when it skips messages around a rebalance)
    asyncio.run(_commit(broker.bootstrap, "loopline-ingest", "events", {p: 5 for p in range(4)}))

    w = start_worker("w", extra=("--role", "ingest"))
    def done():
        v = w.view("/ingest/") or {}
        parts = [v.get(str(p)) for p in range(4)]
        return v if all(parts) and sum(c["read"] + c["redelivered"] for c in parts) == len(records) else None
    view = wait_for(done, 120, "every event processed", proc=w)
    assert view["gaps_read"]["ranges"] == 4 and view["gaps_read"]["recovered"] == 20
    accepted = sum(view[str(p)]["accepted"] for p in range(4))
    assert accepted == expected["events"]["accepted"]


def test_a_role_agent_stops_its_gap_readers_consumer_when_it_stops(broker, tmp_path):
    from loopline.stream.app import WorkerConfig, build_app
    from loopline.stream.role import role_agent
    create_topics(broker.bootstrap, {"g": 1})
    asyncio.run(_produce(broker.bootstrap, "g", [b"m0"]))
    app = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), role="ingest"))
    source = app.topic("gap-close", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=1)
    reader, read = GapReader(broker.bootstrap, timeout_s=20), []

    async def handle(batch):  # a role that reads a range itself, as ingest does
        read.extend(r.value for r in await reader.read("g", 0, 0, 1))

    agent = role_agent(app, "gap-close", source, handle, batch=10, within=0.01, gaps=reader)

    async def run():
        async with agent.test_context() as ag:
            await ag.put(b"v", key=b"k")
            for _ in range(200):
                if read:
                    break
                await asyncio.sleep(0.1)
            consumer = reader._consumer
            assert consumer is not None  # started on first use
        for _ in range(100):  # the agent's task ends after the context
            if consumer._closed:
                break
            await asyncio.sleep(0.05)
        return consumer
    consumer = asyncio.run(run())
    assert read == [b"m0"] and reader._consumer is None and consumer._closed
