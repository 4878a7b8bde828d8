"""Delayed-feedback weights: positives paired with the cohort whose negatives arrive with them."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.model.delay import DelayConfig, DelayWeights

DAY = 86400.0


def pos(ts, label_ts, campaign=None):
    return {"ts": ts, "label_ts": label_ts, "label": 1, "campaign": campaign}


def neg(ts):
    return {"ts": ts, "label_ts": ts + DAY, "label": 0}


def traffic(dw, start, end, per_hour, campaign=None):
    """Impressions spread evenly, ``per_hour`` an hour, over [start, end), of one campaign."""
    n = int((end - start) / 3600 * per_hour)
    dw.observe(np.linspace(start, end, n, endpoint=False).tolist(), [campaign] * n)


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


def test_a_campaign_is_weighted_by_its_own_cohorts_when_the_stream_total_is_steady():
    dw = DelayWeights(DelayConfig(window_s=DAY, max_weight=10.0))
    traffic(dw, 0, 2 * DAY, 100, "steady")
    traffic(dw, 0, DAY, 300, "cut")  # 300 an hour, then 100: the others make up the difference
    traffic(dw, DAY, 2 * DAY, 100, "cut")
    traffic(dw, DAY, 2 * DAY, 200, "grows")
    traffic(dw, 1.9 * DAY, 2 * DAY, 100, "new")  # started 2.4 hours ago
    t = 1.95 * DAY
    w = dw.weights([pos(t, t + 60, c) for c in ("steady", "cut", "grows", "new")])
    assert w[0] == pytest.approx(1.0, abs=0.1)
    assert w[1] == pytest.approx(3.0, rel=0.1)  # yesterday's three times as many negatives
    assert w[2] < 0.05  # no impressions a window ago: it weighs a / (its count + a) of the stream's ratio
    assert w[3] < 0.05
    assert DelayWeights(DelayConfig(window_s=DAY, by="")).weights([pos(t, t + 60, "new")])[0] == 0.0  # no counts
    stream_only = DelayWeights(DelayConfig(window_s=DAY, by=""))
    traffic(stream_only, 0, 2 * DAY, 100, "new")
    assert stream_only.weights([pos(t, t + 60, "new")])[0] == pytest.approx(1.0, abs=0.1)  # the total's ratio


def test_a_thin_campaign_weighs_about_as_the_stream_does():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    traffic(dw, 0, 2 * DAY, 100, "big")
    dw.observe([0.5 * DAY, 1.5 * DAY], ["thin", "thin"])  # one impression in each cohort's hour
    w = dw.weights([pos(1.5 * DAY, 1.5 * DAY + 60, "thin")])
    # (1 paired + 2 x 1) / (0 others + 2): not the 1 / 1 of its raw counts, and near the stream's 1
    assert w[0] == pytest.approx(1.5, rel=0.05)


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
    many = DelayWeights(DelayConfig(window_s=3600.0, rate_s=600.0, key_slots=64))
    many.observe([5.0] * 10_000, [f"c{i}" for i in range(10_000)])  # ten thousand campaigns in one bucket
    assert [per.shape for per in many._keyed.values()] == [(64,)] and many._keyed[0].sum() == 10_000


def test_state_round_trips_and_off_means_all_ones():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    traffic(dw, 0, 1.5 * DAY, 100, "c1")
    traffic(dw, 0.8 * DAY, 1.5 * DAY, 50, "c2")
    other = DelayWeights(DelayConfig(window_s=DAY))
    other.load_state_dict(dw.state_dict())
    exs = [pos(1.2 * DAY, 1.2 * DAY + 60, "c1"), pos(1.2 * DAY, 1.2 * DAY + 60, "c2"), pos(100.0, 160.0), neg(10.0)]
    assert np.array_equal(dw.weights(exs), other.weights(exs))
    assert dw.weights(exs)[1] < 0.5 * dw.weights(exs)[0]  # c2's per-campaign counts came through
    assert DelayWeights(DelayConfig(enabled=False)).weights(exs).tolist() == [1.0, 1.0, 1.0, 1.0]
    old = dict(dw.state_dict())
    del old["keyed"]  # a snapshot from before the per-campaign counts still loads
    other.load_state_dict(old)
    assert other.weights(exs)[0] == pytest.approx(dw.weights([pos(1.2 * DAY, 1.2 * DAY + 60)])[0], rel=0.1)


@pytest.mark.parametrize("field,value", [("window_s", 0), ("rate_s", -1.0), ("max_weight", float("nan")),
                                         ("window_s", True), ("by", "user"), ("key_slots", 0),
                                         ("key_prior", 0.0)])
def test_bad_config_is_one_line_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        DelayConfig(**{field: value})


def test_times_that_are_not_finite_give_a_weight_never_an_exception():
    dw = DelayWeights(DelayConfig(window_s=DAY))
    dw.observe([float("nan"), float("inf"), 5.0])
    w = dw.weights([pos(float("inf"), float("inf")), pos(float("nan"), 10.0), neg(float("-inf"))])
    assert w.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["c1", "c2", "", None])),
                max_size=30),
       st.lists(st.tuples(st.floats(allow_nan=True, allow_infinity=True),
                          st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from([0, 1]), st.sampled_from(["c1", "c3", None])), max_size=30))
def test_property_any_times_give_weights_in_zero_to_the_cap(impressions, exs):
    dw = DelayWeights(DelayConfig(window_s=3600.0, rate_s=600.0, max_weight=4.0))
    dw.observe([t for t, _ in impressions], [c for _, c in impressions])
    w = dw.weights([{"ts": a, "label_ts": b, "label": y, "campaign": c} for a, b, y, c in exs])
    assert len(w) == len(exs) and all(0.0 <= x <= 4.0 for x in w.tolist())
