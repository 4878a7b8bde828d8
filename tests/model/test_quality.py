"""The quality fits on exact small cases, the verdicts on thin or odd input, and the adjusted reach."""

import math

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.model.quality import (QualityConfig, _box_ls, _solve_many, adjust_reach, assess, bootstrap_ls,
                                    campaign_table, fit_em, fit_gls, fit_ls, param_bootstrap_ls, report_covariance)
from loopline.state.quality_counts import QualityCounts


def _agg(q, p, seen=1000, measured=500, source="s", segment="g", prefix="c"):
    """An aggregate with one labelled user per campaign share: campaign c has `seen` impressions of
    which round(q_c * seen) are labelled, and a truth report p_c measured on `measured`."""
    qc = QualityCounts({})
    # a labelled user who never sees an impression: the source exists even when it labels no impression
    qc.learn_one({"type": "segment", "source": source, "user": f"{prefix}-idle", "segment": segment, "ts": 0.0})
    for i, (qi, pi) in enumerate(zip(q, p)):
        c = f"{prefix}{i}"
        k = int(round(qi * seen))
        for j in range(seen):
            qc.learn_one({"type": "impression", "user": f"{c}-u{j}", "campaign": c, "ts": 0.0})
        for j in range(k):
            qc.learn_one({"type": "segment", "source": source, "user": f"{c}-u{j}", "segment": segment, "ts": 0.0})
        qc.learn_one({"type": "truth", "campaign": c, "segment": segment, "fraction": float(pi),
                      "impressions": measured, "ts": 1.0})
    return qc.aggregate()


def test_ls_and_em_recover_exact_a_b_from_noiseless_reports():
    q = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    for a, b in ((0.8, 0.1), (0.2, 0.6), (1.0, 0.0), (0.5, 0.5)):
        p = a * q + b * (1 - q)
        assert fit_ls(q, p, np.ones(5)) == pytest.approx((a, b), abs=1e-9)
        ea, eb, _ = fit_em(q, p, np.full(5, 1000.0), max_iter=20000, tol=1e-13)
        assert (ea, eb) == pytest.approx((a, b), abs=1e-4)  # EM slows down at the boundary


def test_ls_respects_the_box_and_is_optimal_on_it():
    q = np.array([0.2, 0.4, 0.6, 0.8])
    p = np.array([0.0, 0.0, 0.9, 1.0])  # unconstrained slope would put a above 1 and b below 0
    w = np.array([1.0, 2.0, 3.0, 4.0])
    a, b = fit_ls(q, p, w)
    assert 0 <= a <= 1 and 0 <= b <= 1
    grid = np.linspace(0, 1, 201)
    sse = lambda a_, b_: float(np.sum(w * (p - a_ * q - b_ * (1 - q)) ** 2))  # noqa: E731
    best = min(sse(x, y) for x in grid for y in grid)
    assert sse(a, b) <= best + 1e-12


def test_ls_weights_follow_impressions():
    q = np.array([0.2, 0.5, 0.8])
    p = np.array([0.3, 0.5, 0.9])
    heavy_last = fit_ls(q, p, np.array([1.0, 1.0, 1000.0]))
    a, b = heavy_last
    assert a * 0.8 + b * 0.2 == pytest.approx(0.9, abs=2e-3)  # the heavy campaign is fitted almost exactly


def test_bootstrap_replicates_stay_in_the_box_and_are_seeded():
    rng = np.random.default_rng(0)
    q = rng.random(30)
    p = np.clip(0.9 * q + 0.05 * (1 - q) + rng.normal(0, 0.05, 30), 0, 1)
    w = rng.integers(100, 1000, 30).astype(float)
    boot = bootstrap_ls(q, p, w, 200, seed=3)
    assert boot.shape == (200, 2) and np.all((boot >= 0) & (boot <= 1))
    assert np.array_equal(boot, bootstrap_ls(q, p, w, 200, seed=3))
    assert not np.array_equal(boot, bootstrap_ls(q, p, w, 200, seed=4))


def test_vectorized_box_solutions_equal_the_scalar_ones():
    rng = np.random.default_rng(2)
    rows = []
    for i in range(500):
        q = np.zeros(6) if i % 9 == 0 else rng.random(6)  # some singular problems too
        p, w, r = rng.random(6) * 1.6 - 0.3, rng.random(6), 1 - q
        rows.append([np.sum(w * q * q), np.sum(w * q * r), np.sum(w * r * r), np.sum(w * q * p), np.sum(w * r * p)])
    rows = np.array(rows)
    want = np.array([_box_ls(*row) for row in rows])
    assert np.allclose(_solve_many(rows), want, atol=1e-12)


def test_parametric_bootstrap_is_centred_on_the_fit_and_stays_in_the_box():
    q = [0.1, 0.3, 0.5, 0.7, 0.9, 0.4]
    t = campaign_table(_agg(q, [0.95 * x + 0.02 * (1 - x) for x in q], measured=200), "s", "g")
    boot = param_bootstrap_ls(t, 0.95, 0.02, 400, seed=1)
    assert np.all((boot >= 0) & (boot <= 1))
    assert np.median(boot[:, 0]) == pytest.approx(0.95, abs=0.02)
    assert np.mean(boot[:, 1] == 0.0) > 0.05  # b near 0: a share of replicates sits on the edge


def test_fit_rejects_fractions_outside_the_unit_interval():
    with pytest.raises(ConfigError, match="^p:"):
        fit_ls([0.1, 0.2], [0.5, 1.2], [1, 1])
    with pytest.raises(ConfigError, match="^q:"):
        fit_em([0.1, float("nan")], [0.5, 0.2], [1, 1])


def test_assess_fits_and_ranks_constructed_sources():
    q = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2]
    good = _agg(q, [0.9 * x + 0.1 * (1 - x) for x in q], source="good", segment="g1")
    bad = _agg(q, [0.1 * x + 0.7 * (1 - x) for x in q], source="bad", segment="g2", prefix="d")
    from loopline.state.quality_counts import merge_aggregates
    rep = assess(merge_aggregates([good, bad]), QualityConfig(bootstrap=100))
    rows = {r["source"]: r for r in rep["sources"]}
    assert rows["good"]["rank"] == 1 and rows["bad"]["rank"] == 2
    assert rows["good"]["a"] == pytest.approx(0.9, abs=1e-6) and rows["good"]["b"] == pytest.approx(0.1, abs=1e-6)
    assert rows["good"]["verdict"] == "good" and rows["bad"]["verdict"] == "adversarial"
    assert rows["good"]["lift"] == pytest.approx(9.0, rel=1e-4)
    # recall = P(labelled | in) at the mean labelled fraction
    qbar = rows["good"]["q_mean"]
    assert rows["good"]["recall"] == pytest.approx(0.9 * qbar / (0.9 * qbar + 0.1 * (1 - qbar)), abs=1e-5)
    for m in ("ls", "em", "gls"):
        assert rows["good"]["methods"][m]["a"] == pytest.approx(0.9, abs=1e-4)
    assert rows["good"]["correlation"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q,p,verdict", [
    ([0.0] * 6, [0.3, 0.4, 0.35, 0.3, 0.4, 0.3], "labels_nobody"),
    ([1.0] * 6, [0.3, 0.4, 0.35, 0.3, 0.4, 0.3], "labels_everyone"),
    ([0.5] * 6, [0.3, 0.4, 0.35, 0.3, 0.4, 0.3], "no_spread"),
    ([0.1, 0.9], [0.2, 0.8], "too_few_campaigns"),
], ids=["labels-nobody", "labels-everyone", "no-spread", "two-campaigns"])
def test_unidentifiable_sources_get_a_clear_verdict_and_no_fit(q, p, verdict):
    row = assess(_agg(q, p), QualityConfig(bootstrap=50))["sources"][0]
    assert row["verdict"] == verdict and row["note"]
    assert row["rank"] is None and row.get("a_ci") is None


def test_thin_campaigns_and_missing_reports_are_counted_not_dropped():
    q = [0.1, 0.3, 0.5, 0.7, 0.9]
    agg = _agg(q, [0.8 * x + 0.2 * (1 - x) for x in q])
    agg["impressions"]["c_thin"] = 3  # a campaign with few impressions
    agg["truth"]["c_thin"] = {"g": [0.5, 100, 2.0]}
    agg["truth"]["c_ghost"] = {"g": [0.5, 100, 2.0]}  # a report for a campaign never seen
    agg["truth"]["c0"]["other"] = [0.5, 100, 2.0]  # a segment no source labels
    t = campaign_table(agg, "s", "g", QualityConfig())
    agg["impressions"]["c_unmeasured"] = 500  # a campaign without any truth report
    t = campaign_table(agg, "s", "g", QualityConfig())
    assert t["skipped"] == {"no_report": 1, "no_impressions": 1, "few_impressions": 1, "small_report": 0}
    rep = assess(agg, QualityConfig(bootstrap=50))
    assert rep["sources"][0]["campaigns"] == 5
    assert rep["truth"]["segments_without_source"] == ["other"]
    qc = QualityCounts({})
    qc.learn_one({"type": "segment", "source": "s", "user": "u", "segment": "never_measured", "ts": 0.0})
    assert assess(qc.aggregate())["sources"][0]["verdict"] == "no_truth"


def test_report_covariance_matches_simulated_shared_users():
    rng = np.random.default_rng(1)
    users, camps, a, b = 60, 4, 0.8, 0.3
    n_uc = rng.poisson(2.0, (users, camps)) + (rng.random((users, camps)) < 0.5)
    labelled = rng.random(users) < 0.5
    qc = QualityCounts({})
    for u in range(users):
        for c in range(camps):
            for _ in range(int(n_uc[u, c])):
                qc.learn_one({"type": "impression", "user": f"u{u}", "campaign": f"c{c}", "ts": 0.0})
        if labelled[u]:
            qc.learn_one({"type": "segment", "source": "s", "user": f"u{u}", "segment": "g", "ts": 0.0})
    for c in range(camps):
        qc.learn_one({"type": "truth", "campaign": f"c{c}", "segment": "g", "fraction": 0.5,
                      "impressions": 10 ** 9, "ts": 0.0})
    t = campaign_table(qc.aggregate(), "s", "g", QualityConfig(min_impressions=1))
    cov = report_covariance(t, a, b)
    draws = rng.random((20000, users)) < np.where(labelled, a, b)  # each user truly in or not
    p = draws @ n_uc / n_uc.sum(axis=0)  # (draws, campaigns) realized true fractions
    emp = np.cov(p, rowvar=False)
    assert np.allclose(cov, emp, atol=3e-3 * np.abs(emp).max() + 1e-4, rtol=0.08)


def test_gls_recovers_noiseless_a_b():
    q = [0.1, 0.3, 0.5, 0.7, 0.9]
    t = campaign_table(_agg(q, [0.7 * x + 0.2 * (1 - x) for x in q]), "s", "g")
    g = fit_gls(t, 0.5, 0.5, 1.96)
    assert (g["a"], g["b"]) == pytest.approx((0.7, 0.2), abs=1e-6)
    assert g["a_ci"][0] <= 0.7 <= g["a_ci"][1]


def test_adjusted_reach_scales_and_widens():
    r = adjust_reach(1000, (900, 1100), 0.8, (0.8, 0.8))
    assert r["users"] == pytest.approx(800) and r["users_ci"] == pytest.approx([720, 880])
    w = adjust_reach(1000, (900, 1100), 0.8, (0.7, 0.9))
    assert w["users"] == pytest.approx(800)
    lo, hi = w["users_ci"]
    assert lo < 720 and hi > 880  # the quality uncertainty widens it
    z = 1.959963984540054
    sd = math.sqrt(0.8 ** 2 * (100 / z) ** 2 + 1000 ** 2 * (0.1 / z) ** 2 + (100 / z) ** 2 * (0.1 / z) ** 2)
    assert hi - lo == pytest.approx(2 * z * sd, rel=1e-9)
    assert w["users_ci_bounds"] == pytest.approx([630, 990])


@pytest.mark.parametrize("args,field", [
    ((100, (120, 150), 0.5, (0.4, 0.6)), "users_ci"),
    ((100, (90, 110), 0.5, (0.6, 0.7)), "rate_ci"),
    ((100, (90, 110), float("nan"), (0.4, 0.6)), "users"),
])
def test_adjusted_reach_rejects_inconsistent_input(args, field):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        adjust_reach(*args)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^coverage:"):
        QualityConfig(coverage=1.5)
    with pytest.raises(ConfigError, match="^bootstrap:"):
        QualityConfig(bootstrap=3)
    with pytest.raises(ConfigError, match="^methods:"):
        assess(_agg([0.1, 0.5], [0.2, 0.3]), methods=("nope",))
