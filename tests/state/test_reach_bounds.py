"""The reach sampler's bounds: the vocabulary (names and values, rare ones pruned so junk cannot lock out
real attributes) and the segment labels held per user."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.state.reach import ReachConfig, ReachSampler, answer, segment_attr
from loopline.state.reach_vocab import HeavyHitters, Vocabulary

AGES = ("18-24", "25-34", "65+")
CENSUS = dict(budget_users=50_000, min_per_stratum=5)  # every user sampled: answers are exact counts


def test_sixty_four_junk_names_no_longer_lock_out_age():
    """Today the first 64 names take every slot for good and ``age = 18-24`` matches nobody."""
    s = ReachSampler(ReachConfig(**CENSUS))
    s.observe("junk", 1.0, {f"j{k}": "x" for k in range(64)})
    for rnd in range(2):  # every user twice: the second impression re-codes the first few
        for i in range(2000):
            s.observe(f"u{i}", 2.0 + rnd + i * 1e-4, {"age": AGES[i % 3], "gender": "FM"[i % 2]})
    assert "age" in s.attrs and "gender" in s.attrs and len(s.attrs) == 64
    sample = s.snapshot()
    assert answer(sample, "age = 18-24")["users"] == 667
    assert answer(sample, "age = 25-34 and gender = F")["users"] == sum(1 for i in range(2000) if i % 6 == 4)
    b = s.bounds()
    assert b["attrs_pruned"] == 2 and b["attrs_dropped"] == 4


def test_ten_thousand_junk_names_and_values_stay_under_the_caps():
    cfg = ReachConfig(max_attrs=8, max_values=16, vocab_candidates=32, **CENSUS)
    s = ReachSampler(cfg)
    for i in range(10_000):
        s.observe(f"u{i}", 1.0 + i * 1e-4, {"age": AGES[i % 3], "gender": "FM"[i % 2], f"junk{i}": "x",
                                            "zip": f"z{i}"})
    assert len(s.attrs) <= 8 and all(len(v) <= 16 for v in s.values.values())
    assert all(len(v) == len(s.vocab[a]) for a, v in s.values.items())
    b = s.bounds()
    assert b["candidates"] <= (8 + 1) * 32
    assert b["attrs_dropped"] >= 10_000 - 8 and b["values_dropped"] >= 10_000 - 16
    sample = s.snapshot()
    assert answer(sample, "gender = F")["users"] == 5000 and answer(sample, "age = 65+")["users"] == 3333


def test_a_frequent_value_replaces_the_least_used_and_its_users_lose_the_pruned_one():
    s = ReachSampler(ReachConfig(max_values=4, **CENSUS))
    for i in range(4):
        s.observe(f"rare{i}", 1.0, {"city": f"c{i}"})
    s.observe("rare0", 1.5, {"city": "c0"})  # c0 hit twice: not the one pruned
    for i in range(10):
        s.observe(f"p{i}", 2.0 + i, {"city": "paris"})
    assert sorted(s.values["city"]) == ["c0", "c2", "c3", "paris"]
    sample = s.snapshot()
    assert answer(sample, "city = paris")["users"] == 8  # the first two came before it had a code
    assert answer(sample, "city = c1")["users"] == 0 and answer(sample, "city = c0")["users"] == 1
    assert s.bounds()["values_pruned"] == 1


def test_a_name_that_stops_coming_loses_its_slot_at_the_epoch_boundaries():
    s = ReachSampler(ReachConfig(max_attrs=1, epoch_s=100.0, horizon_epochs=10, **CENSUS))
    for i in range(10):
        s.observe(f"a{i}", 1.0 + i, {"old": "x"})
    for e in range(1, 4):
        for i in range(10):
            s.observe(f"b{e}_{i}", 100.0 * e + i, {"new": "y"})
    assert s.attrs == ["new"]
    assert answer(s.snapshot(), "new = y")["users"] > 0


def test_segment_labels_are_bounded_and_a_sampled_user_keeps_its_own():
    s = ReachSampler(ReachConfig(max_segment_users=100, max_attrs=8, **CENSUS))
    s.assert_segment("u0", "s1", "g1")
    s.observe("u0", 1.0, {"age": "18-24"})  # sampled with its label
    for i in range(1, 1000):
        s.assert_segment(f"u{i}", "s1", "g1")
    assert len(s.segments) == 100 and s.counts["segment_users_evicted"] == 900 and "u0" not in s.segments
    s.observe("u0", 2.0, {"age": "18-24"})  # re-coded without its forgotten labels: keeps them
    for i in range(1, 1000):
        s.observe(f"u{i}", 3.0, {"age": "25-34"})
    q = f"{segment_attr('s1', 'g1')} = yes"
    assert answer(s.snapshot(), q)["users"] == 1 + 100  # u0 and the 100 newest labelled
    for k in range(12):
        s.assert_segment("v", "s2", f"g{k}")
    assert len(s.segments["v"]) == 8 and s.counts["segments_dropped"] == 4
    assert s.bounds()["segment_users_evicted"] == 901  # v's labels pushed one more out


def test_under_the_caps_the_sample_is_unchanged():
    users = [(f"u{i}", {"age": AGES[i % 3], "geo": f"g{i % 7}", "gender": "FM"[i % 2]}) for i in range(3000)]
    samples = []
    for cfg in (ReachConfig(budget_users=300, min_per_stratum=10, epoch_s=100.0),
                ReachConfig(budget_users=300, min_per_stratum=10, epoch_s=100.0, max_attrs=500,
                            max_values=50_000, vocab_candidates=7)):
        s = ReachSampler(cfg)
        for k in range(3):
            for i, (u, a) in enumerate(users):
                s.observe(u, 100.0 * k + i * 0.03, a)
        assert s.bounds()["attrs_pruned"] == s.bounds()["values_dropped"] == 0
        samples.append(s.snapshot().to_bytes())
    assert samples[0] == samples[1]


@pytest.mark.parametrize("field,bad", [("vocab_candidates", 0), ("max_segment_users", 0), ("max_answers", 0),
                                       ("answers_ttl_s", 0), ("answers_ttl_s", float("inf")), ("answers_ttl_s", True)])
def test_bad_bound_settings_name_the_field(field, bad):
    with pytest.raises(ConfigError, match=field):
        ReachConfig(**{field: bad})


def test_heavy_hitters_keep_a_frequent_item_among_a_flood_of_one_offs():
    hh = HeavyHitters(16)
    for i in range(20_000):
        hh.add("age" if i % 4 == 0 else f"junk{i}")
    assert len(hh) <= 16 and hh.counts["age"] >= 5000 - 20_000 // 17


names = st.sampled_from(["a", "b", "c", "d", "e", "seg.s.x"])
values = st.sampled_from(["1", "2", "3", "4", "5"])
events = st.lists(st.one_of(
    st.tuples(st.just("imp"), st.integers(0, 9), st.floats(0, 500), st.dictionaries(names, values, max_size=4)),
    st.tuples(st.just("seg"), st.integers(0, 9), st.sampled_from(["x", "y", "z"]))), max_size=60)


@pytest.mark.fuzz
@given(events)
def test_the_vocabulary_stays_bounded_and_every_code_stays_valid(evs):
    s = ReachSampler(ReachConfig(budget_users=4, min_per_stratum=1, epoch_s=100.0, horizon_epochs=2, max_attrs=3,
                                 max_values=2, vocab_candidates=2, max_segment_users=3))
    for ev in evs:
        if ev[0] == "imp":
            s.observe(f"u{ev[1]}", ev[2], ev[3])
        else:
            s.assert_segment(f"u{ev[1]}", "s", ev[2])
        assert len(s.attrs) <= 3 and len(s.segments) <= 3
        assert all(len(s.values[a]) <= 2 and s.vocab[a] == {v: i for i, v in enumerate(s.values[a])}
                   for a in s.attrs)
        for rec in s.records.values():
            assert all(c == -1 or c < len(s.values[s.attrs[j]]) for j, c in enumerate(rec.codes))
    sample = s.snapshot()
    a = answer(sample, "a = 1 or seg.s.x = yes")
    assert 0 <= a["users"] <= sample.w_users.sum() + 1e-6


def test_prunes_between_two_decays_are_limited():
    """Names crafted to take each other's slot (each seen more than twice as often as the last) cost at
    most ``candidates`` walks over the sample between two epoch boundaries."""
    walks = []
    v = Vocabulary(max_attrs=1, max_values=8, candidates=2, on_prune=lambda j, c: walks.append(j))
    v.encode({"a": "1"})
    for name, times in (("b", 3), ("c", 9), ("d", 21)):
        for _ in range(times):
            v.encode({name: "1"})
    assert v.attrs == ["c"] and len(walks) == 2 and v.counts["attrs_dropped"] >= 21
    v.decay()  # the epoch boundary: a new budget
    v.encode({"d": "1"})
    assert v.attrs == ["d"] and len(walks) == 3
