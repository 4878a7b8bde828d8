"""A corpus of malformed event lines, each with the reason it must be dead-lettered with.

Shared by the unit tests of the validator, the fuzz properties and the integration test through a real
worker. ``CASES`` are rejected by ``parse_event`` alone; ``ts_ahead`` (the skew check) needs a partition's
watermark and is tested in ``tests/state/test_ingest.py``.
"""

import orjson

IMP = {"type": "impression", "id": "i1", "ts": 1700000000.0, "user": "u1", "ad": "a1", "campaign": "c1",
       "vertical": "feed", "attrs": {"age": "25-34", "gender": "F"}, "features": {"slot": "3", "hour": 14}}
CONV = {"type": "conversion", "id": "v1", "ts": 1700000120.5, "impression": "i1", "kind": "click", "value": 1.5}
SEG = {"type": "segment", "source": "s1", "user": "u1", "segment": "female", "ts": 1700000000.0}
TRUTH = {"type": "truth", "campaign": "c1", "segment": "female", "fraction": 0.62, "impressions": 12000,
         "ts": 1700090000.0}

HUGE = "1" + "0" * 400  # an integer no float holds: orjson refuses it, the lenient parser gives an int


def with_(base, **kw):
    """``base`` as a JSON line with fields replaced (``...`` removes one)."""
    d = dict(base)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return orjson.dumps(d)


def raw_field(base, name, text):
    """``base`` as a JSON line whose field ``name`` is the literal JSON ``text`` (numbers no float holds,
    escapes orjson would not write, such as a lone surrogate)."""
    marker = "\x1e@@\x1e"
    return orjson.dumps({**base, name: marker}).replace(orjson.dumps(marker), text.encode())


CASES = [
    ("truncated json", orjson.dumps(IMP)[:40], "bad_json"),
    ("ts is a string", with_(IMP, ts="yesterday"), "wrong_type"),
    ("ts is a bool", with_(IMP, ts=True), "wrong_type"),
    ("user is a number", with_(IMP, user=7), "wrong_type"),
    ("attrs is a list", with_(IMP, attrs=["F"]), "wrong_type"),
    ("attr value is an object", with_(IMP, attrs={"a": {"b": 1}}), "wrong_type"),
    ("negative ts", with_(IMP, ts=-1.0), "bad_ts"),
    ("NaN ts", orjson.dumps(IMP).replace(b"1700000000.0", b"NaN"), "bad_ts"),
    ("Infinity ts", orjson.dumps(IMP).replace(b"1700000000.0", b"Infinity"), "bad_ts"),
    ("overflowing ts", orjson.dumps(IMP).replace(b"1700000000.0", b"1e999"), "bad_ts"),
    ("missing user", with_(IMP, user=...), "missing_field"),
    ("missing ts", with_(CONV, ts=...), "missing_field"),
    ("missing type", with_(IMP, type=...), "missing_field"),
    ("empty id", with_(IMP, id=""), "bad_value"),
    ("NaN value", orjson.dumps(CONV).replace(b"1.5", b"NaN"), "bad_value"),
    ("1 MB line", with_(IMP, junk="x" * 1_000_000), "line_too_long"),
    ("non-UTF-8", b'{"type":"impression","id":"\xff\xfe"}', "not_utf8"),
    ("deep nesting", b'{"type":"impression","x":' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
    ("unknown type", with_(IMP, type="view"), "unknown_type"),
    ("an array", b"[1,2,3]", "not_object"),
    ("a number", b"42", "not_object"),
    ("too many attrs", with_(IMP, attrs={f"k{i}": "v" for i in range(65)}), "too_many_fields"),
    ("long user id", with_(IMP, user="u" * 300), "string_too_long"),
    ("long attr value", with_(IMP, attrs={"a": "v" * 300}), "string_too_long"),
    # -- issue 12: numbers outside the float range or a field's bound ---------------------------------
    ("400-digit ts", raw_field(IMP, "ts", HUGE), "bad_ts"),
    ("400-digit negative ts", raw_field(CONV, "ts", "-" + HUGE), "bad_ts"),
    ("400-digit value", raw_field(CONV, "value", HUGE), "bad_value"),
    ("400-digit negative value", raw_field(CONV, "value", "-" + HUGE), "bad_value"),
    ("value 1e308", with_(CONV, value=1e308), "bad_value"),
    ("value -1e308", with_(CONV, value=-1e308), "bad_value"),
    ("400-digit truth fraction", raw_field(TRUTH, "fraction", HUGE), "bad_value"),
    ("400-digit truth impressions", raw_field(TRUTH, "impressions", HUGE), "bad_value"),
    ("truth impressions 1e30", raw_field(TRUTH, "impressions", "1" + "0" * 30), "bad_value"),
    ("400-digit truth ts", raw_field(TRUTH, "ts", HUGE), "bad_ts"),
    ("400-digit attr value", raw_field(IMP, "attrs", '{"age":' + HUGE + "}"), "string_too_long"),
    # -- timestamps outside the plausible absolute range ----------------------------------------------
    ("ts in milliseconds", with_(IMP, ts=1700000000123.0), "bad_ts"),
    ("ts in microseconds", with_(CONV, ts=1700000000123456), "bad_ts"),
    ("ts in nanoseconds", with_(IMP, ts=1700000000123456789), "bad_ts"),
    ("ts 9.2e12 (history key overflow)", with_(IMP, ts=9.3e12), "bad_ts"),
    ("ts after 2100", with_(IMP, ts=4102444801.0), "bad_ts"),
    ("segment ts in milliseconds", with_(SEG, ts=1700000000000), "bad_ts"),
    # -- invalid Unicode (lone surrogates, through the lenient fallback parser) -----------------------
    ("lone surrogate user", raw_field(IMP, "user", '"\\ud800"'), "bad_string"),
    ("lone low surrogate id", raw_field(CONV, "id", '"v\\udc00"'), "bad_string"),
    ("lone surrogate attr key", raw_field(IMP, "attrs", '{"\\ud83d":"x"}'), "bad_string"),
    ("lone surrogate attr value", raw_field(IMP, "attrs", '{"age":"\\udfff"}'), "bad_string"),
    ("lone surrogate feature value", raw_field(IMP, "features", '{"slot":"3\\ud800"}'), "bad_string"),
    ("lone surrogate segment source", raw_field(SEG, "source", '"\\ud800s"'), "bad_string"),
    ("lone surrogate truth campaign", raw_field(TRUTH, "campaign", '"c\\udbff"'), "bad_string"),
    # -- NUL and control characters in ids and keys ---------------------------------------------------
    ("NUL in id", with_(IMP, id="i\x001"), "bad_string"),
    ("NUL in user", with_(IMP, user="u1\x00"), "bad_string"),
    ("NUL in conversion impression", with_(CONV, impression="i\x00"), "bad_string"),
    ("bell in ad", with_(IMP, ad="a\x07"), "bad_string"),
    ("C1 control in campaign", with_(IMP, campaign="c\x85"), "bad_string"),
    ("DEL in kind", with_(CONV, kind="click\x7f"), "bad_string"),
    ("newline in vertical", with_(IMP, vertical="fe\ned"), "bad_string"),
    ("NUL in attr key", with_(IMP, attrs={"a\x00ge": "25-34"}), "bad_string"),
    ("control in attr value", with_(IMP, attrs={"age": "25\x1b34"}), "bad_string"),
    ("NUL in segment user", with_(SEG, user="\x00"), "bad_string"),
    # -- blank ids and keys -----------------------------------------------------------------------------
    ("blank id", with_(IMP, id="   "), "bad_value"),
    ("blank user (ideographic space)", with_(IMP, user="\u3000"), "bad_value"),
    ("blank conversion impression", with_(CONV, impression=" \t "), "bad_value"),
    ("blank segment", with_(SEG, segment="  "), "bad_value"),
    ("empty attr key", with_(IMP, attrs={"": "x"}), "bad_value"),
    ("blank feature key", with_(IMP, features={"  ": "x"}), "bad_value"),
]
