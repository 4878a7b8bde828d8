"""Metrics against brute-force references."""

import itertools
import math

import numpy as np
import pytest

from loopline.model.metrics import BinaryMetrics, auc, log_loss


def brute_auc(p, y):
    pos = [a for a, t in zip(p, y) if t]
    neg = [a for a, t in zip(p, y) if not t]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 10, 200) / 10  # many ties
    y = rng.random(200) < 0.3
    assert auc(p, y) == pytest.approx(brute_auc(p, y), abs=1e-12)


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
