"""Model health from score rows: windowed metrics equal a batch computation, transfer ratio, alarms."""

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.model.health import HealthConfig, ModelHealth, example_loss
from loopline.model.metrics import BinaryMetrics
from loopline.model.monitor import Monitor, MonitorConfig


def _rows(rng, n, t0, t1, models, shift_ts=None):
    """Score rows whose models have known quality; after ``shift_ts`` the 'fm' model turns to noise."""
    ts = np.sort(rng.uniform(t0, t1, n))
    truth = rng.random(n) * 0.2
    y = (rng.random(n) < truth).astype(int)
    rows = []
    for i in range(n):
        scores = {}
        for m, noise in models.items():
            if shift_ts is not None and m == "fm" and ts[i] >= shift_ts:
                noise = 1.0
            p = float(np.clip(truth[i] + rng.normal(0, noise * 0.1), 0.001, 0.999))
            scores[m] = p
        rows.append({"id": f"i{i}", "user": "u", "ts": float(ts[i]), "label_ts": float(ts[i]) + 1.0,
                     "label": int(y[i]), "scores": scores})
    return rows


def test_windowed_metrics_equal_batch_metrics_over_the_same_rows():
    rng = np.random.default_rng(0)
    rows = _rows(rng, 3000, 0.0, 300.0, {"fm": 0.1, "lr": 0.5})
    h = ModelHealth(HealthConfig(window_s=100.0))
    h.update(rows)
    windows = h.report()["windows"]
    assert len(windows) == 3
    for w in windows:
        sel = [r for r in rows if w["start"] <= r["ts"] < w["end"]]
        for m in ("fm", "lr"):
            bm = BinaryMetrics()
            bm.update([r["scores"][m] for r in sel], [r["label"] for r in sel])
            assert w["models"][m] == bm.report()
    overall = h.report()["models"]["fm"]
    bm = BinaryMetrics()
    bm.update([r["scores"]["fm"] for r in rows], [r["label"] for r in rows])
    assert overall["logloss"] == pytest.approx(bm.report()["logloss"], abs=1e-6)
    assert overall["ne"] == pytest.approx(bm.report()["ne"], abs=1e-6)


def test_old_windows_keep_their_figures_after_their_predictions_are_dropped():
    rng = np.random.default_rng(1)
    rows = _rows(rng, 2000, 0.0, 500.0, {"fm": 0.2})
    full = ModelHealth(HealthConfig(window_s=100.0, keep_windows=100))
    bounded = ModelHealth(HealthConfig(window_s=100.0, keep_windows=2))
    full.update(rows)
    bounded.update(rows)
    assert len(bounded._open) == 2
    assert bounded.report()["windows"] == full.report()["windows"]
    few = ModelHealth(HealthConfig(window_s=100.0, keep_windows=2, max_windows=3))
    few.update(rows)
    assert few.report()["windows"] == full.report()["windows"][-3:]
    few.update([dict(rows[0], id="late")])  # a row for a window long closed: overall figures only
    assert few.report()["windows"] == full.report()["windows"][-3:]
    assert few.report()["models"]["fm"]["n"] == len(rows) + 1


def test_transfer_ratio_from_rows_of_separate_stages_joined_by_id():
    rng = np.random.default_rng(2)
    rows = _rows(rng, 4000, 0.0, 100.0, {"fm": 0.05, "vm:base": 1.0, "vm:ah": 0.5})
    split = []  # the FM stage and the VM stage write rows of their own for the same ids
    for r in rows:
        split.append({**r, "scores": {"fm": r["scores"]["fm"]}})
        split.append({**r, "scores": {k: v for k, v in r["scores"].items() if k.startswith("vm:")}})
    h = ModelHealth(HealthConfig(window_s=100.0))
    h.update(split)
    tr = h.report()["windows"][0]["transfer"]["vm:ah"]
    assert tr["n"] == 4000
    assert tr["tr"] == pytest.approx((tr["ne_base"] - tr["ne_vm"]) / (tr["ne_base"] - tr["ne_fm"]), abs=1e-5)
    assert 0 < tr["tr"] < 1  # the half-noisy VM captures part of the FM's gain
    assert "vm:base" not in h.report()["windows"][0]["transfer"]


def test_a_model_that_degrades_raises_alarms_after_the_change_and_the_others_do_not():
    rng = np.random.default_rng(3)
    rows = _rows(rng, 20000, 0.0, 2000.0, {"fm": 0.05, "lr": 0.05}, shift_ts=1000.0)
    h = ModelHealth(HealthConfig(window_s=500.0))
    h.update(rows)
    alarms = h.report()["alarms"]
    for det in ("adwin", "page_hinkley"):
        fm = [a for a in alarms if a["model"] == "fm" and a["detector"] == det]
        assert fm and fm[0]["ts"] >= 1000.0, det
    assert not [a for a in alarms if a["model"] == "lr"]


def test_example_loss_clips_like_the_batch_metric():
    assert example_loss(1.0, 0) == pytest.approx(-np.log(1e-7))
    assert example_loss(0.25, 1) == pytest.approx(-np.log(0.25))


def test_monitor_summary_names_every_model_it_has_seen():
    rng = np.random.default_rng(4)
    m = Monitor(MonitorConfig.with_window(100.0))
    m.observe_scores(_rows(rng, 500, 0.0, 100.0, {"fm": 0.1, "vm:loopfm": 0.2, "das": 0.3}))
    s = m.summary()
    assert sorted(s["models"]) == ["das", "fm", "vm:loopfm"]
    assert s["models"]["fm"]["window"]["n"] == 500 and s["event_time"] < 100.0
    assert s["score_rows"] == 500


def test_bad_health_settings_name_the_field():
    with pytest.raises(ConfigError, match="^window_s"):
        HealthConfig(window_s=-1)
    with pytest.raises(ConfigError, match="^detectors"):
        HealthConfig(detectors=("cusum",))
