"""The event contract: valid lines parse, each kind of bad line is rejected with its reason."""

import orjson
import pytest

from loopline.state.errors import InvalidEvent
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
