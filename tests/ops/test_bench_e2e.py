"""``loopline bench e2e`` on a tiny log: both figures, the ratio, and the worker's models equal to
evaluate's (the figures themselves are the benchmark's, never asserted as speeds)."""

from __future__ import annotations

import pytest

from loopline.ops.bench_e2e import bench_e2e


@pytest.mark.integration
def test_bench_e2e_times_a_role_all_worker_and_evaluate_on_the_same_log(tmp_path):
    out = bench_e2e(n_events=1500, repeats=1, out_path=str(tmp_path / "e2e.json"), progress=False, timeout=600)
    run = out["repeats"][0]
    assert run["evaluate_s"] > 0 and run["worker_s"] > 0
    assert out["median_ratio"] == run["ratio"] == pytest.approx(run["worker_s"] / run["evaluate_s"], rel=0.01)
    assert out["same_numbers"], "the worker's models differ from evaluate's"
    t = run["timeline"]  # where the worker's time went: each role's marks, in the order they must come
    assert 0 < t["fm_started"] < t["fm_finished"] <= t["vm_finished"] == pytest.approx(run["worker_s"], abs=0.05)
    assert 0 < t["vm_started"] < t["vm_finished"] and 0 < t["ingest_done"] <= t["fm_finished"]
    assert (tmp_path / "e2e.json").read_text().startswith("{")
