"""`loopline bench stage`: a tiny run reports the stage and the bare trainer on the same batches, their
ratio and where the stage's time goes (the figures come from the command itself)."""

import json

from loopline.ops.bench_stage import PART_GROUPS
from loopline.ops.cli import main


def test_bench_stage_reports_both_figures_the_ratio_and_the_breakdown(tmp_path, capsys):
    path = tmp_path / "stage.json"
    assert main(["bench", "stage", "--events", "600", "--repeats", "1", "--out", str(path), "--json"]) == 0
    out = json.loads(path.read_text())
    assert out == json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "stage" and out["examples"] > 256  # at least two micro-batches
    run = out["repeats"][0]
    for k in ("stage_examples_per_s", "bare_examples_per_s", "ratio", "stage_s", "sequential_s", "bare_s"):
        assert run[k] > 0, k
    assert out["median_ratio"] == run["ratio"]
    # the stage trained on exactly the examples it was given, so both rates count the same examples
    assert abs(run["ratio"] - run["stage_examples_per_s"] / run["bare_examples_per_s"]) < 0.01
    assert set(out["groups_s"]) == set(PART_GROUPS) | {"other"}
    for part in ("train", "featurize", "history_read", "history_write", "vm_train", "vm_featurize",
                 "vm_history_read"):
        assert out["breakdown_s"][part] > 0, part
    # the one-thread stage's parts account for its time, and none of them is counted twice
    assert sum(out["breakdown_s"].values()) <= out["median_sequential_s"] * 1.01 + 0.01
    assert out["median_sequential_ratio"] == run["sequential_ratio"] > 0
    assert out["machine"]["cpus"] >= 1 and len(out["machine"]["load_before"]) == 3


def test_bench_stage_names_a_bad_size(capsys):
    assert main(["bench", "stage", "--events", "5", "--out", "/dev/null"]) == 2
    assert capsys.readouterr().err.startswith("ConfigError: events:")
