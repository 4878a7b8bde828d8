"""The reach sampler and estimators: unbiased on small exact cases (with the score model learned on the
way), exact when the sample is a census, intervals that hold, partition sums that merge into one
sample's answer, the horizon (event time, stated in every answer), the memory budget, the fall-back,
and the split modules' public surfaces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.state import reach, reach_estimate, reach_sample, reach_sampler
from loopline.state.reach import (Estimate, ReachConfig, ReachSampler, Sample, answer, build_sample, exact_answer,
                                  finish, merge_stats, query_stats, segment_attr, user_hash, users_estimate)

QUERIES = ["*", "gender = F", "geo = IS and gender = M", "not geo = IS and age in (18-24, 65+)"]
DAY = 86_400.0


def small_population(seed: int = 0, n: int = 80):
    """Users with attributes, and (epoch, impressions) activity over two epochs of 100 s."""
    rng = np.random.default_rng(seed)
    users = []
    for i in range(n):
        attrs = {"geo": "IS" if i % 4 == 0 else "US", "gender": "F" if rng.random() < 0.5 else "M",
                 "age": ["18-24", "25-34", "65+"][int(rng.integers(3))]}
        active = [e for e in (0, 1) if rng.random() < 0.7] or [1]
        users.append((f"u{i}", attrs, {e: int(rng.integers(1, 5)) for e in active}))
    return users


def feed(sampler: ReachSampler, users, epoch: float = 100.0) -> None:
    events = [(epoch * e + 1 + (hash(u) % 90) * epoch / 100, u, a) for u, a, act in users
              for e, k in act.items() for _ in range(k)]
    for ts, u, a in sorted(events, key=lambda t: (t[0], t[1])):
        sampler.observe(u, ts, a)


def truth(users, text: str) -> tuple[int, int]:
    from loopline.state.reach_query import parse_query
    from tests.state.test_reach_query import reference
    tree = parse_query(text).tree
    hits = [sum(act.values()) for u, a, act in users if reference(tree, a)]
    return len(hits), sum(hits)


def test_each_module_declares_its_public_surface():
    for mod in (reach, reach_sampler, reach_sample, reach_estimate):
        assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__), mod.__name__
    assert not hasattr(reach, "ThetaBaseline")  # the baselines live in the benchmark


def test_estimates_are_unbiased_on_a_small_exact_case_with_a_learned_score_model():
    users = small_population()
    cfg = dict(budget_users=16, min_per_stratum=3, epoch_s=100.0, horizon_epochs=2)
    runs = 300
    est = {q: ([], []) for q in QUERIES}
    learned = 0
    for seed in range(runs):
        s = ReachSampler(ReachConfig(seed=seed, **cfg))
        feed(s, users)
        learned += s.counts["models_learned"] > 0
        sample = s.snapshot()
        assert sample.n <= 16
        for q in QUERIES:
            a = answer(sample, q, 3, composite=False)
            est[q][0].append(a["users"])
            est[q][1].append(a["impressions"])
    assert learned == runs  # the second epoch ran with a learned score model every time
    for q in QUERIES:
        tu, ti = truth(users, q)
        for got, want in ((np.array(est[q][0]), tu), (np.array(est[q][1]), ti)):
            se = got.std(ddof=1) / np.sqrt(runs)
            assert abs(got.mean() - want) < 4 * se + 0.5, (q, got.mean(), want, se)


def test_a_census_is_exact_with_a_zero_width_interval():
    users = small_population(1)
    s = ReachSampler(ReachConfig(budget_users=1000, epoch_s=100.0))
    feed(s, users)
    for q in QUERIES:
        a = answer(s.snapshot(), q)
        tu, ti = truth(users, q)
        assert (a["users"], a["impressions"]) == (tu, ti)
        assert a["users_ci"] == [tu, tu] and a["impressions_ci"] == [ti, ti]


def test_intervals_hold_the_truth_about_95_percent_of_the_time():
    users = small_population(2, n=400)
    hits = {q: [0, 0] for q in ("gender = F", "geo = IS and age = 65+")}
    runs = 200
    for seed in range(runs):
        s = ReachSampler(ReachConfig(budget_users=60, min_per_stratum=5, epoch_s=100.0, seed=seed))
        feed(s, users)
        sample = s.snapshot()
        for q, h in hits.items():
            tu, ti = truth(users, q)
            a = answer(sample, q, 5)
            h[0] += a["users_ci"][0] <= tu <= a["users_ci"][1]
            h[1] += a["impressions_ci"][0] <= ti <= a["impressions_ci"][1]
    for q, (hu, hi) in hits.items():
        assert 0.88 <= hu / runs <= 0.995 and 0.85 <= hi / runs <= 1.0, (q, hu, hi)


def partition_samples(users, partitions: int = 4, **cfg) -> list[Sample]:
    samplers = [ReachSampler(ReachConfig(**cfg), p, partitions) for p in range(partitions)]
    for p, s in enumerate(samplers):
        feed(s, [u for u in users if int(u[0][1:]) % partitions == p])
    return [s.snapshot() for s in samplers]


def test_partition_sums_merge_into_the_answer_of_one_merged_sample():
    parts = partition_samples(small_population(3, n=300), budget_users=48, min_per_stratum=4, epoch_s=100.0)
    merged = Sample.merge(parts)
    assert merged.n == sum(p.n for p in parts) and merged.n <= 48
    for q in QUERIES:
        one = answer(merged, q, 4)
        summed = finish(merge_stats([query_stats(p, q, 4) for p in parts]), q)
        for k in ("users", "impressions"):
            assert summed[k] == pytest.approx(one[k], abs=0.11)
        assert summed["users_ci"] == pytest.approx(one["users_ci"], abs=0.11)
        assert summed["range"] == one["range"] and summed["sample_bytes"] == one["sample_bytes"] == merged.nbytes


# -- the horizon ------------------------------------------------------------------------------------------
def test_the_last_seven_days_cover_seven_days_of_event_time_and_the_answer_says_which():
    """The issue's case: a 7-day log, users spread over it. Every user of the last 7 days counts,
    including those seen only in its first hours (7 epoch buckets used to cut them off), and the
    answer states the range: at least 7 days, at most an hour more."""
    s = ReachSampler(ReachConfig(budget_users=10_000))  # a census: the counts are exact
    t0 = 1_700_000_000.0
    n = 700
    for i in range(n):  # one user an hour or so, from t0 to t0 + 7 days - a minute
        s.observe(f"u{i}", t0 + (7 * DAY - 60) * i / (n - 1), {"g": "early" if i < 10 else "late"})
    a = answer(s.snapshot(), "*")
    assert a["users"] == n and a["users_ci"] == [n, n]
    assert answer(s.snapshot(), "g = early")["users"] == 10  # the first hours are in
    lo, hi = a["range"]["from"], a["range"]["to"]
    assert hi == t0 + 7 * DAY - 60 and lo <= hi - 7 * DAY and hi - lo < 7 * DAY + 3600


def test_users_and_impressions_older_than_the_horizon_leave_and_a_user_counts_its_in_range_impressions_only():
    cfg = ReachConfig(budget_users=1000, epoch_s=DAY, horizon_epochs=7)
    s = ReachSampler(cfg)
    s.observe("gone", 0.0, {"g": "a"})
    s.observe("both", 10.0, {"g": "a"}, impressions=5)  # 5 impressions that will fall out of the horizon
    s.observe("both", 7 * DAY + 7200.0, {"g": "a"}, impressions=2)
    s.observe("new", 7 * DAY + 7200.0, {"g": "b"})
    a = answer(s.snapshot(), "*")
    lo, hi = a["range"]["from"], a["range"]["to"]
    assert (hi, lo) == (7 * DAY + 7200.0, 7200.0)  # now - 7 days, on the hour grid
    assert (a["users"], a["impressions"]) == (2, 3)  # "gone" left; "both" keeps its 2 in-range impressions
    s.observe("late", 3600.0, {"g": "a"})  # before the range: ignored and counted
    s.observe("inside", 8000.0, {"g": "a"})  # late, but inside the range: counts
    assert s.counts["too_old"] == 1 and answer(s.snapshot(), "*")["users"] == 3


def test_the_horizon_slides_with_event_time_not_with_arrival():
    """The same events in another order (late events within the horizon) give the same answer."""
    rng = np.random.default_rng(4)
    events = [(float(rng.uniform(0, 10 * DAY)), f"u{rng.integers(300)}") for _ in range(2000)]
    events.sort()
    shuffled = list(events)
    for i in range(0, len(shuffled) - 5, 5):  # swap neighbours: a little out of order
        shuffled[i], shuffled[i + 3] = shuffled[i + 3], shuffled[i]
    out = []
    for evs in (events, shuffled):
        s = ReachSampler(ReachConfig(budget_users=10_000))
        for ts, u in evs:
            s.observe(u, ts, {"g": u[-1]})
        out.append(answer(s.snapshot(), "*"))
    start = out[0]["range"]["from"]
    want = len({u for ts, u in events if ts >= start})
    assert out[0]["users"] == out[1]["users"] == want
    assert out[0]["impressions"] == sum(1 for ts, _ in events if ts >= start)


# -- the budget -------------------------------------------------------------------------------------------
def test_the_budget_is_shared_by_the_partitions_and_holds_over_many_epochs():
    """Four partitions, 10 days of users coming and going: together they never hold more than the
    budget, and sliding users out does not starve the sample (the threshold rises again)."""
    budget, parts = 200, 4
    samplers = [ReachSampler(ReachConfig(budget_users=budget, min_per_stratum=10, epoch_s=DAY, horizon_epochs=2), p, parts)
                for p in range(parts)]
    rng = np.random.default_rng(0)
    for day in range(10):
        for i in range(3000):
            u = f"d{day}u{i}" if rng.random() < 0.7 else f"loyal{i % 500}"
            ts = day * DAY + i * (DAY / 3000)
            samplers[int(user_hash(u, 99) * parts)].observe(u, ts, {"g": "ab"[i % 2], "r": str(i % 50)})
            held = sum(len(s.records) for s in samplers)
            assert held <= budget, (day, i, held)
    snaps = [s.snapshot() for s in samplers]
    assert sum(x.n for x in snaps) >= budget / 2  # still a real sample after 10 days of churn
    a = finish(merge_stats([query_stats(x, "*") for x in snaps]))
    assert a["budget_users"] == budget and a["sample_bytes"] == sum(x.nbytes for x in snaps) > 0
    assert sum(s.counts["models_learned"] for s in samplers) > 0


def test_the_default_is_a_real_sample_not_a_census_and_memory_is_reported():
    cfg = ReachConfig()
    assert cfg.budget_users == 20_000
    s = ReachSampler(cfg, 0, 4)  # a partition of four: 5,000 users
    for i in range(30_000):
        s.observe(f"u{i}", 1_700_000_000.0 + i, {"g": str(i % 7)})
    assert len(s.records) == 5_000 and s.k == 5_000
    m = s.memory()
    assert m["sampled_users"] == 5_000 and 50 < m["bytes_per_user"] < 2000 and m["budget_users"] == 5_000
    d = s.snapshot().describe()
    assert d["sampled_users"] == 5_000 and 0 < d["bytes_per_user"] < 40
    with pytest.raises(ConfigError, match="^budget_users: "):
        ReachConfig(budget_users=0)


# -- the design and the estimator -------------------------------------------------------------------------
def test_the_stream_sampler_equals_the_bulk_builder_before_any_model():
    users = [(f"u{i}", {"geo": "IS" if i % 5 == 0 else "US"}, {0: 1 + i % 3}) for i in range(300)]
    s = ReachSampler(ReachConfig(budget_users=40, epoch_s=1000.0, seed=7))
    feed(s, users, epoch=1000.0)
    cols = {"geo": np.array([1 if i % 5 == 0 else 0 for i in range(300)], dtype=np.int32)}
    bulk = build_sample(cols, {"geo": ["US", "IS"]}, np.array([user_hash(u, 7) for u, _, _ in users]),
                        np.array([float(sum(a.values())) for _, _, a in users]), np.ones(300), 40)
    for q in ("*", "geo = IS"):
        # the design alone: the estimator's model (which the stream has and the static builder has not) left out
        a, b = answer(s.snapshot(), q, composite=False), answer(bulk, q, composite=False)
        assert (a["users"], a["users_ci"], a["impressions"]) == (b["users"], b["users_ci"], b["impressions"])


def test_a_learned_model_over_samples_rare_users_and_every_user_keeps_a_floor():
    rng = np.random.default_rng(3)
    n = 6000
    geos = rng.choice(["US", "IS", "MC"], n, p=[0.9, 0.08, 0.02])
    s = ReachSampler(ReachConfig(budget_users=600, epoch_s=100.0, horizon_epochs=3, seed=2))
    for day in range(3):
        for i in range(n):
            s.observe(f"u{i}", 100.0 * day + i * 90.0 / n, {"geo": geos[i], "dev": "ab"[i % 2]})
    assert s.counts["models_learned"] >= 1
    sample = s.snapshot()
    mc = answer(sample, "geo = MC", composite=False)
    assert mc["matched_sample_users"] / sample.n > 2 * 0.02  # the rare value is over-sampled
    pi = 1 / sample.w_users
    assert pi.min() >= 0.6 * (600 / n)  # ... and nobody falls far below the uniform rate (1 - rare_share)
    assert mc["users_ci"][0] <= (geos == "MC").sum() <= mc["users_ci"][1]


def test_few_matches_fall_back_to_the_synthetic_estimate_and_beat_the_direct_one_when_attributes_are_independent():
    rng = np.random.default_rng(5)
    n = 40000
    values = {"geo": [f"g{i}" for i in range(8)], "interest": [f"i{i}" for i in range(40)]}
    cols = {"geo": rng.integers(0, 8, n).astype(np.int32), "interest": rng.integers(0, 40, n).astype(np.int32)}
    imps = rng.integers(1, 4, n).astype(float)
    q = "geo = g3 and interest in (i1, i2)"
    truth_u = exact_answer(cols, values, imps, q)["users"]  # about 250 users: ~5 matches in the sample
    err_fuzzy, err_direct, flagged, held = [], [], 0, 0
    for seed in range(100):  # 95% intervals over 100 draws: at least 88 (3 sd below 95) hold the truth
        sample = build_sample(cols, values, np.random.default_rng(seed).random(n), imps, np.ones(n), 800)
        a = answer(sample, q, 30)
        flagged += a["fallback"]
        held += a["users_ci"][0] <= truth_u <= a["users_ci"][1]
        err_fuzzy.append(abs(a["users"] - truth_u))
        err_direct.append(abs(answer(sample, q, 30, composite=False)["users"] - truth_u))
    assert flagged == 100 and held >= 88, held
    assert np.mean(err_fuzzy) < 0.7 * np.mean(err_direct)
    assert answer(sample, "geo = g3 and geo = g4", 30)["users"] == 0  # an empty rule stays empty


def test_a_rule_no_sampled_user_matches_gets_an_upper_bound_that_a_census_does_not():
    cols = {"g": np.array([0] * 990 + [1] * 10, dtype=np.int32)}
    sample = build_sample(cols, {"g": ["a", "b"]}, np.linspace(0.001, 0.999, 1000), np.ones(1000), np.ones(1000), 50)
    a = answer(sample, "g = b", composite=False)
    assert a["users"] == 0 and a["users_ci"][0] == 0 and a["users_ci"][1] > 10
    census = build_sample(cols, {"g": ["a", "b"]}, np.linspace(0.001, 0.999, 1000), np.ones(1000), np.ones(1000), 1000)
    assert answer(census, "g = c")["users_ci"] == [0, 0]


def test_the_estimate_names_its_bounds():
    parts = partition_samples(small_population(4), 2, budget_users=20, epoch_s=100.0)
    e = users_estimate(merge_stats([query_stats(p, "gender = F") for p in parts]))
    assert isinstance(e, Estimate) and e.level == 0.95
    assert e.lower <= e.estimate <= e.upper and e.holds(e.estimate) and not e.holds(e.upper + 1)
    with pytest.raises(AssertionError):
        Estimate(5.0, 6.0, 7.0)


def test_sample_files_round_trip_and_bad_files_are_refused():
    parts = partition_samples(small_population(4), 2, budget_users=20, epoch_s=100.0)
    sample = Sample.merge(parts)
    back = Sample.from_bytes(sample.to_bytes())
    for q in QUERIES:
        assert answer(back, q) == answer(sample, q)
    for bad in (b"not json", b'{"format": "other"}', b'{"format": "loopline-reach-sample/2"}',
                b'{"format": "loopline-reach-sample/1"}'):
        with pytest.raises(ConfigError, match="^sample: "):
            Sample.from_bytes(bad)


@pytest.mark.parametrize("field, value", [("budget_users", 0), ("min_per_stratum", -1), ("epoch_s", 0.0),
                                          ("horizon_epochs", 1.5), ("rare_share", 1.0), ("buckets_per_epoch", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ReachConfig(**{field: value})


def test_segment_labels_become_query_attributes_whatever_their_order():
    """A source's segment label is the attribute seg.<source>.<segment> = yes, whether the assertion
    comes before or after the user's impressions; the score model never uses it, so the sample is the same."""
    users = [f"u{i}" for i in range(400)]
    imps = [("imp", u, 1000.0 + i) for i, u in enumerate(users)]
    segs = [("seg", u, 0.0) for u in users[::4]]

    def build(items):
        s = ReachSampler(ReachConfig(budget_users=60, min_per_stratum=5))
        for kind, u, t in items:
            if kind == "imp":
                s.observe(u, t, {"age": str(int(u[1:]) % 3)})
            else:
                s.assert_segment(u, "dmp-1", "female")
        return s.snapshot()

    before, after = build(segs + imps), build(imps + segs)
    a, b = answer(before, "seg.dmp_1.female = yes"), answer(after, "seg.dmp_1.female = yes")
    assert a == b
    assert a["users_ci"][0] <= 100 <= a["users_ci"][1]
    assert segment_attr("dmp-1", "female") == "seg.dmp_1.female"
    assert answer(before, "not seg.dmp_1.female = yes")["users"] == pytest.approx(
        answer(before, "*")["users"] - a["users"], abs=0.2)  # answers are rounded to 0.1


def test_score_model_q_of_many_users_equals_q_of_each_after_the_vocabulary_moved_on():
    """``q_codes`` (the fresh sample a view asks for) gives each user the ``q`` the sampler gave it one
    event at a time, also when the vocabulary has since pruned values, reused their codes and added new
    ones, and for a missing or an unseen attribute."""
    from loopline.state.reach_strata import ScoreModel

    rng = np.random.default_rng(3)
    values = {"geo": ["US", "IS", "DE", "FR"], "dev": ["ios", "web", "tv"], "age": ["18", "25", "35"]}
    n = 500
    cols = {a: rng.integers(-1, len(v), n).astype(np.int32) for a, v in values.items()}
    model = ScoreModel.fit(cols, values, rng.uniform(0.5, 2.0, n))
    today = {"geo": ["US", "IS", "NO", "XX", "FR"], "dev": ["ios", "web", "ca"], "lang": ["en", "is"]}
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in today.items()}
    m = 300
    now = {a: rng.integers(-1, len(v), m).astype(np.int32) for a, v in today.items()}
    got = model.q_codes(now, vocab, m)
    want = [model.q({a: today[a][c[i]] for a, c in now.items() if c[i] >= 0}) for i in range(m)]
    assert got.tolist() == want  # bit for bit: a frozen sample takes either (ReachSampler._q_held)
    assert len(set(np.round(got, 9))) > 10
    assert math.isfinite(float(got.max()))


def test_score_model_q_codes_takes_memory_of_the_users_not_of_the_vocabularies_product():
    """A live vocabulary grows to thousands of values per attribute; a dense (|a|, |b|) look-up table per
    pair of attributes then took tens of MB and seconds for each fresh sample (found by the soak: the
    event loop held 3.9 s)."""
    import tracemalloc

    from loopline.state.reach_strata import ScoreModel

    rng = np.random.default_rng(0)
    fitted = {f"a{i}": [f"v{j}" for j in range(8)] for i in range(4)}
    cols = {a: rng.integers(-1, 8, 4000).astype(np.int32) for a in fitted}
    model = ScoreModel.fit(cols, fitted, rng.uniform(0.5, 2.0, 4000))
    assert model.pairs, "the model kept no pair table to look up"
    today = {a: [f"new{j}" for j in range(4000)] + vals for a, vals in fitted.items()}
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in today.items()}
    now = {a: rng.integers(-1, len(v), 2000).astype(np.int32) for a, v in today.items()}
    tracemalloc.start()
    try:
        got = model.q_codes(now, vocab, 2000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"q_codes took {peak / 2**20:.0f} MB for 2,000 users"
    want = [model.q({a: today[a][c[i]] for a, c in now.items() if c[i] >= 0}) for i in range(200)]
    np.testing.assert_allclose(got[:200], want, rtol=1e-12)


def test_the_score_model_holds_its_cells_in_arrays_not_per_cell_objects():
    """A fitted model's cells grow with the sample (37 per sampled user in the soak); a dict per table
    keyed by value tuples took ~150 bytes a cell."""
    import tracemalloc

    from loopline.state.reach_strata import ScoreModel

    rng = np.random.default_rng(0)
    n = 5000
    values = {f"a{i}": [f"v{j}" for j in range(50)] for i in range(8)}
    cols = {a: rng.integers(-1, 50, n).astype(np.int32) for a in values}
    tracemalloc.start()
    try:
        model = ScoreModel.fit(cols, values, rng.uniform(0.5, 2.0, n))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cells = len(model._keys)
    assert cells > 50_000
    assert held < 40 * cells, f"{held / cells:.0f} bytes a cell"
    some = {a: values[a][c[0]] for a, c in cols.items() if c[0] >= 0}
    assert model.q(some) == pytest.approx(float(model.q_codes({a: c[:1] for a, c in cols.items()},
                                                              {a: {v: i for i, v in enumerate(vs)} for a, vs in values.items()}, 1)[0]), rel=1e-12)


def test_a_frozen_sample_reuses_each_users_q_and_equals_one_computed_afresh(monkeypatch):
    """Freezing a sample (each view refresh) needs every held user's q under every model in force: it is
    computed once per distinct attribute codes and model, and the frozen sample is the one a sampler with
    no cache gives (the soak found views recomputing it for every user, every second)."""
    from loopline.state.reach_strata import ScoreModel

    s = ReachSampler(ReachConfig(budget_users=40, min_per_stratum=3, epoch_s=100.0, horizon_epochs=2, seed=1))
    feed(s, small_population(n=300))
    assert s.counts["models_learned"] > 0
    first = s._frozen()
    rows = []
    real, real_one = ScoreModel.q_codes, ScoreModel.q
    monkeypatch.setattr(ScoreModel, "q_codes", lambda self, cols, vocab, n: rows.append(n) or real(self, cols, vocab, n))
    monkeypatch.setattr(ScoreModel, "q", lambda self, attrs: rows.append(1) or real_one(self, attrs))
    again = s._frozen()
    assert rows == [], "q was computed again for users whose codes did not change"
    s._qcache.clear()
    fresh = s._frozen()
    assert sum(rows) > 0
    for a, b, c in zip(first, again, fresh):
        if isinstance(a, dict):
            assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a)
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


def test_a_frozen_sample_is_the_same_whether_q_comes_user_by_user_or_in_one_pass(monkeypatch):
    """``_q_held`` computes a few missing users one by one and many in one ``q_codes`` pass."""
    from loopline.state import reach_sampler

    s = ReachSampler(ReachConfig(budget_users=200, min_per_stratum=3, epoch_s=100.0, horizon_epochs=2, seed=1))
    feed(s, small_population(n=600))
    assert s.counts["models_learned"] > 0
    frozen = []
    for few in (0, 10**9):
        monkeypatch.setattr(reach_sampler, "FEW_MISSES", few)
        s._qcache.clear()
        frozen.append(s._frozen())
    for a, b in zip(*frozen):
        if isinstance(a, dict):
            assert all(np.array_equal(a[k], b[k]) for k in a)
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_prune_drops_the_cached_q_of_the_pruned_code_and_nothing_else():
    s = ReachSampler(ReachConfig(budget_users=40, min_per_stratum=3, epoch_s=100.0, horizon_epochs=2, seed=1))
    feed(s, small_population(n=300))
    s._frozen()
    cache = next(c for c in s._qcache.values() if c)
    j, code = 0, next(k[0] for k in cache if k and k[0] != -1)
    kept = {k for k in cache if not (k and k[0] == code)}
    s._pruned(j, code)
    assert set(cache) == kept and kept


def test_the_q_cache_is_bounded_by_the_sample_and_says_when_it_starts_over():
    s = ReachSampler(ReachConfig(budget_users=40, min_per_stratum=3, epoch_s=100.0, horizon_epochs=2, seed=1))
    feed(s, small_population(n=300))
    s._frozen()
    m, cache = next((m, c) for m, c in s._qcache.items() if c)
    for i in range(2 * len(s.records) + 1025):  # code tuples of users long gone
        cache[(-7, i)] = 1.0
    s._frozen()
    assert s.counts["q_cache_cleared"] >= 1
    assert all(len(c) <= 2 * len(s.records) + 1024 for c in s._qcache.values())


def test_the_score_model_keeps_the_most_covered_attributes_only():
    """A vocabulary of many attribute names (junk included) must not make every pair a table."""
    from loopline.state.reach_strata import MAX_MODEL_ATTRS, ScoreModel

    rng = np.random.default_rng(0)
    n = 2000
    values = {f"a{i:02d}": ["x", "y", "z"] for i in range(MAX_MODEL_ATTRS + 8)}
    # attribute i is present for a share of users falling with i: the last 8 are the least covered
    cols = {a: np.where(rng.random(n) < 1.0 - i / 40, rng.integers(0, 3, n), -1).astype(np.int32)
            for i, a in enumerate(values)}
    model = ScoreModel.fit(cols, values, np.ones(n))
    kept = sorted(model.attrs)
    assert kept == sorted(values)[:MAX_MODEL_ATTRS]
    assert len(model.pairs) == MAX_MODEL_ATTRS * (MAX_MODEL_ATTRS - 1) // 2
    assert {a for pair in model.pairs for a in pair} == set(kept)
