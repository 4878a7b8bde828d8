"""From labelled examples to model inputs: hashed sparse ids and per-event-type history sequences.

Public surface: ``FeatureConfig``, ``Featurizer``, ``Batch``, ``hash_id``, ``raw_id``, ``HashCache``,
``gap_buckets``, ``SPARSE_KEYS``, ``EVENT_TYPES``.

Unseen ids are hashed into fixed-size tables (sizes in ``FeatureConfig``), with a process-independent
hash (CRC32 of ``name\\x1fvalue``: Python's ``hash`` is salted per process, which would make a worker
and ``loopline evaluate`` disagree). ``attrs`` and ``features`` are multi-hot bags of ``key=value``. The
keys in ``FeatureConfig.managed`` (the FM's managed-collision tables, ``model/fm.py``) also come as
``sparse[key + "_raw"]``: a 62-bit id (``raw_id``) that the table maps to a row of its own.
History sequences are the user's raw recent events strictly before the example's time, split by event
type (``impression``, ``click``), newest last, left-padded to ``seq_len``.

**Speed.** A batch is built column-wise: each distinct id string is hashed once and kept in a per-table
cache (at most ``hash_cache`` entries in all, checked once per batch; when it is over, the cache is emptied
and ``cache_resets`` counts it), and the sequences are written with one numpy scatter per tensor. The gap
bucket is ``int(log2(1 + gap))`` exactly as ``math.log2`` gives it: the binary exponent from ``frexp``
(exact), with ``math.log2`` itself asked only where the value sits within a hair of the next power of two
(there a correctly rounded ``log2`` may round up to it). So a batch is bit for bit what the plain
per-element loop built (``tests/model/test_features.py`` checks against that loop).

>>> hash_id("ad", "a1", 1000) == hash_id("ad", "a1", 1000)
True
>>> f = Featurizer(FeatureConfig(seq_len=3))
>>> ex = {"user": "u1", "ad": "a1", "campaign": "c1", "vertical": "feed", "ts": 100.0,
...       "attrs": {"age": "25-34"}, "features": {"slot": "2"}, "label": 1}
>>> b = f.batch([ex], [[(90.0, "a0", "c0", "impression"), (95.0, "a0", "c0", "click")]])
>>> b.labels.tolist(), b.seq["impression"][3].tolist(), b.seq["click"][3].tolist()
([1.0], [[False, False, True]], [[False, False, True]])
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch

from loopline.errors import ConfigError

__all__ = ["FeatureConfig", "Featurizer", "Batch", "hash_id", "raw_id", "HashCache", "gap_buckets", "SPARSE_KEYS",
           "EVENT_TYPES"]

SPARSE_KEYS = ("user", "ad", "campaign", "vertical", "attrs", "feats")
EVENT_TYPES = ("impression", "click")


def _default_sizes() -> dict:
    # rows per hashed table; collisions are the price of a fixed memory bound
    return {"user": 50_000, "ad": 20_000, "campaign": 2_000, "vertical": 64, "attrs": 4_096, "feats": 4_096}


@dataclass(frozen=True)
class FeatureConfig:
    table_sizes: dict = field(default_factory=_default_sizes)
    seq_len: int = 32  # history events per type read for each example
    gap_buckets: int = 24  # log2-second buckets of the time since a history event
    # hashed id strings cached per featurizer, all tables together (~150 B each: ~10 MB at the default);
    # ids, campaigns and attribute values repeat from batch to batch, users less so
    hash_cache: int = 65_536
    # keys also sent as 62-bit ids (``<key>_raw``) for the FM's managed-collision tables; only "user"
    managed: tuple = ()

    def __post_init__(self):
        missing = [k for k in SPARSE_KEYS if k not in self.table_sizes]
        if missing:
            raise ConfigError(f"table_sizes: missing {missing}")
        bad = [k for k, v in self.table_sizes.items() if not isinstance(v, int) or v < 2]
        if bad:
            raise ConfigError(f"table_sizes: sizes must be integers >= 2, not for {bad}")
        if self.seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {self.seq_len}")
        if isinstance(self.hash_cache, bool) or not isinstance(self.hash_cache, int) or self.hash_cache < 0:
            raise ConfigError(f"hash_cache: must be an integer >= 0, got {self.hash_cache!r}")
        if not set(self.managed) <= {"user"}:
            raise ConfigError(f"managed: only the user table can be managed, got {list(self.managed)}")


def hash_id(name: str, value: str, size: int) -> int:
    return zlib.crc32(f"{name}\x1f{value}".encode()) % size


def raw_id(name: str, value: str) -> int:
    """A 62-bit id of ``value`` (two CRC32s, 30 bits apart): what a managed-collision table remaps. At a
    million ids about 1e-7 of them share one with another, against 20 per row of a 50,000-row hash.

    >>> 0 <= raw_id("user", "u1") < 2 ** 62 and raw_id("user", "u1") != raw_id("user", "u2")
    True
    """
    return (zlib.crc32(f"{name}\x1f{value}".encode()) << 30) ^ zlib.crc32(f"{name}\x1e{value}".encode())


class Batch(NamedTuple):
    """One micro-batch. ``sparse``: key -> (values (N,), lengths (B,)) for a KeyedJaggedTensor;
    ``seq``: type -> (ad ids, campaign ids, gap buckets, mask), each (B, L); ``labels`` (B,); ``weights``
    (B,) the examples' importance weights in training (``model/delay.py``), or None for all 1."""

    sparse: dict
    seq: dict
    labels: torch.Tensor
    size: int
    weights: torch.Tensor | None = None


class HashCache:
    """``hash_id`` of string values per table, each computed once; at most ``limit`` entries in all,
    checked by ``bound()`` (once per batch), which empties the cache when it is over and counts it in
    ``resets``. Only ``str`` values (and pairs of them) are cached: ``1`` and ``True`` are equal keys of a
    dict but format differently, so anything else is hashed every time."""

    def __init__(self, limit: int):
        self.limit = limit
        self.tables: dict[tuple, dict] = {}
        self.resets = 0

    def ids(self, table: str, values: list, size: int) -> list[int]:
        """``hash_id(table, v, size)`` for each value."""
        c = self.tables.setdefault((table, size, False), {})
        try:
            return [c[v] for v in values]
        except (KeyError, TypeError):
            out = []
            for v in values:
                h = c.get(v) if type(v) is str else None
                if h is None:
                    h = hash_id(table, v, size)
                    if type(v) is str:
                        c[v] = h
                out.append(h)
            return out

    def raw(self, table: str, values: list) -> list[int]:
        """``raw_id(table, v)`` for each value."""
        c = self.tables.setdefault((table, 0, False), {})
        out = []
        for v in values:
            h = c.get(v) if type(v) is str else None
            if h is None:
                h = raw_id(table, v)
                if type(v) is str:
                    c[v] = h
            out.append(h)
        return out

    def pairs(self, table: str, items: list, size: int, sep: str = "=") -> list[int]:
        """``hash_id(table, f"{k}{sep}{v}", size)`` for each ``(k, v)``."""
        c = self.tables.setdefault((table, size, sep), {})
        try:
            return [c[kv] for kv in items]
        except (KeyError, TypeError):
            out = []
            for kv in items:
                k, v = kv
                cacheable = type(k) is str and type(v) is str
                h = c.get(kv) if cacheable else None
                if h is None:
                    h = hash_id(table, f"{k}{sep}{v}", size)
                    if cacheable:
                        c[kv] = h
                out.append(h)
            return out

    def bound(self) -> None:
        if sum(map(len, self.tables.values())) > self.limit:
            self.tables.clear()
            self.resets += 1


def gap_buckets(dt: np.ndarray, buckets: int) -> np.ndarray:
    """``min(buckets - 1, int(math.log2(1.0 + max(0.0, dt))))`` for each float64 ``dt``, bit for bit.

    >>> gap_buckets(np.array([-5.0, 0.0, 1.0, 3.0, 1023.0, 1e12]), 24).tolist()
    [0, 0, 1, 2, 10, 23]
    """
    x = 1.0 + np.maximum(dt, 0.0)
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1): floor(log2(x)) = e - 1 exactly
    out = (e - 1).astype(np.int64)
    near = np.flatnonzero(m > 1.0 - 2.0 ** -30)  # log2 may round up to the next integer here
    for i in near.tolist():
        out[i] = int(math.log2(float(x[i])))
    return np.minimum(out, buckets - 1)


class Featurizer:
    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg
        self.cache = HashCache(cfg.hash_cache)

    def sparse_ids(self, ex: dict) -> dict[str, list[int]]:
        s = self.cfg.table_sizes
        out = {k: [hash_id(k, ex[k], s[k])] for k in ("user", "ad", "campaign", "vertical")}
        out["attrs"] = [hash_id("attrs", f"{k}={v}", s["attrs"]) for k, v in sorted((ex.get("attrs") or {}).items())]
        out["feats"] = [hash_id("feats", f"{k}={v}", s["feats"]) for k, v in sorted((ex.get("features") or {}).items())]
        return out

    def batch(self, examples: Sequence[dict], histories: Sequence[list]) -> Batch:
        """``histories[i]``: the i-th example's user events ``(ts, ad, campaign, kind)`` before its ts."""
        assert len(examples) == len(histories), f"{len(examples)} examples, {len(histories)} histories"
        B, L, s, cache = len(examples), self.cfg.seq_len, self.cfg.table_sizes, self.cache
        sparse = {}
        for k in ("user", "ad", "campaign", "vertical"):
            sparse[k] = (torch.tensor(cache.ids(k, [ex[k] for ex in examples], s[k]), dtype=torch.int64),
                         torch.ones(B, dtype=torch.int64))
        for k in self.cfg.managed:
            sparse[f"{k}_raw"] = (torch.tensor(cache.raw(k, [ex[k] for ex in examples]), dtype=torch.int64),
                                  torch.ones(B, dtype=torch.int64))
        for k, src in (("attrs", "attrs"), ("feats", "features")):
            rows = [sorted((ex.get(src) or {}).items()) for ex in examples]
            flat = [kv for r in rows for kv in r]
            sparse[k] = (torch.tensor(cache.pairs(k, flat, s[k]), dtype=torch.int64),
                         torch.tensor(list(map(len, rows)), dtype=torch.int64))
        ts = np.array([ex["ts"] for ex in examples], dtype=np.float64)
        seq = {}
        for kind in EVENT_TYPES:
            picked = [[e for e in hist if e[3] == kind][-L:] for hist in histories]
            lens = np.fromiter(map(len, picked), np.int64, B)
            rows = np.repeat(np.arange(B), lens)
            cols = np.arange(len(rows)) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(L - lens, lens)
            evs = [e for p in picked for e in p]  # left-pad: the newest event is always at position L-1
            ad = np.zeros((B, L), np.int64)
            camp = np.zeros((B, L), np.int64)
            gap = np.zeros((B, L), np.int64)
            mask = np.zeros((B, L), bool)
            if evs:
                ad[rows, cols] = cache.ids("ad", [e[1] for e in evs], s["ad"])
                camp[rows, cols] = cache.ids("campaign", [e[2] for e in evs], s["campaign"])
                gap[rows, cols] = gap_buckets(ts[rows] - np.array([e[0] for e in evs], np.float64),
                                              self.cfg.gap_buckets)
                mask[rows, cols] = True
            seq[kind] = tuple(torch.from_numpy(a) for a in (ad, camp, gap, mask))
        labels = torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float32)
        cache.bound()
        return Batch(sparse, seq, labels, B)
