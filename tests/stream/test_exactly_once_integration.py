"""Exactly-once effects over at-least-once delivery, through real workers on the real broker: an ingest
worker killed mid-replay, a second ingest member joining and leaving (two rebalances), and copies of
already-delivered examples and audience values re-sent on purpose. The fm trains each example once and
ends with ``evaluate``'s numbers; reach and quality count each impression once."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer

from loopline.ops.evaluate import evaluate_records, ingest_outputs
from loopline.ops.eventlog import read_log
from loopline.ops.generate import QUALITY_SOURCES, GenerateConfig, write_log
from loopline.ops.replay import read_topic, replay
from loopline.state.quality_counts import QualityCounts, merge_aggregates
from loopline.stream.app import control_of
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

REACH = ("--role", "reach", "--reach-budget-users", "240")


async def resend(bootstrap: str, topic: str, n: int) -> int:
    """Produce copies of the first ``n`` data messages of ``topic`` again (same key, same partition),
    as an outbox re-send after a crash would."""
    msgs = [m for m in await read_topic(bootstrap, topic, 4) if control_of(m.headers) is None][:n]
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await prod.start()
    try:
        for m in msgs:
            await prod.send(topic, m.value, key=m.key, partition=m.partition)
        await prod.flush()
    finally:
        await prod.stop()
    return len(msgs)


def test_kills_rebalances_and_re_sends_leave_every_effect_exactly_once(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=600, days=3, seed=11, malformed=0.01, quality_sources=QUALITY_SOURCES),
              str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, models=True)
    total = expected["examples"]["total"]
    offline_quality = QualityCounts({})
    for o in ingest_outputs(records, 4, audience=True):
        if o.kind == "audience":
            offline_quality.learn_one(o.value)

    ing = start_worker("ing", extra=("--role", "ingest"))
    fm = start_worker("fm", ready=False, extra=("--role", "fm"))
    rq = start_worker("rq", ready=False, extra=REACH)
    half = len(records) // 2
    asyncio.run(replay(broker.bootstrap, records[:half], 4, end_of_log=False, progress=False))
    wait_for(lambda: ing.processed() >= half // 3 or None, 120, "ingest to get going", proc=ing)
    ing.kill9()  # mid-batch: its outbox re-sends what it had not seen acknowledged
    ing = start_worker("ing", extra=("--role", "ingest"))
    ing2 = start_worker("ing2", extra=("--role", "ingest"))  # a rebalance
    wait_for(lambda: ing.processed() + ing2.processed() >= half or None, 180, "the first half", proc=ing)
    # re-sends of outputs already delivered and consumed: every consumer must drop them by id
    resent_examples = asyncio.run(resend(broker.bootstrap, "examples", 300))
    resent_audience = asyncio.run(resend(broker.bootstrap, "audience", 300))
    assert resent_examples == 300 and resent_audience == 300
    asyncio.run(replay(broker.bootstrap, records[half:], 4, progress=False))
    assert ing2.stop() == "stopped on SIGTERM"  # another rebalance, mid-stream

    got = wait_for(lambda: (v := fm.view("/fm/") or {}).get("finished") and v, 300, "the fm to finish", proc=fm)
    assert got["models"] == expected["models"]
    assert got["counts"]["examples"] == total  # each distinct example id trained once
    assert got["dedup"]["repeats"] >= resent_examples

    def quality_done():
        parts = (rq.view("/quality?fit=0") or {}).get("partitions", {})
        agg = merge_aggregates(parts.values()) if len(parts) == 4 else None
        return agg if agg and agg["impression_events"] == offline_quality.agg["impression_events"] else None
    agg = wait_for(quality_done, 120, "quality to count every impression", proc=rq)
    assert agg["impressions"] == offline_quality.agg["impressions"]
    assert agg["pairs"] == offline_quality.agg["pairs"]
    assert agg["impression_repeats"] >= 1

    # reach: every accepted impression applied once (its sample is order-dependent, so the answer
    # through ingest's interleaving is not compared with the offline pass here)
    impressions = offline_quality.agg["impression_events"]
    stats = wait_for(lambda: (s := (rq.view("/reach") or {}).get("stats", {})).get("impressions") == impressions
                     and s or None, 60, "reach to apply every impression once", proc=rq)
    assert stats["impression_repeats"] >= 1
