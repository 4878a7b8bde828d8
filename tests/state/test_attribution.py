"""The attribution join: labels, windows, lateness, duplicates, redelivery, and a batch reference."""

import random

import pytest

from loopline.errors import ConfigError
from loopline.state.attribution import AttributionConfig, AttributionJoin
from loopline.state.events import Conversion, Impression

CFG = AttributionConfig(window_s=100.0, lateness_s=10.0, bucket_s=5.0, dedup_horizon_s=100.0)


def imp(i, ts, user="u1"):
    return Impression(f"i{i}", float(ts), user, "a1", "c1", "feed")


def conv(v, i, ts, kind="click"):
    return Conversion(f"v{v}", float(ts), f"i{i}", kind)


def run(events, cfg=CFG, end=True):
    j = AttributionJoin({}, cfg)
    outs = []
    for n, e in enumerate(events):
        outs += j.process(e, src=n)
        j.save()
    if end:
        outs += j.close_all()
    return j, outs


def labels(outs):
    return {o.value["id"]: o.value["label"] for o in outs if o.kind == "example"}


def test_conversion_inside_window_makes_a_positive_at_once():
    j = AttributionJoin({}, CFG)
    j.process(imp(1, 0), 0)
    out = j.process(conv(1, 1, 50), 1)
    assert [(o.kind, o.key, o.value["label"], o.value["conversion"]) for o in out] == [("example", "u1", 1, "v1")]


def test_window_closes_negative_only_after_watermark_passes_it():
    j = AttributionJoin({}, CFG)
    j.process(imp(1, 0), 0)
    # watermark = 105 - 10 = 95 < 100: still open
    assert j.process(imp(2, 105), 1) == []
    out = j.process(imp(3, 120), 2)  # watermark 110 passes bucket [100, 105)
    assert labels(out) == {"i1": 0}


def test_conversion_after_window_is_late_and_does_not_label():
    j, outs = run([imp(1, 0), conv(1, 1, 101)])
    assert labels(outs) == {"i1": 0}
    assert j.stats["late"] == 1


def test_conversion_before_its_impression_is_held_within_lateness():
    j, outs = run([conv(1, 1, 95), imp(1, 100)])
    assert labels(outs) == {"i1": 1}
    assert j.stats["orphan"] == 0


def test_conversion_whose_impression_never_comes_is_orphan():
    j, outs = run([conv(1, 9, 5), imp(1, 30), imp(2, 60)])
    assert j.stats["orphan"] == 1
    assert labels(outs) == {"i1": 0, "i2": 0}


def test_other_kinds_are_counted_not_labelled():
    j, outs = run([imp(1, 0), conv(1, 1, 5, kind="purchase")])
    assert labels(outs) == {"i1": 0} and j.stats["other_kind"] == 1


def test_second_conversion_is_extra():
    j, outs = run([imp(1, 0), conv(1, 1, 5), conv(2, 1, 6)])
    assert labels(outs) == {"i1": 1} and j.stats["extra"] == 1


def test_duplicate_ids_are_dead_lettered():
    j = AttributionJoin({}, CFG)
    j.process(imp(1, 0), src=0)
    dup = j.process(imp(1, 1), src=1)
    assert [(o.kind, o.value[0]) for o in dup] == [("deadletter", "duplicate_impression")]
    j.process(conv(1, 1, 5), src=2)
    assert [o.value[0] for o in j.process(conv(1, 1, 7), src=3)] == ["duplicate_conversion"]
    assert j.stats["duplicates"] == 2


def test_ids_are_forgotten_after_the_dedup_horizon():
    store = {}
    j = AttributionJoin(store, CFG)
    j.process(imp(1, 0), 0)
    j.process(imp(2, 1000), 1)  # far beyond window + horizon: i1 closed and forgotten
    assert "i:i1" not in j.index and "i:i2" in j.index
    assert not any("i:i1" in chunk for chunk in store.values() if isinstance(chunk, dict))
    # a third impression with the first id is accepted again: the id was forgotten
    assert j.process(imp(1, 1001), 2) == []


def test_close_all_ends_event_time_and_counts_what_it_closed():
    j, outs = run([imp(1, 0), imp(2, 1), conv(1, 1, 2)])
    assert labels(outs) == {"i1": 1, "i2": 0}
    assert j.stats["closed_at_end"] == 1
    assert j.buckets == [] and j.index == {} and not any(k.startswith("b:") for k in j.store)


def test_state_resumes_from_the_store():
    store = {}
    j = AttributionJoin(store, CFG)
    j.process(imp(1, 0), 0)
    j.process(conv(7, 9, 1), 1)  # held, its impression not yet seen
    j.save()
    j2 = AttributionJoin(store, CFG)  # a restarted worker over the same table rebuilds its index
    assert set(j2.index) == {"i:i1", "c:i9"}
    out = j2.process(imp(9, 2), 2) + j2.process(conv(1, 1, 50), 3)
    assert labels(out) == {"i1": 1, "i9": 1}


def test_large_buckets_are_chunked():
    j, outs = run([imp(i, 0.001 * i) for i in range(AttributionJoin.CHUNK * 2 + 7)], end=False)
    assert max(j.nchunks.values()) == 3
    outs = j.close_all()
    assert len(labels(outs)) == AttributionJoin.CHUNK * 2 + 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_labels_match_a_batch_reference_on_random_sorted_streams(seed):
    rng = random.Random(seed)
    events, t = [], 0.0
    for i in range(400):
        t += rng.expovariate(1 / 3)
        events.append(imp(i, t, user=f"u{rng.randrange(20)}"))
        for k in range(rng.choice([0, 0, 1, 2])):
            events.append(conv(f"{i}-{k}", i, t + rng.expovariate(1 / 60), kind=rng.choice(["click", "buy"])))
    events.sort(key=lambda e: e.ts)
    _, outs = run(events)
    got = labels(outs)
    ref = {}
    imps = {e.id: e for e in events if isinstance(e, Impression)}
    for e in imps.values():
        ref[e.id] = int(any(isinstance(c, Conversion) and c.impression == e.id and c.kind == "click"
                            and e.ts - CFG.lateness_s <= c.ts <= e.ts + CFG.window_s for c in events))
    assert got == ref
    assert sum(got.values()) > 10


@pytest.mark.parametrize("field,value", [("window_s", -1), ("bucket_s", 0), ("lateness_s", float("nan")),
                                         ("dedup_horizon_s", 1.0), ("target_kind", "")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}"):
        AttributionConfig(**{field: value})


def test_a_duplicate_does_not_move_event_time():
    """A dead-lettered line must leave the join as it was (issue 12): a copy of an id with a later ts
    closed every window it passed."""
    j = AttributionJoin({}, CFG)
    j.process(imp(1, 0), src=0)
    dup = j.process(imp(1, 500), src=1)
    assert [o.kind for o in dup] == ["deadletter"] and j.meta["max_ts"] == 0.0
    assert labels(j.process(conv(1, 1, 50), src=2)) == {"i1": 1}
