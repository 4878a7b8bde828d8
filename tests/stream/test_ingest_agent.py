"""The ingest agent in Faust's test context (memory store): the same outputs as the core; control
messages only in an evaluation worker; tombstones; the outbox after acknowledgements."""

import asyncio

import orjson

from loopline.state.ingest import IngestCore
from loopline.stream.app import CONTROL_HEADER, WorkerConfig, build_app
from loopline.stream.ingest import route_of


class Recorder:
    """Stands in for an output topic inside test_context; the integration tests use the real ones."""

    def __init__(self):
        self.sent = []

    async def send(self, key=None, value=None, partition=None, headers=None):
        self.sent.append((key, value) if headers is None else ("control", partition, headers))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)  # delivered
        return fut


def line(**kw):
    base = {"type": "impression", "id": "i3", "ts": 100.0, "user": "u1", "ad": "a", "campaign": "c",
            "vertical": "feed"}
    base.update(kw)
    return orjson.dumps(base)


def ingest_app(tmp_path, evaluation=True):
    app = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), partitions=2, role="ingest",
                                 evaluation=evaluation))
    sinks = {name: Recorder() for name in ("examples", "deadletter", "ingest.status", "history.events", "audience")}
    app.loopline_topics.update(sinks)
    return app, sinks


def test_the_ids_used_here_live_in_partition_1():  # elsewhere the agent would forward them (integration)
    assert {route_of(line(id=i), 2)[1] for i in ("i2", "i3", "i4")} == {1}


async def test_agent_labels_dead_letters_and_closes_at_end_of_log(tmp_path):
    app, sinks = ingest_app(tmp_path)
    agent = app.agents["ingest"]
    async with agent.test_context() as ag:
        await ag.put(line(), key=b"i3", partition=1)
        await ag.put(line(id="i2", user="u2", ts=101.0), key=b"i2", partition=1)
        await ag.put(orjson.dumps({"type": "conversion", "id": "v1", "ts": 150.0, "impression": "i3",
                                   "kind": "click"}), key=b"i3", partition=1)
        await ag.put(b'{"type":"impression","id":', key=None, partition=1)
        await ag.put(b"", partition=1, headers=[(CONTROL_HEADER, b"end_of_log:t1")])
    examples = {v[1]["id"]: (v[0], v[1]["label"]) for v in sinks["examples"].sent if v[0] != "control"}
    assert examples == {"i3": ("u1", 1), "i2": ("u2", 0)}
    assert [v["reason"] for _, v in sinks["deadletter"].sent] == ["bad_json"]
    # reach and quality read every accepted impression from `audience`, keyed by user
    assert [(k, v["type"], v["campaign"]) for k, v in sinks["audience"].sent] == [("u1", "impression", "c"),
                                                                                  ("u2", "impression", "c")]
    # the fm role's inputs: impressions at event time, then this partition's end of log on every partition
    history = [v for v in sinks["history.events"].sent if v[0] != "control"]
    assert [(k, v[4], v[5]) for k, v in history] == [("u1", "impression", "i3"), ("u2", "impression", "i2")]
    controls = [v for v in sinks["history.events"].sent if v[0] == "control"]
    assert sorted(q for _, q, _ in controls) == [0, 1]
    assert all(h == [(CONTROL_HEADER, b"end_of_log:1")] for _, _, h in controls)
    [(_, status)] = sinks["ingest.status"].sent
    assert status["partition"] == 1 and status["control"] == "end_of_log:t1"
    assert status["counts"]["read"] == 4 and status["counts"]["attribution"]["closed_at_end"] == 1


async def test_a_worker_not_started_for_evaluation_ignores_end_of_log(tmp_path):
    """Anyone who can write to `events` could otherwise close every window of a partition."""
    app, sinks = ingest_app(tmp_path, evaluation=False)
    async with app.agents["ingest"].test_context() as ag:
        await ag.put(line(), key=b"i3", partition=1)
        await ag.put(b"", partition=1, headers=[(CONTROL_HEADER, b"end_of_log:t1")])
        await ag.put(b"", partition=1, headers=[(CONTROL_HEADER, b"no_such_mark")])
    # the window stays open: no example, no end-of-log status, and only watermarks to the fm role
    assert [v for v in sinks["examples"].sent if v[0] != "control"] == [] and sinks["ingest.status"].sent == []
    marks = {v[2][0][1] for name in ("examples", "history.events") for v in sinks[name].sent if v[0] == "control"}
    assert marks and all(m.startswith(b"watermark:") for m in marks), marks


async def test_a_tombstone_is_dead_lettered_not_a_crash(tmp_path):
    app, sinks = ingest_app(tmp_path)
    async with app.agents["ingest"].test_context() as ag:
        await ag.put(None, key=b"i3", partition=1)
        await ag.put(line(), key=b"i3", partition=1)
    [(_, dl)] = sinks["deadletter"].sent
    assert dl["reason"] == "not_object" and "tombstone" in dl["detail"] and dl["src"] == [1, 0]
    assert [v["id"] for _, v in sinks["audience"].sent] == ["i3"]  # and the stream goes on


async def test_acknowledged_outputs_leave_the_stored_outbox_with_their_batch(tmp_path):
    """A rebalance or restart re-reads the outbox from the table: it must not hold what was delivered."""
    app, sinks = ingest_app(tmp_path)
    table = app.tables["attribution"]
    async with app.agents["ingest"].test_context() as ag:
        for i, ident in enumerate(("i2", "i3", "i4")):
            await ag.put(line(id=ident, user=f"u{i}", ts=100.0 + i), key=ident.encode(), partition=1)
    assert len(sinks["audience"].sent) == 3  # delivered (the recorder's futures are done)
    assert IngestCore(table, 1).unacked() == [], "acknowledged outputs are still in the outbox"
    assert table.get("1|o") == {"chunks": [], "next": 1}  # the index: its one chunk deleted
