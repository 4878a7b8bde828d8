"""The attribution join: impressions + conversions -> one labelled example per impression, in event time.

Public surface: ``AttributionConfig``, ``AttributionJoin``, ``Output``.

The join is plain Python over a key-value store with ``get``/``__setitem__``/``__delitem__``: a ``dict``
in the in-process replay (``loopline evaluate``), a RocksDB-backed Faust table in the ingest worker. Both
run this class, so both give the same labels. One ``AttributionJoin`` owns one partition's state; its
keys carry the partition as a prefix so one table (or dict) can hold several partitions.

Semantics (all times are event time, ``ts`` of the events):

* ``watermark = max ts seen - lateness``. An impression's window is ``[ts - lateness, ts + window]``.
* A conversion of the target kind inside the window makes the impression a positive example at once.
  Conversions of other kinds are counted (``other_kind``) and do not label.
* When the watermark passes ``ts + window`` with no such conversion, the example is emitted negative.
* A conversion whose impression is unknown is held until the watermark passes its ``ts``; if the
  impression arrives in that time the conversion is applied, else it is counted as ``orphan``.
* A conversion after the window (or for an impression already labelled) counts as ``late`` (or
  ``extra``). Nothing valid is dropped silently: every outcome has a counter in ``stats``.
* A second impression (or conversion) with an id already seen is a duplicate: it is dead-lettered with
  reason ``duplicate_impression`` (``duplicate_conversion``) and does not move event time (a copy with a
  later ``ts`` must not close windows). Ids are remembered for ``dedup_horizon``
  after their window closed. Every record keeps the source position ``src`` of the message that wrote
  it. (A batch's writes reach the store atomically, ``IngestCore``: a message processed again after a
  crash never meets its own writes.)
* Due work sits in time buckets of ``bucket_s`` seconds; a bucket is processed once the watermark passes
  its end, so closing costs O(due items), never a scan. ``close_all()`` ends event time (end of a log).

* An impression remembers at most ``max_conversions`` conversion ids (held before it, or applied to
  it); one more is counted (``conversions_dropped``) and changes nothing, so that a record stays small.

Storage layout (why it is fast in a Faust table, where every key written is a changelog message): the
records live *inside* their due bucket, in chunks of at most ``CHUNK`` records and ``CHUNK_BYTES``
(``b:<bucket>:<n>``; a record that outgrows its chunk moves to a new chunk of its bucket);
an open impression sits in the bucket of its window's end, a closed one (kept for de-duplication) in the
bucket of its forget time, held conversions in the bucket of their orphan time. Events arrive roughly in
time order, so a batch of events touches a handful of chunks, and a flush writes each once. An in-memory
index (record key -> chunk) is rebuilt from the chunks when a partition's join is created. The schedule
(bucket -> number of chunks) is kept in ranges of ``SCHEDULE_SPAN`` buckets (``s:<range>``, the live
ranges listed under ``s``): a one-second bucket and a day of horizon make ~86,400 live buckets. So no
value outgrows one changelog message (``state/sizes.py``).

>>> j = AttributionJoin({}, AttributionConfig(window_s=100, lateness_s=0))
>>> j.process(Impression("i1", 0.0, "u1", "a1", "c1", "feed"), src=0)
[]
>>> [(o.kind, o.key, o.value["label"]) for o in j.process(Conversion("v1", 50.0, "i1", "click"), src=1)]
[('example', 'u1', 1)]
>>> j.process(Impression("i2", 60.0, "u2", "a1", "c1", "feed"), src=2)
[]
>>> [(o.value["id"], o.value["label"]) for o in j.close_all()]
[('i2', 0)]
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, MutableMapping, NamedTuple

from loopline.errors import ConfigError
from loopline.settings import setting

from .events import Conversion, Impression
from .sizes import CHUNK_BYTES, size_of

__all__ = ["AttributionConfig", "AttributionJoin", "Output", "STAT_NAMES", "MAX_AHEAD_CONFIRM", "MAX_CONVERSIONS"]

STAT_NAMES = ("impressions", "conversions", "positives", "negatives", "closed_at_end", "orphan",
              "late", "extra", "other_kind", "duplicates", "conversions_dropped")
# Held events are kept in the partition's meta record (state/ingest.py), each with its line (up to
# ~150 KiB for a 64 KiB line): more than this many would outgrow one message (state/sizes.py)
MAX_AHEAD_CONFIRM = 4
# Conversions remembered per impression (~2 KiB each at most, with 256-character id and kind): more would
# let one record outgrow one message
MAX_CONVERSIONS = 256


@dataclass(frozen=True)
class AttributionConfig:
    window_s: float = 86400.0  # attribution window after the impression (1 day of event time)
    lateness_s: float = setting(60.0, "allowed lateness, seconds: the watermark trails the largest ts by this much",
                                flag="lateness")
    target_kind: str = setting("click", "the conversion kind that makes an example positive")
    bucket_s: float = 600.0  # due-work bucket width: a window closes at most this late (event time);
    # wider buckets mean fewer keys and a smaller schedule record (window + horizon / bucket_s entries)
    dedup_horizon_s: float = 86400.0  # how long an id is remembered after its window closed
    # Skew (state/ingest.py): an event more than this far ahead of its partition's watermark is held, and
    # dead-lettered (`ts_ahead`) unless `ahead_confirm` more events agreeing with it (all within
    # max_ahead_s of each other) follow: one bad clock must not close every open window, while a real
    # pause in traffic (MovieLens has 63-hour gaps) loses nothing. inf turns the check off.
    max_ahead_s: float = 86400.0
    ahead_confirm: int = 2  # later agreeing events that make a jump real (held meanwhile: at most this many
    # events per partition, MAX_AHEAD_CONFIRM at most); 0 accepts every jump at once
    # conversion ids an impression remembers, held or applied (de-duplication; at most MAX_CONVERSIONS);
    # one more is counted `conversions_dropped` and changes nothing: a few per impression are normal
    max_conversions: int = 64

    def __post_init__(self):
        for name in ("window_s", "lateness_s", "bucket_s", "dedup_horizon_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "bucket_s" and v == 0):
                raise ConfigError(f"{name}: must be a finite number >= 0 (bucket_s > 0), got {v!r}")
        v = self.max_ahead_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"max_ahead_s: must be a number > 0 (inf: no skew check), got {v!r}")
        v = self.ahead_confirm
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_AHEAD_CONFIRM:
            raise ConfigError(f"ahead_confirm: must be an integer from 0 to {MAX_AHEAD_CONFIRM}, got {v!r}")
        v = self.max_conversions
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_CONVERSIONS:
            raise ConfigError(f"max_conversions: must be an integer from 1 to {MAX_CONVERSIONS}, got {v!r}")
        if self.dedup_horizon_s < self.bucket_s:
            raise ConfigError(f"dedup_horizon_s: must be >= bucket_s ({self.bucket_s}), got {self.dedup_horizon_s}")
        if not self.target_kind:
            raise ConfigError("target_kind: must not be empty")


class Output(NamedTuple):
    """What processing an event yields: an ``example`` (key = user) or a ``deadletter`` (a reason)."""

    kind: str  # "example" | "deadletter"
    key: str | None
    value: Any


class AttributionJoin:
    """One partition's join state machine over ``store``; see the module docstring for the rules."""

    CHUNK = 128  # records per chunk value: a chunk is rewritten whole on every flush that touches it,
    # so smaller chunks re-serialize each record fewer times (512 measured 6% slower in the benchmark)
    CHUNK_BYTES = CHUNK_BYTES  # and bytes per chunk (state/sizes.py)
    SCHEDULE_SPAN = 2048  # buckets per schedule range (~16 bytes each: ~32 KiB a range)

    def __init__(self, store: MutableMapping, cfg: AttributionConfig = AttributionConfig(), prefix: str = ""):
        self.store = store
        self.cfg = cfg
        self.p = prefix
        meta = store.get(self.p + "m")
        self.meta = meta if meta is not None else {"max_ts": None, "stats": {k: 0 for k in STAT_NAMES}}
        for k in STAT_NAMES:  # a counter added since the record was written
            self.meta["stats"].setdefault(k, 0)
        # schedule: {bucket id: number of chunks}; kept in memory, written by save() when it changed
        sched = store.get(self.p + "s") or {}
        self._sched_dirty: set[int] = set()  # schedule ranges to write
        if isinstance(sched, dict):  # one value (the earlier layout): written in ranges by the next save
            self.nchunks = {int(b): n for b, n in sched.items()}
            self._sched_dirty.update(b // self.SCHEDULE_SPAN for b in self.nchunks)
        else:
            self.nchunks = {int(b): n for r in sched for b, n in (store.get(f"{self.p}s:{r}") or {}).items()}
        self.buckets = sorted(self.nchunks)
        self._ranges: dict[int, int] = {}  # schedule range -> its live buckets
        for b in self.buckets:
            r = b // self.SCHEDULE_SPAN
            self._ranges[r] = self._ranges.get(r, 0) + 1
        self.index: dict[str, str] = {}  # record key -> chunk key
        self.sizes: dict[str, int] = {}  # chunk key -> its bytes (the sum of its records')
        for b, n in self.nchunks.items():
            for c in range(n):
                ck = self._chunk_key(b, c)
                chunk = store.get(ck) or {}
                for key, rec in chunk.items():
                    self.index[key] = ck
                self.sizes[ck] = 2 + sum(self._size(key, rec) for key, rec in chunk.items())

    # -- storage -------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self.meta["stats"]

    @property
    def watermark(self) -> float:
        m = self.meta["max_ts"]
        return -math.inf if m is None else m - self.cfg.lateness_s

    def ahead(self, ts: float) -> float:
        """How far ``ts`` is beyond the skew limit (``watermark + max_ahead_s``); <= 0 when it is not.
        A partition with no watermark yet has no limit (its first event anchors event time)."""
        return ts - (self.watermark + self.cfg.max_ahead_s) if self.meta["max_ts"] is not None else -math.inf

    def save(self) -> None:
        """Write the watermark and counters (one small value), and the schedule if it changed.

        Copies: a Faust table may serialize a value after later in-place updates."""
        if self._sched_dirty:
            # the list first: a range it names that a crash kept from the store reads as empty
            self.store[self.p + "s"] = sorted(self._ranges)
            span = self.SCHEDULE_SPAN
            for r in sorted(self._sched_dirty):
                lo, hi = bisect.bisect_left(self.buckets, r * span), bisect.bisect_left(self.buckets, (r + 1) * span)
                key = f"{self.p}s:{r}"
                if lo < hi:
                    self.store[key] = {str(b): self.nchunks[b] for b in self.buckets[lo:hi]}
                elif self.store.get(key) is not None:
                    del self.store[key]
            self._sched_dirty.clear()
        self.store[self.p + "m"] = {k: dict(v) if isinstance(v, dict) else v for k, v in self.meta.items()}

    def _chunk_key(self, b: int, c: int) -> str:
        return f"{self.p}b:{b}:{c}"

    def _get(self, key: str) -> dict | None:
        ck = self.index.get(key)
        if ck is None:
            return None
        return self.store.get(ck)[key]

    @staticmethod
    def _size(key: str, rec: Any) -> int:
        return size_of(rec) + size_of(key) + 2  # "key":rec,

    def _chunk_size(self, ck: str, chunk: dict) -> int:
        """The bytes of chunk ``ck`` (measured when first seen: a chunk written before a crash whose
        schedule was not saved is found again by key)."""
        size = self.sizes.get(ck)
        if size is None:
            size = self.sizes[ck] = 2 + sum(self._size(key, rec) for key, rec in chunk.items())
        return size

    def _sched_changed(self, b: int) -> None:
        self._sched_dirty.add(b // self.SCHEDULE_SPAN)

    def _put(self, key: str, rec: Any, due: float | None = None) -> None:
        """Store ``rec`` in its current chunk, or (``due`` given) in the bucket due at ``due``."""
        ck = self.index.get(key)
        size = self._size(key, rec)
        if due is None and ck is not None:  # in place, unless it outgrows its chunk: then a new one
            chunk = self.store.get(ck)
            grown = self._chunk_size(ck, chunk) - self._size(key, chunk[key]) + size
            if grown <= self.CHUNK_BYTES or len(chunk) == 1:
                chunk[key] = rec
                self.sizes[ck] = grown
                self.store[ck] = chunk
                return
            b = int(ck.rsplit(":", 2)[1])
        else:
            b = int(due // self.cfg.bucket_s)
        if ck is not None:
            self._drop(key)
        n = self.nchunks.get(b)
        if n is None:
            n = self.nchunks[b] = 1
            bisect.insort(self.buckets, b)
            r = b // self.SCHEDULE_SPAN
            self._ranges[r] = self._ranges.get(r, 0) + 1
            self._sched_changed(b)
        ck = self._chunk_key(b, n - 1)
        chunk = self.store.get(ck) or {}
        if chunk and (len(chunk) >= self.CHUNK or self._chunk_size(ck, chunk) + size > self.CHUNK_BYTES):
            self.nchunks[b] = n + 1
            self._sched_changed(b)
            ck, chunk = self._chunk_key(b, n), {}
        self.index[key] = ck
        base = self._chunk_size(ck, chunk)
        chunk[key] = rec
        self.sizes[ck] = base + size
        self.store[ck] = chunk

    def _drop(self, key: str) -> None:
        ck = self.index.pop(key, None)
        if ck is not None:
            chunk = self.store.get(ck)
            size = self._chunk_size(ck, chunk)
            old = chunk.pop(key, None)
            if old is not None:
                self.sizes[ck] = size - self._size(key, old)
            self.store[ck] = chunk

    def _example(self, rec: dict, label: int, label_ts: float, conv: dict | None) -> Output:
        ex = dict(rec["ex"])
        ex.update(label=label, label_ts=label_ts, conversion=conv["id"] if conv else None,
                  value=conv["value"] if conv else 0.0)
        self.stats["positives" if label else "negatives"] += 1
        return Output("example", ex["user"], ex)

    def _in_window(self, rec: dict, cts: float) -> bool:
        return rec["ts"] - self.cfg.lateness_s <= cts <= rec["ts"] + self.cfg.window_s

    def _close(self, key: str, rec: dict) -> None:
        """Keep only a closed marker (for de-duplication) until its forget time."""
        marker = {"s": "closed", "src": rec["src"], "pos": rec.get("pos", False),
                  "cv": rec.get("cv", {})}
        self._put(key, marker, due=rec["ts"] + self.cfg.window_s + self.cfg.dedup_horizon_s)

    # -- events --------------------------------------------------------------------------------------
    def process(self, ev: Impression | Conversion, src: Any) -> list[Output]:
        """Apply one valid event (``src`` identifies its message) and return what it emits.

        The caller calls :meth:`save` after a batch, so counters reach the store with it. A duplicate
        (dead-lettered) changes nothing but the ``duplicates`` counter: not even event time."""
        out = self._impression(ev, src) if isinstance(ev, Impression) else self._conversion(ev, src)
        if out and out[0].kind == "deadletter":
            return out
        out.extend(self.advance(ev.ts))
        return out

    def duplicate_of(self, ev: Impression | Conversion) -> str | None:
        """The duplicate reason :meth:`process` would dead-letter ``ev`` with, or None (reads only)."""
        if isinstance(ev, Impression):
            rec = self._get("i:" + ev.id)
            return "duplicate_impression" if rec is not None else None
        rec = self._get("i:" + ev.impression)
        held = self._get("c:" + ev.impression) if rec is None else None
        seen = rec.get("cv", {}) if rec is not None else {c["id"] for c in held or ()}
        return "duplicate_conversion" if ev.id in seen else None

    def _duplicate(self, reason: str, ident: str) -> list[Output]:
        self.stats["duplicates"] += 1
        return [Output("deadletter", None, (reason, f"id {ident!r} was already seen"))]

    def _impression(self, imp: Impression, src: Any) -> list[Output]:
        key = "i:" + imp.id
        rec = self._get(key)
        if rec is not None:
            return self._duplicate("duplicate_impression", imp.id)
        self.stats["impressions"] += 1
        ex = imp.to_dict()
        del ex["type"]
        rec = {"s": "open", "src": src, "ts": imp.ts, "ex": ex, "cv": {}}
        held = self._get("c:" + imp.id)
        if held:
            self._drop("c:" + imp.id)
            rec["cv"] = {c["id"]: c["src"] for c in held}
        self._put(key, rec, due=imp.ts + self.cfg.window_s)
        out: list[Output] = []
        for c in held or ():
            out.extend(self._apply(key, self._get(key), c))
        return out

    def _conversion(self, conv: Conversion, src: Any) -> list[Output]:
        # Conversion ids are remembered inside their impression's record (or its held list).
        key = "i:" + conv.impression
        rec = self._get(key)
        held = self._get("c:" + conv.impression) if rec is None else None
        seen = rec.get("cv", {}) if rec is not None else {c["id"]: c["src"] for c in held or ()}
        if conv.id in seen:
            return self._duplicate("duplicate_conversion", conv.id)
        self.stats["conversions"] += 1
        if len(seen) >= self.cfg.max_conversions:  # a record must stay small (module docstring)
            self.stats["conversions_dropped"] += 1
            return []
        c = {"id": conv.id, "ts": conv.ts, "value": conv.value, "src": src, "kind": conv.kind}
        if rec is None:  # before its impression: hold it until the watermark passes its ts
            if held:
                self._put("c:" + conv.impression, held + [c])
            else:
                self._put("c:" + conv.impression, [c], due=conv.ts)
            return []
        rec = dict(rec, cv={**seen, conv.id: src})
        self._put(key, rec)
        return self._apply(key, rec, c)

    def _apply(self, key: str, rec: dict, c: dict) -> list[Output]:
        """A conversion meets its impression record (open or closed)."""
        if c["kind"] != self.cfg.target_kind:
            self.stats["other_kind"] += 1
            return []
        if rec["s"] == "closed":
            self.stats["extra" if rec.get("pos") else "late"] += 1
            return []
        if not self._in_window(rec, c["ts"]):
            self.stats["late"] += 1
            return []
        out = [self._example(rec, 1, c["ts"], c)]
        # a copy: a stored record is never changed in place (the chunks' byte counts rely on it)
        self._close(key, dict(rec, pos=True))
        return out

    # -- time ----------------------------------------------------------------------------------------
    def advance(self, ts: float) -> list[Output]:
        """Move event time to ``ts`` and process every bucket the watermark has passed."""
        if self.meta["max_ts"] is None or ts > self.meta["max_ts"]:
            self.meta["max_ts"] = ts
        wm = self.watermark
        out: list[Output] = []
        while self.buckets and (self.buckets[0] + 1) * self.cfg.bucket_s <= wm:
            out.extend(self._run_bucket(self.buckets[0], at_end=False))
        return out

    def close_all(self) -> list[Output]:
        """End of event time (end of a finite log): process every bucket; negatives count ``closed_at_end``."""
        out: list[Output] = []
        while self.buckets:
            out.extend(self._run_bucket(self.buckets[0], at_end=True))
        return out

    def _run_bucket(self, b: int, at_end: bool) -> list[Output]:
        out: list[Output] = []
        # records moved while this bucket runs (to their forget time) land in later buckets
        for c in range(self.nchunks[b]):
            ck = self._chunk_key(b, c)
            chunk = self.store.get(ck)
            if chunk is None:  # processed before a crash whose schedule was not yet saved
                continue
            for key, rec in list(chunk.items()):
                if self.index.get(key) != ck:
                    continue  # moved elsewhere before a crash; this copy is stale
                del self.index[key]
                out.extend(self._due(key, rec, at_end))
            del self.store[ck]
            self.sizes.pop(ck, None)
        self.buckets.remove(b)
        del self.nchunks[b]
        r = b // self.SCHEDULE_SPAN
        self._ranges[r] -= 1
        if not self._ranges[r]:
            del self._ranges[r]
        self._sched_changed(b)
        return out

    def _due(self, key: str, rec: Any, at_end: bool) -> list[Output]:
        if key.startswith("c:"):
            self.stats["orphan"] += len(rec)
        elif rec["s"] == "open":
            if at_end:
                self.stats["closed_at_end"] += 1
            out = [self._example(rec, 0, rec["ts"] + self.cfg.window_s, None)]
            self._close(key, rec)
            return out
        return []  # a closed marker reached its forget time
