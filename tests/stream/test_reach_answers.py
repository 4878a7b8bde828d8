"""The reach.answers table stays bounded: a partition deletes its answers past a time-to-live and past a
count before answering (the reach-queries agent in Faust's test context, on the real broker)."""

import asyncio
import time

import orjson
import pytest

from loopline.ops.broker import create_topics
from loopline.state.reach import ReachConfig
from loopline.stream.app import TOPICS, WorkerConfig, build_app

pytestmark = pytest.mark.integration


async def _app(broker, tmp_path, **reach):
    await asyncio.to_thread(create_topics, broker.bootstrap, {t: 2 for t in TOPICS})
    cfg = WorkerConfig(broker=broker.bootstrap, store="memory://", data_dir=str(tmp_path), partitions=2,
                       role="reach", reach=ReachConfig(**reach))
    return build_app(cfg)


async def _answered(table, qid, timeout=30.0):
    """Wait until the agent has written ``qid`` (a put returns once the agent took the event)."""
    deadline = time.monotonic() + timeout
    while qid not in table:
        assert time.monotonic() < deadline, f"{qid} was never answered"
        await asyncio.sleep(0.05)


def _shares(table, p):
    return sorted(k for k, v in list(table.items()) if isinstance(v, dict) and v.get("partition") == p)


async def test_answers_past_the_count_are_deleted_oldest_first(broker, tmp_path):
    app = await _app(broker, tmp_path, max_answers=3)
    table = app.tables["reach.answers"]
    async with app.agents["reach-queries"].test_context() as ag:
        for i in range(10):
            await ag.put(orjson.dumps({"id": f"q{i}", "q": "age = 18-24"}), key=f"q{i}".encode(), partition=0)
        await ag.put(orjson.dumps({"id": "other", "q": "*"}), key=b"other", partition=1)
        await _answered(table, "q9")
        await _answered(table, "other")
    assert _shares(table, 0) == ["q7", "q8", "q9"]  # today: all ten stay for good
    assert _shares(table, 1) == ["other"] and "stats" in table["q9"]


async def test_answers_past_their_time_to_live_are_deleted(broker, tmp_path):
    app = await _app(broker, tmp_path, answers_ttl_s=0.5)
    table = app.tables["reach.answers"]
    async with app.agents["reach-queries"].test_context() as ag:
        for i in range(3):
            await ag.put(orjson.dumps({"id": f"old{i}", "q": "*"}), key=b"k", partition=0)
        await _answered(table, "old2")
        await asyncio.sleep(0.6)
        await ag.put(orjson.dumps({"id": "new", "q": "*"}), key=b"k", partition=0)
        await _answered(table, "new")
    assert _shares(table, 0) == ["new"]
    assert table["new"]["answered_at"] <= time.time()


async def test_a_topic_query_is_counted_off_the_event_loop(broker, tmp_path, monkeypatch):
    """Freezing a fresh sample and counting it took seconds on a live vocabulary (the soak): the agent
    hands it to the reach thread and only awaits it."""
    import threading

    from loopline.stream import reach as reach_role

    threads = []
    real = reach_role.query_stats
    monkeypatch.setattr(reach_role, "query_stats",
                        lambda *a, **k: threads.append(threading.current_thread()) or real(*a, **k))
    app = await _app(broker, tmp_path)
    table = app.tables["reach.answers"]
    async with app.agents["reach-queries"].test_context() as ag:
        await ag.put(orjson.dumps({"id": "q", "q": "*"}), key=b"q", partition=0)
        await _answered(table, "q")
    assert threads and all(t is not threading.main_thread() for t in threads), threads
    assert "stats" in table["q"]
