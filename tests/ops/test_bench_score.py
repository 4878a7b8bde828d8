"""`loopline bench score` at a tiny size, on the real broker: `POST /score/` timed beside the in-process
scorer and the bare forward of the same snapshot, with the ratios the issue's goal is stated in."""

import pytest

from loopline.ops.bench_score import bench_score


@pytest.mark.integration
def test_bench_score_reports_http_in_process_and_forward_latency_with_their_ratios(tmp_path):
    out = bench_score(repeats=1, requests=20, candidates=10, users=40, days=0.5,
                      out_path=str(tmp_path / "score.json"), progress=False)
    lat = out["latency"]
    for path in ("http", "http_stdlib", "in_process", "forward"):
        assert 0 < lat[path]["p50_ms"] <= lat[path]["p99_ms"], path
    assert out["ratio_http_to_forward_p50"] == round(lat["http"]["p50_ms"] / lat["forward"]["p50_ms"], 2)
    assert out["ratio_http_to_forward_p99"] == round(lat["http"]["p99_ms"] / lat["forward"]["p99_ms"], 2)
    assert out["ratio_http_stdlib_to_forward_p99"] == round(lat["http_stdlib"]["p99_ms"] / lat["forward"]["p99_ms"], 2)
    assert set(out["training_examples_per_s"]) == {"base", "loopfm+kd", "loopfm+ah+sa"}
    assert (tmp_path / "score.json").exists()
