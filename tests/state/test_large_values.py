"""Issue 13, item 4: no stored value (one changelog message) and no output outgrows ``MAX_VALUE_BYTES``,
whatever the input; the chunked layouts read back exactly what was written."""

from __future__ import annotations

import base64
import hashlib
import random

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.state.attribution import AttributionConfig, AttributionJoin
from loopline.state.events import Conversion, EventLimits, Impression
from loopline.state.ingest import IngestCore, output_id
from loopline.state.quality_counts import QualityCounts, QualityCountsConfig, load_aggregate
from loopline.state.sizes import MAX_DEADLETTER_RAW, MAX_VALUE_BYTES, size_of

MAX_LINE = EventLimits().max_line_bytes


class SizedStore(dict):
    """A dict store that remembers the largest value written to it (as the table serializes it)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.largest, self.largest_key, self.writes = 0, None, 0

    def __setitem__(self, key, value):
        n = size_of(value)
        self.writes += 1
        if n > self.largest:
            self.largest, self.largest_key = n, key
        super().__setitem__(key, value)


def bad_line(i: int, size: int = MAX_LINE) -> bytes:
    """A line of ``size`` bytes that is dead-lettered (``bad_json``), distinct per ``i``."""
    head = b"{%d " % i
    return head + b"x" * (size - len(head))


# -- the ingest outbox ---------------------------------------------------------------------------------
def test_a_batch_of_many_max_size_dead_letters_fits_the_outbox_and_survives_a_restart():
    """The finding: 300 max-size lines dead-lettered in one batch made a 25 MiB outbox value."""
    store = SizedStore()
    core = IngestCore(store, 0)
    outs = [o for i in range(300) for o in core.handle(bad_line(i), i)]
    assert {o.value["reason"] for o in outs} == {"bad_json"} and len(outs) == 300
    assert sum(size_of(list(o)) for o in outs) > 16 * 1024 * 1024  # more than the producer's limit in all
    core.flush()
    assert store.largest <= MAX_VALUE_BYTES, (store.largest_key, store.largest)

    rng = random.Random(7)
    acked = rng.sample(outs, 200)
    core.acked(acked)
    core.flush()
    assert store.largest <= MAX_VALUE_BYTES
    gone = {output_id(o) for o in acked}
    want = [o for o in outs if output_id(o) not in gone]
    assert IngestCore(store, 0).unacked() == want  # exactly the unacknowledged ones, in order

    again = IngestCore(store, 0)
    again.acked(again.unacked())
    again.flush()
    assert IngestCore(store, 0).unacked() == []
    assert [k for k in store if k.startswith("0|o|")] == []  # emptied chunks are deleted


def test_twelve_one_mib_lines_give_dead_letters_that_fit_one_message():
    """The issue's example: dead letters of 1 MiB lines (and a 20 MiB one) each fit, and so does the
    outbox; a long line keeps its first bytes, its length and its SHA-256."""
    store = SizedStore()
    core = IngestCore(store, 0)
    lines = [bad_line(i, 1024 * 1024) for i in range(12)] + [bad_line(12, 20 * 1024 * 1024)]
    outs = [o for i, raw in enumerate(lines) for o in core.handle(raw, i)]
    core.flush()
    assert [o.value["reason"] for o in outs] == ["line_too_long"] * 13
    for raw, o in zip(lines, outs):
        assert size_of(o.value) <= MAX_VALUE_BYTES
        kept = base64.b64decode(o.value["raw_b64"])
        assert kept == raw[:MAX_DEADLETTER_RAW] and o.value["raw_len"] == len(raw)
        assert o.value["raw_sha256"] == hashlib.sha256(raw).hexdigest()
    assert store.largest <= MAX_VALUE_BYTES
    assert IngestCore(store, 0).unacked() == outs


def test_a_short_dead_letter_keeps_its_line_whole():
    [o] = IngestCore({}, 0).handle(bad_line(0), 0)
    assert base64.b64decode(o.value["raw_b64"]) == bad_line(0) and "raw_sha256" not in o.value


def test_an_outbox_in_the_single_value_layout_is_read_and_rewritten_in_chunks():
    old = IngestCore({}, 0)
    outs = [o for i in range(3) for o in old.handle(bad_line(i, 100), i)]
    store = {"0|o": {output_id(o): list(o) for o in outs}}  # what the earlier layout stored
    core = IngestCore(store, 0)
    assert core.unacked() == outs
    core.flush()
    assert store["0|o"] == {"chunks": [0], "next": 1} and IngestCore(store, 0).unacked() == outs


def test_a_chunk_the_index_names_but_the_store_lacks_reads_as_empty():
    """The index is written before the chunks: a crash between them leaves a named, missing chunk."""
    store = {}
    core = IngestCore(store, 0)
    core.handle(bad_line(0, 100), 0)
    core.flush()
    store["0|o"] = {"chunks": [0, 1], "next": 2}
    assert len(IngestCore(store, 0).unacked()) == 1


SIZES = st.sampled_from([60, 2_000, 20_000, MAX_LINE])


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.lists(SIZES, max_size=8), st.integers(0, 2 ** 16), st.booleans()), max_size=8))
def test_the_outbox_returns_exactly_the_unacked_outputs_after_any_restart(batches):
    """Batches of outputs of mixed sizes (small chunks, so that they split), acknowledgements of a random
    part, restarts: the stored outbox always reads back as the model of it, every value within bounds."""
    store = SizedStore()
    core = IngestCore(store, 0)
    core.outbox.CHUNK_BYTES = 30_000
    offset, model = 0, {}
    for sizes, pick, restart in batches:
        outs = []
        for size in sizes:
            outs += core.handle(bad_line(offset, size), offset)
            offset += 1
        core.flush()
        model.update((output_id(o), o) for o in outs)
        acked = [o for k, o in enumerate(model.values()) if pick >> (k % 16) & 1]
        core.acked(acked)
        core.flush()
        for o in acked:
            model.pop(output_id(o))
        if restart:
            core = IngestCore(store, 0)
            core.outbox.CHUNK_BYTES = 30_000
        assert IngestCore(store, 0).unacked() == list(model.values())
    assert store.largest <= MAX_VALUE_BYTES


# -- the quality aggregate -----------------------------------------------------------------------------
def name(prefix: str, i: int) -> str:
    return f"{prefix}{i}-".ljust(250, "q")  # names as long as the event limits allow (256 characters)


def test_a_quality_aggregate_of_many_campaigns_and_pairs_fits_and_reads_back():
    """The finding: the aggregate was one value, rewritten every batch; many campaigns and pairs
    (long names) made it several MiB."""
    store = SizedStore()
    qc = QualityCounts(store, prefix="0|")
    rng = random.Random(3)
    for u in range(8):
        for src in ("s1", "s2"):
            qc.learn_one({"type": "segment", "source": name(src, 0), "user": f"u{u}", "segment": name("g", u % 3),
                          "ts": 1.0})
        for k in range(64):
            c = name("c", rng.randrange(3000))
            qc.learn_one({"type": "impression", "id": f"i{u}-{k}", "user": f"u{u}", "campaign": c, "ts": 2.0})
        if u % 3 == 2:
            qc.flush()
    for c in range(1000):
        qc.learn_one({"type": "truth", "campaign": name("c", c), "segment": name("g", c % 3), "fraction": 0.25,
                      "impressions": 1000, "ts": 3.0})
    qc.flush()
    agg = qc.aggregate()
    assert size_of(agg) > 4 * MAX_VALUE_BYTES  # the single value it used to be
    assert store.largest <= MAX_VALUE_BYTES, (store.largest_key, store.largest)
    assert load_aggregate(store, "0|") == agg
    assert QualityCounts(store, prefix="0|").aggregate() == agg


def test_a_flush_rewrites_only_the_chunks_that_changed():
    store = SizedStore()
    qc = QualityCounts(store)
    for c in range(3000):
        qc.learn_one({"type": "impression", "id": f"i{c}", "user": f"u{c}", "campaign": name("c", c), "ts": 1.0})
    qc.flush()
    chunks = [k for k in store if k.startswith("agg|impressions|")]
    assert len(chunks) > 2
    before = store.writes
    qc.learn_one({"type": "impression", "id": "j", "user": "u1", "campaign": name("c", 1), "ts": 2.0})
    qc.flush()
    # the user record, the ring slot and head, the aggregate's head and one chunk of impressions
    assert store.writes - before == 5


def test_an_aggregate_in_the_single_value_layout_is_read_and_rewritten_in_chunks():
    old = QualityCounts({})
    for u in range(5):
        old.learn_one({"type": "segment", "source": "s", "user": f"u{u}", "segment": "g", "ts": 1.0})
        old.learn_one({"type": "impression", "id": f"i{u}", "user": f"u{u}", "campaign": f"c{u % 2}", "ts": 2.0})
    old.learn_one({"type": "segment", "source": "s", "user": "u9", "segment": "lonely", "ts": 1.0})  # no impressions
    agg = old.aggregate()
    store = {"agg": agg}
    qc = QualityCounts(store)
    assert qc.aggregate() == agg
    qc.flush()
    assert "impressions" not in store["agg"] and load_aggregate(store) == agg


class SmallChunks(QualityCounts):
    CHUNK_BYTES = 400  # a few entries per chunk, so that small examples split


def quality_events():
    users, camps = st.sampled_from([f"u{i}" for i in range(6)]), st.sampled_from([f"c{i}" for i in range(8)])
    imp = st.builds(lambda u, c, i: {"type": "impression", "id": f"i{i}", "user": u, "campaign": c, "ts": 1.0},
                    users, camps, st.integers(0, 30))
    seg = st.builds(lambda u, s, g: {"type": "segment", "source": s, "user": u, "segment": g, "ts": 1.0},
                    users, st.sampled_from(["s1", "s2"]), st.sampled_from(["g1", "g2", "g3"]))
    truth = st.builds(lambda c, g, f, ts: {"type": "truth", "campaign": c, "segment": g, "fraction": f,
                                           "impressions": 100, "ts": ts},
                      camps, st.sampled_from(["g1", "g2"]), st.sampled_from([0.1, 0.5]), st.integers(0, 3))
    return st.one_of(imp, seg, truth)


@pytest.mark.fuzz
@given(st.lists(st.tuples(quality_events(), st.sampled_from(["", "flush", "restart"])), max_size=60))
def test_the_chunked_aggregate_reads_back_as_the_unchunked_one(steps):
    """Any events, flushes and restarts: the aggregate reassembled from the chunks equals the one
    counted in memory by a store that never restarts, and the bounds' counters agree too."""
    cfg = QualityCountsConfig(max_pairs=25, max_campaigns=6)  # bounds that bite, so restarts must keep them
    store = SizedStore()
    qc, ref = SmallChunks(store, cfg=cfg), QualityCounts({}, cfg=cfg)
    for ev, then in steps:
        qc.learn_one(ev)
        ref.learn_one(ev)
        if then:
            qc.flush()
            assert load_aggregate(store) == qc.aggregate()
        if then == "restart":
            qc = SmallChunks(store, cfg=cfg)
        assert qc.aggregate() == ref.aggregate()
    qc.flush()
    assert load_aggregate(store) == ref.aggregate()


# -- the attribution join ------------------------------------------------------------------------------
T0 = 1_700_000_000.0
JOIN = AttributionConfig(window_s=3600.0, lateness_s=60.0, bucket_s=60.0, dedup_horizon_s=3600.0)


def big_impression(i: int, ts: float = T0) -> bytes:
    """A valid impression near the line limit (64 attributes and 64 features with long names)."""
    attrs = {f"a{k}-".ljust(200, "k"): f"v{i}-".ljust(256, "v") for k in range(64)}
    features = {f"f{k}-".ljust(200, "f"): "x".ljust(200, "x") for k in range(64)}
    raw = orjson.dumps({"type": "impression", "id": f"i{i}", "ts": ts, "user": f"u{i}", "ad": "a", "campaign": "c",
                        "vertical": "feed", "attrs": attrs, "features": features})
    assert 40_000 < len(raw) <= MAX_LINE
    return raw


def test_join_chunks_of_max_size_impressions_fit_one_message():
    """The finding: a join chunk held 128 records whatever their size; 128 impressions near the line
    limit made a 6 MiB value."""
    store = SizedStore()
    core = IngestCore(store, 0, JOIN)
    for i in range(300):
        assert core.handle(big_impression(i, T0 + i), i) == []
    core.flush()
    assert store.largest <= MAX_VALUE_BYTES, (store.largest_key, store.largest)
    again = IngestCore(store, 0, JOIN)  # the chunks read back: every window closes once, at the end
    assert sorted(o.value["id"] for o in again.end_of_log() if o.kind == "example") == sorted(f"i{i}" for i in range(300))


def long_conversion(v: int, ts: float, impression: str = "i0", kind: str = "view") -> bytes:
    return orjson.dumps({"type": "conversion", "id": f"v{v}-".ljust(250, "v"), "ts": ts, "impression": impression,
                         "kind": kind.ljust(200, "k")})


@pytest.mark.parametrize("before", [True, False], ids=["held-before-the-impression", "after-it"])
def test_conversions_of_one_impression_are_bounded(before):
    """The finding: every conversion id of an impression was kept in one record (or one held list):
    thousands of them for one impression outgrew a message. Past ``max_conversions`` they are counted
    (``conversions_dropped``), not kept."""
    store = SizedStore()
    core = IngestCore(store, 0, JOIN)
    imp = orjson.dumps({"type": "impression", "id": "i0", "ts": T0 + 10, "user": "u", "ad": "a", "campaign": "c",
                        "vertical": "feed"})
    n = 3000
    lines = [long_conversion(v, T0 + 20) for v in range(n)]
    lines = lines + [imp] if before else [imp] + lines
    for off, raw in enumerate(lines):
        core.handle(raw, off)
    core.flush()
    stats = core.counts()["attribution"]
    assert stats["conversions"] == n and stats["conversions_dropped"] == n - JOIN.max_conversions
    assert stats["other_kind"] == JOIN.max_conversions  # the kept ones were all applied
    assert store.largest <= MAX_VALUE_BYTES, (store.largest_key, store.largest)
    # a kept conversion seen again is still a duplicate
    [dl] = core.handle(long_conversion(1, T0 + 21), len(lines))
    assert dl.value["reason"] == "duplicate_conversion"


def test_held_events_fit_the_meta_record_and_their_number_is_bounded():
    from loopline.state.attribution import MAX_AHEAD_CONFIRM
    from loopline.errors import ConfigError
    with pytest.raises(ConfigError, match="^ahead_confirm"):
        AttributionConfig(ahead_confirm=MAX_AHEAD_CONFIRM + 1)
    cfg = AttributionConfig(ahead_confirm=MAX_AHEAD_CONFIRM)
    store = SizedStore()
    core = IngestCore(store, 0, cfg)
    core.handle(big_impression(0, T0), 0)
    for i in range(1, MAX_AHEAD_CONFIRM + 1):  # max-size events far ahead: held, all of them
        core.handle(big_impression(i, T0 + 10 * 86400 + i), i)
    core.flush()
    assert core.counts()["held"] == MAX_AHEAD_CONFIRM
    assert store.largest <= MAX_VALUE_BYTES, (store.largest_key, store.largest)


def test_the_join_schedule_of_many_short_buckets_fits():
    """The finding: the schedule (due buckets) was one value; one-second buckets (``--window 1``) and a
    day of events keep ~86,400 buckets live."""
    cfg = AttributionConfig(window_s=86400.0, lateness_s=0.0, bucket_s=1.0, dedup_horizon_s=86400.0)
    store = {}
    j = AttributionJoin(store, cfg)
    n = 80_000
    for i in range(n):
        j.process(Impression(f"i{i}", T0 + i, "u", "a", "c", "feed"), src=i)
    j.save()
    assert len(j.buckets) == n
    largest = max(store, key=lambda k: size_of(store[k]))
    assert size_of(store[largest]) <= MAX_VALUE_BYTES, largest
    again = AttributionJoin(store, cfg)
    assert again.nchunks == j.nchunks and again.buckets == j.buckets
    outs = again.advance(T0 + 86400 + 3000)  # the first ~3,000 windows close (and ranges empty)
    again.save()
    assert {o.kind for o in outs} == {"example"} and len(outs) > 2900
    third = AttributionJoin(store, cfg)
    assert third.nchunks == again.nchunks and third.buckets == again.buckets
    assert len(store["s"]) == len({b // AttributionJoin.SCHEDULE_SPAN for b in third.buckets})


class SmallJoin(AttributionJoin):
    CHUNK, CHUNK_BYTES, SCHEDULE_SPAN = 3, 600, 2  # records move between chunks and ranges often


def join_events():
    ids = st.integers(0, 12)
    imp = st.builds(lambda i, t, u: Impression(f"i{i}", T0 + t, f"u{u}".ljust(60, "u"), "a", "c", "feed"),
                    ids, st.integers(0, 400), st.integers(0, 3))
    conv = st.builds(lambda v, i, t, k: Conversion(f"v{v}".ljust(40, "v"), T0 + t, f"i{i}", k),
                     st.integers(0, 20), ids, st.integers(0, 400), st.sampled_from(["click", "view"]))
    return st.one_of(imp, conv)


@pytest.mark.fuzz
@given(st.lists(st.tuples(join_events(), st.sampled_from(["", "save", "restart"])), max_size=50))
def test_join_chunking_changes_no_outcome_and_its_sizes_are_exact(steps):
    """A join with tiny chunks and schedule ranges, saved and restarted anywhere, emits what the default
    one emits (the order within a due bucket follows the chunks); its size accounting matches the
    stored chunks."""
    cfg = AttributionConfig(window_s=60.0, lateness_s=5.0, bucket_s=10.0, dedup_horizon_s=60.0, max_conversions=3)
    ref, store = AttributionJoin({}, cfg), {}
    j = SmallJoin(store, cfg)
    want, got = [], []
    for src, (ev, then) in enumerate(steps):
        want += ref.process(ev, src)
        got += j.process(ev, src)
        if then:
            j.save()
        if then == "restart":
            j = SmallJoin(store, cfg)
        for ck, chunk in store.items():
            if ck.startswith("b:") and chunk:
                assert j.sizes[ck] == size_of(chunk) + 1, ck  # (one comma more)
    want += ref.close_all()
    got += j.close_all()
    assert sorted(orjson.dumps(list(o)) for o in got) == sorted(orjson.dumps(list(o)) for o in want)
    assert j.stats == ref.stats
