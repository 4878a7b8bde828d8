"""The per-user history store of LoopFM: time-ordered FM codes (and raw events) per user, in RocksDB.

Public surface: ``HistoryConfig``, ``HistoryStore``, ``rdict_options``, ``EMBEDDING``, ``EVENT``.

LoopFM (``shared/papers.md`` section 1) feeds a vertical model, for each example of user ``u`` at time
``t``, the sequence of the last ``L`` FM codes of ``u`` *strictly before* ``t``: the current example is
never part of its own history, which is what removes real-time FM inference from serving. The FM trainer
publishes one code per example on ``fm.embeddings`` (keyed by user); a worker appends them here, and the
VM trainers read the sequences. The store also keeps the user's raw recent events (ad, campaign, kind),
which the FM's own sequence encoder reads. Everything is event time, never wall-clock.

**Entries.** Two kinds per user, each its own time-ordered sequence:

* embeddings ``(ts, fm_version, code)``: ``fm_version`` is an ``int`` or a ``str`` (a frozen FM checkpoint
  makes a consistent embedding space, so every code says which FM made it); ``code`` is stored quantized
  by ``loopline.state.codes`` (int8 by default, int4 with ``bits=4``) with its per-row scale, and read
  back dequantized (error at most ``scale / 2`` per element);
* events ``(ts, ad, campaign, kind)``: strings, as in the event log.

**Key layout** (raw bytes; RocksDB orders keys bytewise)::

    kind (1 byte: b"E" embedding, b"V" event) | user (UTF-8) | 0x00
        | ts_us (8 bytes, big-endian) | seq (4 bytes, big-endian)

``ts_us`` is ``round(ts * 1e6)`` (microseconds since the epoch; ``ts`` must be >= 0), so bytewise order is
time order within a user. The 0x00 separator ends the user: ``"u1"``'s keys (``E u1 00 ...``) can never
interleave with ``"u10"``'s (``E u10 00 ...``), because 0x00 sorts below every byte of a user id. Any
``str`` is a user id (the event contract rejects odd ones first; this is defence in depth): its UTF-8
(lone surrogates kept, ``surrogatepass``) is byte-stuffed so it holds no 0x00 (0x00 -> 0x01 0x01, 0x01 ->
0x01 0x02; ids without either byte are unchanged), and one of more than 1024 bytes is keyed by its first
1000 bytes, the marker 0x01 0x03 (which stuffing never writes) and the hex BLAKE2b-128 of the whole id. A
read at any finite ``t`` is clamped to the key range. ``seq`` orders entries
with the same ``ts``: the first gets 0, a later distinct one the next number, so ties keep insertion
order. An append is one ``put``; "the last ``L`` strictly before ``t``" is one ``seek_for_prev`` to
``(t_us - 1, 0xFFFFFFFF)`` and a reverse scan of at most ``L`` keys.

**Values** (little-endian ``struct``, never pickle). Embedding: ``flags u8 | len(version) u8 | fm_version
| bits u8 | d u16 | scale f32 | payload | id u32``, where ``bits .. payload`` is exactly ``codes.pack``'s
output and ``fm_version`` is 8 bytes ``<q`` for an int, UTF-8 (at most 255 bytes) for a str (flag bit 1).
Everything that must agree for a block decode (flags, version, bits, d) is one contiguous prefix, so a
read checks a user's ``L`` entries with one comparison and decodes them with a few numpy calls. Event:
``flags u8 | len(ad) u16 | len(campaign) u16 | ad | campaign | kind | id u32``. Flag bit 0 says the row
came with an id; ``id`` is its CRC-32 (zero without one). Per entry at d=64, int8 and an int version: 85
value bytes (64 of code) and 14 + len(user) key bytes.

**Idempotent appends (replays).** Kafka delivers at least once, and a worker that takes over partitions
replays ``fm.embeddings``, so the same row can arrive twice. A row may carry an ``id`` as its last element
(the example's impression id); its identity is that id's CRC-32, or, without an id, its whole value. A
row whose ``ts`` is newer than the user's newest entry is new: its ``seq`` is 0 and no read is needed
(the streaming case). Otherwise (a late row, a tie, a replay) the store brings that user's retention up
to date and reads the entries at that exact ``(user, ts)`` (one seek): a stored entry with the same
identity is overwritten in place, else the row gets the next ``seq``. So a replay overwrites rather than
duplicates, and ties keep insertion order, which a ``seq`` derived from a hash of the id would lose (we
chose the read on the rare path over that). A 32-bit hash only has to tell apart entries with the same
user and the same microsecond.

**Retention**, per user and kind, at append time, for the users an append touched, never by a full scan:
at most ``max_len`` entries, and none older than the user's newest ``ts`` minus ``max_age_s``. A row
already older than that limit is not written, nor is a late row (not found by identity) that is not newer
than the oldest entry of a user who already holds ``max_len``: it would be deleted at once, and dropping
it keeps a replayed row that retention deleted earlier from coming back in place of a kept one. The
store keeps, per cached user, ``(count, oldest ts, newest ts)`` in memory (loaded by one scan of that
user's prefix the first time the user is touched after opening; evicted beyond ``cache_users``). After a
write batch it seeks straight to each touched user's oldest entry (past the tombstones of earlier
deletes) and deletes from there while the user is over either limit. The stored contents are then the
same as if retention ran after every row, so they depend only on the rows and their order, not on the
batching, on restarts or on duplicates (``tests/state/test_history.py`` checks this against a
row-at-a-time reference). Users who are never touched again keep their entries; reads apply the age limit
themselves (only entries with ``t - max_age_s <= ts < t`` are returned), so they never see stale history.
The ``dropped`` and ``trimmed`` counters (``append_*`` results, ``stats()``) count both kinds of removal.

**Rebuild.** After a worker dies, the partitions' stores are re-created on the worker that takes them
over by replaying ``fm.embeddings`` (and the raw events from ``examples``): ``rebuild`` empties the store
(unless ``clear=False``) and appends the rows in stream order; appends are idempotent (above), so a
replay with at-least-once duplicates, or a second replay, changes nothing. Use one store per partition,
as Faust does for its RocksDB tables.

>>> import tempfile, numpy as np
>>> tmp = tempfile.TemporaryDirectory()
>>> with HistoryStore(tmp.name) as h:
...     _ = h.append_embeddings([("u1", 10.0, 3, np.full(4, 0.5)), ("u1", 20.0, 3, np.full(4, -0.25))])
...     _ = h.append_events([("u1", 15.0, "a1", "c1", "click")])
...     got = h.last_embeddings("u1", t=20.0, L=5)   # the entry at exactly t=20 is excluded
...     got["ts"].tolist(), got["versions"], got["codes"].shape, h.last_events("u1", 21.0, 5)
([10.0], [3], (1, 4), [(15.0, 'a1', 'c1', 'click')])
>>> tmp.cleanup()
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import struct
import zlib
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Sequence

import numpy as np
from rocksdict import (BlockBasedOptions, BottommostLevelCompaction, Cache, CompactOptions, DBCompressionType,
                       Options, Rdict, ReadOptions, WriteBatch, WriteOptions)

from loopline.errors import Closed, ConfigError

from . import codes as _codes

__all__ = ["HistoryConfig", "HistoryStore", "rdict_options", "EMBEDDING", "EVENT"]

EMBEDDING = b"E"  # first key byte of embedding entries
EVENT = b"V"  # first key byte of raw-event entries

_TSQ = struct.Struct(">QI")  # ts_us, seq: the key's last 12 bytes
_VHDR = struct.Struct("<BHH")  # event value: flags, len(ad), len(campaign)
_ID = struct.Struct("<I")  # the id hash, last 4 bytes of every value
_I64 = struct.Struct("<q")
_HAS_ID, _STR_VERSION = 1, 2
_MAX_SEQ = 0xFFFFFFFF
_MAX_TS_S = 9.2e12  # ts_us must fit 63 bits
_EMPTY = (1 << 64)  # "oldest" of a user with no entries: above every ts_us
COUNTERS = ("appended", "overwritten", "dropped", "trimmed", "state_loads")


@dataclass(frozen=True)
class HistoryConfig:
    max_len: int = 200  # entries kept per user and kind (LoopFM's sequence length L is about 200)
    max_age_s: float = 30 * 86400.0  # event-time age kept, behind the user's newest entry (30 days)
    bits: int = 8  # quantization of new codes: 8 (int8) or 4 (int4, half the bytes, ~18x the error)
    write_batch: int = 1024  # rows per RocksDB WriteBatch (one write call, one WAL record)
    cache_users: int = 200_000  # users whose (count, oldest, newest) stay in memory (~200 B each); a miss
    # costs one scan of that user's prefix (<= max_len keys), never a wrong answer
    wal: bool = True  # write-ahead log: a killed process loses nothing written. False is faster; after
    # a crash the store must then be rebuilt from fm.embeddings
    # RocksDB memory, per store (a role all worker holds two, fm and vm): both fill slowly with traffic,
    # so they are what a long-lived worker's memory grows by until they are full (`bench soak`)
    block_cache_mb: int = 16  # block cache (reads of recent history hit it)
    write_buffer_mb: int = 8  # memtable size before a flush to an SST file (two memtables at most)
    background_jobs: int = 2  # flush/compaction threads: workers run on 2 cores (shared/design.md)

    def __post_init__(self):
        for name in ("max_len", "write_batch", "cache_users", "block_cache_mb", "write_buffer_mb",
                     "background_jobs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        v = self.max_age_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"max_age_s: must be a finite number > 0, got {v!r}")
        if self.bits not in (8, 4):
            raise ConfigError(f"bits: must be 8 or 4, got {self.bits!r}")
        if not isinstance(self.wal, bool):
            raise ConfigError(f"wal: must be True or False, got {self.wal!r}")


def rdict_options(cfg: HistoryConfig = HistoryConfig()) -> tuple[Options, WriteOptions]:
    """The RocksDB options of a history store (the benchmark opens its raw baseline with the same ones).

    * raw mode: keys and values are our bytes, with no rocksdict type prefix (the layout above);
    * LZ4 compression: cheap; it gains little on codes, more on event strings and on keys;
    * a deletion-triggered compaction collector: retention turns every user's oldest entries into
      tombstones, a queue-like pattern; SST files dense with deletes are compacted early so the
      tombstones do not pile up in front of the seeks;
    * block cache, memtable size and background threads from ``cfg``; 16 KiB blocks (a user's last 200
      codes span a few blocks, and the index stays small); WAL on or off from ``cfg.wal``.
    """
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_compression_type(DBCompressionType.lz4())
    opts.set_write_buffer_size(cfg.write_buffer_mb << 20)
    opts.set_max_write_buffer_number(2)
    opts.set_max_background_jobs(cfg.background_jobs)
    opts.set_level_compaction_dynamic_level_bytes(True)
    opts.set_keep_log_file_num(2)
    opts.add_compact_on_deletion_collector_factory(10_000, 2_500, 0.25)
    table = BlockBasedOptions()
    table.set_block_size(16 << 10)
    table.set_block_cache(Cache(cfg.block_cache_mb << 20))
    opts.set_block_based_table_factory(table)
    wo = WriteOptions()
    wo.disable_wal = not cfg.wal
    return opts, wo


def _user_bytes(user) -> bytes:
    """The user part of a key: any ``str`` (module docstring, key layout); never holds 0x00."""
    if not isinstance(user, str):
        raise ConfigError(f"user: must be a string, got {type(user).__name__}")
    b = user.encode("utf-8", "surrogatepass")
    if b"\x00" in b or b"\x01" in b:
        b = b.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
    if len(b) > 1024:
        b = b[:1000] + b"\x01\x03" + hashlib.blake2b(user.encode("utf-8", "surrogatepass"),
                                                      digest_size=16).hexdigest().encode("ascii")
    return b


def _ts_us_column(tss) -> list[int]:
    try:
        a = np.asarray(tss)
    except (TypeError, ValueError):
        a = np.asarray([], dtype=object)
    if a.dtype.kind not in "iuf" or a.ndim != 1:
        raise ConfigError("ts: must be numbers (seconds since the epoch)")
    a = a.astype(np.float64)
    bad = ~(np.isfinite(a) & (a >= 0) & (a < _MAX_TS_S))
    if bad.any():
        raise ConfigError(f"ts: must be finite, >= 0 and < {_MAX_TS_S:g} seconds, got {float(a[bad][0])!r}")
    return np.rint(a * 1e6).astype(np.int64).tolist()


def _t_us(t) -> int:
    """A read's time in key units, clamped to the key range: any ``t`` beyond it (even an integer no
    float holds, or inf) reads what the last key time reads; any ``t`` <= 0 reads nothing."""
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise ConfigError(f"t: must be a number of seconds, got {type(t).__name__}")
    try:
        f = float(t)
    except OverflowError:
        f = math.inf if t > 0 else -math.inf
    if math.isnan(f):
        raise ConfigError(f"t: must be a number of seconds, got {t!r}")
    return int(round(max(-1.0, min(f, _MAX_TS_S)) * 1e6))


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def _id_hash(i) -> int:
    if isinstance(i, str):
        return zlib.crc32(_utf8(i))
    if isinstance(i, (bytes, bytearray)):
        return zlib.crc32(i)
    if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
        return zlib.crc32(str(int(i)).encode())
    raise ConfigError(f"id: must be a str, bytes or int, got {type(i).__name__}")


def _version_tail(v) -> tuple[int, bytes]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        if not -(1 << 63) <= int(v) < (1 << 63):
            raise ConfigError(f"fm_version: an int version must fit 64 bits, got {v!r}")
        return 0, _I64.pack(int(v))
    if isinstance(v, str):
        b = v.encode("utf-8", "surrogatepass")
        if len(b) > 255:
            raise ConfigError(f"fm_version: at most 255 bytes of UTF-8, got {len(b)}")
        return _STR_VERSION, b
    raise ConfigError(f"fm_version: must be an int or a str, got {v!r}")


def _decode_version(flags: int, tail: bytes):
    return tail.decode("utf-8", "surrogatepass") if flags & _STR_VERSION else _I64.unpack(tail)[0]


@functools.lru_cache(maxsize=64)
def _key_dtype(klen: int) -> np.dtype:
    return np.dtype([("prefix", f"V{klen - 12}"), ("ts", ">u8"), ("seq", ">u4")])


@functools.lru_cache(maxsize=64)
def _value_dtype(vlen: int, bits: int, plen: int) -> np.dtype:
    """An embedding value as a record: flags and the version's length, the version, bits and d, the
    scale, the payload, the id."""
    return np.dtype([("head", "V2"), ("version", f"V{vlen}"), ("layout", "V3"), ("scale", "<f4"),
                     ("q", "i1" if bits == 8 else "u1", (plen,)), ("id", "<u4")])


def _columns(chunk: list, width: int, field: str) -> tuple[list, ...]:
    """Transpose rows of ``width`` (or ``width + 1``: a trailing id) fields into columns; ids last."""
    try:
        lens = set(map(len, chunk))
    except TypeError:
        raise ConfigError(f"{field}: each row must be a tuple of {width} fields "
                          f"(or {width + 1} with an id)") from None
    if lens == {width}:
        return (*zip(*chunk), [None] * len(chunk))
    if lens == {width + 1}:
        return tuple(zip(*chunk))
    if not lens <= {width, width + 1}:
        raise ConfigError(f"{field}: each row must have {width} fields (or {width + 1} with an id), "
                          f"got lengths {sorted(lens)}")
    return tuple(zip(*[tuple(r) if len(r) > width else (*r, None) for r in chunk]))


class HistoryStore:
    """Per-user, time-ordered embedding codes and raw events in one RocksDB at ``path``; see the module
    docstring for the layout, idempotence and retention rules. Not thread-safe: one writer per store."""

    def __init__(self, path, cfg: HistoryConfig = HistoryConfig()):
        if not isinstance(cfg, HistoryConfig):
            raise ConfigError(f"cfg: must be a HistoryConfig, got {type(cfg).__name__}")
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise ConfigError(f"path: must be a path, got {path!r}") from None
        self.cfg = cfg
        self._opts, self._wo = rdict_options(cfg)
        self._db: Rdict | None = Rdict(self.path, self._opts)
        self._max_age_us = int(round(cfg.max_age_s * 1e6))
        # per kind: user -> [prefix, count, oldest ts_us, newest ts_us] (retention state, see docstring)
        self._state: dict[bytes, dict[str, list]] = {EMBEDDING: {}, EVENT: {}}
        self.counters = dict.fromkeys(COUNTERS, 0)

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "HistoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (idempotent); written data is durable per ``cfg.wal``."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def flush(self) -> None:
        """Flush the memtable to an SST file (RocksDB does this on its own; for tests and benchmarks)."""
        self._live().flush()

    def compact(self) -> None:
        """Compact the whole database, bottom level included, which drops the tombstones retention left
        (RocksDB compacts on its own; this is for tooling and benchmarks)."""
        opt = CompactOptions()
        opt.set_bottommost_level_compaction(BottommostLevelCompaction.force())
        self._live().compact_range(None, None, opt)

    def _live(self) -> Rdict:
        if self._db is None:
            raise Closed(f"store: the history store at {self.path} is closed")
        return self._db

    # -- appends ----------------------------------------------------------------------------------
    def append_embeddings(self, rows: Iterable) -> dict:
        """Append ``(user, ts, fm_version, code)`` rows (optionally a 5th field ``id``), in batches of
        ``cfg.write_batch``. ``code`` is a float array ``(d,)``, quantized to ``cfg.bits``. Returns this
        call's counts: ``appended`` (new entries), ``overwritten`` (replayed rows), ``dropped`` (rows too
        old to keep, see Retention), ``trimmed`` (entries deleted by retention)."""
        return self._append(rows, EMBEDDING, self._embedding_values)

    def append_events(self, rows: Iterable) -> dict:
        """Append ``(user, ts, ad, campaign, kind)`` rows (optionally a 6th field ``id``), like
        ``append_embeddings``."""
        return self._append(rows, EVENT, self._event_values)

    def _append(self, rows: Iterable, kind: bytes, encode) -> dict:
        db = self._live()
        before = dict(self.counters)
        it = iter(rows)
        while chunk := list(islice(it, self.cfg.write_batch)):
            self._append_chunk(db, kind, chunk, encode)
        return {k: self.counters[k] - before[k] for k in COUNTERS if k != "state_loads"}

    def _append_chunk(self, db: Rdict, kind: bytes, chunk: list, encode) -> None:
        # 1. parse and validate everything first: a bad row raises before anything is written
        users, ts_us, values = encode(chunk)
        states = self._state[kind]
        for u in set(users).difference(states):
            _user_bytes(u)
        # 2. put every row (seq 0 when newer than the user's newest entry, else look at the tie group)
        try:
            wb = WriteBatch(raw_mode=True)
            put, pack = wb.put, _TSQ.pack
            touched: dict[str, list] = {}
            max_age = self._max_age_us
            appended = overwritten = dropped = 0
            for user, t, value in zip(users, ts_us, values):
                s = states.get(user)
                if s is None:
                    s = self._load_state(db, kind, user)
                if t > s[3]:  # the streaming case: newer than anything stored for this user
                    s[3] = t
                    put(s[0] + pack(t, 0), value)
                    s[1] += 1
                    if t < s[2]:
                        s[2] = t
                    appended += 1
                elif t < s[3] - max_age:
                    dropped += 1
                    continue
                else:  # a late row, a tie, or a replay: bring this user's retention up to date first
                    if len(wb):
                        db.write(wb, self._wo)
                        wb = WriteBatch(raw_mode=True)
                        put = wb.put
                    self._trim(db, (s,))
                    seq, new = self._tie_seq(db, s[0], t, value)
                    if new and s[1] >= self.cfg.max_len and t <= s[2]:
                        dropped += 1  # not newer than the oldest entry of a full user: it would be
                        continue  # trimmed at once (and a replay of a trimmed row must not come back)
                    put(s[0] + pack(t, seq), value)
                    if new:
                        s[1] += 1
                        if t < s[2]:
                            s[2] = t
                        appended += 1
                    else:
                        overwritten += 1
                touched[user] = s
            if len(wb):
                db.write(wb, self._wo)
            c = self.counters
            c["appended"] += appended
            c["overwritten"] += overwritten
            c["dropped"] += dropped
            # 3. retention for the users this chunk touched
            self._trim(db, touched.values())
        except BaseException:
            self._state[kind].clear()  # the cache may be ahead of the database: reload on next touch
            raise
        # 4. bound the cache (only between chunks, so a chunk never reloads a user it has pending)
        if len(states) > self.cfg.cache_users:
            for u in list(states)[: len(states) - (self.cfg.cache_users * 3) // 4]:
                del states[u]

    def _load_state(self, db: Rdict, kind: bytes, user: str) -> list:
        """Scan one user's prefix: [prefix, count, oldest ts_us, newest ts_us] (empty: oldest above all)."""
        ub = _user_bytes(user)
        prefix = kind + ub + b"\x00"
        ro = ReadOptions()
        ro.set_iterate_upper_bound(kind + ub + b"\x01")
        count, first, last = 0, None, None
        for k in db.keys(from_key=prefix, read_opt=ro):
            if first is None:
                first = k
            last = k
            count += 1
        s = [prefix, count, _TSQ.unpack_from(first, len(prefix))[0] if first else _EMPTY,
             _TSQ.unpack_from(last, len(prefix))[0] if last else -1]
        self._state[kind][user] = s
        self.counters["state_loads"] += 1
        return s

    def _tie_seq(self, db: Rdict, prefix: bytes, t: int, value: bytes) -> tuple[int, bool]:
        """The seq for a row at ``t`` that is not newer than the user's newest: the seq of a stored entry
        with the same identity (an overwrite), else one past the largest at ``t``."""
        group = prefix + _TSQ.pack(t, 0)[:8]
        ro = ReadOptions()
        ro.set_iterate_upper_bound(prefix + _TSQ.pack(t + 1, 0)[:8])
        with_id, ident = value[0] & _HAS_ID, value[-4:]
        top = -1
        for k, v in db.items(from_key=group, read_opt=ro):
            seq = _TSQ.unpack_from(k, len(prefix))[1]
            if (v[-4:] == ident and v[0] & _HAS_ID) if with_id else (v == value):
                return seq, False
            top = max(top, seq)
        if top >= _MAX_SEQ:
            raise ConfigError(f"ts: more than {_MAX_SEQ} entries of one user at ts_us={t}")
        return top + 1, True

    def _trim(self, db: Rdict, states: Iterable[list]) -> None:
        """Retention for these users: from each one's oldest entry (one seek past the tombstones of
        earlier deletes), delete while over ``max_len`` or older than newest - ``max_age_s``."""
        max_len, max_age = self.cfg.max_len, self._max_age_us
        wb = WriteBatch(raw_mode=True)
        for s in states:
            prefix, cutoff = s[0], s[3] - max_age
            if s[1] <= max_len and s[2] >= cutoff:
                continue
            ro = ReadOptions()
            ro.set_iterate_upper_bound(prefix[:-1] + b"\x01")
            oldest = _EMPTY
            for k in db.keys(from_key=prefix + _TSQ.pack(max(s[2], 0), 0)[:8], read_opt=ro):
                t = _TSQ.unpack_from(k, len(prefix))[0]
                if s[1] <= max_len and t >= cutoff:
                    oldest = t
                    break
                wb.delete(k)
                s[1] -= 1
                self.counters["trimmed"] += 1
            s[2] = oldest
        if len(wb):
            db.write(wb, self._wo)

    # -- value encoding ---------------------------------------------------------------------------
    def _embedding_values(self, chunk: list) -> tuple[list, list, list]:
        users, tss, versions, zs, ids = _columns(chunk, 4, "rows")
        ts_us = _ts_us_column(tss)
        n = len(chunk)
        missing = ids.count(None)
        if missing == n:
            flags, idh = np.zeros(n, np.uint8), np.zeros(n, np.uint32)
        else:
            if missing == 0 and set(map(type, ids)) == {str}:  # the common case, at C speed
                try:
                    hashes = list(map(zlib.crc32, map(str.encode, ids)))
                except UnicodeEncodeError:  # a lone surrogate: take the slow path
                    hashes = list(map(_id_hash, ids))
            else:
                hashes = [0 if i is None else _id_hash(i) for i in ids]
            idh = np.array(hashes, np.uint32)
            flags = (np.ones(n, np.uint8) if missing == 0
                     else np.array([i is not None for i in ids], np.uint8))  # _HAS_ID
        # one version per chunk is the common case: then the whole value is built in one numpy block
        try:
            one = versions[0] if len(set(map(type, versions))) == 1 and len(set(versions)) == 1 else None
        except TypeError:  # unhashable
            raise ConfigError(f"fm_version: must be an int or a str, got {versions[0]!r}") from None
        heads = None
        if one is not None:
            vflag, vtail = _version_tail(one)
            if vflag:
                flags |= vflag
            hw = 2 + len(vtail)
        else:
            vcache: dict = {}
            heads = []
            for f, v in zip(flags.tolist(), versions):
                key = (type(v), v)
                ft = vcache.get(key)
                if ft is None:
                    ft = vcache[key] = _version_tail(v)
                heads.append(bytes((f | ft[0], len(ft[1]))) + ft[1])
            hw = 0
        # group rows by code length (one group in practice) and quantize each group in one call
        try:
            groups = [(np.arange(n), np.array(zs))]  # np.array: 3x faster than np.stack here
        except ValueError:
            by_len: dict[tuple, list] = {}
            for r, z in enumerate(zs):
                by_len.setdefault(np.shape(z), []).append(r)
            groups = [(np.array(rs), np.array([zs[r] for r in rs])) for rs in by_len.values()]
        bits = self.cfg.bits
        values: list = [None] * n
        for idx, Z in groups:
            if Z.ndim != 2 or not 1 <= Z.shape[1] <= 0xFFFF or Z.dtype.kind not in "iuf":
                raise ConfigError(f"code: must be a 1-d array of 1 to 65535 numbers, got shape {Z.shape[1:]} "
                                  f"of {Z.dtype}")
            try:
                q, scale = _codes.quantize(Z, bits)
            except ConfigError:
                r = int(idx[np.flatnonzero(~np.isfinite(Z).all(axis=1))[0]])
                raise ConfigError(f"code: must be finite, row {r} (user {users[r]!r}) is not") from None
            d, m = Z.shape[1], len(idx)
            payload = q.view(np.uint8) if bits == 8 else _codes.pack_int4(q)
            c = hw + _codes.HEADER.size
            w = c + payload.shape[1] + 4
            blk = np.empty((m, w), np.uint8)
            if heads is None:
                blk[:, 0] = flags[idx]
                blk[:, 1] = hw - 2
                blk[:, 2:hw] = np.frombuffer(vtail, np.uint8)
            blk[:, hw] = bits
            blk[:, hw + 1:hw + 3] = np.frombuffer(struct.pack("<H", d), np.uint8)
            blk[:, hw + 3:c] = scale.astype("<f4").view(np.uint8).reshape(m, 4)
            blk[:, c:w - 4] = payload
            blk[:, w - 4:] = idh[idx].astype("<u4").view(np.uint8).reshape(m, 4)
            buf = blk.tobytes()
            if heads is None and len(groups) == 1:
                return list(users), ts_us, [buf[o:o + w] for o in range(0, n * w, w)]
            for j, r in enumerate(idx.tolist()):
                values[r] = buf[j * w:(j + 1) * w] if heads is None else heads[r] + buf[j * w:(j + 1) * w]
        return list(users), ts_us, values

    def _event_values(self, chunk: list) -> tuple[list, list, list]:
        users, tss, ads, campaigns, kinds, ids = _columns(chunk, 5, "rows")
        ts_us = _ts_us_column(tss)
        values = []
        for ad, camp, kind, i in zip(ads, campaigns, kinds, ids):
            if not (type(ad) is str and type(camp) is str and type(kind) is str):
                for name, x in (("ad", ad), ("campaign", camp), ("kind", kind)):
                    if not isinstance(x, str):
                        raise ConfigError(f"{name}: must be a str, got {x!r}")
            a, c, k = ad.encode("utf-8", "surrogatepass"), camp.encode("utf-8", "surrogatepass"), \
                kind.encode("utf-8", "surrogatepass")
            if len(a) > 0xFFFF or len(c) > 0xFFFF:
                raise ConfigError(f"{'ad' if len(a) > 0xFFFF else 'campaign'}: at most 65535 bytes of UTF-8")
            if i is None:
                values.append(_VHDR.pack(0, len(a), len(c)) + a + c + k + b"\x00\x00\x00\x00")
            else:
                values.append(_VHDR.pack(_HAS_ID, len(a), len(c)) + a + c + k + _ID.pack(_id_hash(i)))
        return list(users), ts_us, values

    # -- reads ------------------------------------------------------------------------------------
    def _scan_before(self, kind: bytes, user: str, t, L: int, keep=None) -> tuple[bytes, list, list]:
        """The keys and values of the newest ``L`` entries of ``user`` with ``t - max_age <= ts < t`` (and
        ``keep(value)``), newest first: one seek_for_prev and a reverse scan."""
        db = self._live()
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 0:
            raise ConfigError(f"L: must be an integer >= 0, got {L!r}")
        t_us = _t_us(t)
        s = self._state[kind].get(user)
        prefix = s[0] if s is not None else kind + _user_bytes(user) + b"\x00"
        ks: list = []
        vs: list = []
        if t_us <= 0 or L == 0:
            return prefix, ks, vs
        lo = prefix + _TSQ.pack(max(0, t_us - self._max_age_us), 0)[:8]
        # (no iterate_lower_bound: rocksdict 0.3.29's set_iterate_lower_bound sets the upper bound)
        for k, v in db.items(backwards=True, from_key=prefix + _TSQ.pack(t_us - 1, _MAX_SEQ)):
            if k < lo:
                break
            if keep is None or keep(v):
                ks.append(k)
                vs.append(v)
                if len(ks) >= L:
                    break
        return prefix, ks, vs

    def last_embeddings(self, user: str, t: float, L: int, fm_version=None) -> dict:
        """The last ``L`` codes of ``user`` strictly before ``t`` (and not older than ``t - max_age_s``),
        oldest first: ``{"codes": float32 (n, d) dequantized, "ts": float64 (n,), "versions": [n]}``.
        ``fm_version`` given: only that FM's codes (the ``L`` newest of them). With none, ``codes`` is
        ``(0, 0)``. Codes of different lengths (two FMs) need ``fm_version``."""
        keep = None
        if fm_version is not None:
            vf, vt = _version_tail(fm_version)

            def keep(v: bytes) -> bool:
                return (v[0] & _STR_VERSION) == vf and v[2:2 + v[1]] == vt
        _, keys, vals = self._scan_before(EMBEDDING, user, t, L, keep)
        n = len(keys)
        if n == 0:
            return {"codes": np.zeros((0, 0), np.float32), "ts": np.zeros(0, np.float64), "versions": []}
        keys.reverse()
        vals.reverse()
        ts = np.frombuffer(b"".join(keys), _key_dtype(len(keys[0])))["ts"] / 1e6
        # the common case: every entry has the same layout (flags, version length, bits, d), whatever
        # its version (live codes: one version per FM step): two comparisons check it, and the block
        # decodes with a handful of numpy calls
        v0 = vals[0]
        c = 2 + v0[1]
        w, bits, d = len(v0), v0[c], v0[c + 1] | (v0[c + 2] << 8)
        plen = _codes.payload_len(d, bits)
        if bits in (8, 4) and w == c + _codes.HEADER.size + plen + 4 and len(set(map(len, vals))) == 1:
            rec = np.frombuffer(b"".join(vals), _value_dtype(v0[1], bits, plen))
            # (bytes comparisons: 3x faster than comparing in numpy)
            if rec["head"].tobytes() == v0[:2] * n and rec["layout"].tobytes() == v0[c:c + 3] * n:
                q = rec["q"] if bits == 8 else _codes.unpack_int4(rec["q"], d)
                tails, vlen = rec["version"].tobytes(), c - 2
                if v0[0] & _STR_VERSION:
                    versions = [_decode_version(v0[0], tails[i * vlen:(i + 1) * vlen]) for i in range(n)]
                else:
                    versions = np.frombuffer(tails, "<i8").tolist()
                return {"codes": q * rec["scale"][:, None],  # int8 * float32 -> float32
                        "ts": ts, "versions": versions}
        rows = [_codes.unpack(v, 2 + v[1]) for v in vals]
        lens = {len(r[0]) for r in rows}
        if len(lens) > 1:
            raise ConfigError(f"fm_version: the history of {user!r} before t={t} mixes code lengths "
                              f"{sorted(lens)}; pass fm_version= to read one FM's codes")
        codes = np.stack([_codes.dequantize(q, sc) for q, sc, _ in rows]).astype(np.float32)
        memo: dict = {}
        versions = []
        for v in vals:
            key = (v[0] & _STR_VERSION, v[2:2 + v[1]])
            ver = memo.get(key)
            if ver is None:
                ver = memo[key] = _decode_version(*key)
            versions.append(ver)
        return {"codes": codes, "ts": ts, "versions": versions}

    def last_events(self, user: str, t: float, L: int) -> list[tuple[float, str, str, str]]:
        """The last ``L`` raw events ``(ts, ad, campaign, kind)`` of ``user`` strictly before ``t`` (and
        not older than ``t - max_age_s``), oldest first."""
        prefix, keys, vals = self._scan_before(EVENT, user, t, L)
        out = []
        p = len(prefix)
        unpack_ts, unpack_v = _TSQ.unpack_from, _VHDR.unpack_from
        for k, v in zip(reversed(keys), reversed(vals)):
            _, la, lc = unpack_v(v)
            a = 5 + la
            out.append((unpack_ts(k, p)[0] / 1e6, v[5:a].decode("utf-8", "surrogatepass"),
                        v[a:a + lc].decode("utf-8", "surrogatepass"),
                        v[a + lc:-4].decode("utf-8", "surrogatepass")))
        return out

    def last_events_many(self, users: Sequence[str], ts: Sequence[float], L: int) -> list[list[tuple]]:
        """``[last_events(u, t, L) for u, t in zip(users, ts)]``, read as one batch: one reverse scan per
        distinct user, from the newest of its times down to what its oldest time needs, and each stored
        event decoded once (a micro-batch holds several examples of a user's session)."""
        db = self._live()
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 0:
            raise ConfigError(f"L: must be an integer >= 0, got {L!r}")
        if len(users) != len(ts):
            raise ConfigError(f"ts: {len(ts)} times for {len(users)} users")
        t_us = [_t_us(t) for t in ts]
        out: list[list[tuple]] = [[] for _ in t_us]
        if L == 0:
            return out
        by_user: dict[str, list[int]] = {}
        for i, (u, t) in enumerate(zip(users, t_us)):
            if t > 0:
                by_user.setdefault(u, []).append(i)
        max_age, unpack_ts, unpack_v = self._max_age_us, _TSQ.unpack_from, _VHDR.unpack_from
        states = self._state[EVENT]
        for user, idx in by_user.items():
            s = states.get(user)
            prefix = s[0] if s is not None else EVENT + _user_bytes(user) + b"\x00"
            p = len(prefix)
            times = [t_us[i] for i in idx]
            t_hi, t_lo = max(times), min(times)
            lo = prefix + _TSQ.pack(max(0, t_lo - max_age), 0)[:8]
            neg: list[int] = []  # -ts of each entry, newest first (ascending: bisect finds each window)
            evs: list[tuple] = []
            below = 0  # entries older than the oldest time: L of them serve every example
            for k, v in db.items(backwards=True, from_key=prefix + _TSQ.pack(t_hi - 1, _MAX_SEQ)):
                if k < lo:
                    break
                t = unpack_ts(k, p)[0]
                _, la, lc = unpack_v(v)
                a = 5 + la
                neg.append(-t)
                evs.append((t / 1e6, v[5:a].decode("utf-8", "surrogatepass"),
                            v[a:a + lc].decode("utf-8", "surrogatepass"),
                            v[a + lc:-4].decode("utf-8", "surrogatepass")))
                if t < t_lo:
                    below += 1
                    if below >= L:
                        break
            for i in idx:
                start = bisect.bisect_right(neg, -t_us[i])  # the first entry strictly before t
                end = min(start + L, bisect.bisect_right(neg, -max(0, t_us[i] - max_age)))
                out[i] = evs[start:end][::-1]
        return out

    # -- rebuild, inspection ----------------------------------------------------------------------
    def rebuild(self, embedding_rows: Iterable = (), event_rows: Iterable = (), clear: bool = True) -> dict:
        """Re-create the store from a replayed stream (``fm.embeddings`` rows, and raw-event rows), in
        stream order. ``clear=True`` first deletes the whole database (one store per partition);
        ``clear=False`` merges. Idempotent either way: replayed duplicates overwrite (module docstring).
        Returns the append counts per kind."""
        if clear:
            self._live().close()
            self._db = None
            Rdict.destroy(self.path, self._opts)
            self._db = Rdict(self.path, self._opts)
            for states in self._state.values():
                states.clear()
        return {"embeddings": self.append_embeddings(embedding_rows), "events": self.append_events(event_rows)}

    def raw_items(self, kind: bytes | None = None):
        """Every stored ``(key, value)`` (of one kind, or all), in key order. A full scan: for tests,
        tooling and the benchmark, never on the streaming path."""
        db = self._live()
        if kind is None:
            yield from db.items()
            return
        ro = ReadOptions()
        ro.set_iterate_upper_bound(bytes([kind[0] + 1]))
        yield from db.items(from_key=kind, read_opt=ro)

    def stats(self, exact: bool = False) -> dict:
        """Entries and size. Without ``exact``: RocksDB's estimates (no scan): ``entries_estimate``
        (RocksDB's ``estimate-num-keys``, which undercounts while retention's deletes are not compacted
        away), ``sst_bytes``, ``memtable_bytes``, ``bytes_per_entry_estimate`` (on disk, after
        compression, plus the memtable), and the store's counters since it was opened. With ``exact``:
        also a full scan counting ``embeddings``, ``events``, ``users`` and the mean ``key_bytes``,
        ``value_bytes`` and ``bytes_per_entry`` (key + value)."""
        db = self._live()
        est = int(db.property_int_value("rocksdb.estimate-num-keys") or 0)
        sst = int(db.property_int_value("rocksdb.total-sst-files-size") or 0)
        mem = int(db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0)
        out = {"entries_estimate": est, "sst_bytes": sst, "memtable_bytes": mem,
               "bytes_per_entry_estimate": (sst + mem) / est if est else 0.0,
               "cached_users": sum(len(s) for s in self._state.values()), **self.counters}
        if exact:
            n = {EMBEDDING: 0, EVENT: 0}
            kb = vb = 0
            users = set()
            for k, v in db.items():
                n[k[:1]] = n.get(k[:1], 0) + 1
                kb += len(k)
                vb += len(v)
                users.add(k[1:-13])
            total = n[EMBEDDING] + n[EVENT]
            out.update(embeddings=n[EMBEDDING], events=n[EVENT], users=len(users),
                       key_bytes=kb / total if total else 0.0, value_bytes=vb / total if total else 0.0,
                       bytes_per_entry=(kb + vb) / total if total else 0.0)
        return out
