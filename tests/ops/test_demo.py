"""``loopline demo --json``: the whole loop on the real embedded broker and real workers, every key a real
result, and the live numbers equal to ``evaluate``'s."""

import json
import math
from pathlib import Path

import pytest

from loopline.ops.cli import main
from loopline.ops.demo import DemoConfig, format_demo

pytestmark = pytest.mark.integration


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_demo_json_holds_every_part_of_the_loop_and_matches_evaluate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run directory is .loopline-data/demo/<time> under the cwd
    assert main(["demo", "--json", "--users", "120", "--days", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"models", "score", "reach", "quality", "drift", "report", "matches_evaluate"} <= set(out)

    # the live counts and models equal the in-process evaluate of the same log
    assert out["matches_evaluate"] is True, out["matches"]
    assert out["examples"] > 0 and out["deadlettered"] > 0 and out["accepted"] > out["examples"]
    assert out["worker_stop"] == "stopped on SIGTERM" and out["monitor_stop"] == "stopped on SIGTERM"

    models = out["models"]["overall"]
    vms = [name for name in models if name.startswith("vm:")]
    assert {"fm", "lr", "vm:base"} <= set(models) and len(vms) >= 2
    for name, m in models.items():
        assert m["n"] > 0 and _number(m["auc"]) and 0 <= m["auc"] <= 1 and _number(m["ne"]), (name, m)
    assert models["fm"]["n"] == out["examples"]
    # TR is a number where the FM is ahead of vm:base, and null (no meaning) where it is not
    fm_ahead = models["fm"]["ne"] < models["vm:base"]["ne"]
    assert all(_number(models[v]["tr"]) if fm_ahead else models[v]["tr"] is None for v in vms)
    windows = out["models"]["windows"]
    assert [w["window"] for w in windows] == ["before", "after"]
    assert sum(w["models"]["fm"]["n"] for w in windows) == models["fm"]["n"]
    assert all(w["to"] == out["models"]["split_ts"] == out["log"]["shift_ts"] for w in windows[:1])
    table = out["models"]["table"].splitlines()
    assert table[0].split()[:3] == ["model", "n", "AUC"] and "AUC before" in table[0]
    assert {line.split()[0] for line in table[1:]} == set(models)

    score = out["score"]
    assert score["status"] == 200 and len(score["scores"]) == len(score["candidates"]) > 0
    assert all(0 <= s <= 1 for s in score["scores"])
    assert _number(score["latency_ms"]) and score["latency_ms"] > 0

    reach = out["reach"]
    lo, hi = reach["users_ci"]
    assert reach["query"] and not reach["partial"]
    assert 0 <= lo <= reach["users"] <= hi and reach["users"] > 0
    assert reach["impressions_ci"][0] <= reach["impressions"] <= reach["impressions_ci"][1]
    assert reach["true_users"] > 0
    assert reach["budget_users"] == DemoConfig().reach_budget_users >= reach["sample_users"] > 0  # the total budget

    sources = out["quality"]["sources"]
    assert {(q["source"], q["segment"]) for q in sources} == \
        {("s_good", "auto_intender"), ("s_poor", "sports_fan"), ("s_adversarial", "new_parent")}
    assert all(isinstance(q["verdict"], str) and q["verdict"] for q in sources)

    drift = out["drift"]
    assert isinstance(drift["alarms"], list) and set(drift["alarm_counts"]) >= {"fm", "vm:base"}
    assert all(a["at"].endswith("UTC") and _number(a["hours_after_shift"]) for a in drift["alarms"])
    # the generator's shift stops and starts campaigns: the campaign mix moves far beyond noise
    assert drift["largest_psi_window"]["psi"]["campaign"] > 0.5
    assert drift["examples"] == out["examples"]

    assert out["metrics"]["lines"] > 20
    report = Path(out["report"]["path"])
    assert report.is_file() and "<table>" in report.read_text() and report.parent.parent == Path(out["run_dir"])
    assert Path(out["run_dir"]).is_relative_to(tmp_path.resolve()) and Path(out["log"]["path"]).is_file()
    assert not (Path(out["run_dir"]) / "worker").exists()  # the workers' state went with the broker

    text = format_demo(out)  # the summary for people
    assert "vm:loopfm+kd" in text and "POST /score/" in text and "matches evaluate: yes" in text
