"""IngestCore: counting, dead letters with raw bytes, and the crash-safety outbox."""

import base64

import orjson

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


def test_a_partly_written_batch_is_processed_again_without_false_duplicates():
    store = {}
    core = IngestCore(store, 0, CFG)
    core.handle(line(), 0)
    core.flush(meta=False)  # state written, crash before the meta record
    restarted = IngestCore(store, 0, CFG)
    assert restarted.handle(line(), 0) == []  # its own write, not a duplicate
    assert [o.value["id"] for o in restarted.end_of_log()] == ["i1"]
    assert restarted.counts()["deadletter"] == {} and restarted.counts()["accepted"] == 1


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
