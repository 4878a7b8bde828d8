"""Ingest for one partition: raw bytes -> validated event -> attribution join -> outputs.

Public surface: ``IngestCore``, ``deadletter_record``, ``output_id``.

This is the code both paths run: the Faust ingest agent (one ``IngestCore`` per partition over the
RocksDB-backed table) and ``loopline evaluate`` (over dicts). A raw line never raises out of
``handle``: anything invalid comes back as a dead-letter output with its reason and the raw bytes.

Crash safety. Writes are buffered and flushed once per batch, in this order: (1) the outbox, the
batch's outputs; (2) the state changes; then, once the caller knows (1) and (2) are durable (a producer
flush), (3) ``flush_meta``: the counters and ``through``, the last offset whose effects are all stored.
After a crash (``kill -9``) the worker restarts from its last committed offset:

* messages at or below ``through`` are skipped (counted as ``redelivered``): their effects are stored;
* messages above it are processed again; the join recognizes its own partial writes by ``src``;
* outputs that may have been lost in the producer's buffer are still in the outbox: ``unacked()``
  returns them for re-sending, and they are removed from it after ``acked``. Re-sent outputs are
  de-duplicated downstream by ``output_id``.

The meta record is written alone after the others, which also keeps a partition's end offset right on
the embedded broker (Tansu 0.6 reports the end of a multi-record batch as its first offset + 1).

>>> store = {}
>>> core = IngestCore(store, partition=0)
>>> [o.value["reason"] for o in core.handle(b'{"type":"click"}', offset=0)]
['unknown_type']
>>> core.flush()  # buffered writes reach the store
>>> core.handle(b'{"type":"click"}', offset=0)  # a redelivered message whose effects are stored
[]
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
    if o.kind == "history":
        return "h:" + o.value[5]
    if o.kind == "audience":
        v = o.value
        if v["type"] == "impression" and "id" in v:
            return "a:" + v["id"]
        return "a:" + ":".join(str(v.get(k)) for k in ("type", "source", "campaign", "user", "segment", "ts"))
    return "d:" + ":".join(str(x) for x in (o.value["src"] if isinstance(o.value["src"], list) else [o.value["src"]]))


class _Overlay:
    """Buffers a batch's writes (so the outbox can be written before them, and each key once) and
    caches its reads (a Faust table deserializes on every read)."""

    def __init__(self, store: MutableMapping):
        self.store = store
        self.writes: dict = {}
        self.reads: dict = {}

    def get(self, key, default=None):
        v = self.writes.get(key)
        if v is None:
            if key in self.reads:
                v = self.reads[key]
            else:
                v = self.reads[key] = self.store.get(key)
        return default if v is None or v is _DELETED else v

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
        self.reads.clear()


class IngestCore:
    """Parse, validate and join the events of one partition; count accepted and dead-lettered events."""

    def __init__(self, store: MutableMapping, partition: int = 0,
                 cfg: AttributionConfig = AttributionConfig(), limits: EventLimits = EventLimits(),
                 history: bool = False, audience: bool = False):
        self.partition = partition
        self.history = history  # also output each accepted impression for the FM's history, at event time
        # also output to the user-keyed `audience` topic (reach and quality): each accepted impression,
        # segment assertions (keyed by user) and truth reports (keyed by campaign)
        self.audience = audience
        self.limits = limits
        self.store = store
        self.overlay = _Overlay(store)
        self.join = AttributionJoin(self.overlay, cfg, prefix=f"{partition}|")
        self.outbox_key = f"{partition}|o"
        self.outbox: dict = store.get(self.outbox_key) or {}
        self._acked: set[str] = set()
        self._outbox_dirty = False
        meta = self.join.meta
        for k in ("read", "accepted", "redelivered"):
            meta.setdefault(k, 0)
        meta.setdefault("deadletter", {})
        meta.setdefault("through", -1)  # the last offset whose effects are all stored
        self._durable_through = meta["through"]

    def handle(self, raw: bytes, offset: int) -> list[Output]:
        """Process the message at ``offset`` of this partition; return its examples and dead letters.

        State changes are buffered until :meth:`flush` (once per batch of messages: each key is then
        written once, however many messages touched it)."""
        meta = self.join.meta
        if offset <= self._durable_through:
            meta["redelivered"] += 1
            return []
        outs = self._compute(raw, [self.partition, offset])
        meta["through"] = max(meta["through"], offset)
        self._to_outbox(outs)
        return outs

    def end_of_log(self) -> list[Output]:
        """Close every open window: the end of a finite log is the end of event time."""
        outs = self.join.close_all()
        self._to_outbox(outs)
        return outs

    def flush(self, meta: bool = True) -> None:
        """Write the buffered changes: the outbox first, then the state; then the meta record unless
        ``meta=False`` (the worker writes it with :meth:`flush_meta` after a producer flush)."""
        if self._acked:
            for oid in self._acked:
                self._outbox_dirty |= self.outbox.pop(oid, None) is not None
            self._acked.clear()
        if self._outbox_dirty:
            self.store[self.outbox_key] = dict(self.outbox)
            self._outbox_dirty = False
        self.overlay.flush()
        if meta:
            self.flush_meta()

    def flush_meta(self) -> None:
        """Write counters and ``through``: call only when the state writes before it are durable."""
        self.join.save()
        self.overlay.flush()
        self._durable_through = self.join.meta["through"]

    def acked(self, outs: Iterable[Output]) -> None:
        """Mark outputs as delivered; their outbox entries go with the next flush."""
        self._acked.update(output_id(o) for o in outs)

    def unacked(self) -> list[Output]:
        """Outputs written to the outbox and never acknowledged (after a restart: possibly never sent)."""
        return [Output(*v) for v in self.outbox.values()]

    def counts(self) -> dict:
        m = self.join.meta
        return {"read": m["read"], "accepted": m["accepted"], "deadletter": dict(m["deadletter"]),
                "redelivered": m["redelivered"], "attribution": dict(m["stats"]), "max_ts": m["max_ts"]}

    # -- internals -----------------------------------------------------------------------------------
    def _compute(self, raw: bytes, src: Any) -> list[Output]:
        meta = self.join.meta
        try:
            ev = parse_event(raw, self.limits)
        except InvalidEvent as exc:
            meta["read"] += 1
            return [self._deadletter(exc.reason, exc.detail, raw, src)]
        if ev.type in ("segment", "truth"):  # for the quality fit only: not part of the attribution join
            meta["read"] += 1
            meta["accepted"] += 1
            if not self.audience:
                return []
            return [Output("audience", ev.user if ev.type == "segment" else ev.campaign, ev.to_dict())]
        outs = self.join.process(ev, src)
        meta["read"] += 1
        if any(o.kind == "deadletter" for o in outs):
            return [self._deadletter(*o.value, raw, src) if o.kind == "deadletter" else o for o in outs]
        meta["accepted"] += 1
        if self.history and ev.type == "impression":
            outs.insert(0, Output("history", ev.user, [ev.user, ev.ts, ev.ad, ev.campaign, "impression", ev.id]))
        if self.audience and ev.type == "impression":
            outs.insert(0, Output("audience", ev.user, {"type": "impression", "id": ev.id, "user": ev.user,
                                                        "ts": ev.ts, "campaign": ev.campaign,
                                                        "attrs": ev.attrs}))
        return outs

    def watermark(self) -> float:
        """No example this partition emits later has a ``label_ts`` below this, in a time-ordered stream
        (open windows close in buckets of ``bucket_s`` once the watermark passes them)."""
        return self.join.watermark - self.join.cfg.bucket_s

    def _deadletter(self, reason: str, detail: str, raw: bytes, src: Any) -> Output:
        dl = self.join.meta["deadletter"]
        dl[reason] = dl.get(reason, 0) + 1
        return Output("deadletter", None, deadletter_record(reason, detail, raw, src))

    def _to_outbox(self, outs: list[Output]) -> None:
        for o in outs:
            self.outbox[output_id(o)] = list(o)
            self._outbox_dirty = True
