"""Outputs sent in per-partition batches (``stream/app.py`` OutputBatch, the fm role's publishing) land
where ``send`` would put them, in the order they were added, through the real broker."""

import asyncio

import orjson
from aiokafka import AIOKafkaProducer

from loopline.ops.broker import create_topics
from loopline.stream.app import CONTROL_HEADER, OutputBatch, read_topic


def test_batched_outputs_land_on_the_default_partitioners_partition_in_order_with_marks_last(broker):
    create_topics(broker.bootstrap, {"batched": 4, "sent": 4})
    keys = [f"u{i % 37}" for i in range(3000)]  # about 45 kB a partition: several batches each

    async def produce():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            out = OutputBatch(producer, {"batched": 4})
            for i, k in enumerate(keys):
                out.add("batched", key=k, value={"i": i, "pad": "x" * 30})
            for q in range(4):
                out.add("batched", partition=q, headers=[(CONTROL_HEADER, b"fmstep:0")])
            futures = await out.send()
            assert len(futures) > 4  # full batches were cut and sent in order
            await asyncio.gather(*futures)
            for i, k in enumerate(keys):
                await producer.send("sent", orjson.dumps({"i": i}), key=k.encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(produce())
    batched = asyncio.run(read_topic(broker.bootstrap, "batched", 4))
    sent = asyncio.run(read_topic(broker.bootstrap, "sent", 4))
    where = {orjson.loads(m.value)["i"]: m.partition for m in sent}
    data = [m for m in batched if not m.headers]
    assert len(data) == len(keys) and all(where[orjson.loads(m.value)["i"]] == m.partition for m in data)
    for q in range(4):
        mine = [m for m in batched if m.partition == q]
        order = [orjson.loads(m.value)["i"] for m in mine[:-1]]
        assert order == sorted(order) and len(order) > 0  # the order they were added in
        assert dict(mine[-1].headers) == {CONTROL_HEADER: b"fmstep:0"} and mine[-1].value == b"null"


def test_a_message_with_neither_key_nor_partition_is_refused_not_sent_to_partition_0():
    import pytest
    with pytest.raises(ValueError, match="batched: a message needs a key or a partition"):
        OutputBatch(None, {"batched": 4}).add("batched", value={"i": 0})
