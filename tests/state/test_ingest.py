"""IngestCore: counting, dead letters with raw bytes, and the crash-safety outbox."""

import base64

import orjson
import pytest

from loopline.state.attribution import AttributionConfig
from loopline.state.ingest import IngestCore, output_id

CFG = AttributionConfig(window_s=100.0, lateness_s=0.0, bucket_s=5.0, dedup_horizon_s=100.0)


def line(**kw):
    base = {"type": "impression", "id": "i1", "ts": 0.0, "user": "u1", "ad": "a", "campaign": "c",
            "vertical": "feed"}
    base.update(kw)
    return orjson.dumps(base)


def test_dead_letter_keeps_reason_raw_bytes_and_source():
    core = IngestCore({}, 3, CFG)
    raw = b"\xff not utf8"
    [out] = core.handle(raw, offset=17)
    assert out.kind == "deadletter"
    assert out.value["reason"] == "not_utf8" and out.value["src"] == [3, 17]
    assert base64.b64decode(out.value["raw_b64"]) == raw
    assert core.counts()["read"] == 1 and core.counts()["accepted"] == 0


def test_duplicate_is_dead_lettered_with_its_raw_line_and_counted_once():
    core = IngestCore({}, 0, CFG)
    core.handle(line(), 0)
    [dl] = core.handle(line(ts=1.0), 1)
    assert dl.value["reason"] == "duplicate_impression"
    c = core.counts()
    assert (c["read"], c["accepted"], c["deadletter"]) == (2, 1, {"duplicate_impression": 1})


def test_messages_whose_effects_are_durable_are_skipped_when_redelivered():
    store = {}
    core = IngestCore(store, 0, CFG)
    core.handle(line(), 0)
    core.handle(line(id="i2", ts=1.0), 1)
    core.flush()
    restarted = IngestCore(store, 0, CFG)
    assert restarted.handle(line(), 0) == [] and restarted.handle(line(id="i2", ts=1.0), 1) == []
    assert restarted.counts()["redelivered"] == 2 and restarted.counts()["read"] == 2
    assert restarted.counts()["deadletter"] == {}


class Crash(Exception):
    pass


class CrashingStore(dict):
    """A store that stops (a ``kill -9``) after ``left`` more writes or deletions."""

    left = None

    def _tick(self):
        if self.left is not None:
            if self.left == 0:
                raise Crash
            self.left -= 1

    def __setitem__(self, k, v):
        self._tick()
        super().__setitem__(k, orjson.loads(orjson.dumps(v)))  # what a table keeps: a copy, as serialized

    def __delitem__(self, k):
        self._tick()
        super().__delitem__(k)

    def get(self, k, default=None):  # a table deserializes on every read: changing it changes no store
        v = super().get(k)
        return default if v is None else orjson.loads(orjson.dumps(v))


def batches_of_a_small_log():
    """Impressions, conversions (held, applied, late), windows closing, in three batches."""
    lines = [imp_at(1, T0), conv_at(9, 5, T0 + 1), imp_at(2, T0 + 5), conv_at(1, 1, T0 + 30), imp_at(5, T0 + 40),
             imp_at(3, T0 + 3000), imp_at(4, T0 + 4000), conv_at(2, 2, T0 + 4100), imp_at(6, T0 + 9000),
             b"not json", imp_at(7, T0 + 9001), imp_at(1, T0 + 9002)]
    return [lines[:5], lines[5:9], lines[9:]]


def run(store, batches, core=None, start_batch=0):
    """Feed batches (each flushed); returns the outputs by id (the last copy: re-sent ones are equal)."""
    outs = {}
    core = core or IngestCore(store, 0, LIVE)
    offsets = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
    for b in range(start_batch, len(batches)):
        for o in feed(core, batches[b], start=offsets[b]):
            outs[output_id(o)] = o
        if b == len(batches) - 1:
            for o in core.end_of_log():
                outs[output_id(o)] = o
        core.flush()
    return core, outs


def test_a_crash_at_any_write_of_a_flush_leaves_the_numbers_of_a_run_without_crash():
    """The finding (``loopline chaos``, kills): a kill -9 between the state writes and the counters lost
    negatives and positives from the counters. Here the store stops at every write of every flush in
    turn; the restarted core re-sends its outbox, processes the batches again from its last committed
    offset, and must end with the outputs and counts of the run that never crashed."""
    batches = batches_of_a_small_log()
    clean, want = run(CrashingStore(), batches)
    assert sum(o.kind == "example" for o in want.values()) == 7
    crashes = 0
    for crash_at in range(10_000):
        store = CrashingStore()
        store.left = crash_at
        outs = {}
        core = IngestCore(store, 0, LIVE)
        try:
            run(store, batches, core)
            break  # no write left to crash at
        except Crash:
            crashes += 1
        store.left = None
        again = IngestCore(store, 0, LIVE)
        for o in again.unacked():
            outs[output_id(o)] = o
        done = sum(1 for b in range(len(batches)) if sum(len(x) for x in batches[:b + 1]) - 1 <= again.join.meta["through"])
        _, rest = run(store, batches, again, start_batch=done)
        outs.update(rest)
        assert outs == want, crash_at
        got = again.counts()
        assert {k: got[k] for k in ("accepted", "deadletter", "attribution", "max_ts")} == \
            {k: clean.counts()[k] for k in ("accepted", "deadletter", "attribution", "max_ts")}, crash_at
    assert crashes > 20  # every write of every flush was a crash point


def test_outbox_holds_outputs_until_acked_and_survives_a_restart():
    store = {}
    core = IngestCore(store, 0, CFG)
    core.handle(line(), 0)
    outs = core.handle(orjson.dumps({"type": "conversion", "id": "v1", "ts": 5, "impression": "i1",
                                     "kind": "click"}), 1)
    assert [o.value["label"] for o in outs] == [1]
    core.flush()
    # crash before the send was acknowledged: a new core over the same store still has it
    again = IngestCore(store, 0, CFG)
    assert [output_id(o) for o in again.unacked()] == ["x:i1"]
    again.acked(again.unacked())
    again.flush()  # the next flush drops acknowledged entries
    assert IngestCore(store, 0, CFG).unacked() == []


def test_partitions_do_not_share_state_in_one_store():
    store = {}
    a, b = IngestCore(store, 0, CFG), IngestCore(store, 1, CFG)
    a.handle(line(), 0)
    assert b.handle(line(), 0) == []  # same id in another partition is not a duplicate there
    assert a.counts()["accepted"] == b.counts()["accepted"] == 1


# -- issue 12: skew, totality ------------------------------------------------------------------------
DAY = 86400.0
T0 = 1_700_000_000.0
LIVE = AttributionConfig(window_s=3600.0, lateness_s=60.0, bucket_s=60.0, dedup_horizon_s=3600.0)


def imp_at(i, ts, user="u1"):
    return line(id=f"i{i}", ts=ts, user=user)


def conv_at(v, i, ts):
    return orjson.dumps({"type": "conversion", "id": f"v{v}", "ts": ts, "impression": f"i{i}", "kind": "click"})


def feed(core, lines, start=0):
    outs = []
    for n, raw in enumerate(lines, start):
        outs += core.handle(raw, n)
    return outs


def reasons(outs):
    return [o.value["reason"] for o in outs if o.kind == "deadletter"]


def adds_up(core):
    c = core.counts()
    return c["read"] == c["accepted"] + sum(c["deadletter"].values()) + c["held"]


def test_one_millisecond_timestamp_does_not_close_every_window():
    """The finding: one impression at 1.7e12 closed every open window as negative."""
    core = IngestCore({}, 0, LIVE)
    outs = feed(core, [imp_at(1, T0), imp_at(2, T0 + 10), imp_at(3, T0 * 1000)])
    assert reasons(outs) == ["bad_ts"] and not [o for o in outs if o.kind == "example"]
    assert core.counts()["max_ts"] == T0 + 10
    outs = feed(core, [conv_at(1, 1, T0 + 20)], start=3)
    assert [(o.value["id"], o.value["label"]) for o in outs if o.kind == "example"] == [("i1", 1)]


def test_an_event_far_ahead_of_the_watermark_is_dead_lettered_and_never_moves_it():
    core = IngestCore({}, 0, LIVE)
    outs = feed(core, [imp_at(1, T0), imp_at(2, T0 + 3 * DAY)])
    assert outs == [] and core.counts()["held"] == 1  # held: is it a jump of the stream or an outlier?
    outs = feed(core, [imp_at(3, T0 + 30), conv_at(1, 1, T0 + 40)], start=2)
    assert reasons(outs) == ["ts_ahead"]
    [dl] = [o for o in outs if o.kind == "deadletter"]
    assert dl.value["src"] == [0, 1] and "'ts'" in dl.value["detail"] and "ahead" in dl.value["detail"]
    assert base64.b64decode(dl.value["raw_b64"]) == imp_at(2, T0 + 3 * DAY)
    assert [(o.value["id"], o.value["label"]) for o in outs if o.kind == "example"] == [("i1", 1)]
    assert core.counts()["max_ts"] == T0 + 40
    assert core.counts()["deadletter"] == {"ts_ahead": 1} and adds_up(core)


def test_a_real_gap_in_traffic_is_accepted_once_later_events_confirm_it():
    """A partition's traffic may pause for days (MovieLens has 63-hour gaps): the events after the gap
    agree with each other, so they are processed in order, none lost."""
    core = IngestCore({}, 0, LIVE)
    feed(core, [imp_at(1, T0)])
    after = [imp_at(2, T0 + 3 * DAY), conv_at(2, 2, T0 + 3 * DAY + 5), imp_at(3, T0 + 3 * DAY + 9)]
    outs = feed(core, after, start=1)
    assert reasons(outs) == []
    assert [(o.value["id"], o.value["label"]) for o in outs if o.kind == "example"] == [("i1", 0), ("i2", 1)]
    c = core.counts()
    assert c["held"] == 0 and c["accepted"] == 4 and c["max_ts"] == T0 + 3 * DAY + 9 and adds_up(core)


def test_outliers_that_disagree_with_each_other_are_all_dead_lettered():
    core = IngestCore({}, 0, LIVE)
    outs = feed(core, [imp_at(1, T0), imp_at(2, T0 + 3 * DAY), imp_at(3, T0 + 6 * DAY), imp_at(4, T0 + 9 * DAY)])
    assert reasons(outs) == ["ts_ahead", "ts_ahead"] and core.counts()["held"] == 1
    outs = core.end_of_log()  # nothing confirmed the last one before the log ended
    assert reasons(outs) == ["ts_ahead"] and [o.value["id"] for o in outs if o.kind == "example"] == ["i1"]
    assert core.counts()["held"] == 0 and adds_up(core)


def test_the_first_event_of_a_partition_sets_its_watermark_unchecked():
    """Documented: with no watermark there is nothing to be ahead of; the absolute range guards it."""
    core = IngestCore({}, 0, LIVE)
    assert feed(core, [imp_at(1, T0 + 5 * DAY)]) == [] and core.counts()["held"] == 0
    assert core.counts()["max_ts"] == T0 + 5 * DAY


def test_held_events_survive_a_restart():
    store = {}
    core = IngestCore(store, 0, LIVE)
    feed(core, [imp_at(1, T0), imp_at(2, T0 + 3 * DAY)])
    core.flush()
    again = IngestCore(store, 0, LIVE)
    assert again.handle(imp_at(2, T0 + 3 * DAY), 1) == []  # redelivered: its effect (the hold) is stored
    outs = feed(again, [imp_at(3, T0 + 3 * DAY + 1), imp_at(4, T0 + 3 * DAY + 2)], start=2)
    assert reasons(outs) == [] and [o.value["id"] for o in outs if o.kind == "example"] == ["i1"]
    assert again.counts()["accepted"] == 4 and adds_up(again)


@pytest.mark.parametrize("field,value", [("max_ahead_s", 0), ("max_ahead_s", float("nan")),
                                         ("ahead_confirm", -1), ("ahead_confirm", 1.5)])
def test_bad_skew_settings_name_the_field(field, value):
    from loopline.errors import ConfigError
    with pytest.raises(ConfigError, match=f"^{field}"):
        AttributionConfig(**{field: value})


def test_the_skew_check_can_be_turned_off():
    core = IngestCore({}, 0, AttributionConfig(max_ahead_s=float("inf")))
    feed(core, [imp_at(1, T0), imp_at(2, T0 + 300 * DAY)])
    assert core.counts()["held"] == 0 and core.counts()["max_ts"] == T0 + 300 * DAY


@pytest.mark.parametrize("raw", [None, bytearray(b'{"type":"click"}'), memoryview(b"[]"), "text \ud800", 42],
                         ids=["tombstone", "bytearray", "memoryview", "str-with-surrogate", "int"])
def test_handle_never_raises_on_any_message_value(raw):
    core = IngestCore({}, 0, CFG)
    [dl] = core.handle(raw, 0)
    assert dl.kind == "deadletter" and dl.value["reason"] in ("not_object", "unknown_type", "not_utf8", "bad_json")
    assert adds_up(core)


def test_an_unexpected_exception_becomes_an_internal_dead_letter(monkeypatch):
    core = IngestCore({}, 0, CFG)

    def boom(*a, **kw):
        raise KeyError("bug")
    monkeypatch.setattr(core.join, "process", boom)
    [dl] = core.handle(line(), 0)
    assert dl.value["reason"] == "internal" and "KeyError" in dl.value["detail"]
    monkeypatch.undo()
    assert core.handle(line(id="i2"), 1) == []  # the core goes on
    c = core.counts()
    assert c["deadletter"] == {"internal": 1} and c["accepted"] == 1 and adds_up(core)


def test_duplicates_neither_confirm_nor_refute_a_jump():
    """Found by the fuzz property: two copies of an earlier impression, days ahead, 'confirmed' a jump
    that the good lines alone would not have made."""
    core = IngestCore({}, 0, LIVE)
    outs = feed(core, [imp_at(0, T0), imp_at(0, T0 + 2 * DAY), imp_at(0, T0 + 2 * DAY), imp_at(1, T0 + 2 * DAY)])
    assert reasons(outs) == ["duplicate_impression", "duplicate_impression"] and core.counts()["held"] == 1
    outs = feed(core, [imp_at(1, T0 + 2 * DAY + 1)], start=4)  # a copy of a held one: still a duplicate
    assert reasons(outs) == ["duplicate_impression"] and core.counts()["held"] == 1
    outs = core.end_of_log()
    assert reasons(outs) == ["ts_ahead"] and [o.value["id"] for o in outs if o.kind == "example"] == ["i0"]
    assert adds_up(core)
