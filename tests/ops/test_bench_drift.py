"""The detector/PSI study runs end to end at a tiny size (its figures come from `loopline bench drift`)."""

import json

from loopline.ops.bench_drift import DETECTORS, bench_drift


def test_drift_study_separates_shifted_from_unshifted_features_and_scores_every_detector(tmp_path):
    out = bench_drift(repeats=1, out_path=str(tmp_path / "d.json"), progress=False, users=500, days=4.0)
    assert json.loads((tmp_path / "d.json").read_text())["benchmark"] == "drift"
    s = out["summary"]
    assert s["min_psi_shifted"] > 5 * s["max_psi_unshifted"]  # campaigns and ads, against everything else
    assert set(s["detectors"]) == set(DETECTORS)
    run = out["runs"][0]
    for d in run["detectors"].values():
        assert d["false_alarms"] >= 0 and (d["delay_s"] is None or d["delay_s"] >= 0)
    assert run["windows"] and all(0 <= w["auc"] <= 1 for w in run["windows"] if w["auc"] is not None)
