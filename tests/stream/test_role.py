"""The role scaffold (stream/role.py): catch up, then stream; progress in health; offsets fed once;
one Faust agent per role, supervised, through the real app (memory store)."""

from __future__ import annotations

import asyncio

from loopline.stream.app import WorkerConfig, build_app
from loopline.stream.role import Fed, Msg, by_partition, role_agent, run_role
from loopline.stream.supervise import Health


async def _batches(items):
    for b in items:
        await asyncio.sleep(0)
        yield b


async def test_a_role_is_ready_only_after_its_catch_up_and_counts_each_nonempty_batch():
    health, seen = Health(["r"], stall_s=60), []

    async def start():
        assert not health.report()["ready"]  # still catching up
        assert health.report()["roles"]["r"]["busy_s"] is not None
        seen.append("start")

    async def handle(batch):
        assert health.report()["roles"]["r"]["busy_s"] is not None  # inside a batch: busy
        seen.append(batch)

    await run_role("r", health, _batches([[1], [], [2, 3]]), handle, start=start)
    assert seen == ["start", [1], [2, 3]]
    report = health.report()
    assert report["ready"] and report["roles"]["r"]["batches"] == 3  # the catch-up and two batches
    assert report["roles"]["r"]["busy_s"] is None


async def test_a_batch_that_never_ends_makes_the_role_stalled():
    health = Health(["r"], stall_s=0.05)

    async def handle(batch):
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(run_role("r", health, _batches([[1]]), handle))
    await asyncio.sleep(0.2)
    try:
        assert not health.report()["live"] and health.report()["roles"]["r"]["stalled"]
    finally:
        task.cancel()


def test_offsets_are_fed_once_per_partition_and_resume_from_positions():
    fed = Fed({"t/0": 3})
    msgs = [Msg("t", 0, o, [], b"") for o in (1, 3, 4, 4)] + [Msg("t", 1, 0, [], b"")]
    assert [(m.partition, m.offset) for m in fed.take(msgs)] == [(0, 3), (0, 4), (1, 0)]
    assert fed.positions() == {"t/0": 5, "t/1": 1}
    assert fed.fed("t", 0, 4) and not fed.fed("t", 0, 5)
    assert fed.take(msgs) == []  # a redelivery of the whole batch
    assert list(by_partition(msgs)) == [0, 1]


async def test_role_agent_registers_one_supervised_agent_that_catches_up_first(tmp_path):
    cfg = WorkerConfig(store="memory://", data_dir=str(tmp_path), role="ingest")
    app = build_app(cfg)
    source = app.topic("role-test", key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw", partitions=cfg.partitions)
    got = []

    async def start():
        got.append("caught up")

    async def handle(batch):
        got.extend((m.partition, m.value) for m in batch)

    agent = role_agent(app, "role-test", source, handle, batch=10, within=0.01, start=start, msgs=True)
    assert app.agents["role-test"] is agent and "role-test" in app.loopline_health.roles
    async with agent.test_context() as ag:
        await ag.put(b"v1", key=b"k")
        await asyncio.sleep(0.1)
    assert got[0] == "caught up" and (0, b"v1") in got[1:]
