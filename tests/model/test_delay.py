"""Delayed-feedback weights: positives paired with the cohort whose negatives arrive with them."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.model.delay import DelayConfig, DelayWeights

DAY = 86400.0


def pos(ts, label_ts):
    return {"ts": ts, "label_ts": label_ts, "label": 1}


def neg(ts):
    return {"ts": ts, "label_ts": ts + DAY, "label": 0}


def traffic(dw, start, end, per_hour):
    """Impressions spread evenly, ``per_hour`` an hour, over [start, end)."""
    n = int((end - start) / 3600 * per_hour)
    dw.observe(np.linspace(start, end, n, endpoint=False).tolist())


def test_positives_of_the_first_window_weigh_nothing_and_negatives_always_one():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    traffic(dw, 0, 1.5 * DAY, 100)
    w = dw.weights([pos(3600.0, 3700.0), pos(1.2 * DAY, 1.2 * DAY + 60), neg(0.1 * DAY)])
    assert w[0] == 0.0  # its negatives' cohort is before the stream began
    assert w[1] == pytest.approx(1.0, abs=0.08)  # steady traffic: the two cohorts are alike
    assert w[2] == 1.0


def test_a_positive_is_weighted_by_the_paired_cohort_over_its_own():
    dw = DelayWeights(DelayConfig(window_s=DAY, max_weight=10.0))
    traffic(dw, 0, DAY, 100)
    traffic(dw, DAY, 2 * DAY, 300)  # traffic tripled: three times the positives per negative
    w = dw.weights([pos(1.5 * DAY, 1.5 * DAY + 60)])
    assert w[0] == pytest.approx(1 / 3, rel=0.1)
    dw = DelayWeights(DelayConfig(window_s=DAY, max_weight=2.0))
    traffic(dw, 0, DAY, 300)
    traffic(dw, DAY, 2 * DAY, 100)
    assert dw.weights([pos(1.5 * DAY, 1.5 * DAY + 60)])[0] == 2.0  # 3 capped at max_weight


def test_weighted_stream_has_the_true_label_rate_at_every_time():
    """A label-time stream (positives at once, negatives a window later) with traffic growing 4x: the
    raw positive share drifts from the true rate, the weighted one stays on it."""
    rng = np.random.default_rng(0)
    p, dw, events = 0.05, DelayWeights(DelayConfig(window_s=DAY)), []
    ts = np.sort(np.concatenate([rng.uniform(d * DAY, (d + 1) * DAY, int(2000 * (1 + d))) for d in range(4)]))
    y = rng.random(ts.size) < p
    for t, lab in zip(ts, y):
        events.append((t + 60.0, pos(t, t + 60.0)) if lab else (t + DAY, neg(t)))
    events.sort(key=lambda e: e[0])
    i = 0
    raw, weighted = [], []
    for t_end in np.arange(1.25 * DAY, 4 * DAY, 0.25 * DAY):  # label-time slices after the first window
        dw.observe(ts[(ts > (t_end - 0.25 * DAY - 1e-9)) & (ts <= t_end)].tolist() if t_end > 1.25 * DAY
                   else ts[ts <= t_end].tolist())
        chunk = []
        while i < len(events) and events[i][0] <= t_end:
            chunk.append(events[i][1])
            i += 1
        if t_end <= 1.25 * DAY:
            continue
        w = dw.weights(chunk)
        labels = np.array([e["label"] for e in chunk])
        raw.append(labels.mean())
        weighted.append((w * labels).sum() / ((w * labels).sum() + (labels == 0).sum()))
    assert np.mean(raw) > 1.5 * p  # growing traffic: positives of today against negatives of yesterday
    assert abs(np.mean(weighted) - p) < 0.2 * p


def test_memory_is_bounded_by_the_window_whatever_the_traffic():
    dw = DelayWeights(DelayConfig(window_s=3600.0, rate_s=600.0))
    for h in range(200):
        traffic(dw, h * 3600.0, (h + 1) * 3600.0, 50)
        dw.weights([pos(h * 3600.0 + 3000, h * 3600.0 + 3500)])
    assert len(dw._counts) <= 16 * (3600 / 600 + 2) + 20
    far = DelayWeights(DelayConfig(window_s=3600.0, rate_s=600.0))
    far.observe([i * 1e6 for i in range(5000)])  # times far apart, never weighed
    assert len(far._counts) <= 4 * far._keep and far.counts()["dropped"] > 0


def test_state_round_trips_and_off_means_all_ones():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    traffic(dw, 0, 1.5 * DAY, 100)
    other = DelayWeights(DelayConfig(window_s=DAY))
    other.load_state_dict(dw.state_dict())
    exs = [pos(1.2 * DAY, 1.2 * DAY + 60), pos(100.0, 160.0), neg(10.0)]
    assert np.array_equal(dw.weights(exs), other.weights(exs))
    assert DelayWeights(DelayConfig(enabled=False)).weights(exs).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("field,value", [("window_s", 0), ("rate_s", -1.0), ("max_weight", float("nan")),
                                         ("window_s", True)])
def test_bad_config_is_one_line_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DelayConfig(**{field: value})


def test_times_that_are_not_finite_give_a_weight_never_an_exception():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    dw.observe([float("nan"), float("inf"), 5.0])
    w = dw.weights([pos(float("inf"), float("inf")), pos(float("nan"), 10.0), neg(float("-inf"))])
    assert w.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.fuzz
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30),
       st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([0, 1])), max_size=30))
def test_property_any_times_give_weights_in_zero_to_the_cap(impressions, exs):
    dw = DelayWeights(DelayConfig(window_s=3600.0, rate_s=600.0, max_weight=4.0))
    dw.observe(impressions)
    w = dw.weights([{"ts": a, "label_ts": b, "label": y} for a, b, y in exs])
    assert len(w) == len(exs) and all(0.0 <= x <= 4.0 for x in w.tolist())
