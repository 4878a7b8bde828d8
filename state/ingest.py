"""Ingest for one partition: raw bytes -> validated event -> attribution join -> outputs.

Public surface: ``IngestCore``, ``deadletter_record``, ``output_id``, ``INTERNAL``.

This is the code both paths run: the Faust ingest agent (one ``IngestCore`` per partition over the
RocksDB-backed table) and ``loopline evaluate`` (over dicts). ``handle`` is total: any message value
(bytes of any kind, a ``str``, ``None`` for a tombstone) gives outputs, never an exception. Anything
invalid comes back as a dead-letter output with its reason and the raw bytes; an exception nobody
expected becomes a dead letter with reason :data:`INTERNAL` and the exception's type (a bug to report,
counted like any reason). Counts always add up: ``read == accepted + sum(deadletter) + held``.

Skew. An impression or conversion whose ``ts`` is more than ``cfg.max_ahead_s`` ahead of the partition's
watermark is *held* (stored with the partition's counters, so it survives a restart), not applied: one
producer with a bad clock must not close every open window of the partition. What comes next decides:

* an event that is not ahead: the held events were outliers; each is dead-lettered ``ts_ahead``;
* an ahead event within ``max_ahead_s`` of every held one: it agrees; once ``ahead_confirm`` events agree
  with the first, the traffic really jumped (a pause in traffic, a backlog): all of them are applied in
  arrival order, nothing is lost;
* an ahead event that disagrees with them: they are dead-lettered, it is held in their place;
* the end of the log: the held events are dead-lettered (nothing confirmed them).

So a dead-lettered ``ts_ahead`` never moved the watermark. The first event of a partition has no
watermark to be ahead of: it anchors event time unchecked (the contract's absolute range,
``EventLimits.min_ts``/``max_ts``, is its guard, and rejects a timestamp in milliseconds anywhere).
Segment assertions and truth reports do not move event time and are not held.

Crash safety. Writes are buffered and flushed once per batch as one atomic change of the store
(``_Overlay``: journaled, then applied): the outbox (the batch's outputs), the state changes, the
counters and ``through``, the last offset whose effects are all stored. After a crash (``kill -9``) at
any point of a flush, the store holds all of the batch's effects or none of them, and the worker
restarts from its last committed offset:

* messages at or below ``through`` are skipped (counted as ``redelivered``): their effects are stored;
* messages above it are processed again, from the state as it was before them, counters included;
* outputs that may have been lost in the producer's buffer are still in the outbox: ``unacked()``
  returns them for re-sending, and they are removed from it after ``acked``. Re-sent outputs are
  de-duplicated downstream by ``output_id``. The outbox is kept in chunks (``_Outbox``), so that no
  stored value outgrows one changelog message (``state/sizes.py``) however many or large the outputs.

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
>>> core.handle(None, offset=1)[0].value["reason"]  # a tombstone
'not_object'
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Iterable, MutableMapping

from loopline.errors import InvalidEvent

from .attribution import AttributionConfig, AttributionJoin, Output
from .events import Conversion, EventLimits, Impression, parse_event
from .sizes import CHUNK_BYTES, MAX_DEADLETTER_RAW, size_of

__all__ = ["IngestCore", "deadletter_record", "output_id", "INTERNAL"]

_DELETED = object()
INTERNAL = "internal"  # the last-resort reason: an exception no input should cause (outside events.REASONS)


def _as_bytes(raw: Any) -> bytes:
    """The bytes a dead letter keeps of any message value."""
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, (bytearray, memoryview)):
        return bytes(raw)
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass")
    return b""


def _event_of(d: dict) -> Impression | Conversion:
    """A held event back from its stored ``to_dict()``."""
    fields = {k: v for k, v in d.items() if k != "type"}
    return Impression(**fields) if d["type"] == "impression" else Conversion(**fields)


def deadletter_record(reason: str, detail: str, raw: bytes, src: Any) -> dict:
    """The dead-letter topic's value: reason, detail, the raw bytes (base64) and where they came from.

    A line longer than ``MAX_DEADLETTER_RAW`` keeps its first ``MAX_DEADLETTER_RAW`` bytes, its length
    (``raw_len``) and the SHA-256 of all of it (``raw_sha256``), so that the dead letter fits one message
    (``state/sizes.py``) whatever the line.

    >>> d = deadletter_record("line_too_long", "", b"x" * (MAX_DEADLETTER_RAW + 1), [0, 7])
    >>> d["raw_len"] - len(base64.b64decode(d["raw_b64"])), len(d["raw_sha256"])
    (1, 64)
    """
    d = {"reason": reason, "detail": detail, "raw_b64": base64.b64encode(raw[:MAX_DEADLETTER_RAW]).decode("ascii"),
         "raw_len": len(raw), "src": src}
    if len(raw) > MAX_DEADLETTER_RAW:
        d["raw_sha256"] = hashlib.sha256(raw).hexdigest()
    return d


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
    """Buffers a batch's writes (each key written once) and caches its reads (a Faust table deserializes
    on every read); :meth:`flush` makes them one atomic change of the store.

    Atomic, because a crash (``kill -9``) may stop the writes of a flush anywhere, and the store that a
    restarted worker recovers (a Faust table: its changelog, written in order) is then any prefix of
    them. So the batch's writes are first journaled: in the commit record ``<p>|j`` itself when they fit
    one message, else in chunks ``<p>|j|<n>`` that the commit record names, written before it. Then they
    are applied to their keys, and the commit record deleted. A store whose commit record is present
    holds a batch that is not known to be applied: :meth:`recover` (on start) applies it again, which
    is idempotent. A prefix without the commit record has none of the batch's writes outside the
    journal's chunks (never read without it; a later batch's chunks overwrite them), so state,
    counters and outbox always move together.

    >>> store = {}
    >>> o = _Overlay(store, "0|")
    >>> o["a"] = 1; o["b"] = 2; del o["a"]
    >>> o.flush(); store
    {'b': 2}
    >>> store["0|j"] = {"w": [["c", 3], ["b", None]]}  # a crash after the commit record
    >>> _Overlay(store, "0|").recover(); store
    {'c': 3}
    """

    def __init__(self, store: MutableMapping, prefix: str = ""):
        self.store = store
        self.journal = prefix + "j"
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
        if not self.writes:
            return
        items = [[k, None if v is _DELETED else v] for k, v in self.writes.items()]
        self.writes.clear()
        self.reads.clear()
        chunks, chunk, size = [], [], 2
        for item in items:  # a chunk takes items while under CHUNK_BYTES (one item alone may be larger)
            n = size_of(item) + 1
            if chunk and size + n > CHUNK_BYTES:
                chunks.append(chunk)
                chunk, size = [], 2
            chunk.append(item)
            size += n
        chunks.append(chunk)
        if len(chunks) == 1:
            self.store[self.journal] = {"w": chunks[0]}  # the commit record holds the writes
        else:
            for i, c in enumerate(chunks):
                self.store[f"{self.journal}|{i}"] = c
            self.store[self.journal] = {"n": len(chunks)}  # the commit record
        self._apply(items)
        del self.store[self.journal]
        if len(chunks) > 1:
            for i in range(len(chunks)):
                del self.store[f"{self.journal}|{i}"]

    def recover(self) -> None:
        """Apply the journaled batch a crash may have left half-applied (a no-op when there is none)."""
        rec = self.store.get(self.journal)
        if not isinstance(rec, dict):
            return
        if "w" in rec:
            self._apply(rec["w"])
        else:
            n = int(rec.get("n", 0))
            for i in range(n):
                self._apply(self.store.get(f"{self.journal}|{i}") or ())
        del self.store[self.journal]
        for i in range(int(rec.get("n", 0))):
            if self.store.get(f"{self.journal}|{i}") is not None:
                del self.store[f"{self.journal}|{i}"]

    def _apply(self, items) -> None:
        for k, v in items:
            if v is not None:
                self.store[k] = v
            elif self.store.get(k) is not None:
                del self.store[k]


class _Outbox:
    """The partition's unacknowledged outputs, in chunks that each fit one changelog message.

    Layout: ``<p>|o`` is the index, ``{"chunks": [n, ...], "next": n}``; ``<p>|o|<n>`` a chunk,
    ``{output id: [kind, key, value]}``. A chunk takes outputs while it is under ``CHUNK_BYTES``; a flush
    writes the chunks it changed, deletes the emptied ones, and writes the index first (listing every
    chunk it is about to write): a chunk the index names but the store lacks is read as empty, and chunk
    numbers are never reused. So a batch's outputs cost a few chunk writes, and an acknowledged batch a
    few deletions, whatever their number or size. A store written by the single-value outbox (``<p>|o``
    a dict of outputs) is read as such and rewritten in chunks by the next flush."""

    CHUNK_BYTES = CHUNK_BYTES  # (a test may set a smaller one on an instance)

    def __init__(self, store: MutableMapping, prefix: str):
        self.store = store
        self.key = prefix + "o"
        self.entries: dict[str, tuple[int, list, int]] = {}  # output id -> (chunk, output, bytes)
        self.chunks: dict[int, dict[str, None]] = {}  # chunk -> its output ids, in order (an ordered set)
        self.sizes: dict[int, int] = {}  # chunk -> its bytes (approximately: the sum of its entries')
        self.dirty: set[int] = set()
        self.next = 0
        self._index = None  # the index as last written
        idx = store.get(self.key)
        if isinstance(idx, dict) and "chunks" in idx and "next" in idx:
            self._index = idx
            self.next = int(idx["next"])
            for n in idx["chunks"]:
                for oid, o in (store.get(f"{self.key}|{n}") or {}).items():
                    self._add(oid, list(o), n)
        elif idx:  # the single-value layout: move it into chunks
            for oid, o in idx.items():
                self.add(oid, list(o))

    def _add(self, oid: str, o: list, n: int) -> None:
        size = size_of([oid, o])  # ("oid":[...], as in the chunk)
        self.entries[oid] = (n, o, size)
        ids = self.chunks.get(n)
        if ids is None:
            ids = self.chunks[n] = {}
            self.sizes[n] = 2
            self.next = max(self.next, n + 1)
        ids[oid] = None
        self.sizes[n] += size

    def add(self, oid: str, o: list) -> None:
        """Keep output ``o`` under ``oid`` (replacing an earlier one with that id)."""
        if oid in self.entries:
            self.remove(oid)
        n = self.next - 1
        if n not in self.chunks or self.sizes[n] >= self.CHUNK_BYTES:
            n = self.next
        self._add(oid, o, n)
        self.dirty.add(n)

    def remove(self, oid: str) -> None:
        e = self.entries.pop(oid, None)
        if e is not None:
            n, _, size = e
            del self.chunks[n][oid]
            self.sizes[n] -= size
            self.dirty.add(n)

    def outputs(self) -> list[list]:
        return [self.entries[oid][1] for n in sorted(self.chunks) for oid in self.chunks[n]]

    def flush(self) -> None:
        if not self.dirty:
            return
        for n in [n for n in self.dirty if not self.chunks.get(n)]:
            self.chunks.pop(n, None)
            self.sizes.pop(n, None)
        index = {"chunks": sorted(self.chunks), "next": self.next}
        if index != self._index:
            self.store[self.key] = self._index = index
        for n in sorted(self.dirty):
            ck = f"{self.key}|{n}"
            ids = self.chunks.get(n)
            if ids:
                self.store[ck] = {oid: self.entries[oid][1] for oid in ids}
            elif self.store.get(ck) is not None:
                del self.store[ck]
        self.dirty.clear()


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
        self.overlay = _Overlay(store, f"{partition}|")
        self.overlay.recover()  # a batch a crash left half-applied
        self.join = AttributionJoin(self.overlay, cfg, prefix=f"{partition}|")
        self.outbox = _Outbox(self.overlay, f"{partition}|")
        self._acked: set[str] = set()
        meta = self.join.meta
        for k in ("read", "accepted", "redelivered"):
            meta.setdefault(k, 0)
        meta.setdefault("deadletter", {})
        meta.setdefault("through", -1)  # the last offset whose effects are all stored
        meta.setdefault("held", [])  # events ahead of the watermark awaiting confirmation (module docstring)
        self._durable_through = meta["through"]

    def handle(self, raw: bytes, offset: int) -> list[Output]:
        """Process the message at ``offset`` of this partition; return its examples and dead letters
        (and those of earlier held messages that it resolved).

        State changes are buffered until :meth:`flush` (once per batch of messages: each key is then
        written once, however many messages touched it)."""
        meta = self.join.meta
        if offset <= self._durable_through:
            meta["redelivered"] += 1
            return []
        src = [self.partition, offset]
        meta["read"] += 1
        try:
            outs = self._compute(raw, src)
        except Exception as exc:  # noqa: BLE001 - the last resort: a bug must not stop the partition
            outs = [self._internal(exc, raw, src)]
        meta["through"] = max(meta["through"], offset)
        self._to_outbox(outs)
        return outs

    def passed(self, offset: int) -> None:
        """A message at ``offset`` was consumed without being handled here (a control mark, an event
        forwarded to its home partition): :meth:`next_offset` moves past it, ``through`` does not (its
        effect, if any, is not this partition's state)."""
        self.join.meta["passed"] = max(self.join.meta.get("passed", -1), offset)

    def next_offset(self) -> int:
        """The offset this partition's next message must have: one past everything consumed. A batch
        that starts later had messages skipped by the consumer (``stream/gaps.py``)."""
        return max(self.join.meta["through"], self.join.meta.get("passed", -1)) + 1

    def end_of_log(self) -> list[Output]:
        """Close every open window: the end of a finite log is the end of event time. Held events
        (nothing confirmed them) are dead-lettered first."""
        outs = self._drop_held()
        outs += self.join.close_all()
        self._to_outbox(outs)
        return outs

    def drop_held(self) -> list[Output]:
        """Dead-letter every held event (``ts_ahead``): nothing confirmed them (the end of a log)."""
        outs = self._drop_held()
        self._to_outbox(outs)
        return outs

    def _drop_held(self) -> list[Output]:
        meta, cfg = self.join.meta, self.join.cfg
        held, meta["held"] = meta["held"], []
        return [self._deadletter("ts_ahead", f"field 'ts' is {h['ev']['ts']!r}, {h['ahead']:.0f} s ahead of the "
                                             f"partition's watermark (max_ahead_s {cfg.max_ahead_s:g}) and fewer "
                                             f"than {cfg.ahead_confirm} later events agreed with it",
                                 base64.b64decode(h["raw"]), h["src"]) for h in held]

    def flush(self) -> None:
        """Write the buffered changes (outbox, state, counters and ``through``) as one atomic change
        (``_Overlay``): after a crash the store holds all of a batch's effects or none of them."""
        for oid in self._acked:
            self.outbox.remove(oid)
        self._acked.clear()
        self.outbox.flush()
        self.join.save()
        self.overlay.flush()
        self._durable_through = self.join.meta["through"]

    def acked(self, outs: Iterable[Output]) -> None:
        """Mark outputs as delivered; their outbox entries go with the next flush."""
        self._acked.update(output_id(o) for o in outs)

    def unacked(self) -> list[Output]:
        """Outputs written to the outbox and never acknowledged (after a restart: possibly never sent)."""
        return [Output(*v) for v in self.outbox.outputs()]

    def counts(self) -> dict:
        m = self.join.meta
        return {"read": m["read"], "accepted": m["accepted"], "deadletter": dict(m["deadletter"]),
                "redelivered": m["redelivered"], "held": len(m["held"]), "attribution": dict(m["stats"]),
                "max_ts": m["max_ts"]}

    # -- internals -----------------------------------------------------------------------------------
    def _compute(self, raw: Any, src: Any) -> list[Output]:
        try:
            ev = parse_event(raw, self.limits)
        except InvalidEvent as exc:
            return [self._deadletter(exc.reason, exc.detail, _as_bytes(raw), src)]
        if ev.type in ("segment", "truth"):  # not part of event time, nor of the attribution join
            return self._apply(ev, raw, src)
        meta, cfg = self.join.meta, self.join.cfg
        held = meta["held"]
        ahead = self.join.ahead(ev.ts)
        if ahead <= 0 and not held:  # the usual case
            return self._apply(ev, raw, src)
        dup = self._duplicate(ev, raw, src, held)  # a duplicate neither confirms nor refutes a jump
        if dup is not None:
            return [dup]
        if ahead <= 0:  # anything held was an outlier
            return self._drop_held() + self._apply(ev, raw, src)
        entry = {"ev": ev.to_dict(), "src": src, "raw": base64.b64encode(_as_bytes(raw)).decode("ascii"),
                 "ahead": ahead + cfg.max_ahead_s}
        cluster = [h["ev"]["ts"] for h in held] + [ev.ts]
        if held and max(cluster) - min(cluster) <= cfg.max_ahead_s:  # it agrees with the held events
            held = held + [entry]  # (a new list: the stored meta may still refer to the old one)
            if len(held) <= cfg.ahead_confirm:
                meta["held"] = held
                return []
            meta["held"] = []  # confirmed: event time really jumped; apply them in arrival order
            outs: list[Output] = []
            for h in held:
                outs += self._apply(_event_of(h["ev"]), base64.b64decode(h["raw"]), h["src"])
            return outs
        outs = self._drop_held()
        if cfg.ahead_confirm == 0:
            return outs + self._apply(ev, raw, src)
        meta["held"] = [entry]
        return outs

    def _duplicate(self, ev, raw: Any, src: Any, held: list) -> Output | None:
        """``ev`` as a duplicate dead letter when its id was seen: by the join, or among the held events."""
        reason = self.join.duplicate_of(ev)
        if reason is None:
            if ev.type == "impression":
                same = any(h["ev"]["type"] == "impression" and h["ev"]["id"] == ev.id for h in held)
            else:
                same = any(h["ev"]["type"] == "conversion" and h["ev"]["id"] == ev.id
                           and h["ev"]["impression"] == ev.impression for h in held)
            reason = f"duplicate_{ev.type}" if same else None
        if reason is None:
            return None
        self.join.stats["duplicates"] += 1
        return self._deadletter(reason, f"id {ev.id!r} was already seen", _as_bytes(raw), src)

    def _apply(self, ev, raw: Any, src: Any) -> list[Output]:
        """Apply one valid event; count it accepted, or dead-lettered (a duplicate, or :data:`INTERNAL`)."""
        meta = self.join.meta
        try:
            if ev.type in ("segment", "truth"):  # for the quality fit only
                meta["accepted"] += 1
                if not self.audience:
                    return []
                return [Output("audience", ev.user if ev.type == "segment" else ev.campaign, ev.to_dict())]
            outs = self.join.process(ev, src)
            if any(o.kind == "deadletter" for o in outs):
                return [self._deadletter(*o.value, _as_bytes(raw), src) if o.kind == "deadletter" else o
                        for o in outs]
            if self.history and ev.type == "impression":
                outs.insert(0, Output("history", ev.user, [ev.user, ev.ts, ev.ad, ev.campaign, "impression", ev.id]))
            if self.audience and ev.type == "impression":
                outs.insert(0, Output("audience", ev.user, {"type": "impression", "id": ev.id, "user": ev.user,
                                                            "ts": ev.ts, "campaign": ev.campaign,
                                                            "attrs": ev.attrs}))
        except Exception as exc:  # noqa: BLE001 - see handle()
            return [self._internal(exc, raw, src)]
        meta["accepted"] += 1
        return outs

    def _internal(self, exc: Exception, raw: Any, src: Any) -> Output:
        return self._deadletter(INTERNAL, f"{type(exc).__name__}: {ascii(str(exc))[1:-1][:200]}", _as_bytes(raw), src)

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
            self.outbox.add(output_id(o), list(o))
