"""The event contract: parse and validate one JSONL line into an :class:`Impression`, a :class:`Conversion`,
a :class:`SegmentAssertion` or a :class:`TruthReport`.

Public surface: ``Impression``, ``Conversion``, ``SegmentAssertion``, ``TruthReport``, ``EventLimits``,
``parse_event``, ``event_key``, ``REASONS``.

Every rejection raises :class:`~loopline.errors.InvalidEvent` with a short ``reason`` code from
``REASONS`` (a bounded set, so dead-letter counts stay readable) and a detail that names the field.
Unknown extra fields are ignored, never an error (design.md).

The contract is total: any bytes give an event or an ``InvalidEvent``, never another exception. What it
checks beyond types and presence (the bounds are :class:`EventLimits` fields):

* numbers: a number no float holds (a 400-digit integer, which the lenient fallback parser returns as a
  Python ``int``) is rejected like ``NaN``: ``bad_ts`` for ``ts``, ``bad_value`` elsewhere. ``ts`` must lie
  in ``[min_ts, max_ts]`` (the epoch to 2100-01-01 by default: a timestamp in milliseconds, microseconds
  or nanoseconds falls above it, and the detail says which unit it looks like); ``|value| <= max_value``;
  truth ``impressions <= max_impressions``;
* strings (every id, name, attribute key and value): valid Unicode (no lone surrogate, which the lenient
  parser lets through), no control character (C0, DEL, C1: NUL ends a user in the history's keys) ->
  ``bad_string``; ids, names and keys not empty or blank -> ``bad_value``.

Skew (an event far ahead of its partition's watermark) needs the partition's state: the ingest core
checks it (``ts_ahead``, ``loopline.state.ingest``).

>>> ev = parse_event(b'{"type":"conversion","id":"v1","ts":5,"impression":"i1","kind":"click"}')
>>> (ev.id, ev.impression, ev.value)
('v1', 'i1', 0.0)
>>> try:
...     parse_event(b'{"type":"conversion","id":"v1","ts":-1,"impression":"i1","kind":"click"}')
... except InvalidEvent as exc:
...     print(exc.reason, "|", exc.detail)
bad_ts | field 'ts' must be finite and >= 0, got -1
>>> try:
...     parse_event(b'{"type":"conversion","id":"v1","ts":1700000000000,"impression":"i1","kind":"click"}')
... except InvalidEvent as exc:
...     print(exc.reason, "|", exc.detail)
bad_ts | field 'ts' is 1700000000000, after 4102444800 (2100-01-01): looks like milliseconds
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

import orjson
from aiokafka.partitioner import murmur2

from loopline.errors import ConfigError, InvalidEvent

__all__ = ["Impression", "Conversion", "SegmentAssertion", "TruthReport", "EventLimits", "parse_event", "event_key", "key_partition",
           "REASONS"]

# Every reason code an event can be dead-lettered with (the ingest core adds the two duplicate reasons and
# `ts_ahead`; its last-resort `internal`, a bug by definition, is outside this set: ingest.INTERNAL).
REASONS = (
    "line_too_long", "not_utf8", "bad_json", "too_deep", "not_object", "unknown_type",
    "missing_field", "wrong_type", "bad_ts", "bad_value", "bad_string", "too_many_fields", "string_too_long",
    "duplicate_impression", "duplicate_conversion", "ts_ahead",
)


_HISTORY_MAX_TS = 9.2e12  # state/history.py keys ts in microseconds in 63 bits


@dataclass(frozen=True)
class EventLimits:
    """Bounds on untrusted input. Defaults follow the foundation issue."""

    max_line_bytes: int = 64 * 1024  # a line longer than this is rejected before parsing
    max_fields: int = 64  # entries in `attrs`, and separately in `features`
    max_str: int = 256  # characters in any id, name, key or value
    max_depth: int = 8  # nesting of containers in the whole object (the contract needs 2)
    # The plausible absolute range of `ts` (seconds since the epoch). The floor is the epoch itself, not
    # 2000: MovieLens-100k is from 1997 and synthetic logs start near 0. The ceiling (2100-01-01) is what
    # catches a producer writing milliseconds (1.7e12), microseconds or nanoseconds.
    min_ts: float = 0.0
    max_ts: float = 4102444800.0  # must stay below 9.2e12: the history store keys microseconds in 63 bits
    max_value: float = 1e12  # |conversion value|: a larger one is a unit or encoding error, not revenue
    max_impressions: int = 10 ** 12  # a truth report's sample size (more than every ad ever shown)

    def __post_init__(self):
        for name in ("max_line_bytes", "max_fields", "max_str", "max_depth", "max_impressions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        for name in ("min_ts", "max_ts", "max_value"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
        if not self.min_ts < self.max_ts <= _HISTORY_MAX_TS:
            raise ConfigError(f"max_ts: must be > min_ts ({self.min_ts:g}) and <= {_HISTORY_MAX_TS:g} "
                              f"(the history store's key range), got {self.max_ts!r}")


@dataclass(frozen=True, slots=True)
class Impression:
    id: str
    ts: float
    user: str
    ad: str
    campaign: str
    vertical: str
    attrs: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)

    type = "impression"

    def to_dict(self) -> dict:
        return {"type": "impression", "id": self.id, "ts": self.ts, "user": self.user, "ad": self.ad,
                "campaign": self.campaign, "vertical": self.vertical, "attrs": self.attrs,
                "features": self.features}


@dataclass(frozen=True, slots=True)
class Conversion:
    id: str
    ts: float
    impression: str
    kind: str
    value: float = 0.0

    type = "conversion"

    def to_dict(self) -> dict:
        return {"type": "conversion", "id": self.id, "ts": self.ts, "impression": self.impression,
                "kind": self.kind, "value": self.value}


@dataclass(frozen=True, slots=True)
class SegmentAssertion:
    """A data source asserts that a user is in a segment (data-source quality, papers.md section 5)."""

    source: str
    user: str
    segment: str
    ts: float

    type = "segment"

    def to_dict(self) -> dict:
        return {"type": "segment", "source": self.source, "user": self.user, "segment": self.segment,
                "ts": self.ts}


@dataclass(frozen=True, slots=True)
class TruthReport:
    """Aggregate ground truth: ``fraction`` of campaign ``campaign``'s impressions reached users truly in
    ``segment``, measured on ``impressions`` impressions (the measurement's sample size)."""

    campaign: str
    segment: str
    fraction: float
    impressions: int
    ts: float

    type = "truth"

    def to_dict(self) -> dict:
        return {"type": "truth", "campaign": self.campaign, "segment": self.segment,
                "fraction": self.fraction, "impressions": self.impressions, "ts": self.ts}


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """True when brackets nest deeper than ``limit`` (strings skipped). Runs before the JSON parser so
    a pathological line costs one linear scan, not a recursion."""
    depth = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x7B, 0x5B):
            depth += 1
            if depth > limit:
                return True
        elif b in (0x7D, 0x5D):
            depth -= 1
    return False


# Characters no string of the contract may hold: C0 controls (NUL ends a user in the history's keys), DEL,
# C1 controls, and lone surrogates (the lenient parser accepts "\ud800"; UTF-8 cannot encode it, so the
# table write and the send would fail on it later).
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_UNITS = ((1e3, "milliseconds"), (1e6, "microseconds"), (1e9, "nanoseconds"))
_UNIT_FLOOR = 315532800.0  # 1980-01-01: a unit hint is given only when the rescaled time is this recent


def _show(v, n: int = 40) -> str:
    """A printable, bounded rendering of untrusted input for a detail (``ascii`` escapes surrogates and
    controls, so a detail is always valid UTF-8 and one line)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        try:
            return f"a {len(str(abs(v)))}-digit integer"
        except ValueError:  # beyond Python's int-to-str digit limit
            return f"an integer of {v.bit_length()} bits"
    text = ascii(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_text(v: str, name: str, limits: EventLimits, key: str | None = None, value_of: str | None = None,
                blank_ok: bool = False) -> str:
    """Length, then blankness (ids, names and keys), then Unicode and control characters. ``name`` is
    the field; ``key`` is set when ``v`` is a key of the object ``name``, ``value_of`` when ``v`` is the
    value of that key (the detail then names ``attrs.age``)."""
    if len(v) > limits.max_str or (not blank_ok and (not v or v.isspace())) or _BAD_CHAR.search(v):
        _text_error(v, name, limits, key, value_of)  # the rare path: the detail is only built here
    return v


def _text_error(v: str, name: str, limits: EventLimits, key: str | None, value_of: str | None):
    label = (f"field '{name}' key {_show(key, 24)}" if key is not None else
             f"field '{name}.{value_of}'" if value_of is not None else f"field '{name}'")
    if len(v) > limits.max_str:
        raise InvalidEvent("string_too_long", f"{label} is longer than {limits.max_str} characters")
    if not v:
        raise InvalidEvent("bad_value", f"{label} must not be empty")
    if v.isspace():
        raise InvalidEvent("bad_value", f"{label} must not be blank, got {_show(v)}")
    m = _BAD_CHAR.search(v)
    c = m.group()
    what = "is not valid Unicode (a lone surrogate " if 0xD800 <= ord(c) <= 0xDFFF else "holds a control character ("
    raise InvalidEvent("bad_string", f"{label} {what}U+{ord(c):04X} at position {m.start()})")


def _str(obj: dict, name: str, limits: EventLimits) -> str:
    if name not in obj:
        raise InvalidEvent("missing_field", f"field '{name}' is required")
    v = obj[name]
    if type(v) is not str:
        raise InvalidEvent("wrong_type", f"field '{name}' must be a string, got {type(v).__name__}")
    if len(v) > limits.max_str or not v or v.isspace() or _BAD_CHAR.search(v):  # (_check_text, inlined)
        _text_error(v, name, limits, None, None)
    return v


def _number(obj: dict, name: str, overflow_reason: str) -> float:
    """``obj[name]`` as a float; an integer no float holds is rejected, never an ``OverflowError``."""
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidEvent("wrong_type", f"field '{name}' must be a number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise InvalidEvent(overflow_reason, f"field '{name}' is {_show(v)}, outside the float range") from None


def _ts(obj: dict, limits: EventLimits) -> float:
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "field 'ts' is required")
    v = _number(obj, "ts", "bad_ts")
    if not math.isfinite(v) or v < 0:
        raise InvalidEvent("bad_ts", f"field 'ts' must be finite and >= 0, got {_show(obj['ts'])}")
    if v < limits.min_ts:
        raise InvalidEvent("bad_ts", f"field 'ts' is {_show(obj['ts'])}, before min_ts {limits.min_ts:.0f} "
                                     f"({time.strftime('%Y-%m-%d', time.gmtime(limits.min_ts))})")
    if v > limits.max_ts:
        hint = next((f": looks like {unit}" for div, unit in _UNITS
                     if max(limits.min_ts, _UNIT_FLOOR) <= v / div <= limits.max_ts), "")
        raise InvalidEvent("bad_ts", f"field 'ts' is {_show(obj['ts'])}, after {limits.max_ts:.0f} "
                                     f"({time.strftime('%Y-%m-%d', time.gmtime(limits.max_ts))}){hint}")
    return v


def _value(obj: dict, limits: EventLimits) -> float:
    if "value" not in obj:
        return 0.0
    v = _number(obj, "value", "bad_value")
    if not math.isfinite(v):
        raise InvalidEvent("bad_value", "field 'value' must be a finite number")
    if abs(v) > limits.max_value:
        raise InvalidEvent("bad_value", f"field 'value' is {_show(obj['value'])}, beyond "
                                        f"max_value {limits.max_value:g} in magnitude")
    return v


def _truth(obj: dict, limits: EventLimits) -> TruthReport:
    if "fraction" not in obj:
        raise InvalidEvent("missing_field", "field 'fraction' is required")
    if "impressions" not in obj:
        raise InvalidEvent("missing_field", "field 'impressions' is required")
    f, n = _number(obj, "fraction", "bad_value"), obj["impressions"]
    if not math.isfinite(f) or not 0 <= f <= 1:
        raise InvalidEvent("bad_value", f"field 'fraction' must be in [0, 1], got {_show(obj['fraction'])}")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or (isinstance(n, float) and not n.is_integer()):
        raise InvalidEvent("wrong_type", f"field 'impressions' must be an integer, got {_show(n)}")
    if n < 1 or n > limits.max_impressions:
        raise InvalidEvent("bad_value", f"field 'impressions' must be in [1, max_impressions "
                                        f"{limits.max_impressions:g}], got {_show(n)}")
    return TruthReport(campaign=_str(obj, "campaign", limits), segment=_str(obj, "segment", limits),
                       fraction=f, impressions=int(n), ts=_ts(obj, limits))


def _str_map(obj: dict, name: str, limits: EventLimits) -> dict:
    v = obj.get(name, {})
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise InvalidEvent("wrong_type", f"field '{name}' must be an object, got {type(v).__name__}")
    if len(v) > limits.max_fields:
        raise InvalidEvent("too_many_fields", f"field '{name}' has {len(v)} entries (max {limits.max_fields})")
    out = {}
    for k, x in v.items():
        _check_text(k, name, limits, key=k)  # checked before a detail shows it
        if type(x) is not str:
            if isinstance(x, bool) or not isinstance(x, int):
                raise InvalidEvent("wrong_type", f"field '{name}.{k}' must be a string or integer")
            if x.bit_length() > 4 * limits.max_str:  # more digits than max_str: no need to print it
                raise InvalidEvent("string_too_long", f"field '{name}.{k}' is longer than {limits.max_str} characters")
            x = str(x)
        out[k] = _check_text(x, name, limits, value_of=k, blank_ok=True)
    return out


def parse_event(raw: bytes | str, limits: EventLimits = EventLimits()
                ) -> Impression | Conversion | SegmentAssertion | TruthReport:
    """Parse one line of the event log; raise :class:`InvalidEvent` naming the reason and field.

    Total: any value gives an event or an ``InvalidEvent`` (``None``, a Kafka tombstone, is
    ``not_object``)."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte: not UTF-8
            raw = raw.encode("utf-8", "surrogatepass")
    elif isinstance(raw, (bytearray, memoryview)):
        raw = bytes(raw)
    elif not isinstance(raw, bytes):
        what = "no value (a tombstone)" if raw is None else f"a {type(raw).__name__}"
        raise InvalidEvent("not_object", f"a message value must be bytes of a JSON object, got {what}")
    if len(raw) > limits.max_line_bytes:
        raise InvalidEvent("line_too_long", f"{len(raw)} bytes (max {limits.max_line_bytes})")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    # (the byte scan only when there are enough brackets to nest too deep: an event has about 3)
    if raw.count(b"{") + raw.count(b"[") > limits.max_depth and _depth_exceeds(raw, limits.max_depth):
        raise InvalidEvent("too_deep", f"JSON nests deeper than {limits.max_depth}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # NaN, Infinity, 1e999, integers beyond 64 bits and lone surrogates are not JSON orjson accepts,
        # but a producer that writes them meant a value: parse leniently (nesting is already bounded) so
        # the error names the field (`bad_ts`, `bad_string`), not the syntax.
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidEvent("bad_json", _show(str(exc), 120)[1:-1]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"an event is a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "impression":
        return Impression(
            id=_str(obj, "id", limits), ts=_ts(obj, limits), user=_str(obj, "user", limits),
            ad=_str(obj, "ad", limits), campaign=_str(obj, "campaign", limits),
            vertical=_str(obj, "vertical", limits), attrs=_str_map(obj, "attrs", limits),
            features=_str_map(obj, "features", limits))
    if kind == "conversion":
        value = _value(obj, limits)
        return Conversion(id=_str(obj, "id", limits), ts=_ts(obj, limits), impression=_str(obj, "impression", limits),
                          kind=_str(obj, "kind", limits), value=value)
    if kind == "segment":
        return SegmentAssertion(source=_str(obj, "source", limits), user=_str(obj, "user", limits),
                                segment=_str(obj, "segment", limits), ts=_ts(obj, limits))
    if kind == "truth":
        return _truth(obj, limits)
    if "type" not in obj:
        raise InvalidEvent("missing_field", "field 'type' is required")
    raise InvalidEvent("unknown_type", f"field 'type' is {_show(kind)}; expected impression, conversion, segment or truth")


def event_key(raw: bytes) -> tuple[bytes | None, float | None]:
    """Lenient (key, ts) of a raw line for routing and ordering; ``(None, None)`` when it is unreadable.

    The key is the impression id (an impression's ``id``, a conversion's ``impression``), so the two
    sides of the attribution join land in the same partition. Validation proper happens in ingest.
    """
    if len(raw) > EventLimits.max_line_bytes:
        return None, None
    try:
        obj = orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    k = obj.get("id") if obj.get("type") == "impression" else obj.get("impression")
    ts = obj.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
        ts = None
    return (k.encode() if isinstance(k, str) else None), (float(ts) if ts is not None else None)


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a keyed message: murmur2 of the key, as aiokafka
    and the Java clients compute it (so a user's own producers, the replay and Loopline's roles agree).

    >>> [key_partition(k, 4) for k in (b"i1", b"i2", b"u2")]
    [0, 3, 2]
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions

