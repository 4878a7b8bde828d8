"""The quality counts' bounds: user records, per-user campaigns and labels, campaigns, segments, campaign
pairs and truth reports stay under their caps, each counted when it bites, exact under them."""

from __future__ import annotations

import random

import pytest

from loopline.errors import ConfigError
from loopline.model.quality import assess, campaign_table
from loopline.state.quality_counts import BOUND_COUNTERS, QualityCounts, QualityCountsConfig, merge_aggregates


def imp(user, campaign, i):
    return {"type": "impression", "id": f"i{i}", "user": user, "campaign": campaign, "ts": float(i)}


def seg(user, source="s1", segment="g"):
    return {"type": "segment", "user": user, "source": source, "segment": segment, "ts": 0.0}


def users_in(store, prefix=""):
    return [k for k in store if k.startswith(prefix + "u:")]


def test_ten_thousand_users_keep_at_most_max_users_records_and_the_regulars_stay():
    """Today every user ever seen keeps a record for good."""
    store = {}
    qc = QualityCounts(store, "0|", QualityCountsConfig(max_users=100))
    qc.learn_one(seg("regular"))
    for i in range(10_000):
        qc.learn_one(imp(f"u{i}", "c1", i))
        if i % 20 == 0:
            qc.learn_one(imp("regular", "c2", 100_000 + i))
        if i % 500 == 0:
            qc.flush()
    qc.flush()
    assert len(users_in(store, "0|")) <= 100
    assert len([k for k in store if k.startswith("0|ring:")]) <= 100
    agg = qc.aggregate()
    assert agg["users_evicted"] == 10_001 - len(users_in(store, "0|"))
    assert store["0|u:regular"]["l"] == [["s1", "g"]]  # seen every 20 users: never forgotten
    assert agg["labelled"]["s1"]["g"]["c2"] == 500 and agg["impressions"]["c1"] == 10_000


def test_restarting_from_the_store_continues_the_ring_exactly():
    rng = random.Random(0)
    evs = [imp(f"u{rng.randrange(300)}", f"c{rng.randrange(5)}", i) for i in range(3000)]
    evs[::7] = [seg(f"u{rng.randrange(300)}", "s1", "g") for _ in evs[::7]]
    cfg = QualityCountsConfig(max_users=50)
    one, restarted = {}, {}
    a = QualityCounts(one, "", cfg)
    for k in range(0, len(evs), 100):
        b = QualityCounts(restarted, "", cfg)  # a new worker over the same table every batch
        for e in evs[k:k + 100]:
            a.learn_one(e)
            b.learn_one(e)
        a.flush()
        b.flush()
    assert one == restarted and a.aggregate()["users_evicted"] > 0


def test_per_user_campaigns_and_labels_are_capped():
    qc = QualityCounts({}, "", QualityCountsConfig(max_user_campaigns=10, max_user_labels=3))
    for k in range(5):
        qc.learn_one(seg("u1", "s1", f"g{k}"))
    for i in range(1000):
        qc.learn_one(imp("u1", f"c{i}", i))
    agg = qc.aggregate()
    assert len(qc._users["u1"]["c"]) == 10 and len(qc._users["u1"]["l"]) == 3
    assert agg["user_campaigns_dropped"] == 990 and agg["user_labels_dropped"] == 2
    assert len(agg["impressions"]) == 1000 and agg["labelled"]["s1"]["g0"]["c999"] == 1
    assert sum(len(r) for r in agg["pairs"].values()) == 55  # the 10 tracked campaigns' pairs


def test_campaigns_segments_pairs_and_truth_reports_are_capped():
    cfg = QualityCountsConfig(max_campaigns=50, max_segments=4, max_pairs=30, max_truth=20)
    qc = QualityCounts({}, "", cfg)
    for k in range(10):
        qc.learn_one(seg(f"u{k}", f"s{k}", "g"))
    for i in range(10_000):
        qc.learn_one(imp(f"u{i % 10}", f"c{i % 200}", i))
    for c in range(100):
        qc.learn_one({"type": "truth", "campaign": f"c{c}", "segment": "g", "fraction": 0.5,
                      "impressions": 100, "ts": 1.0})
    agg = qc.aggregate()
    assert len(agg["impressions"]) == 50 and agg["campaign_impressions_dropped"] == 7500
    assert sum(len(v) for v in agg["labelled"].values()) == 4 and agg["segments_dropped"] == 6
    entries = sum(len(r) for r in agg["pairs"].values()) + sum(
        len(r) for segs in agg["labelled_pairs"].values() for p in segs.values() for r in p.values())
    assert entries == 30 and agg["pairs_dropped"] > 0
    assert sum(len(v) for v in agg["truth"].values()) == 20 and agg["truth_dropped"] == 80
    assert not campaign_table(agg, "s0", "g")["has_pairs"]  # incomplete pair sums are not used
    report = assess(agg)
    assert report["bounds"]["pairs_dropped"] == agg["pairs_dropped"]
    assert merge_aggregates([agg, agg])["truth_dropped"] == 160


def test_under_the_bounds_the_counts_are_unchanged():
    rng = random.Random(1)
    evs = [imp(f"u{rng.randrange(500)}", f"c{rng.randrange(30)}", i) for i in range(5000)]
    evs += [seg(f"u{rng.randrange(500)}", "s1", rng.choice("gh")) for _ in range(400)]
    rng.shuffle(evs)
    small, large = QualityCounts({}), QualityCounts({}, "", QualityCountsConfig(max_users=10**9))
    for e in evs:
        small.learn_one(e)
        large.learn_one(e)
    a, b = small.aggregate(), large.aggregate()
    assert a == b and all(a[k] == 0 for k in BOUND_COUNTERS)
    assert assess(a)["bounds"] == {k: 0 for k in BOUND_COUNTERS}


@pytest.mark.parametrize("field", ["max_users", "max_user_campaigns", "max_user_labels", "max_campaigns",
                                   "max_segments", "max_pairs", "max_truth"])
def test_bad_bounds_name_the_field(field):
    with pytest.raises(ConfigError, match=field):
        QualityCountsConfig(**{field: 0})


def test_an_aggregate_stored_before_the_bounds_still_loads():
    old = {"impressions": {"c1": 1}, "labelled": {}, "labelled_users": {}, "pairs": {"c1": {"c1": 1}},
           "labelled_pairs": {}, "truth": {}, "users": 1, "impression_events": 1, "segment_events": 0,
           "segment_repeats": 0, "truth_received": 0, "truth_replaced": 0, "ignored": 0}
    qc = QualityCounts({"agg": old, "u:u1": {"l": [], "c": {"c1": 1}}})
    qc.learn_one(imp("u1", "c1", 2))
    assert qc.aggregate()["pairs"]["c1"]["c1"] == 4 and qc.aggregate()["users_evicted"] == 0
