"""Ingest for one partition: raw bytes -> validated event -> attribution join -> outputs.

Public surface: ``IngestCore``, ``deadletter_record``.

This is the code both paths run: the Faust ingest agent (one ``IngestCore`` per partition over the
RocksDB-backed table) and ``loopline evaluate`` (over dicts). A raw line never raises out of
``handle``: anything invalid comes back as a dead-letter output with its reason and the raw bytes.

>>> core = IngestCore({}, partition=0)
>>> [o.value["reason"] for o in core.handle(b'{"type":"click"}', src=0)]
['unknown_type']
>>> core.counts()["deadletter"]
{'unknown_type': 1}
"""

from __future__ import annotations

import base64
from typing import Any, MutableMapping

from .attribution import AttributionConfig, AttributionJoin, Output
from .errors import InvalidEvent
from .events import EventLimits, parse_event

__all__ = ["IngestCore", "deadletter_record"]


def deadletter_record(reason: str, detail: str, raw: bytes, src: Any) -> dict:
    """The dead-letter topic's value: reason, detail, the raw bytes (base64) and where they came from."""
    return {"reason": reason, "detail": detail, "raw_b64": base64.b64encode(raw).decode("ascii"),
            "raw_len": len(raw), "src": src}


class IngestCore:
    """Parse, validate and join the events of one partition; count accepted and dead-lettered events."""

    def __init__(self, store: MutableMapping, partition: int = 0,
                 cfg: AttributionConfig = AttributionConfig(), limits: EventLimits = EventLimits()):
        self.partition = partition
        self.limits = limits
        self.join = AttributionJoin(store, cfg, prefix=f"{partition}|")
        meta = self.join.meta
        meta.setdefault("read", 0)
        meta.setdefault("accepted", 0)
        meta.setdefault("deadletter", {})

    def handle(self, raw: bytes, src: Any) -> list[Output]:
        """Process one raw message; return the examples and dead-letter records it produces."""
        meta = self.join.meta
        try:
            ev = parse_event(raw, self.limits)
        except InvalidEvent as exc:
            meta["read"] += 1
            out = [self._deadletter(exc.reason, exc.detail, raw, src)]
            self.join.save()
            return out
        before = self.join.stats["redelivered"]
        outs = self.join.process(ev, src)
        if self.join.stats["redelivered"] == before:  # a redelivered message was counted the first time
            meta["read"] += 1
            if any(o.kind == "deadletter" for o in outs):
                outs = [self._deadletter(*o.value, raw, src) if o.kind == "deadletter" else o for o in outs]
            else:
                meta["accepted"] += 1
        self.join.save()
        return outs

    def _deadletter(self, reason: str, detail: str, raw: bytes, src: Any) -> Output:
        dl = self.join.meta["deadletter"]
        dl[reason] = dl.get(reason, 0) + 1
        return Output("deadletter", None, deadletter_record(reason, detail, raw, src))

    def end_of_log(self) -> list[Output]:
        """Close every open window: the end of a finite log is the end of event time."""
        return self.join.close_all()

    def counts(self) -> dict:
        m = self.join.meta
        return {"read": m["read"], "accepted": m["accepted"], "deadletter": dict(m["deadletter"]),
                "attribution": dict(m["stats"])}
