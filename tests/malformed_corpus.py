"""A corpus of malformed event lines, each with the reason it must be dead-lettered with.

Shared by the unit tests of the validator and the integration test through a real worker.
"""

import orjson

IMP = {"type": "impression", "id": "i1", "ts": 1700000000.0, "user": "u1", "ad": "a1", "campaign": "c1",
       "vertical": "feed", "attrs": {"age": "25-34", "gender": "F"}, "features": {"slot": "3", "hour": 14}}
CONV = {"type": "conversion", "id": "v1", "ts": 1700000120.5, "impression": "i1", "kind": "click", "value": 1.5}


def with_(base, **kw):
    """``base`` as a JSON line with fields replaced (``...`` removes one)."""
    d = dict(base)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return orjson.dumps(d)


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
]


