"""The reach sampler and estimators: unbiased on small exact cases, exact when the sample is a census,
partition sums that merge into one sample's answer, the fuzzy fall-back, the horizon, the strata
learner and allocation, and the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.state.reach import (ReachConfig, ReachSampler, Sample, ThetaBaseline, answer, build_sample,
                                  exact_answer, finish, merge_stats, query_stats, segment_attr, user_hash)
from loopline.state.reach_strata import Strata, allocate, learn_strata, probe_scores

QUERIES = ["*", "gender = F", "geo = IS and gender = M", "not geo = IS and age in (18-24, 65+)"]


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


def feed(sampler: ReachSampler, users) -> None:
    events = [(100.0 * e + 1 + (hash(u) % 90), u, a) for u, a, act in users for e, k in act.items() for _ in range(k)]
    for ts, u, a in sorted(events, key=lambda t: (t[0], t[1])):
        sampler.observe(u, ts, a)


def truth(users, text: str) -> tuple[int, int]:
    from loopline.state.reach_query import parse_query
    from tests.state.test_reach_query import reference
    tree = parse_query(text).tree
    hits = [sum(act.values()) for u, a, act in users if reference(tree, a)]
    return len(hits), sum(hits)


def test_estimates_are_unbiased_on_a_small_exact_case_with_strata_and_two_epochs():
    users = small_population()
    cfg = dict(sample_users=16, min_per_stratum=3, epoch_s=100.0, min_leaf_share=0.0)
    runs = 300
    est = {q: ([], []) for q in QUERIES}
    learned = 0
    for seed in range(runs):
        s = ReachSampler(ReachConfig(seed=seed, **cfg))
        feed(s, users)
        learned += s.counts["restratified"]
        sample = s.snapshot()
        assert sample.n < len(users)
        for q in QUERIES:
            a = answer(sample, q, 3)
            est[q][0].append(a["users"])
            est[q][1].append(a["impressions"])
    assert learned == runs  # the second epoch ran with learned strata every time
    for q in QUERIES:
        tu, ti = truth(users, q)
        for got, want in ((np.array(est[q][0]), tu), (np.array(est[q][1]), ti)):
            se = got.std(ddof=1) / np.sqrt(runs)
            assert abs(got.mean() - want) < 4 * se + 0.5, (q, got.mean(), want, se)


def test_a_census_is_exact_with_a_zero_width_interval():
    users = small_population(1)
    s = ReachSampler(ReachConfig(sample_users=1000, epoch_s=100.0))
    feed(s, users)
    for q in QUERIES:
        a = answer(s.snapshot(), q)
        tu, ti = truth(users, q)
        assert (a["users"], a["impressions"]) == (tu, ti)
        assert a["users_ci"] == [tu, tu] and a["impressions_ci"] == [ti, ti]


def test_intervals_hold_the_truth_about_95_percent_of_the_time():
    users = small_population(2, n=400)
    tu, ti = truth(users, "gender = F")
    hit_u = hit_i = 0
    runs = 200
    for seed in range(runs):
        s = ReachSampler(ReachConfig(sample_users=60, min_per_stratum=5, epoch_s=100.0, seed=seed))
        feed(s, users)
        a = answer(s.snapshot(), "gender = F", 5)
        hit_u += a["users_ci"][0] <= tu <= a["users_ci"][1]
        hit_i += a["impressions_ci"][0] <= ti <= a["impressions_ci"][1]
    assert 0.88 <= hit_u / runs <= 1.0 and 0.85 <= hit_i / runs <= 1.0, (hit_u, hit_i)


def partition_samples(users, partitions: int = 4, **cfg) -> list[Sample]:
    samplers = [ReachSampler(ReachConfig(**cfg), p) for p in range(partitions)]
    for p, s in enumerate(samplers):
        feed(s, [u for u in users if int(u[0][1:]) % partitions == p])
    return [s.snapshot() for s in samplers]


def test_partition_sums_merge_into_the_answer_of_one_merged_sample():
    parts = partition_samples(small_population(3, n=300), sample_users=12, min_per_stratum=4, epoch_s=100.0,
                              min_leaf_share=0.0)
    merged = Sample.merge(parts)
    assert merged.n == sum(p.n for p in parts)
    for q in QUERIES:
        one = answer(merged, q, 4)
        summed = finish(merge_stats([query_stats(p, q, 4) for p in parts]), q)
        for k in ("users", "impressions"):
            assert summed[k] == pytest.approx(one[k], abs=0.11)
        assert summed["fallback"] == one["fallback"]
        assert summed["users_ci"] == pytest.approx(one["users_ci"], abs=0.11)


def fallback_population(n_us: int = 1000, n_is: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_us + n_is
    values = {"geo": ["US", "IS"], "gender": ["F", "M"]}
    cols = {"geo": np.array([0] * n_us + [1] * n_is, dtype=np.int32),
            "gender": (rng.random(n) < 0.5).astype(np.int32)}
    return cols, values, rng.random(n), rng.integers(1, 6, n).astype(float)


def geo_strata() -> Strata:
    return Strata([
        {"key": "[]", "split": "geo", "children": {"US": 1}, "rest": 2, "leaf": -1},
        {"key": '[["geo","US"]]', "split": None, "children": {}, "rest": None, "leaf": -1},
        {"key": '[["geo","*"]]', "split": None, "children": {}, "rest": None, "leaf": -1},
    ])


def test_a_thin_stratum_borrows_its_rate_from_the_coarser_one_and_says_so():
    cols, values, hashes, imps = fallback_population()
    sample = build_sample(cols, values, hashes, imps, geo_strata(), [200, 4])
    true = exact_answer(cols, values, imps, "geo = IS and gender = F")
    a = answer(sample, "geo = IS and gender = F", n_min=30)
    assert a["fallback"] and a["fallback_strata"] == ['[["geo","*"]]']
    assert a["users_ci"][0] <= true["users"] <= a["users_ci"][1]
    assert abs(a["users"] - true["users"]) < 0.35 * true["users"]
    # the stratum's own attribute still decides: a query that excludes it is untouched by the fall-back
    us = answer(sample, "geo = US and gender = F", n_min=30)
    assert not us["fallback"]
    assert us["users"] == answer(sample, "geo = US and gender = F", n_min=0)["users"]


def test_partitions_with_a_thin_stratum_merge_like_one_sample_fall_back_included():
    cols, values, hashes, imps = fallback_population(seed=1)
    halves = [np.arange(len(hashes)) % 2 == h for h in (0, 1)]
    parts = [build_sample({a: c[m] for a, c in cols.items()}, values, hashes[m], imps[m], geo_strata(), [100, 3])
             for m in halves]
    q = "gender = F and geo = IS"
    one = answer(Sample.merge(parts), q, 30)
    summed = finish(merge_stats([query_stats(p, q, 30) for p in parts]), q)
    assert one["fallback"] and summed["fallback"]
    assert summed["users"] == pytest.approx(one["users"], abs=0.11)
    assert summed["impressions"] == pytest.approx(one["impressions"], abs=0.11)


def test_the_stream_sampler_equals_the_bulk_builder_on_one_epoch():
    users = [(f"u{i}", {"geo": "IS" if i % 5 == 0 else "US"}, {0: 1 + i % 3}) for i in range(300)]
    s = ReachSampler(ReachConfig(sample_users=40, epoch_s=1000.0, seed=7))
    feed(s, users)
    cols = {"geo": np.array([1 if i % 5 == 0 else 0 for i in range(300)], dtype=np.int32)}
    bulk = build_sample(cols, {"geo": ["US", "IS"]}, np.array([user_hash(u, 7) for u, _, _ in users]),
                        np.array([float(sum(a.values())) for _, _, a in users]), Strata.root(), [40])
    for q in ("*", "geo = IS"):
        assert answer(s.snapshot(), q) == answer(bulk, q)


def test_users_leave_the_sample_with_the_horizon():
    s = ReachSampler(ReachConfig(sample_users=100, epoch_s=10.0, horizon_epochs=2))
    for i in range(20):
        s.observe(f"old{i}", 1.0, {"g": "a"})
    s.observe("new", 25.0, {"g": "b"})  # epoch 2: epoch 0 leaves a 2-epoch horizon
    s.observe("late", 3.0, {"g": "a"})  # too old now: ignored and counted
    a = answer(s.snapshot(), "*")
    assert (a["users"], a["impressions"]) == (1, 1)
    assert s.counts["too_old"] == 1 and len(s.records) == 1


def test_memory_is_bounded_and_reported():
    s = ReachSampler(ReachConfig(sample_users=50, epoch_s=1e9))
    for i in range(2000):
        s.observe(f"u{i}", float(i), {"g": str(i % 7)})
    m = s.memory()
    assert m["sampled_users"] == 50 and 50 < m["bytes_per_user"] < 2000
    snap = s.snapshot().describe()
    assert snap["sampled_users"] == 50 and snap["bytes_per_user"] > 0


def test_sample_files_round_trip_and_bad_files_are_refused():
    parts = partition_samples(small_population(4), 2, sample_users=10, epoch_s=100.0)
    sample = Sample.merge(parts)
    back = Sample.from_bytes(sample.to_bytes())
    for q in QUERIES:
        assert answer(back, q) == answer(sample, q)
    for bad in (b"not json", b'{"format": "other"}', b'{"format": "loopline-reach-sample/1"}'):
        with pytest.raises(ConfigError, match="^sample: "):
            Sample.from_bytes(bad)


@pytest.mark.parametrize("field, value", [("sample_users", 0), ("min_per_stratum", -1), ("epoch_s", 0.0),
                                          ("horizon_epochs", 1.5), ("min_leaf_share", 1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        ReachConfig(**{field: value})


def test_the_learner_gives_a_rare_group_hit_by_many_probes_a_stratum_of_its_own():
    rng = np.random.default_rng(0)
    n = 20000
    values = {"geo": [f"g{i}" for i in range(10)], "dev": ["a", "b", "c"]}
    cols = {"geo": rng.choice(10, n, p=np.r_[0.91, [0.01] * 9]).astype(np.int32),
            "dev": rng.integers(0, 3, n).astype(np.int32)}
    w = np.ones(n)
    st = learn_strata(cols, values, w, probe_scores(cols, values, w), max_strata=8, min_leaf=50)
    assert 2 <= len(st) <= 8
    assert st.keys[0] == '[["geo","g0"]]'
    caps = allocate(np.array(st.n), np.array(st.s), 400, 10)
    rate = caps / np.maximum(st.n, 1)
    assert rate[0] < rate[1:].min()  # the common group is sampled at a lower rate than every other


def test_allocation_keeps_floors_and_census_caps_and_spends_the_budget():
    N = np.array([10000.0, 500.0, 40.0, 5.0])
    k = allocate(N, np.array([1.0, 2.0, 1.0, 1.0]), 1000, 50)
    assert (k <= N).all() and k[2] == 40 and k[3] == 5 and k[1] >= 50
    assert 990 <= k.sum() <= 1000
    assert allocate(N, np.ones(4), 1000, 0)[0] == pytest.approx(1000 * N[0] / N.sum(), abs=2)


def test_theta_and_exact_baselines():
    cols, values, _, imps = fallback_population(2000, 300)
    theta = ThetaBaseline(cols, values, budget_bytes=4096)
    assert theta.nbytes <= 4096
    truth = exact_answer(cols, values, imps, "geo = IS or gender = F")
    assert truth["users"] == int(((cols["geo"] == 1) | (cols["gender"] == 0)).sum())
    a = theta.answer("geo = IS or gender = F")
    assert a["users_ci"][0] <= a["users"] <= a["users_ci"][1]
    assert abs(a["users"] - truth["users"]) < 0.25 * truth["users"]


def test_few_matches_borrow_the_residual_rate_and_beat_the_direct_estimate_when_attributes_are_independent():
    rng = np.random.default_rng(5)
    n = 40000
    values = {"geo": [f"g{i}" for i in range(8)], "interest": [f"i{i}" for i in range(40)]}
    cols = {"geo": rng.integers(0, 8, n).astype(np.int32), "interest": rng.integers(0, 40, n).astype(np.int32)}
    imps = rng.integers(1, 4, n).astype(float)
    nodes = [{"key": "[]", "split": "geo", "children": {f"g{i}": i + 1 for i in range(7)}, "rest": 8, "leaf": -1}]
    nodes += [{"key": f'[["geo","g{i}"]]', "split": None, "children": {}, "rest": None, "leaf": -1} for i in range(7)]
    nodes += [{"key": '[["geo","*"]]', "split": None, "children": {}, "rest": None, "leaf": -1}]
    q = "geo = g3 and interest in (i1, i2)"
    truth = exact_answer(cols, values, imps, q)["users"]  # about 250 users: ~5 matches in the sample
    err_fuzzy, err_direct, flagged = [], [], 0
    for seed in range(40):
        sample = build_sample(cols, values, np.random.default_rng(seed).random(n), imps, Strata(nodes), [100] * 8)
        a = answer(sample, q, 30)
        flagged += a["fallback_strata"] == ['[["geo","g3"]]']
        err_fuzzy.append(abs(a["users"] - truth))
        err_direct.append(abs(answer(sample, q, 30, composite=False)["users"] - truth))
    assert flagged == 40
    assert np.mean(err_fuzzy) < 0.7 * np.mean(err_direct)
    # a stratum the query excludes contributes nothing, fall-back or not
    assert answer(sample, "geo = g3 and geo = g4", 30)["users"] == 0


def test_priority_sampling_in_the_stream_equals_the_bulk_builder_and_favours_rare_users():
    from loopline.state.reach import with_score_model
    rng = np.random.default_rng(3)
    n = 3000
    values = {"geo": ["US", "IS", "MC"], "dev": ["a", "b"]}
    cols = {"geo": rng.choice(3, n, p=[0.9, 0.08, 0.02]).astype(np.int32), "dev": rng.integers(0, 2, n).astype(np.int32)}
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    st = with_score_model(Strata.root(), cols, values, np.ones(n), vocab)
    caps = [300]
    users = [(f"u{i}", {a: values[a][cols[a][i]] for a in values}, {0: 1 + i % 2}) for i in range(n)]
    s = ReachSampler(ReachConfig(sample_users=300, epoch_s=1000.0, seed=2))
    s.strata, s.cap = st, caps  # strata learned elsewhere (past data), as the bench does
    feed(s, users)
    bulk = build_sample(cols, values, np.array([user_hash(u, 2) for u, _, _ in users]),
                        np.array([float(sum(a.values())) for _, _, a in users]), st, caps)
    stream = s.snapshot()
    for q in ("*", "geo = MC", "geo = US and dev = a"):
        a, b = answer(stream, q, composite=False), answer(bulk, q, composite=False)
        assert a["users"] == pytest.approx(b["users"], abs=0.11) and a["impressions"] == pytest.approx(b["impressions"], abs=0.11)
    mc = cols["geo"] == 2
    share_mc = np.mean([v["geo"] == "MC" for v in (users[i][1] for i in range(n))])
    sampled_mc = answer(stream, "geo = MC", composite=False)["matched_sample_users"] / stream.n
    assert mc.any() and sampled_mc > 2 * share_mc  # the rare value is over-sampled


def test_segment_labels_become_query_attributes_whatever_their_order():
    """A source's segment label is the attribute seg.<source>.<segment> = yes, whether the assertion
    comes before or after the user's impressions; the strata never use it, so the sample is the same."""
    users = [f"u{i}" for i in range(400)]
    imps = [("imp", u, 1000.0 + i) for i, u in enumerate(users)]
    segs = [("seg", u, 0.0) for u in users[::4]]

    def build(items):
        s = ReachSampler(ReachConfig(sample_users=60, min_per_stratum=5))
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
    # today: "DE" pruned and its code reused by "NO", "FR" moved to a new code, "tv" gone, "ca" new,
    # and "age" no longer encoded (every user missing it) while "lang" has come
    today = {"geo": ["US", "IS", "NO", "XX", "FR"], "dev": ["ios", "web", "ca"], "lang": ["en", "is"]}
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in today.items()}
    m = 300
    now = {a: rng.integers(-1, len(v), m).astype(np.int32) for a, v in today.items()}
    got = model.q_codes(now, vocab, m)
    want = [model.q({a: today[a][c[i]] for a, c in now.items() if c[i] >= 0}) for i in range(m)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(set(np.round(got, 9))) > 10  # the users differ: a constant would not pass by chance
