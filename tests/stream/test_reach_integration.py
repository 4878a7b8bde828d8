"""The reach role against a real broker and real worker processes: the fan-out answer equals the offline
sample's, the stream table gives the same, a dead worker gives a partial answer within the timeout,
and the answer recovers once the partitions are rebuilt elsewhere."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from loopline.ops.generate import QUALITY_SOURCES, GenerateConfig, write_log
from loopline.ops.reach import ask_stream, ask_workers, samples_from_log
from loopline.state.ingest import IngestCore
from loopline.state.reach import ReachConfig, Sample, answer
from loopline.ops.eventlog import partition_for, read_log

pytestmark = pytest.mark.integration

QUERY = "gender = F and not geo = US-CA"
SEG_QUERY = "seg.s_good.auto_intender = yes and gender = F"
REACH = ("--role", "reach", "--reach-budget-users", "240", "--reach-epoch", "86400", "--reach-horizon", "7")


def audience_values(path: str, partitions: int) -> list[bytes]:
    """The audience messages ingest would write for this log, in log order."""
    import orjson
    cores = [IngestCore({}, p, audience=True) for p in range(partitions)]
    offsets = [0] * partitions
    out = []
    for rec in read_log(path):
        p = partition_for(rec.key, rec.raw, partitions)
        outs = cores[p].handle(rec.raw, offsets[p])
        offsets[p] += 1
        out += [(o.key, orjson.dumps(o.value)) for o in outs if o.kind == "audience"]
    return out


async def produce(bootstrap: str, values) -> None:
    prod = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await prod.start()
    try:
        for key, value in values:
            await prod.send("audience", value, key=key.encode())
        await prod.flush()
    finally:
        await prod.stop()


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last is not None:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_fan_out_partial_answer_and_recovery(broker, start_worker, tmp_path):
    log = str(tmp_path / "log.jsonl")
    write_log(GenerateConfig(users=500, days=0.8, seed=5, quality_sources=QUALITY_SOURCES), log)
    cfg = ReachConfig(budget_users=240)
    merged = Sample.merge(samples_from_log(log, 4, cfg))
    offline = answer(merged, QUERY, cfg.min_per_stratum)
    offline_seg = answer(merged, SEG_QUERY, cfg.min_per_stratum)
    assert offline_seg["users"] > 0
    assert offline["users"] > 0 and offline["sample_users"] < 400  # really a sample

    w1 = start_worker("r1", ready=False, extra=REACH)
    w2 = start_worker("r2", ready=False, extra=REACH)
    urls = [f"http://127.0.0.1:{w.port}" for w in (w1, w2)]
    asyncio.run(produce(broker.bootstrap, audience_values(log, 4)))

    def complete():
        a = ask_workers(urls, QUERY, timeout=2.0)
        ok = not a["partial"] and a["sample_users"] == offline["sample_users"]
        return a if ok and all(s == "ok" for s in a["workers"].values()) else None
    full = wait_for(complete, 90, "both workers to answer for every partition")
    assert (full["users"], full["impressions"]) == (offline["users"], offline["impressions"])
    assert full["users_ci"] == offline["users_ci"]
    # the model-assisted part too: each worker's partitions learned the same classes from the stream
    assert offline["fallback"] and (full["fallback"], full["fallback_share"]) == (offline["fallback"], offline["fallback_share"])
    # a source's segment label (segment events on the same topic) is a query attribute on the workers too
    seg = wait_for(lambda: (a := ask_workers(urls, SEG_QUERY, timeout=2.0))["users"] == offline_seg["users"] and a
                   or None, 30, "the segment answer")
    assert seg["users_ci"] == offline_seg["users_ci"]

    table = asyncio.run(ask_stream(broker.bootstrap, QUERY, 4, app_id="loopline", timeout=20))
    assert not table["partial"]
    assert (table["users"], table["impressions"]) == (offline["users"], offline["impressions"])

    w2.kill9()
    t0 = time.monotonic()
    part = ask_workers(urls, QUERY, timeout=1.0)
    assert time.monotonic() - t0 < 5.0
    assert part["partial"] and part["workers"][urls[1]] != "ok" and part["missing_partitions"]
    assert part["users"] < full["users"]  # only w1's partitions

    w3 = start_worker("r3", ready=False, extra=REACH)  # the replacement: rebuilds from the topic
    urls3 = [urls[0], f"http://127.0.0.1:{w3.port}"]

    def recovered():
        a = ask_workers(urls3, QUERY, timeout=2.0)
        return a if not a["partial"] and a["sample_users"] == offline["sample_users"] else None
    again = wait_for(recovered, 120, "the answer to recover after the restart")
    assert (again["users"], again["impressions"]) == (offline["users"], offline["impressions"])
