"""What standard Kafka producers send, through a role ``ingest`` worker on the real broker: a second
client library (confluent-kafka, i.e. librdkafka, test-only) under every compression codec, with headers,
keys of any bytes, a tombstone (a dead letter), an idempotent and a transactional producer (Tansu
supports both, and drops aborted transactions); an unkeyed producer's events, and events placed by
librdkafka's own partitioner, are re-keyed inside and join as in ``loopline evaluate``."""

from __future__ import annotations

import asyncio

import orjson
import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")  # test-only; scripts/setup.sh installs it

from loopline.ops.evaluate import evaluate_records  # noqa: E402
from loopline.ops.eventlog import order_records, read_log  # noqa: E402
from loopline.ops.generate import GenerateConfig, write_log  # noqa: E402
from loopline.ops.replay import collect_results, send_end_of_log  # noqa: E402
from loopline.stream.app import read_topic  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

pytestmark = pytest.mark.integration

INGEST = ("--role", "ingest")
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def test_aiokafka_has_every_codec():
    """aiokafka 0.14 decodes snappy, lz4 and zstd with cramjam; without it a batch kills the worker."""
    from aiokafka import codec
    assert codec.has_gzip() and codec.has_snappy() and codec.has_lz4() and codec.has_zstd()


def _producer(broker, **conf):
    return confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, **conf})


async def _end_of_log(bootstrap: str, run_id: str) -> None:
    from aiokafka import AIOKafkaProducer
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        await send_end_of_log(p, 4, run_id)
    finally:
        await p.stop()


def _burst(n: int, t0: float) -> list[bytes]:
    """Impressions and conversions within 50 s of event time (inside the join's 60 s lateness), so the
    labels cannot depend on arrival order: every 3rd impression is clicked, every 7th has a conversion
    that comes before it, and a few conversions name impressions that never come (orphans)."""
    lines = []
    for i in range(n):
        ts = t0 + 40.0 * i / n
        lines.append({"type": "impression", "id": f"imp-{i}", "ts": ts, "user": f"u{i % 17}", "ad": f"a{i % 5}",
                      "campaign": f"c{i % 3}", "vertical": "feed"})
        if i % 3 == 0:
            lines.append({"type": "conversion", "id": f"clk-{i}", "ts": ts + 5.0, "impression": f"imp-{i}",
                          "kind": "click"})
        if i % 7 == 0:
            lines.append({"type": "conversion", "id": f"early-{i}", "ts": ts - 3.0, "impression": f"imp-{i}",
                          "kind": "click"})
    lines += [{"type": "conversion", "id": f"lost-{k}", "ts": t0 + 45.0, "impression": f"nowhere-{k}", "kind": "click"}
              for k in range(3)]
    return [orjson.dumps(x) for x in lines]


def test_standard_producers_give_evaluates_counts(broker, start_worker, tmp_path):
    """One log, sent by librdkafka producers of every kind, then a burst from an unkeyed producer and a
    keyed one with librdkafka's own partitioner: the worker's counts are ``evaluate``'s for the whole."""
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=60, days=2, seed=3, malformed=0.03), str(path))
    logged = list(read_log(str(path)))
    burst = order_records(_burst(300, max(r.ts for r in logged) + 3 * 86400.0))
    expected = evaluate_records(order_records([r.raw for r in logged + burst]), partitions=4)
    clicked = sum(1 for i in range(300) if i % 3 == 0 or i % 7 == 0)
    assert expected["examples"]["positive"] > clicked and expected["events"]["deadletter"] > 0
    w = start_worker(extra=INGEST)

    # 1. Java's default partitioner (murmur2 of the key), as the README asks, under every codec and
    # producer kind; lines that are not part of the join (malformed ones here) carry keys of arbitrary
    # bytes, NUL and 0xff included
    kinds = [{"compression.type": c, "partitioner": "murmur2_random"} for c in CODECS]
    kinds += [{"enable.idempotence": True, "partitioner": "murmur2_random", "compression.type": "lz4"},
              {"transactional.id": "loopline-test", "partitioner": "murmur2_random", "compression.type": "zstd"}]
    cuts = [len(logged) * k // len(kinds) for k in range(len(kinds) + 1)]
    chunks = [logged[a:b] for a, b in zip(cuts, cuts[1:])]  # in event-time order, one producer after another
    for n, (conf, chunk) in enumerate(zip(kinds, chunks)):
        p = _producer(broker, **conf)
        tx = "transactional.id" in conf
        if tx:
            p.init_transactions(20)
            p.begin_transaction()
        for i, rec in enumerate(chunk):
            key = rec.key if rec.key is not None else bytes([0, 255, n, i % 256])
            p.produce("events", value=rec.raw, key=key, headers=[("producer", str(n).encode()), ("x-empty", b"")])
        if tx:
            p.commit_transaction(20)
            p.begin_transaction()  # an aborted transaction is never read
            p.produce("events", key=b"aborted", value=b'{"type":"impression","id":"aborted"}')
            p.abort_transaction(20)
        assert p.flush(20) == 0, conf
    tomb = _producer(broker)
    tomb.produce("events", key=b"\x00tombstone", value=None)
    assert tomb.flush(20) == 0
    wait_for(lambda: w.processed() >= len(logged) + 1, 120, "the log processed", proc=w)
    assert w.view("/ingest/")["forwarded"] == {"out": 0, "in": 0}  # keyed as the README says: nothing to re-key

    # 2. The burst: half unkeyed (librdkafka's sticky partitioner puts whole batches on one partition),
    # half keyed by impression id but placed by librdkafka's default CRC32 partitioner, not murmur2
    unkeyed = _producer(broker, **{"compression.type": "lz4"})
    crc = _producer(broker)
    for i, rec in enumerate(burst):
        if i % 2:
            unkeyed.produce("events", value=rec.raw)
        else:
            crc.produce("events", value=rec.raw, key=rec.key)
    assert unkeyed.flush(20) == 0 and crc.flush(20) == 0

    def at_home():
        v = w.view("/ingest/") or {}  # one answer for every figure (a second call may be fresher)
        fw = v.get("forwarded", {})
        read = sum(c["read"] + c["redelivered"] for k, c in v.items() if k.isdigit())
        return v if fw.get("in") and fw["in"] == fw["out"] and read == len(logged) + 1 + len(burst) else None

    view = wait_for(at_home, 120, "every event processed at home", proc=w)
    assert len(burst) // 3 < view["forwarded"]["out"] <= len(burst)  # most landed away from home; none of the log

    asyncio.run(_end_of_log(broker.bootstrap, "compat"))
    got = asyncio.run(collect_results(broker.bootstrap, 4, "compat", len(logged) + 1 + len(burst), timeout=120))
    assert w.proc.poll() is None, w.tail()
    # the tombstone: a dead letter with a reason (state/events.py: not_object, "no value (a tombstone)");
    # re-keyed events are processed once: no duplicate dead letters
    by_reason = dict(expected["events"]["by_reason"])
    by_reason["not_object"] = by_reason.get("not_object", 0) + 1
    assert got["events"]["by_reason"] == by_reason
    assert got["examples"] == expected["examples"]
    assert got["attribution"] == expected["attribution"]  # orphans: only the burst's 3 without an impression
    assert got["duplicates_removed"] == {"examples": 0, "deadletter": 0}
    # the forwarded copies carry their origin
    forwards = [m for m in asyncio.run(read_topic(broker.bootstrap, "events", 4))
                if any(k == "loopline-forwarded" for k, _ in (m.headers or ()))]
    assert len(forwards) == view["forwarded"]["out"]
