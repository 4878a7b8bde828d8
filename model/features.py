"""From labelled examples to model inputs: hashed sparse ids and per-event-type history sequences.

Public surface: ``FeatureConfig``, ``Featurizer``, ``Batch``, ``hash_id``, ``SPARSE_KEYS``.

Unseen ids are hashed into fixed-size tables (sizes in ``FeatureConfig``), with a process-independent
hash (CRC32 of ``name\\x1fvalue``: Python's ``hash`` is salted per process, which would make a worker
and ``loopline evaluate`` disagree). ``attrs`` and ``features`` are multi-hot bags of ``key=value``.
History sequences are the user's raw recent events strictly before the example's time, split by event
type (``impression``, ``click``), newest last, left-padded to ``seq_len``.

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

import torch

from loopline.state.errors import ConfigError

__all__ = ["FeatureConfig", "Featurizer", "Batch", "hash_id", "SPARSE_KEYS", "EVENT_TYPES"]

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

    def __post_init__(self):
        missing = [k for k in SPARSE_KEYS if k not in self.table_sizes]
        if missing:
            raise ConfigError(f"table_sizes: missing {missing}")
        bad = [k for k, v in self.table_sizes.items() if not isinstance(v, int) or v < 2]
        if bad:
            raise ConfigError(f"table_sizes: sizes must be integers >= 2, not for {bad}")
        if self.seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {self.seq_len}")


def hash_id(name: str, value: str, size: int) -> int:
    return zlib.crc32(f"{name}\x1f{value}".encode()) % size


class Batch(NamedTuple):
    """One micro-batch. ``sparse``: key -> (values (N,), lengths (B,)) for a KeyedJaggedTensor;
    ``seq``: type -> (ad ids, campaign ids, gap buckets, mask), each (B, L); ``labels`` (B,)."""

    sparse: dict
    seq: dict
    labels: torch.Tensor
    size: int


class Featurizer:
    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg

    def sparse_ids(self, ex: dict) -> dict[str, list[int]]:
        s = self.cfg.table_sizes
        out = {k: [hash_id(k, ex[k], s[k])] for k in ("user", "ad", "campaign", "vertical")}
        out["attrs"] = [hash_id("attrs", f"{k}={v}", s["attrs"]) for k, v in sorted((ex.get("attrs") or {}).items())]
        out["feats"] = [hash_id("feats", f"{k}={v}", s["feats"]) for k, v in sorted((ex.get("features") or {}).items())]
        return out

    def batch(self, examples: Sequence[dict], histories: Sequence[list]) -> Batch:
        """``histories[i]``: the i-th example's user events ``(ts, ad, campaign, kind)`` before its ts."""
        assert len(examples) == len(histories), f"{len(examples)} examples, {len(histories)} histories"
        ids = [self.sparse_ids(ex) for ex in examples]
        sparse = {}
        for k in SPARSE_KEYS:
            rows = [r[k] for r in ids]
            sparse[k] = (torch.tensor([v for r in rows for v in r], dtype=torch.int64),
                         torch.tensor([len(r) for r in rows], dtype=torch.int64))
        L, s = self.cfg.seq_len, self.cfg.table_sizes
        seq = {}
        for kind in EVENT_TYPES:
            ad = torch.zeros(len(examples), L, dtype=torch.int64)
            camp = torch.zeros(len(examples), L, dtype=torch.int64)
            gap = torch.zeros(len(examples), L, dtype=torch.int64)
            mask = torch.zeros(len(examples), L, dtype=torch.bool)
            for i, (ex, hist) in enumerate(zip(examples, histories)):
                evs = [e for e in hist if e[3] == kind][-L:]
                off = L - len(evs)  # left-pad: the newest event is always at position L-1
                for j, (ts, a, c, _) in enumerate(evs):
                    ad[i, off + j] = hash_id("ad", a, s["ad"])
                    camp[i, off + j] = hash_id("campaign", c, s["campaign"])
                    gap[i, off + j] = min(self.cfg.gap_buckets - 1, int(math.log2(1.0 + max(0.0, ex["ts"] - ts))))
                    mask[i, off + j] = True
            seq[kind] = (ad, camp, gap, mask)
        labels = torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float32)
        return Batch(sparse, seq, labels, len(examples))
