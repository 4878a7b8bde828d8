"""The event contract: parse and validate one JSONL line into an :class:`Impression`, a :class:`Conversion`,
a :class:`SegmentAssertion` or a :class:`TruthReport`.

Public surface: ``Impression``, ``Conversion``, ``SegmentAssertion``, ``TruthReport``, ``EventLimits``,
``parse_event``, ``event_key``, ``REASONS``.

Every rejection raises :class:`~loopline.state.errors.InvalidEvent` with a short ``reason`` code from
``REASONS`` (a bounded set, so dead-letter counts stay readable) and a detail that names the field.
Unknown extra fields are ignored, never an error (design.md).

>>> ev = parse_event(b'{"type":"conversion","id":"v1","ts":5,"impression":"i1","kind":"click"}')
>>> (ev.id, ev.impression, ev.value)
('v1', 'i1', 0.0)
>>> try:
...     parse_event(b'{"type":"conversion","id":"v1","ts":-1,"impression":"i1","kind":"click"}')
... except InvalidEvent as exc:
...     print(exc.reason, "|", exc.detail)
bad_ts | field 'ts' must be finite and >= 0, got -1
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import orjson

from .errors import InvalidEvent

__all__ = ["Impression", "Conversion", "SegmentAssertion", "TruthReport", "EventLimits", "parse_event", "event_key",
           "REASONS"]

# Every reason code an event can be dead-lettered with (ingest adds the two duplicate reasons).
REASONS = (
    "line_too_long", "not_utf8", "bad_json", "too_deep", "not_object", "unknown_type",
    "missing_field", "wrong_type", "bad_ts", "bad_value", "too_many_fields", "string_too_long",
    "duplicate_impression", "duplicate_conversion",
)


@dataclass(frozen=True)
class EventLimits:
    """Bounds on untrusted input. Defaults follow the foundation issue."""

    max_line_bytes: int = 64 * 1024  # a line longer than this is rejected before parsing
    max_fields: int = 64  # entries in `attrs`, and separately in `features`
    max_str: int = 256  # characters in any id, name, key or value
    max_depth: int = 8  # nesting of containers in the whole object (the contract needs 2)


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


def _truth(obj: dict, limits: "EventLimits") -> TruthReport:
    if "fraction" not in obj:
        raise InvalidEvent("missing_field", "field 'fraction' is required")
    if "impressions" not in obj:
        raise InvalidEvent("missing_field", "field 'impressions' is required")
    f, n = obj["fraction"], obj["impressions"]
    if isinstance(f, bool) or not isinstance(f, (int, float)):
        raise InvalidEvent("wrong_type", f"field 'fraction' must be a number, got {type(f).__name__}")
    if not math.isfinite(f) or not 0 <= f <= 1:
        raise InvalidEvent("bad_value", f"field 'fraction' must be in [0, 1], got {f!r}")
    if isinstance(n, bool) or not isinstance(n, (int, float)) or (isinstance(n, float) and not n.is_integer()):
        raise InvalidEvent("wrong_type", f"field 'impressions' must be an integer, got {n!r}")
    if n < 1:
        raise InvalidEvent("bad_value", f"field 'impressions' must be >= 1, got {n!r}")
    return TruthReport(campaign=_str(obj, "campaign", limits), segment=_str(obj, "segment", limits),
                       fraction=float(f), impressions=int(n), ts=_ts(obj))


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


def _str(obj: dict, name: str, limits: EventLimits) -> str:
    if name not in obj:
        raise InvalidEvent("missing_field", f"field '{name}' is required")
    v = obj[name]
    if not isinstance(v, str):
        raise InvalidEvent("wrong_type", f"field '{name}' must be a string, got {type(v).__name__}")
    if not v:
        raise InvalidEvent("bad_value", f"field '{name}' must not be empty")
    if len(v) > limits.max_str:
        raise InvalidEvent("string_too_long", f"field '{name}' is longer than {limits.max_str} characters")
    return v


def _ts(obj: dict) -> float:
    if "ts" not in obj:
        raise InvalidEvent("missing_field", "field 'ts' is required")
    v = obj["ts"]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidEvent("wrong_type", f"field 'ts' must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < 0:
        raise InvalidEvent("bad_ts", f"field 'ts' must be finite and >= 0, got {obj['ts']!r}")
    return v


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
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            raise InvalidEvent("wrong_type", f"field '{name}.{k}' must be a string or integer")
        x = str(x)
        if len(k) > limits.max_str or len(x) > limits.max_str:
            raise InvalidEvent("string_too_long", f"field '{name}.{k}' is longer than {limits.max_str} characters")
        out[k] = x
    return out


def parse_event(raw: bytes | str, limits: EventLimits = EventLimits()
                ) -> Impression | Conversion | SegmentAssertion | TruthReport:
    """Parse one line of the event log; raise :class:`InvalidEvent` naming the reason and field."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if len(raw) > limits.max_line_bytes:
        raise InvalidEvent("line_too_long", f"{len(raw)} bytes (max {limits.max_line_bytes})")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("not_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    if _depth_exceeds(raw, limits.max_depth):
        raise InvalidEvent("too_deep", f"JSON nests deeper than {limits.max_depth}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # NaN, Infinity and 1e999 are not JSON, but a producer that writes them meant a number: parse
        # leniently (nesting is already bounded) so the error names the field (`bad_ts`), not the syntax.
        try:
            obj = json.loads(raw)
        except ValueError:
            raise InvalidEvent("bad_json", str(exc)[:120]) from None
    if not isinstance(obj, dict):
        raise InvalidEvent("not_object", f"an event is a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "impression":
        return Impression(
            id=_str(obj, "id", limits), ts=_ts(obj), user=_str(obj, "user", limits),
            ad=_str(obj, "ad", limits), campaign=_str(obj, "campaign", limits),
            vertical=_str(obj, "vertical", limits), attrs=_str_map(obj, "attrs", limits),
            features=_str_map(obj, "features", limits))
    if kind == "conversion":
        value = obj.get("value", 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidEvent("wrong_type" if not isinstance(value, (int, float)) else "bad_value",
                               "field 'value' must be a finite number")
        return Conversion(id=_str(obj, "id", limits), ts=_ts(obj), impression=_str(obj, "impression", limits),
                          kind=_str(obj, "kind", limits), value=float(value))
    if kind == "segment":
        return SegmentAssertion(source=_str(obj, "source", limits), user=_str(obj, "user", limits),
                                segment=_str(obj, "segment", limits), ts=_ts(obj))
    if kind == "truth":
        return _truth(obj, limits)
    if "type" not in obj:
        raise InvalidEvent("missing_field", "field 'type' is required")
    raise InvalidEvent("unknown_type", f"field 'type' is {str(kind)[:40]!r}; expected impression, conversion, segment or truth")


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
