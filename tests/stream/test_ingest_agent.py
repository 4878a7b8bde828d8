"""The ingest agent in Faust's test context (memory store): the same outputs as the core."""

import asyncio

import orjson

from loopline.stream.app import CONTROL_HEADER, WorkerConfig, build_app


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
    base = {"type": "impression", "id": "i1", "ts": 100.0, "user": "u1", "ad": "a", "campaign": "c",
            "vertical": "feed"}
    base.update(kw)
    return orjson.dumps(base)


async def test_agent_labels_dead_letters_and_closes_at_end_of_log(tmp_path):
    app = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), partitions=2, role="ingest"))
    sinks = {name: Recorder() for name in ("examples", "deadletter", "ingest.status", "history.events", "audience")}
    app.loopline_topics.update(sinks)
    agent = app.agents["ingest"]
    async with agent.test_context() as ag:
        await ag.put(line(), key=b"i1", partition=1)
        await ag.put(line(id="i2", user="u2", ts=101.0), key=b"i2", partition=1)
        await ag.put(orjson.dumps({"type": "conversion", "id": "v1", "ts": 150.0, "impression": "i1",
                                   "kind": "click"}), key=b"i1", partition=1)
        await ag.put(b'{"type":"impression","id":', key=None, partition=1)
        await ag.put(b"", partition=1, headers=[(CONTROL_HEADER, b"end_of_log:t1")])
    examples = {v[1]["id"]: (v[0], v[1]["label"]) for v in sinks["examples"].sent if v[0] != "control"}
    assert examples == {"i1": ("u1", 1), "i2": ("u2", 0)}
    assert [v["reason"] for _, v in sinks["deadletter"].sent] == ["bad_json"]
    # reach and quality read every accepted impression from `audience`, keyed by user
    assert [(k, v["type"], v["campaign"]) for k, v in sinks["audience"].sent] == [("u1", "impression", "c"),
                                                                                  ("u2", "impression", "c")]
    # the fm role's inputs: impressions at event time, then this partition's end of log on every partition
    history = [v for v in sinks["history.events"].sent if v[0] != "control"]
    assert [(k, v[4], v[5]) for k, v in history] == [("u1", "impression", "i1"), ("u2", "impression", "i2")]
    controls = [v for v in sinks["history.events"].sent if v[0] == "control"]
    assert sorted(q for _, q, _ in controls) == [0, 1]
    assert all(h == [(CONTROL_HEADER, b"end_of_log:1")] for _, _, h in controls)
    [(_, status)] = sinks["ingest.status"].sent
    assert status["partition"] == 1 and status["control"] == "end_of_log:t1"
    assert status["counts"]["read"] == 4 and status["counts"]["attribution"]["closed_at_end"] == 1
