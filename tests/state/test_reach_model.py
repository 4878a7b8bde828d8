"""The latent-class model behind the reach estimate's fall-back (state/reach_model.py) and its use."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.state.reach import ReachConfig, ReachSampler, Sample, answer, build_sample, exact_answer
from loopline.state.reach_model import UNSEEN, ClassStream, class_weights, fit_classes


def segmented(n: int, seed: int, segments: int = 6):
    """Users of ``segments`` latent segments, each with its own concentrated shares of three attributes
    (strong dependence inside the population, none inside a segment), 1-3 impressions each."""
    rng = np.random.default_rng(seed)
    sizes = {"a": 12, "b": 10, "c": 8}
    seg = rng.choice(segments, n, p=np.arange(1, segments + 1)[::-1] / sum(range(1, segments + 1)))
    cols = {}
    for name, v in sizes.items():
        probs = np.stack([rng.dirichlet(np.full(v, 0.3)) for _ in range(segments)])
        cols[name] = (probs[seg].cumsum(1) > rng.random((n, 1))).argmax(1).astype(np.int32)
    values = {name: [f"{name}{i}" for i in range(v)] for name, v in sizes.items()}
    return cols, values, rng.integers(1, 4, n).astype(float)


def stream(cols: dict, values: dict, imps: np.ndarray, classes: int, seed: int = 0) -> ClassStream:
    """A ClassStream fed every impression of the population, in a random order."""
    s = ClassStream(classes=classes, half_life_s=0, seed=seed)
    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(imps)), imps.astype(int)))
    for i in order.tolist():
        s.add({a: int(c[i]) for a, c in cols.items()}, 0.0)
    return s


def test_one_class_is_independence_and_more_classes_fit_a_segmented_population():
    cols, values, imps = segmented(20_000, 1)
    nv = {a: len(v) for a, v in values.items()}
    w = np.ones(len(imps))
    truth = np.zeros((12, 10))
    np.add.at(truth, (cols["a"], cols["b"]), 1)
    one = fit_classes(cols, nv, w, imps, k=1).cells(("a", "b"))[:12, :10]
    indep = np.outer(np.bincount(cols["a"], minlength=12), np.bincount(cols["b"], minlength=10)) / len(imps)
    assert np.allclose(one, indep, rtol=1e-3)  # the prior is worth 2 users: a hair off the sample's shares
    six = fit_classes(cols, nv, w, imps, k=6).cells(("a", "b"))[:12, :10]
    big = truth >= 50
    err = lambda m: np.median(np.abs(m[big] - truth[big]) / truth[big])  # noqa: E731
    assert err(six) < 0.5 * err(one), (err(six), err(one))


def test_the_stream_learns_classes_whose_users_the_sample_weighs_and_rare_rules_borrow_from_them():
    cols, values, imps = segmented(30_000, 2)
    s = stream(cols, values, imps, classes=6)
    classes = {"share": s.share(), "theta": s.theta(values)}
    assert s.counts["impressions"] == int(imps.sum()) and abs(classes["share"].sum() - 1) < 1e-9
    for t in classes["theta"].values():
        assert np.allclose(t.sum(0), 1.0) and (t > 0).all()
    q = "a = a3 and b = b7 and c in (c1, c2)"
    truth = exact_answer(cols, values, imps, q)["users"]
    n = len(imps)
    errs, errs_direct, held = [], [], 0
    for seed in range(40):
        base = build_sample(cols, values, np.random.default_rng(100 + seed).random(n), imps, np.ones(n), 600)
        sample = Sample(base.cols, base.values, base.w_users, base.w_imps, base.imps, base.info, classes=classes)
        model = class_weights(sample.cols, classes["theta"], classes["share"], sample.w_users, sample.w_imps,
                              sample.imps)
        assert model.users.sum() == pytest.approx(sample.w_users.sum(), rel=0.1)  # the classes hold everyone
        a = answer(sample, q)
        errs.append(abs(a["users"] - truth) / truth)
        errs_direct.append(abs(answer(sample, q, composite=False)["users"] - truth) / truth)
        held += a["users_ci"][0] <= truth <= a["users_ci"][1]
    assert np.median(errs) < 0.6 * np.median(errs_direct), (np.median(errs), np.median(errs_direct))
    assert held >= 34, held  # 95% intervals: at least 34 of 40


def test_the_sampler_carries_its_streams_classes_into_every_snapshot_and_counts_their_bytes():
    cols, values, imps = segmented(3_000, 3)
    s = ReachSampler(ReachConfig(budget_users=300, epoch_s=1e6, model_classes=4))
    for i in range(3_000):
        s.observe(f"u{i}", 1_000.0 + i, {a: values[a][int(c[i])] for a, c in cols.items()})
    snap = s.snapshot()
    (start, stop, classes), = snap.blocks
    assert (start, stop) == (0, snap.n) and classes["share"].shape == (4,)
    assert set(classes["theta"]) == {"a", "b", "c"}
    assert all(t.shape == (len(snap.values[a]) + 1, 4) for a, t in classes["theta"].items())
    assert s.memory()["model_bytes"] == s.classes.nbytes > 0 and s.bounds()["model_classes"] == 4
    plain = Sample(snap.cols, snap.values, snap.w_users, snap.w_imps, snap.imps)
    assert snap.nbytes > plain.nbytes
    off = ReachSampler(ReachConfig(budget_users=300, epoch_s=1e6, model_classes=0))
    off.observe("u1", 1.0, {"a": "x"})
    assert off.classes is None and off.snapshot().blocks[0][2] is None


def test_sample_files_keep_their_blocks_and_refuse_bad_classes():
    cols, values, imps = segmented(2_000, 4)
    s = stream(cols, values, imps, classes=3)
    classes = {"share": s.share(), "theta": s.theta(values)}
    base = build_sample(cols, values, np.random.default_rng(0).random(2_000), imps, np.ones(2_000), 200)
    one = Sample(base.cols, base.values, base.w_users, base.w_imps, base.imps, base.info, classes=classes)
    merged = Sample.merge([one, base])
    back = Sample.from_bytes(merged.to_bytes())
    assert [(a, b, c is None) for a, b, c in back.blocks] == [(0, one.n, False), (one.n, one.n + base.n, True)]
    q = "a = a1 and b = b2"
    assert answer(back, q) == answer(merged, q)
    import orjson
    d = orjson.loads(merged.to_bytes())
    d["blocks"][0][2]["theta"]["a"] = [[1.0]]
    with pytest.raises(ConfigError, match="^sample: not a valid reach sample file"):
        Sample.from_bytes(orjson.dumps(d))
    d = orjson.loads(merged.to_bytes())
    d["blocks"][1][1] = 1
    with pytest.raises(ConfigError, match="^sample: not a valid reach sample file"):
        Sample.from_bytes(orjson.dumps(d))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                                          st.one_of(st.integers(0, 400), st.just(UNSEEN)), max_size=4),
                          st.floats(0, 1e7, allow_nan=False)), max_size=60),
       st.sampled_from([None, ("a", None), ("b", 3)]))
def test_any_stream_of_codes_gives_finite_shares_and_stays_bounded(rows, forget):
    s = ClassStream(classes=3, max_values=256, chunk=16, half_life_s=100.0)
    for codes, ts in rows:
        s.add(codes, ts)
    if forget:
        s.forget(*forget)
    values = {a: [str(i) for i in range(300)] for a in "abcd"}
    theta = s.theta({a: v[:200] for a, v in values.items()})
    share = s.share()
    assert np.all(np.isfinite(share)) and len(share) == 3
    for t in theta.values():
        assert t.shape == (201, 3) and np.all(np.isfinite(t)) and np.allclose(t.sum(0), 1.0)
    assert all(len(x) <= 257 for x in s.stats.values())  # max_values codes and missing, at most
    assert s.theta(values) == {}  # more values than max_values: left out (independent of the rest)


def test_attribute_names_without_a_slot_never_reach_the_class_statistics():
    s = ReachSampler(ReachConfig(budget_users=50, max_attrs=4, epoch_s=1e6, model_classes=3))
    for i in range(5_000):  # a new junk name on every impression, beside a real attribute
        s.observe(f"u{i % 300}", float(i), {"age": str(i % 5), f"junk{i}": "x"})
    s.classes.flush()
    assert set(s.classes.stats) <= set(s.vocabulary.attrs) and len(s.classes.stats) <= 4
    assert "age" in s.classes.stats


_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 500) | st.floats(allow_nan=True) | st.text(max_size=4),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["blocks", "block", "classes", "share", "theta", "row"]), _json)
def test_a_sample_file_with_any_blocks_loads_and_answers_or_is_refused_in_one_line(where, junk):
    import orjson
    cols, values, imps = segmented(400, 5)
    s = stream(cols, values, imps, classes=2)
    base = build_sample(cols, values, np.random.default_rng(1).random(400), imps, np.ones(400), 60)
    merged = Sample.merge([Sample(base.cols, base.values, base.w_users, base.w_imps, base.imps, base.info,
                                  classes={"share": s.share(), "theta": s.theta(values)}), base])
    d = orjson.loads(merged.to_bytes())
    if where == "blocks":
        d["blocks"] = junk
    elif where == "block":
        d["blocks"][0] = junk
    elif where == "classes":
        d["blocks"][0][2] = junk
    elif where == "share":
        d["blocks"][0][2]["share"] = junk
    elif where == "theta":
        d["blocks"][0][2]["theta"] = junk
    else:
        d["blocks"][0][2]["theta"]["a"][0] = junk
    try:
        back = Sample.from_bytes(orjson.dumps(d))
    except ConfigError as exc:
        assert str(exc).startswith("sample: ") and "\n" not in str(exc)
        return
    a = answer(back, "a = a1 and b in (b2, b3)")
    assert np.isfinite(a["users"]) and a["users_ci"][0] <= a["users"] <= a["users_ci"][1]
