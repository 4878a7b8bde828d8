"""Metrics against brute-force references and scikit-learn (a test-only dependency): exact AUC and log
loss, the binned AUC within its stated bound, validation (sklearn's refusals, and ours), bounded memory,
merging, and snapshots that load with ``weights_only=True``."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from loopline.errors import ConfigError, InvalidMetricInput, LooplineError
from loopline.model.metrics import EPS, BinaryMetrics, MetricsConfig, auc, log_loss


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def brute_auc(p, y):
    pos = [a for a, t in zip(p, y) if t]
    neg = [a for a, t in zip(p, y) if not t]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def sk_auc(p, y):
    """sklearn's AUC with soft labels: each example twice, as a positive of weight y and a negative of
    weight 1 - y (the definition ``model/metrics.py`` states)."""
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    return roc_auc_score(np.r_[np.ones(len(y)), np.zeros(len(y))], np.r_[p, p], sample_weight=np.r_[y, 1 - y])


def sk_ll(p, y):
    """sklearn's log loss with our clipping, soft labels as in ``sk_auc``."""
    q = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    y = np.asarray(y, dtype=float)
    return sk_log_loss(np.r_[np.ones(len(y)), np.zeros(len(y))], y_proba=np.r_[q, q],
                       sample_weight=np.r_[y, 1 - y], labels=[0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 10, 200) / 10  # many ties
    y = rng.random(200) < 0.3
    assert auc(p, y) == pytest.approx(brute_auc(p, y), abs=1e-12)
    assert auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_ne_of_the_base_rate_predictor_is_one_and_a_better_model_is_lower():
    rng = np.random.default_rng(3)
    y = (rng.random(5000) < 0.2).astype(int)
    m = BinaryMetrics()
    m.update(np.full(5000, y.mean()), y)
    assert m.report()["ne"] == pytest.approx(1.0, abs=1e-6)
    good = BinaryMetrics()
    good.update(np.where(y == 1, 0.6, 0.1), y)
    assert good.report()["ne"] < 0.9 and good.report()["auc"] == 1.0


def test_streaming_updates_equal_one_batch():
    rng = np.random.default_rng(4)
    p, y = rng.random(300), rng.random(300) < 0.5
    a, b = BinaryMetrics(), BinaryMetrics()
    for i in range(0, 300, 7):
        a.update(p[i:i + 7], y[i:i + 7])
    b.update(p, y)
    assert a.report() == b.report()
    assert a.report()["logloss"] == pytest.approx(log_loss(p, y), abs=1e-6)


def test_one_class_gives_no_auc_and_empty_gives_zero_n():
    m = BinaryMetrics()
    assert m.report()["n"] == 0
    m.update([0.1, 0.2], [0, 0])
    assert m.report()["auc"] is None and m.report()["calibration"] is None and not math.isnan(m.report()["logloss"])
    assert m.auc_error() is None and m.auc_bounds() is None


# -- the findings: NaN scores, labels in {-1, 1}, soft labels truncated --------------------------------

def test_nan_scores_are_refused_like_sklearn_refuses_them():
    rng = np.random.default_rng(5)
    p, y = rng.random(100), rng.random(100) < 0.5
    p[::7] = np.nan
    with pytest.raises(ValueError):
        roc_auc_score(y, p)
    for f in (auc, log_loss, BinaryMetrics().update):
        with pytest.raises(InvalidMetricInput, match=r"^p: 15 of 100 scores are not finite \(first at index 0: nan\)$"):
            f(p, y)


def test_labels_in_minus_one_one_are_refused_not_scored_below_zero():
    rng = np.random.default_rng(6)
    p, y = rng.random(100), np.where(rng.random(100) < 0.5, 1, -1)
    for f in (auc, log_loss, BinaryMetrics().update):
        with pytest.raises(InvalidMetricInput, match=r"^y: labels must lie in \[0, 1\]"):
            f(p, y)
    # sklearn reads {-1, 1} as two classes; mapped to {0, 1}, ours is the same AUC (labels are
    # probabilities here, so the mapping is the caller's, said out loud)
    assert auc(p, (y + 1) / 2) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_soft_labels_count_as_floats_everywhere_and_match_sklearn_with_weights():
    rng = np.random.default_rng(7)
    p, y = rng.random(500), rng.random(500)  # soft labels
    m = BinaryMetrics()
    m.update(p, y)
    r = m.report()
    assert r["logloss"] == pytest.approx(log_loss(p, y), abs=1e-6) == pytest.approx(sk_ll(p, y), abs=1e-6)
    assert r["calibration"] == pytest.approx(p.sum() / y.sum(), abs=1e-6)
    assert auc(p, y) == pytest.approx(sk_auc(p, y), abs=1e-12)
    lo, hi = m.auc_bounds()
    assert lo - 1e-12 <= sk_auc(p, y) <= hi + 1e-12
    with pytest.raises(ValueError, match="continuous"):  # sklearn alone refuses soft labels
        roc_auc_score(y, p)


@pytest.mark.parametrize("p, y, message", [
    ([0.2, float("inf")], [0, 1], r"^p: 1 of 2 scores are not finite \(first at index 1: inf\)$"),
    # auc() alone takes any finite score (only their order counts): these two are refused by the others
    ([0.2, -0.1], [0, 1], r"^p: scores must lie in \[0, 1\] \(probabilities\); 1 of 2 do not \(first at index 1: -0\.1\)$"),
    ([0.2, 1.5], [0, 1], r"^p: scores must lie in \[0, 1\]"),
    ([0.2, 0.5], [0, 2], r"^y: labels must lie in \[0, 1\] \(0/1 or soft labels\); 1 of 2 do not \(first at index 1: 2\.0\)$"),
    ([0.2, 0.5], [0, float("nan")], r"^y: 1 of 2 labels are not finite"),
    (["0.2", "0.5"], [0, 1], r"^p: expected numbers, got an array of dtype <U3$"),
    ([0.2, None], [0, 1], r"^p: expected numbers, got an array of dtype object$"),
    ([0.2, 0.5], [0, 10 ** 400], r"^y: expected numbers, got an array of dtype object$"),
    ([[0.2], [0.5, 0.1]], [0, 1], r"^p: cannot be read as an array of numbers"),
    ([0.2, 0.5, 0.1], [0, 1], r"^y: 2 labels for 3 scores \(p\); they must pair up$"),
    ([0.2 + 1j, 0.5], [0, 1], r"^p: expected numbers, got an array of dtype complex128$"),
])
def test_bad_input_raises_one_typed_line_naming_the_argument_and_adds_nothing(p, y, message):
    m = BinaryMetrics()
    m.update([0.3, 0.7], [0, 1])
    before = m.state_dict()
    ranks_only = message.startswith(r"^p: scores must lie")  # finite scores outside [0, 1]: auc() takes them
    for f in (log_loss, m.update) if ranks_only else (auc, log_loss, m.update):
        with pytest.raises(InvalidMetricInput, match=message) as info:
            f(p, y)
        assert isinstance(info.value, LooplineError) and "\n" not in str(info.value)
    after = m.state_dict()
    assert after["n"] == before["n"] == 2 and torch.equal(after["pos"], before["pos"])


def test_exact_auc_takes_any_finite_scores_like_sklearn():
    rng = np.random.default_rng(15)
    logits, y = rng.normal(0, 3, 400), rng.random(400) < 0.4
    assert auc(logits, y) == pytest.approx(roc_auc_score(y, logits), abs=1e-12) == auc(sigmoid(logits), y)


def test_sklearn_refuses_what_we_refuse_where_it_checks_probabilities():
    for p, y in (([0.2, float("inf")], [0, 1]), ([0.2, 1.5], [0, 1]), ([0.2, -0.1], [0, 1]), ([0.2, 0.5, 0.1], [0, 1])):
        with pytest.raises(ValueError):
            sk_log_loss(y, y_proba=p, labels=[0, 1])


def test_bins_is_a_config_error_naming_the_field():
    for bad in (1, 0, True, 2.5, 1 << 30):
        with pytest.raises(ConfigError, match=r"^bins: "):
            MetricsConfig(bins=bad)


# -- bounded: the binned AUC and its bound ------------------------------------------------------------

@pytest.mark.parametrize("name, make", [
    ("uniform", lambda rng, n: rng.random(n)),
    ("ctr", lambda rng, n: sigmoid(rng.normal(-4.0, 1.0, n))),  # CTR-scale: most scores near 0.02
    ("cvr", lambda rng, n: sigmoid(rng.normal(-7.0, 0.8, n))),  # CVR-scale: near 1e-3, a narrow band
    ("near-one", lambda rng, n: 1 - sigmoid(rng.normal(-6.0, 1.0, n))),
])
def test_binned_auc_is_within_its_bound_of_sklearns_exact_auc(name, make):
    rng = np.random.default_rng(8)
    p = make(rng, 100_000)
    y = (rng.random(p.size) < p).astype(int)  # calibrated labels: informative, both classes
    exact = roc_auc_score(y, p)
    m = BinaryMetrics()
    m.update(p, y)
    err = m.auc_error()
    assert abs(m.auc() - exact) <= err + 1e-12
    lo, hi = m.auc_bounds()
    assert lo <= exact <= hi
    # the logit grid resolves scores near 0 and near 1 as finely as near 0.5 (the docstring's figures)
    assert err < 1e-3, (name, err)
    if name in ("cvr", "near-one"):  # a linear grid with as many bins would not: its bound is far looser
        idx = np.minimum((p * m.cfg.bins).astype(int), m.cfg.bins - 1)
        pos, neg = np.bincount(idx, y, m.cfg.bins), np.bincount(idx, 1 - y, m.cfg.bins)
        assert 0.5 * np.dot(pos / pos.sum(), neg / neg.sum()) > 5 * err


def test_the_bound_is_honest_when_it_bites():
    # every score in one bin: the binned AUC is 1/2, the exact one 1, and the bound says so
    p = np.r_[np.full(50, 0.5), np.full(50, 0.5 + 1e-9)]
    y = np.r_[np.zeros(50), np.ones(50)]
    m = BinaryMetrics()
    m.update(p, y)
    assert m.auc() == 0.5 and roc_auc_score(y, p) == 1.0 and m.auc_error() == 0.5
    assert m.auc_bounds() == (0.0, 1.0)
    coarse = BinaryMetrics(MetricsConfig(bins=4))
    coarse.update(np.random.default_rng(9).random(1000), np.random.default_rng(10).random(1000) < 0.5)
    assert coarse.auc_error() > 0.05  # four bins: a loose bound, stated


def test_memory_does_not_grow_with_the_number_of_examples():
    rng = np.random.default_rng(11)

    def footprint(m):
        sizes = []
        for v in vars(m).values():
            assert not isinstance(v, (list, dict)), "a per-example container"
            if isinstance(v, np.ndarray):
                sizes.append(v.nbytes)
        return sum(sizes)

    small, big = BinaryMetrics(), BinaryMetrics()
    small.update(rng.random(10), rng.random(10) < 0.5)
    for _ in range(50):
        big.update(rng.random(20_000), rng.random(20_000) < 0.5)
    assert big.n == 1_000_000 and footprint(big) == footprint(small) == 16 * big.cfg.bins
    assert not hasattr(big, "arrays")
    st_ = big.state_dict()
    assert all(t.numel() <= big.cfg.bins for t in st_.values() if isinstance(t, torch.Tensor))


def test_windows_merge_into_exactly_the_whole():
    rng = np.random.default_rng(12)
    p, y = rng.random(3000), rng.random(3000)  # soft labels too
    whole = BinaryMetrics()
    whole.update(p, y)
    windows = []
    for lo in range(0, 3000, 1000):
        w = BinaryMetrics()
        w.update(p[lo:lo + 1000], y[lo:lo + 1000])
        windows.append(w)
    merged = BinaryMetrics()
    for w in reversed(windows):  # any order
        merged.merge(w)
    assert merged.report() == whole.report() and merged.n == 3000
    assert merged.state_dict()["sum_loss"] == whole.state_dict()["sum_loss"]  # exact, not close
    with pytest.raises(ConfigError, match=r"^bins: cannot merge"):
        merged.merge(BinaryMetrics(MetricsConfig(bins=100)))


def test_snapshot_round_trip_with_weights_only_keeps_and_continues_the_figures():
    rng = np.random.default_rng(13)
    a = BinaryMetrics(MetricsConfig(bins=1000))
    a.update(rng.random(2000), rng.random(2000) < 0.3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = BinaryMetrics()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.cfg.bins == 1000 and b.report() == a.report() and b.auc_error() == a.auc_error()
    more_p, more_y = rng.random(500), rng.random(500) < 0.3
    a.update(more_p, more_y)
    b.update(more_p, more_y)
    assert b.report() == a.report()


def test_older_snapshots_holding_the_prediction_arrays_still_load():
    rng = np.random.default_rng(14)
    p, y = rng.random(400), (rng.random(400) < 0.4).astype(np.int64)
    m = BinaryMetrics()
    m.load_state_dict([torch.from_numpy(p), torch.from_numpy(y)])
    ref = BinaryMetrics()
    ref.update(p, y)
    assert m.report() == ref.report()


def test_a_corrupt_state_is_a_typed_error():
    good = BinaryMetrics()
    good.update([0.1, 0.9], [0, 1])
    for bad in ({"format": "nope"}, {**good.state_dict(), "bins": 1},
                {**good.state_dict(), "index": torch.tensor([10 ** 6, 0])}, {**good.state_dict(), "n": -1},
                {**good.state_dict(), "pos": torch.tensor([float("nan"), 1.0], dtype=torch.float64)}):
        with pytest.raises(InvalidMetricInput, match=r"^state"):
            BinaryMetrics().load_state_dict(bad)


# -- the property ------------------------------------------------------------------------------------

score = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9, 0.02]))  # ties too
hard = st.sampled_from([0, 1])
soft = st.floats(0.0, 1.0)


@st.composite
def scored(draw):
    n = draw(st.integers(1, 60))
    p = draw(st.lists(score, min_size=n, max_size=n))
    y = draw(st.lists(draw(st.sampled_from([hard, soft])), min_size=n, max_size=n))
    bins = draw(st.sampled_from([None, 16, 1000]))
    return np.array(p), np.array(y, dtype=float), bins


@pytest.mark.fuzz
@given(scored())
def test_property_binned_auc_within_its_bound_and_log_loss_equal_to_sklearn(case):
    p, y, bins = case
    m = BinaryMetrics() if bins is None else BinaryMetrics(MetricsConfig(bins=bins))
    m.update(p, y)
    r = m.report()
    assert r["n"] == len(p)
    assert r["logloss"] == pytest.approx(sk_ll(p, y), abs=1e-6)
    assert log_loss(p, y) == pytest.approx(sk_ll(p, y), rel=1e-9, abs=1e-12)
    P, N = y.sum(), (1 - y).sum()
    if not (P > 0 and N > 0):
        assert r["auc"] is None and math.isnan(auc(p, y)) and m.auc_error() is None
        return
    exact = sk_auc(p, y)
    assert auc(p, y) == pytest.approx(exact, abs=1e-9)
    assert abs(m.auc() - exact) <= m.auc_error() + 1e-9
    assert 0.0 <= m.auc() <= 1.0 and 0.0 <= m.auc_error() <= 0.5


bad_score = st.sampled_from([float("nan"), float("inf"), -float("inf"), -1e-300, -0.5, 1.0000001, 2.0, 1e308])
bad_label = st.sampled_from([float("nan"), float("inf"), -1.0, -1e-300, 1.0000001, 2.0, -1e308])


@pytest.mark.fuzz
@given(scored(), st.sampled_from(["p", "y", "length"]), st.data())
def test_property_invalid_input_raises_the_typed_error_and_never_returns_a_number(case, what, data):
    p, y, _ = case
    i = data.draw(st.integers(0, len(p) - 1))
    if what == "p":
        p = p.copy()
        p[i] = data.draw(bad_score)
    elif what == "y":
        y = y.copy()
        y[i] = data.draw(bad_label)
    else:
        y = np.r_[y, 0.0]
    m = BinaryMetrics()
    ranks_only = what == "p" and np.isfinite(p).all()  # auc() takes any finite score (only order counts)
    for f in (log_loss, m.update) if ranks_only else (auc, log_loss, m.update):
        with pytest.raises(InvalidMetricInput) as info:
            f(p, y)
        msg = str(info.value)
        assert msg.startswith("p: " if what == "p" else "y: ") and "\n" not in msg
    assert m.n == 0
