"""Drift feature names are bounded per window; one-off names cannot push real features out."""

import pytest

from loopline.errors import ConfigError
from loopline.model.drift import DriftConfig, FeatureDrift
from loopline.model.monitor import LabelCap, Monitor, MonitorConfig


def stream(n, junk_every=1, start=0.0, shift=False):
    """Examples with two real features (geo, slot) and, on every ``junk_every``-th, one never-seen name."""
    for i in range(n):
        attrs = {"geo": ("US" if (i % 3) or not shift else "IS")}
        if i % junk_every == 0:
            attrs[f"junk{start}_{i}"] = "x"
        yield {"ts": start + i * 1e-3, "attrs": attrs, "features": {"slot": str(i % 5)}, "label": i % 2}


def test_ten_thousand_feature_names_stay_under_the_cap_and_real_features_still_drift():
    cfg = DriftConfig(window_s=10.0, min_count=50, max_features=64)
    d = FeatureDrift(cfg)
    d.update(stream(10_000, start=0.0))
    d.update(stream(10_000, start=10.0, shift=True))
    assert all(len(w.cats) + len(w.nums) <= 64 for w in d._windows.values())
    r = d.report()
    assert r["bounds"]["features_pruned"] >= 2 * (10_000 - 64) and r["bounds"]["values_pruned"] > 0
    feats = r["latest"]["features"]
    assert feats["attrs.geo"]["psi"] > 0.25 and feats["features.slot"]["psi"] < 0.01
    assert not any(k.startswith("attrs.junk") for k in feats)


def test_under_the_cap_the_figures_are_unchanged():
    exs = list(stream(3000, junk_every=100)) + list(stream(3000, junk_every=100, start=10.0, shift=True))
    a, b = FeatureDrift(DriftConfig(window_s=10.0)), FeatureDrift(DriftConfig(window_s=10.0, max_features=200))
    a.update(exs)
    b.update(exs)
    ra, rb = a.report(), b.report()
    assert rb["bounds"]["features_pruned"] == 0

    def split(r):  # numeric PSI comes from randomized KLL sketches: equal within their error only
        cats = [{k: f for k, f in w["features"].items() if f["kind"] == "categorical"} for w in r["windows"]]
        nums = [{k: f["psi"] for k, f in w["features"].items() if f["kind"] == "numeric"} for w in r["windows"]]
        return cats, nums
    (ca, na), (cb, nb) = split(ra), split(rb)
    assert ca == cb and ca[1]["attrs.geo"]["psi"] > 0.25
    assert [set(x) for x in na] == [set(x) for x in nb]
    assert all(abs(x[k] - y[k]) < 0.01 for x, y in zip(na, nb) for k in x)


def test_the_metric_labels_are_capped_and_counted_once_per_name():
    m = Monitor(MonitorConfig(drift=DriftConfig(window_s=10.0, min_count=5), max_metric_features=3))
    exs = [{"ts": float(t) / 100, "attrs": {f"a{k}": str(t % 2) for k in range(6)}, "label": t % 2}
           for t in range(2000)]
    m.observe_examples(exs)
    for _ in range(3):  # three scrapes
        s = m.metrics_summary()
    assert list(s["features"]) == ["attrs.a0", "attrs.a1", "attrs.a2"]
    assert len(m.summary()["features"]) == 6  # the JSON summary keeps every feature
    b = m.bounds()["metric_labels"]["feature"]
    assert b == {"labels": 3, "cap": 3, "dropped": 3}


def test_label_cap_forgets_refused_names_beyond_its_memory():
    lc = LabelCap(1, memory=1)
    assert lc.admit("a") and not lc.admit("b") and not lc.admit("c") and not lc.admit("b")
    assert lc.dropped == 3 and len(lc._recent) == 1


@pytest.mark.parametrize("field,bad", [("max_features", 1), ("max_features", "9")])
def test_bad_feature_caps_name_the_field(field, bad):
    with pytest.raises(ConfigError, match=field):
        DriftConfig(**{field: bad})


@pytest.mark.parametrize("field", ["max_metric_features", "max_metric_models"])
def test_bad_label_caps_name_the_field(field):
    with pytest.raises(ConfigError, match=field):
        MonitorConfig(**{field: 0})
