"""The event contract: valid lines parse, each kind of bad line is rejected with its reason."""

import orjson
import pytest

from loopline.errors import InvalidEvent
from loopline.state.events import REASONS, Conversion, EventLimits, Impression, event_key, parse_event

from ..malformed_corpus import CASES, CONV, IMP, with_


def test_valid_impression_and_conversion_parse_with_extra_fields_ignored():
    imp = parse_event(with_(IMP, extra_field={"x": 1}))
    assert isinstance(imp, Impression)
    assert imp.features == {"slot": "3", "hour": "14"}  # integers are accepted as categorical strings
    conv = parse_event(orjson.dumps(CONV))
    assert isinstance(conv, Conversion) and conv.value == 1.5


@pytest.mark.parametrize("raw,reason", [(r, why) for _, r, why in CASES], ids=[c[0] for c in CASES])
def test_bad_line_is_rejected_with_its_reason(raw, reason):
    assert reason in REASONS
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    assert info.value.reason == reason
    assert info.value.detail  # a detail that names the field or the limit


def test_limits_are_configurable():
    small = EventLimits(max_fields=1)
    with pytest.raises(InvalidEvent, match="too_many_fields"):
        parse_event(orjson.dumps(IMP), small)


def test_event_key_routes_both_sides_of_the_join_by_impression_id():
    assert event_key(orjson.dumps(IMP)) == (b"i1", 1700000000.0)
    assert event_key(orjson.dumps(CONV)) == (b"i1", 1700000120.5)
    assert event_key(b"not json") == (None, None)


# -- issue 12: the total contract ----------------------------------------------------------------------
@pytest.mark.parametrize("ts,unit", [(1.7e12, "milliseconds"), (1.7e15, "microseconds"),
                                     (1.7e18, "nanoseconds")])
def test_a_timestamp_in_a_smaller_unit_says_so(ts, unit):
    with pytest.raises(InvalidEvent) as info:
        parse_event(with_(IMP, ts=ts))
    assert info.value.reason == "bad_ts"
    assert f"looks like {unit}" in info.value.detail and "'ts'" in info.value.detail


def test_the_plausible_range_and_the_value_bounds_are_configurable():
    early = with_(IMP, ts=5.0)  # the default floor is the epoch: synthetic logs and 1990s data sets pass
    assert parse_event(early).ts == 5.0
    with pytest.raises(InvalidEvent, match="bad_ts"):
        parse_event(early, EventLimits(min_ts=946684800.0))
    assert parse_event(with_(IMP, ts=1.7e12), EventLimits(max_ts=2e12)).ts == 1.7e12
    assert parse_event(with_(CONV, value=5e11)).value == 5e11
    with pytest.raises(InvalidEvent) as info:
        parse_event(with_(CONV, value=5e11), EventLimits(max_value=1e6))
    assert info.value.reason == "bad_value" and "'value'" in info.value.detail
    from ..malformed_corpus import TRUTH
    assert parse_event(with_(TRUTH, impressions=10 ** 12)).impressions == 10 ** 12
    with pytest.raises(InvalidEvent, match="impressions"):
        parse_event(with_(TRUTH, impressions=10 ** 6), EventLimits(max_impressions=1000))


@pytest.mark.parametrize("kw,field", [({"min_ts": -1.0}, "min_ts"), ({"max_ts": 1e13}, "max_ts"),
                                      ({"min_ts": 5.0, "max_ts": 5.0}, "max_ts"),
                                      ({"max_value": float("nan")}, "max_value"),
                                      ({"max_impressions": 0}, "max_impressions"),
                                      ({"max_str": 0}, "max_str")])
def test_bad_limits_name_the_field(kw, field):
    from loopline.errors import ConfigError
    with pytest.raises(ConfigError, match=f"^{field}"):
        EventLimits(**kw)


def test_every_rejection_names_a_field_of_the_event():
    for name, raw, reason in CASES:
        if reason in ("line_too_long", "not_utf8", "bad_json", "too_deep", "not_object"):
            continue  # about the line, not a field
        with pytest.raises(InvalidEvent) as info:
            parse_event(raw)
        assert "field '" in info.value.detail, (name, info.value.detail)


def test_event_key_is_total_on_numbers_and_strings_no_float_holds():
    from ..malformed_corpus import HUGE, raw_field
    assert event_key(raw_field(IMP, "ts", HUGE)) == (None, None)
    assert event_key(raw_field(IMP, "id", '"\\ud800"')) == (None, None)
    assert event_key(with_(IMP, ts=1.7e12)) == (b"i1", 1.7e12)  # ordering only; ingest rejects it
