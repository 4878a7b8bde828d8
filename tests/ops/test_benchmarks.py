"""The benchmarks run end to end at a tiny size (their figures come from `loopline bench ...`)."""

import json

from loopline.ops.bench_fm import bench_fm
from loopline.ops.bench_history import bench_history


def test_fm_benchmark_compares_the_trainer_with_a_bare_loop(tmp_path):
    out = bench_fm(n_examples=512, repeats=1, out_path=str(tmp_path / "fm.json"), progress=False)
    assert out["median_overhead_ratio"] > 0 and out["peak_rss_mb"] > 0
    assert json.loads((tmp_path / "fm.json").read_text())["benchmark"] == "fm"


def test_history_benchmark_compares_the_store_with_raw_rocksdict(tmp_path):
    out = bench_history(n_users=50, entries=2000, L=10, repeats=1, out_path=str(tmp_path / "h.json"))
    assert out["append_ratio"] > 0 and out["read_ratio"] > 0 and out["bytes_per_entry"] > 0
