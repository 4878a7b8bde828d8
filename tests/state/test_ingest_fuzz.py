"""Property-based fuzzing of the event contract and the ingest core (issue 12).

On arbitrary bytes and on almost-valid events (a valid event with one field turned into an edge value:
integers no float holds, surrogates, NULs, timestamps in milliseconds, blank strings, wrong types...):

* ``parse_event`` returns an event that keeps the contract, or raises ``InvalidEvent`` with a reason
  of ``REASONS`` and a printable detail; nothing else;
* ``IngestCore.handle`` never raises; every line is accepted, held or dead-lettered and the counts add
  up; nothing is dead-lettered ``internal``; every output can be sent (orjson) and a dead letter keeps
  the raw bytes;
* dead letters are transparent: the same lines without the dead-lettered ones give the same examples.

Examples per property come from the hypothesis profile (tests/conftest.py: a bounded number in CI,
many more under ``make fuzz``).
"""

from __future__ import annotations

import base64
import json
import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import InvalidEvent
from loopline.state.attribution import AttributionConfig
from loopline.state.events import REASONS, EventLimits, parse_event
from loopline.state.ingest import INTERNAL, IngestCore

from ..malformed_corpus import CONV, IMP, SEG, TRUTH

pytestmark = pytest.mark.fuzz

LIMITS = EventLimits()
CFG = AttributionConfig(window_s=3600.0, lateness_s=60.0, bucket_s=60.0, dedup_horizon_s=3600.0)
T0 = 1_700_000_000.0
DAY = 86400.0

# -- edge values -----------------------------------------------------------------------------------------
huge_ints = st.builds(lambda k, sign: sign * 10 ** k, st.integers(18, 400), st.sampled_from([1, -1]))
edge_floats = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.0, 1.7e12, 1.7e15,
                               1.7e18, 9.3e12, 4102444800.0, 4102444801.0, -1.0, 1e12, 1e12 + 1, 0.5, 1.0])
edge_strings = st.one_of(
    st.sampled_from(["", " ", "   ", "\t", "\u3000", "\x00", "i\x001", "\x07", "\x7f", "\x85", "\ud800", "a\udfffb",
                     "\ud83d", "x" * 257, "ok", "é", "🙂", "i1", "u1"]),
    st.text(max_size=8),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, st.floats(), edge_floats, edge_strings)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(edge_strings, c, max_size=3),
                           max_leaves=6)


def dumps(obj) -> bytes:
    """JSON the way a careless producer writes it: NaN, integers of any size, lone surrogates (escaped)."""
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def almost_valid(draw) -> bytes:
    """A valid event of each type with one field (or one attribute) replaced, removed or added."""
    base = dict(draw(st.sampled_from([IMP, CONV, SEG, TRUTH])))
    base["ts"] = T0 + draw(st.floats(0, 1000))
    how = draw(st.sampled_from(["field", "drop", "attr_key", "attr_value", "extra", "none"]))
    if how == "field":
        base[draw(st.sampled_from(sorted(base)))] = draw(json_values)
    elif how == "drop":
        base.pop(draw(st.sampled_from(sorted(base))))
    elif how in ("attr_key", "attr_value") and base["type"] == "impression":
        name = draw(st.sampled_from(["attrs", "features"]))
        key = draw(edge_strings) if how == "attr_key" else "k"
        base[name] = {**base[name], key: draw(json_values) if how == "attr_value" else "v"}
    elif how == "extra":
        base[draw(edge_strings)] = draw(json_values)
    return dumps(base)


any_line = st.one_of(st.binary(max_size=200), almost_valid(), json_values.map(dumps),
                     st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")))


def _keeps_the_contract(ev) -> None:
    d = ev.to_dict()
    assert parse_event(orjson.dumps(d)) == ev  # sendable and stable: no surrogate, no huge int
    assert LIMITS.min_ts <= ev.ts <= LIMITS.max_ts
    strings = [v for k, v in d.items() if isinstance(v, str) and k != "type"]
    for m in (d.get("attrs") or {}, d.get("features") or {}):
        strings += list(m) + list(m.values())
    for s in strings:
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s), ascii(s)
    ids = [v for k, v in d.items() if isinstance(v, str) and k != "type"]
    ids += [k for m in (d.get("attrs") or {}, d.get("features") or {}) for k in m]
    assert all(s and not s.isspace() for s in ids)
    if ev.type == "conversion":
        assert math.isfinite(ev.value) and abs(ev.value) <= LIMITS.max_value
    if ev.type == "truth":
        assert 0 <= ev.fraction <= 1 and 1 <= ev.impressions <= LIMITS.max_impressions


def _check_parse(raw: bytes) -> None:
    try:
        ev = parse_event(raw)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
        assert exc.detail and "\n" not in exc.detail
        exc.detail.encode("utf-8")  # a dead letter's detail is sent as JSON
        return
    _keeps_the_contract(ev)


@given(st.binary(max_size=400))
def test_parse_event_on_arbitrary_bytes(raw):
    _check_parse(raw)


@given(almost_valid())
def test_parse_event_on_almost_valid_events(raw):
    _check_parse(raw)


# -- the ingest core ---------------------------------------------------------------------------------------
@st.composite
def stream_line(draw) -> bytes:
    """Mostly valid impressions and conversions over a few ids (duplicates, conversions before their
    impression), at times that drift, pause for days, or jump (outliers), mixed with bad lines."""
    kind = draw(st.sampled_from(["imp", "imp", "conv", "conv", "bad", "seg"]))
    if kind == "bad":
        return draw(any_line)
    step = draw(st.sampled_from([0.0, 1.0, 30.0, 600.0, 4000.0, 2 * DAY, 3 * DAY, -3 * DAY, 1.7e12]))
    ts = T0 + step + draw(st.floats(0, 100))
    i = draw(st.integers(0, 6))
    if kind == "imp":
        return orjson.dumps({**IMP, "id": f"i{i}", "ts": ts, "user": f"u{i % 3}"})
    if kind == "conv":
        return orjson.dumps({**CONV, "id": f"v{draw(st.integers(0, 6))}", "ts": ts, "impression": f"i{i}",
                             "kind": draw(st.sampled_from(["click", "buy"]))})
    return orjson.dumps({**SEG, "ts": ts})


def _run(lines: list[bytes], audience: bool = False) -> tuple[IngestCore, list]:
    core = IngestCore({}, 0, CFG, audience=audience, history=audience)
    outs = []
    for n, raw in enumerate(lines):
        got = core.handle(raw, n)
        c = core.counts()
        assert c["read"] == n + 1 == c["accepted"] + sum(c["deadletter"].values()) + c["held"]
        outs += got
        if n % 7 == 6:
            core.flush()
    outs += core.end_of_log()
    core.flush()
    return core, outs


@given(st.lists(st.one_of(stream_line(), any_line), max_size=40))
def test_ingest_core_is_total_and_its_counts_add_up(lines):
    core, outs = _run(lines, audience=True)
    c = core.counts()
    assert c["held"] == 0 and c["read"] == len(lines) == c["accepted"] + sum(c["deadletter"].values())
    assert INTERNAL not in c["deadletter"], c["deadletter"]
    dead = [o for o in outs if o.kind == "deadletter"]
    assert len(dead) == sum(c["deadletter"].values())
    assert len({tuple(o.value["src"]) for o in dead}) == len(dead)  # one dead letter per line at most
    for o in dead:
        assert o.value["reason"] in REASONS
        assert base64.b64decode(o.value["raw_b64"]) == lines[o.value["src"][1]]
    for o in outs:
        orjson.dumps(o.value)  # every output can be sent


@given(st.lists(stream_line(), max_size=40))
def test_dead_letters_leave_the_join_as_if_the_lines_were_not_there(lines):
    """The log without the dead-lettered lines gives the same examples and no dead letter: a bad line
    (an outlier timestamp, a duplicate, a broken line) never changed what the good ones produced."""
    _, outs = _run(lines)
    bad = {o.value["src"][1] for o in outs if o.kind == "deadletter"}
    core, again = _run([x for n, x in enumerate(lines) if n not in bad])
    examples = [(o.value["id"], o.value["label"], o.value["label_ts"]) for o in outs if o.kind == "example"]
    assert [(o.value["id"], o.value["label"], o.value["label_ts"]) for o in again if o.kind == "example"] == examples
    assert core.counts()["deadletter"] == {}
