"""The ingest agent in Faust's test context (memory store): the same outputs as the core."""

import asyncio

import orjson

from loopline.stream.app import CONTROL_HEADER, WorkerConfig, build_app


class Recorder:
    """Stands in for an output topic inside test_context; the integration tests use the real ones."""

    def __init__(self):
        self.sent = []

    async def send(self, key=None, value=None, **kwargs):
        self.sent.append((key, value))
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
    sinks = {name: Recorder() for name in ("examples", "deadletter", "ingest.status")}
    app.loopline_topics.update(sinks)
    agent = app.agents["ingest"]
    async with agent.test_context() as ag:
        await ag.put(line(), key=b"i1", partition=1)
        await ag.put(line(id="i2", user="u2", ts=101.0), key=b"i2", partition=1)
        await ag.put(orjson.dumps({"type": "conversion", "id": "v1", "ts": 150.0, "impression": "i1",
                                   "kind": "click"}), key=b"i1", partition=1)
        await ag.put(b'{"type":"impression","id":', key=None, partition=1)
        await ag.put(b"", partition=1, headers=[(CONTROL_HEADER, b"end_of_log:t1")])
    examples = {v["id"]: (k, v["label"]) for k, v in sinks["examples"].sent}
    assert examples == {"i1": ("u1", 1), "i2": ("u2", 0)}
    assert [v["reason"] for _, v in sinks["deadletter"].sent] == ["bad_json"]
    [(_, status)] = sinks["ingest.status"].sent
    assert status["partition"] == 1 and status["control"] == "end_of_log:t1"
    assert status["counts"]["read"] == 4 and status["counts"]["attribution"]["closed_at_end"] == 1
