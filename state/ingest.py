"""Ingest for one partition: raw bytes -> validated event -> attribution join -> outputs.

Public surface: ``IngestCore``, ``deadletter_record``, ``output_id``.

This is the code both paths run: the Faust ingest agent (one ``IngestCore`` per partition over the
RocksDB-backed table) and ``loopline evaluate`` (over dicts). A raw line never raises out of
``handle``: anything invalid comes back as a dead-letter output with its reason and the raw bytes.

Crash safety (the outbox). A worker killed with ``kill -9`` restarts from its last committed offset with
a store that may already hold the effects of later messages (RocksDB writes land at once; sends sit in
the producer's buffer). Those messages are recognized as redelivered and skipped, so their outputs
must not be lost with the buffer: ``handle`` writes a message's outputs to an outbox key *before* the
state changes they come from (one ordered changelog partition, so a durable state change implies a
durable outbox entry), the caller sends them and calls ``acked`` once delivered, and after a restart
``unacked()`` returns what may never have left. Re-sent outputs are de-duplicated downstream by
``output_id``.

>>> core = IngestCore({}, partition=0)
>>> [o.value["reason"] for o in core.handle(b'{"type":"click"}', src=0)]
['unknown_type']
>>> core.counts()["deadletter"]
{'unknown_type': 1}
>>> len(core.unacked())
1
"""

from __future__ import annotations

import base64
from typing import Any, Iterable, MutableMapping

from .attribution import AttributionConfig, AttributionJoin, Output
from .errors import InvalidEvent
from .events import EventLimits, parse_event

__all__ = ["IngestCore", "deadletter_record", "output_id"]

_DELETED = object()


def deadletter_record(reason: str, detail: str, raw: bytes, src: Any) -> dict:
    """The dead-letter topic's value: reason, detail, the raw bytes (base64) and where they came from."""
    return {"reason": reason, "detail": detail, "raw_b64": base64.b64encode(raw).decode("ascii"),
            "raw_len": len(raw), "src": src}


def output_id(o: Output) -> str:
    """A stable identity for de-duplication downstream: the example's impression id, or the dead
    letter's source position."""
    if o.kind == "example":
        return "x:" + o.value["id"]
    return "d:" + ":".join(str(x) for x in (o.value["src"] if isinstance(o.value["src"], list) else [o.value["src"]]))


class _Overlay:
    """Buffers one message's writes so the outbox entry can be written before them."""

    def __init__(self, store: MutableMapping):
        self.store = store
        self.writes: dict = {}

    def get(self, key, default=None):
        v = self.writes.get(key, None)
        if v is _DELETED:
            return default
        if v is not None:
            return v
        return self.store.get(key, default)

    def __setitem__(self, key, value):
        self.writes[key] = value

    def __delitem__(self, key):
        self.writes[key] = _DELETED

    def flush(self) -> None:
        for k, v in self.writes.items():
            if v is _DELETED:
                if self.store.get(k) is not None:
                    del self.store[k]
            else:
                self.store[k] = v
        self.writes.clear()


class IngestCore:
    """Parse, validate and join the events of one partition; count accepted and dead-lettered events."""

    def __init__(self, store: MutableMapping, partition: int = 0,
                 cfg: AttributionConfig = AttributionConfig(), limits: EventLimits = EventLimits()):
        self.partition = partition
        self.limits = limits
        self.store = store
        self.overlay = _Overlay(store)
        self.join = AttributionJoin(self.overlay, cfg, prefix=f"{partition}|")
        self.outbox_key = f"{partition}|o"
        self.outbox: dict = store.get(self.outbox_key) or {}
        self._acked: set[str] = set()
        meta = self.join.meta
        for k in ("read", "accepted"):
            meta.setdefault(k, 0)
        meta.setdefault("deadletter", {})

    def handle(self, raw: bytes, src: Any) -> list[Output]:
        """Process one raw message; return the examples and dead-letter records it produces."""
        outs = self._compute(raw, src)
        self._commit(outs)
        return outs

    def end_of_log(self) -> list[Output]:
        """Close every open window: the end of a finite log is the end of event time."""
        outs = self.join.close_all()
        self._commit(outs)
        return outs

    def acked(self, outs: Iterable[Output]) -> None:
        """Mark outputs as delivered; their outbox entries go with the next write of this partition."""
        self._acked.update(output_id(o) for o in outs)

    def unacked(self) -> list[Output]:
        """Outputs written to the outbox and never acknowledged (after a restart: possibly never sent)."""
        return [Output(*v) for v in self.outbox.values()]

    def counts(self) -> dict:
        m = self.join.meta
        return {"read": m["read"], "accepted": m["accepted"], "deadletter": dict(m["deadletter"]),
                "attribution": dict(m["stats"]), "max_ts": m["max_ts"]}

    # -- internals -----------------------------------------------------------------------------------
    def _compute(self, raw: bytes, src: Any) -> list[Output]:
        meta = self.join.meta
        try:
            ev = parse_event(raw, self.limits)
        except InvalidEvent as exc:
            meta["read"] += 1
            return [self._deadletter(exc.reason, exc.detail, raw, src)]
        before = self.join.stats["redelivered"]
        outs = self.join.process(ev, src)
        if self.join.stats["redelivered"] != before:  # counted the first time it was delivered
            return outs
        meta["read"] += 1
        if any(o.kind == "deadletter" for o in outs):
            return [self._deadletter(*o.value, raw, src) if o.kind == "deadletter" else o for o in outs]
        meta["accepted"] += 1
        return outs

    def _deadletter(self, reason: str, detail: str, raw: bytes, src: Any) -> Output:
        dl = self.join.meta["deadletter"]
        dl[reason] = dl.get(reason, 0) + 1
        return Output("deadletter", None, deadletter_record(reason, detail, raw, src))

    def _commit(self, outs: list[Output]) -> None:
        """Outbox first, then the buffered state changes and counters."""
        changed = False
        if self._acked:
            for oid in self._acked:
                changed |= self.outbox.pop(oid, None) is not None
            self._acked.clear()
        for o in outs:
            self.outbox[output_id(o)] = list(o)
            changed = True
        if changed:
            self.store[self.outbox_key] = dict(self.outbox)
        self.join.save()
        self.overlay.flush()
