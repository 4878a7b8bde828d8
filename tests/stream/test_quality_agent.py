"""The quality agent in Faust's test context (memory store): its table holds the counts of the core."""

import orjson

from loopline.state.quality_counts import QualityCounts, load_aggregate
from loopline.stream.app import WorkerConfig, build_app

VALUES = [
    {"type": "impression", "id": "i1", "user": "u1", "ts": 1.0, "campaign": "c1", "attrs": {}},
    {"type": "segment", "source": "s1", "user": "u1", "segment": "g", "ts": 2.0},
    {"type": "impression", "id": "i2", "user": "u2", "ts": 3.0, "campaign": "c1", "attrs": {}},
    {"type": "truth", "campaign": "c1", "segment": "g", "fraction": 0.4, "impressions": 100, "ts": 4.0},
]


async def test_agent_counts_audience_values_per_partition(tmp_path):
    app = build_app(WorkerConfig(store="memory://", data_dir=str(tmp_path), partitions=2, role="reach"))
    agent = app.agents["quality"]
    async with agent.test_context() as ag:
        for v in VALUES:
            await ag.put(orjson.dumps(v), key=(v.get("user") or v["campaign"]).encode(), partition=1)
        await ag.put(b"not json", key=b"u9", partition=1)  # counted, never fatal
    table = app.tables["quality"]
    want = QualityCounts({})
    for v in VALUES:
        want.learn_one(v)
    assert load_aggregate(table, "1|") == want.aggregate()
    assert load_aggregate(table, "0|") is None
