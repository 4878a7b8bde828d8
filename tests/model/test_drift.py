"""Feature and label drift: PSI / Jensen-Shannon against a batch reference, shifted vs unshifted features."""

import math

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.model.drift import DriftConfig, FeatureDrift, feature_values, js_divergence, psi


def _examples(rng, n, t0, campaign_p, slot_mean, rate):
    camps = rng.choice(len(campaign_p), n, p=campaign_p)
    return [{"ts": t0 + i * (100.0 / n), "campaign": f"c{c}", "attrs": {"age": str(rng.integers(0, 5))},
             "features": {"slot": str(rng.poisson(slot_mean) + 1)}, "soft_label": float(rng.random() * 0.1),
             "label": int(rng.random() < rate)} for i, c in enumerate(camps)]


def test_psi_and_js_match_their_formulas():
    ref, cur = {"a": 30, "b": 70}, {"a": 60, "b": 30, "c": 10}
    r = np.array([30.5, 70.5, 0.5]) / 101.5
    c = np.array([60.5, 30.5, 10.5]) / 101.5
    assert psi(ref, cur) == pytest.approx(float(((c - r) * np.log(c / r)).sum()))
    r0, c0 = np.array([0.3, 0.7, 0.0]), np.array([0.6, 0.3, 0.1])
    m = (r0 + c0) / 2
    kl = lambda p: sum(pi * math.log2(pi / mi) for pi, mi in zip(p, m) if pi > 0)  # noqa: E731
    assert js_divergence(ref, cur) == pytest.approx((kl(r0) + kl(c0)) / 2)
    assert psi(ref, ref) == 0.0 and js_divergence(ref, ref) == 0.0


def test_shifted_features_drift_far_more_than_unshifted_ones():
    rng = np.random.default_rng(0)
    before = _examples(rng, 3000, 0.0, [0.5, 0.3, 0.2, 0.0], 2.0, 0.04)
    after = _examples(rng, 3000, 100.0, [0.1, 0.2, 0.3, 0.4], 4.0, 0.08)
    d = FeatureDrift(DriftConfig(window_s=100.0))
    d.update(before + after)
    w = d.report()["windows"][1]
    f = w["features"]
    assert f["campaign"]["psi"] > 0.5 and f["campaign"]["js"] > 0.1
    assert f["features.slot"]["kind"] == "numeric" and f["features.slot"]["psi"] > 0.25
    assert f["attrs.age"]["psi"] < 3 * f["attrs.age"]["psi_null"] < 0.05
    assert f["soft_label"]["psi"] < 0.05  # same distribution on both sides
    assert w["label"]["z"] > 3
    assert w["label"]["delta"] == pytest.approx(w["label"]["rate"] - w["label"]["rate_ref"], abs=1e-5)


def test_reference_is_the_previous_window_or_the_first():
    ex = [{"ts": float(t), "campaign": ("a", "b", "b")[t // 10], "label": 0} for t in range(30)]
    prev = FeatureDrift(DriftConfig(window_s=10.0, min_count=1))
    first = FeatureDrift(DriftConfig(window_s=10.0, min_count=1, reference="first"))
    prev.update(ex)
    first.update(ex)
    assert prev.report()["windows"][2]["features"]["campaign"]["psi"] == 0.0
    assert first.report()["windows"][2]["reference"]["window"] == 0
    assert first.report()["windows"][2]["features"]["campaign"]["psi"] > 1


def test_a_long_stream_keeps_a_bounded_number_of_windows_and_categories():
    d = FeatureDrift(DriftConfig(window_s=1.0, keep_windows=5, max_categories=10, min_count=1))
    d.update({"ts": float(t) / 100, "ad": f"a{t}", "label": 0} for t in range(2000))
    assert len(d.windows()) == 5
    latest = d.report()["latest"]
    assert latest["features"]["ad"]["bins"] <= 21  # ten values on each side and "(other)"


def test_feature_values_flatten_attrs_and_features_and_skip_missing_soft_labels():
    ex = {"campaign": "c1", "attrs": {"geo": "US"}, "features": {"slot": "2"}, "soft_label": None, "label": 1}
    assert feature_values(ex) == {"campaign": "c1", "attrs.geo": "US", "features.slot": "2"}


def test_unparseable_numeric_values_are_counted_not_binned():
    d = FeatureDrift(DriftConfig(window_s=10.0, min_count=1))
    d.update([{"ts": 1.0, "features": {"slot": "x"}, "label": 0}, {"ts": 2.0, "features": {"slot": "3"}, "label": 0}])
    assert d.unparsed == 1


def test_bad_drift_settings_name_the_field():
    with pytest.raises(ConfigError, match="^window_s"):
        DriftConfig(window_s=0)
    with pytest.raises(ConfigError, match="^reference"):
        DriftConfig(reference="last")
    with pytest.raises(ConfigError, match="^bins"):
        DriftConfig(bins=1)
