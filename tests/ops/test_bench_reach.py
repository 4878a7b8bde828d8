"""The benchmark's own baselines: the KMV (theta) sketches against the truth and, where the library
installs, against Apache DataSketches' theta sketches of the same size; the proportional sample."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.ops.bench_reach import ThetaSketches, proportional_sample
from loopline.state.reach_estimate import answer, exact_answer


def population(n: int = 20_000, seed: int = 0):
    rng = np.random.default_rng(seed)
    values = {"geo": ["US", "IS", "MC"], "dev": ["a", "b", "c", "d"]}
    cols = {"geo": rng.choice(3, n, p=[0.8, 0.15, 0.05]).astype(np.int32), "dev": rng.integers(0, 4, n).astype(np.int32)}
    return cols, values, rng.random(n), rng.integers(1, 4, n).astype(float)


@pytest.mark.parametrize("query", ["*", "geo = IS", "geo = IS or dev = a", "geo = US and dev in (a, b)", "not geo = US"])
def test_theta_sketches_fit_the_bytes_and_estimate_within_their_interval(query):
    cols, values, hashes, imps = population()
    th = ThetaSketches(cols, values, hashes, budget_bytes=40_000)
    assert th.nbytes <= 40_000 and th.k >= 100
    truth = exact_answer(cols, values, imps, query)["users"]
    a = th.answer(query)
    assert a["users_ci"][0] <= a["users"] <= a["users_ci"][1]
    assert abs(a["users"] - truth) < 0.2 * truth
    exact = ThetaSketches(cols, values, hashes, budget_bytes=10_000_000)  # room for every hash: exact
    assert exact.answer(query)["users"] == truth


def test_theta_sketches_agree_with_datasketches_of_the_same_size():
    import datasketches as ds  # a declared dependency (pyproject.toml): the peer implementation
    cols, values, hashes, _ = population(50_000, 1)
    ours = ThetaSketches(cols, values, hashes, budget_bytes=200_000)
    lg = int(np.log2(ours.k))
    errs = {"ours": [], "ds": []}
    for q, (a, v) in {"geo = IS": ("geo", 1), "geo = MC": ("geo", 2)}.items():
        truth = int((cols[a] == v).sum())
        sk = ds.update_theta_sketch(lg)
        for i in np.flatnonzero(cols[a] == v):
            sk.update(int(i))
        errs["ds"].append(abs(sk.get_estimate() - truth) / truth)
        errs["ours"].append(abs(ours.answer(q)["users"] - truth) / truth)
    assert max(errs["ours"]) < 0.15 and max(errs["ds"]) < 0.15


def test_the_proportional_sample_holds_the_budget_and_is_unbiased_enough():
    cols, values, _, imps = population()
    past_rows = np.random.default_rng(1).choice(len(imps), 1000, replace=False)
    past = {a: c[past_rows] for a, c in cols.items()}
    est = []
    for seed in range(30):
        s = proportional_sample(cols, values, np.random.default_rng(seed).random(len(imps)), imps, past,
                                np.full(1000, 20.0), 400, min_per_stratum=10)
        assert abs(s.n - 400) <= 10
        est.append(answer(s, "geo = MC", composite=False)["users"])
    truth = exact_answer(cols, values, imps, "geo = MC")["users"]
    assert abs(np.mean(est) - truth) < 4 * np.std(est) / np.sqrt(30) + 1
