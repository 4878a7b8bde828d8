"""`loopline fp8 report` measures and prints the decision table (and prints a saved one back);
`loopline bench fp8` runs end to end at a tiny size (its figures come from the command)."""

import json

import orjson
import torch

from loopline.kernels.dispatch import HIGH_PRECISION
from loopline.kernels.fp8_gemm import scaled_mm_supported, triton_supported
from loopline.model.fm import FMConfig, FoundationModel
from loopline.ops.bench_fp8 import bench_fp8
from loopline.ops.cli import main

FP8_HW = scaled_mm_supported()[0] or triton_supported()[0]


def test_fp8_report_prints_the_table_and_a_saved_copy_reads_back(tmp_path, capsys):
    saved = tmp_path / "table.pt"
    assert main(["fp8", "report", "--json", "--save", str(saved)]) == 0
    out = orjson.loads(capsys.readouterr().out)
    table = out["table"]
    shapes = [(r["in_features"], r["out_features"]) for r in table["layers"]]
    width = FoundationModel(FMConfig()).mlp[0].in_features  # sparse embeddings, history encoding, recent means
    assert shapes[:3] == [(width, 128), (128, 64), (64, 1)]  # the FM interaction MLP's shapes
    assert out["fp8_hardware"] == FP8_HW
    for r in table["layers"]:
        assert r["why"] and r["choice"] in {HIGH_PRECISION} | {c["name"] for c in r["candidates"]}
    if table["summary"]["fp8"] == 0:
        assert "every layer stays in high precision" in out["verdict"]
        assert ("no FP8 hardware" in out["verdict"]) == (not FP8_HW)
    else:
        assert f"{table['summary']['fp8']} of 6 layer(s) run FP8" in out["verdict"]

    assert main(["fp8", "report", "--json", "--snapshot", str(saved)]) == 0
    again = orjson.loads(capsys.readouterr().out)
    assert again["table"] == table and again["source"].startswith("saved table")


def test_fp8_report_on_a_snapshot_without_a_table_is_a_one_line_config_error(tmp_path, capsys):
    snap = tmp_path / "snap.pt"
    torch.save({"model": {"w": torch.zeros(2, 2)}}, snap)
    assert main(["fp8", "report", "--snapshot", str(snap)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ConfigError: snapshot:") and "\n" not in err


def test_fp8_benchmark_reports_shapes_mere_and_end_to_end(tmp_path):
    out = bench_fp8(repeats=1, iters=1, quick=True, progress=False, out_path=str(tmp_path / "fp8.json"))
    assert json.loads((tmp_path / "fp8.json").read_text())["benchmark"] == "fp8"
    assert out["fp8_hardware"] == FP8_HW and ("no FP8 hardware" in out["note"]) == (not FP8_HW)
    width = FoundationModel(FMConfig()).mlp[0].in_features
    assert [r["shape"] for r in out["gemm"]][:3] == [[256, width, 128], [256, 128, 64], [256, 64, 1]]
    for r in out["gemm"]:
        assert r["baseline"]["tflops"] > 0
        assert all(c["speedup"] > 0 and c["tflops"] > 0 for c in r["candidates"].values() if c["available"])
    assert all(set(r["by_recipe"]) == {"tensor", "row", "block"} for r in out["mere"])
    e2e = out["end_to_end"]
    assert e2e["high_precision_examples_per_s"] > 0 and e2e["dispatched_examples_per_s"] > 0
    assert e2e["probe_overhead"]["sampled_passes"] == 2  # passes 9 and 19 of 21
