"""`loopline bench scale` at a tiny size on the real broker: the ingest role with 1 and 2 workers in one
group, each run checked to have read every event once, and the FM stage over 1 and 2 ranks."""

import json

import pytest

from loopline.ops.cli import main


@pytest.mark.integration
def test_bench_scale_times_one_and_two_ingest_workers_and_fm_ranks_and_reports_the_speedups(tmp_path, capsys):
    path = tmp_path / "scale.json"
    assert main(["bench", "scale", "--events", "1500", "--repeats", "1", "--out", str(path), "--json"]) == 0
    out = json.loads(path.read_text())
    assert out == json.loads(capsys.readouterr().out)
    run = out["repeats"][0]
    assert out["benchmark"] == "scale" and out["events"] == 1500
    assert run["ingest_1_events_per_s"] > 0 and run["ingest_2_events_per_s"] > 0
    assert abs(run["speedup"] - run["ingest_2_events_per_s"] / run["ingest_1_events_per_s"]) < 0.002
    assert out["median_speedup"] == run["speedup"]
    assert run["fm_1_examples_per_s"] > 0 and run["fm_2_examples_per_s"] > 0 and out["examples"] > 0
    assert abs(run["fm_speedup"] - run["fm_2_examples_per_s"] / run["fm_1_examples_per_s"]) < 0.002
    traffic = out["fm_2_bytes_per_step"]
    # a step sends the batch and all-reduces the replicated gradients (over a million floats): both counted
    assert traffic["dense_all_reduce"] > 4e6 and traffic["batch_broadcast"] > 0 and traffic["outputs_gather"] > 0
