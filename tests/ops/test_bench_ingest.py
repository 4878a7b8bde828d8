"""`loopline bench ingest`: a small run on the real broker reports raw aiokafka consume-and-produce, the
Faust floor (a Faust agent that only forwards) and the ingest worker on the same backlog, with ratios."""

import json

import pytest

from loopline.ops.cli import main


@pytest.mark.integration
def test_bench_ingest_reports_raw_the_faust_floor_and_the_worker(tmp_path, capsys):
    path = tmp_path / "ingest.json"
    assert main(["bench", "ingest", "--events", "1500", "--repeats", "1", "--out", str(path), "--json"]) == 0
    out = json.loads(path.read_text())
    assert out == json.loads(capsys.readouterr().out)
    run = out["repeats"][0]
    assert out["benchmark"] == "ingest" and run["events"] == 1500
    for k in ("raw_events_per_s", "faust_events_per_s", "loopline_events_per_s"):
        assert run[k] > 0, k
    # each ratio is that path's rate over raw consume-and-produce in the same run
    assert abs(run["ratio"] - run["loopline_events_per_s"] / run["raw_events_per_s"]) < 0.002
    assert abs(run["faust_ratio"] - run["faust_events_per_s"] / run["raw_events_per_s"]) < 0.002
    assert out["median_faust_ratio"] == run["faust_ratio"] and out["median_ratio"] == run["ratio"]
