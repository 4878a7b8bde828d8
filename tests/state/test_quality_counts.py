"""Segment and truth events, and the q_c counts: order independence, merging, storage, report rules."""

import random

import orjson
import pytest

from loopline.errors import InvalidEvent
from loopline.state.events import REASONS, SegmentAssertion, TruthReport, parse_event
from loopline.state.ingest import IngestCore
from loopline.state.quality_counts import QualityCounts, merge_aggregates

SEG = {"type": "segment", "source": "s1", "user": "u1", "segment": "female", "ts": 5.0}
TRUTH = {"type": "truth", "campaign": "c1", "segment": "female", "fraction": 0.62, "impressions": 12000, "ts": 9.0}


def test_segment_and_truth_events_parse():
    seg = parse_event(orjson.dumps({**SEG, "extra": 1}))
    assert isinstance(seg, SegmentAssertion) and (seg.source, seg.user, seg.segment) == ("s1", "u1", "female")
    truth = parse_event(orjson.dumps({**TRUTH, "impressions": 12000.0}))
    assert isinstance(truth, TruthReport) and truth.fraction == 0.62 and truth.impressions == 12000
    assert parse_event(orjson.dumps(truth.to_dict())) == truth


@pytest.mark.parametrize("change,reason,field", [
    ({"fraction": 1.3}, "bad_value", "fraction"),
    ({"fraction": -0.1}, "bad_value", "fraction"),
    ({"fraction": "0.5"}, "wrong_type", "fraction"),
    ({"fraction": True}, "wrong_type", "fraction"),
    ({"fraction": None}, "wrong_type", "fraction"),
    ({"impressions": 0}, "bad_value", "impressions"),
    ({"impressions": 2.5}, "wrong_type", "impressions"),
    ({"campaign": ""}, "bad_value", "campaign"),
    ({"ts": -1}, "bad_ts", "ts"),
], ids=lambda x: str(x))
def test_bad_truth_reports_are_rejected_naming_the_field(change, reason, field):
    with pytest.raises(InvalidEvent) as info:
        parse_event(orjson.dumps({**TRUTH, **change}))
    assert info.value.reason == reason and reason in REASONS and field in info.value.detail


@pytest.mark.parametrize("drop", ["fraction", "impressions", "segment", "campaign"])
def test_truth_report_missing_a_field(drop):
    with pytest.raises(InvalidEvent, match="missing_field"):
        parse_event(orjson.dumps({k: v for k, v in TRUTH.items() if k != drop}))


def test_nan_fraction_is_a_bad_value():
    raw = orjson.dumps({**TRUTH, "fraction": 0.5}).replace(b'"fraction":0.5', b'"fraction":NaN')
    with pytest.raises(InvalidEvent, match="bad_value"):
        parse_event(raw)


@pytest.mark.parametrize("drop", ["source", "user", "segment"])
def test_segment_missing_a_field(drop):
    with pytest.raises(InvalidEvent, match="missing_field"):
        parse_event(orjson.dumps({k: v for k, v in SEG.items() if k != drop}))


def test_ingest_routes_quality_events_to_audience_and_counts_bad_ones():
    core = IngestCore({}, 0, audience=True)
    outs = core.handle(orjson.dumps(SEG), 0) + core.handle(orjson.dumps(TRUTH), 1)
    assert [(o.kind, o.key, o.value["type"]) for o in outs] == [("audience", "u1", "segment"),
                                                                ("audience", "c1", "truth")]
    [dl] = core.handle(orjson.dumps({**TRUTH, "fraction": 2}), 2)
    assert dl.kind == "deadletter" and dl.value["reason"] == "bad_value"
    c = core.counts()
    assert c["read"] == 3 and c["accepted"] == 2 and c["deadletter"] == {"bad_value": 1}
    assert c["attribution"]["impressions"] == 0  # the join never sees them
    assert IngestCore({}, 0).handle(orjson.dumps(SEG), 0) == []  # without audience: accepted, no output


def _events(seed=0):
    rng = random.Random(seed)
    evs = [{"type": "impression", "user": f"u{rng.randrange(30)}", "campaign": f"c{rng.randrange(6)}",
            "ts": float(i)} for i in range(500)]
    evs += [{"type": "segment", "source": f"s{rng.randrange(2)}", "user": f"u{rng.randrange(30)}",
             "segment": rng.choice(["g", "h"]), "ts": float(rng.randrange(500))} for _ in range(40)]
    evs += [{"type": "truth", "campaign": f"c{c}", "segment": "g", "fraction": rng.random(), "impressions": 50 + c,
             "ts": float(rng.randrange(3))} for c in range(6) for _ in range(2)]
    return evs


def _count(evs, store=None):
    qc = QualityCounts({} if store is None else store)
    for e in evs:
        qc.learn_one(e)
    return qc


def test_counts_do_not_depend_on_order_or_partitioning():
    evs = _events()
    ref = _count(evs).aggregate()
    shuffled = evs[:]
    random.Random(5).shuffle(shuffled)
    assert _count(shuffled).aggregate() == ref
    # by user for user-keyed values and by campaign for reports, as the audience topic partitions them
    parts = [[], [], []]
    for e in evs:
        parts[hash(e.get("user", e.get("campaign"))) % 3].append(e)
    merged = merge_aggregates(_count(p).aggregate() for p in parts)
    assert {k: v for k, v in merged.items() if k != "truth_replaced"} == \
        {k: v for k, v in ref.items() if k != "truth_replaced"}
    assert merged["truth"] == ref["truth"]


def test_labelled_counts_equal_a_batch_recount():
    evs = _events(3)
    agg = _count(evs).aggregate()
    labels = {(e["source"], e["segment"], e["user"]) for e in evs if e["type"] == "segment"}
    for s, segs in agg["labelled"].items():
        for g, per in segs.items():
            users = {u for s2, g2, u in labels if (s2, g2) == (s, g)}
            for c in agg["impressions"]:
                want = sum(1 for e in evs if e["type"] == "impression" and e["campaign"] == c and e["user"] in users)
                assert per.get(c, 0) == want
            assert agg["labelled_users"][s][g] == len(users)


def test_latest_truth_report_wins_and_replacements_are_counted():
    qc = _count([{**TRUTH, "fraction": 0.5, "ts": 1.0}, {**TRUTH, "fraction": 0.7, "ts": 3.0},
                 {**TRUTH, "fraction": 0.6, "ts": 2.0}, {**TRUTH, "fraction": 0.7, "ts": 3.0}])
    agg = qc.aggregate()
    assert agg["truth"]["c1"]["female"] == [0.7, 12000, 3.0]
    assert agg["truth_received"] == 4 and agg["truth_replaced"] == 3


def test_repeated_assertions_count_once_and_unknown_values_are_counted():
    qc = _count([SEG, SEG, {"type": "impression", "user": "u1", "campaign": "c1", "ts": 1.0}, {"type": "other"}])
    agg = qc.aggregate()
    assert agg["labelled"]["s1"]["female"] == {"c1": 1}
    assert agg["segment_repeats"] == 1 and agg["ignored"] == 1


def test_state_survives_a_flush_and_reload():
    evs = _events(7)
    store: dict = {}
    first = _count(evs[:300], store)
    first.flush()
    second = QualityCounts(store)
    for e in evs[300:]:
        second.learn_one(e)
    assert second.aggregate() == _count(evs).aggregate()


def test_a_re_sent_impression_counts_once_across_batches_and_restarts():
    store = {}
    qc = QualityCounts(store, prefix="0|")
    imp = {"type": "impression", "id": "i1", "user": "u1", "campaign": "c1", "ts": 1.0}
    qc.learn_one(imp)
    qc.learn_one({**imp, "id": "i2"})
    qc.flush()
    again = QualityCounts(store, prefix="0|")  # a restarted worker over the same table
    again.learn_one(imp)  # the ingest outbox re-sends it
    again.flush()
    agg = again.aggregate()
    assert agg["impressions"]["c1"] == 2 and agg["impression_events"] == 2
    assert agg["impression_repeats"] == 1
    assert agg["pairs"]["c1"]["c1"] == 4  # n_uc = 2, not 3
