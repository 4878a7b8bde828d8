"""Exactly-once effects over at-least-once delivery: a bounded memory of recently seen ids.

Public surface: ``DedupConfig``, ``RecentIds``.

Kafka and Faust redeliver, and the ingest outbox re-sends outputs whose acknowledgement it never saw
(``state/ingest.py``). Every consumer whose effect must happen once (the fm trains each example once;
reach and quality count each impression once; the monitor counts each score row once) asks
:meth:`RecentIds.first` before applying a message, and drops repeats.

Bounds. An id is remembered for ``horizon_s`` of event time after the newest time seen (a repeat comes
from a re-send right after a restart or rebalance, so it is never older than that), and at most
``max_ids`` ids are kept (the oldest go first; ``evicted_early`` counts ids dropped before their
horizon because of that cap: a repeat of one of them would be applied twice). Ids are kept as 64-bit
BLAKE2b digests, so the memory per id does not depend on the id's length; two different ids collide
with probability about n^2 / 2^65 (below 1e-7 for n = 1e6).

Eviction walks the ids in arrival order, which is event-time order up to the stream's lateness: an id
that arrived late is kept a little longer than its horizon, never shorter.

>>> seen = RecentIds(DedupConfig(horizon_s=10, max_ids=100))
>>> [seen.first(i, t) for i, t in [("a", 0), ("b", 1), ("a", 2), ("c", 20), ("a", 21)]]
[True, True, False, True, True]
>>> seen.counts()["repeats"], len(seen)
(1, 2)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from loopline.errors import ConfigError

__all__ = ["DedupConfig", "RecentIds"]


@dataclass(frozen=True)
class DedupConfig:
    horizon_s: float = 2 * 86400.0  # event time an id is remembered after the newest time seen
    max_ids: int = 2_000_000  # ids kept at most (about 100 bytes each in memory, 16 in a snapshot)

    def __post_init__(self):
        if not self.horizon_s >= 0:
            raise ConfigError(f"horizon_s: must be >= 0, got {self.horizon_s!r}")
        if not isinstance(self.max_ids, int) or self.max_ids < 1:
            raise ConfigError(f"max_ids: must be an integer >= 1, got {self.max_ids!r}")


def _digest(ident: str) -> int:
    return int.from_bytes(hashlib.blake2b(ident.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


class RecentIds:
    """The ids seen within the horizon; :meth:`first` says whether an id is new (and remembers it)."""

    def __init__(self, cfg: DedupConfig = DedupConfig()):
        self.cfg = cfg
        self._ids: dict[int, float] = {}  # digest -> event time; insertion (arrival) order
        self.newest = float("-inf")
        self.repeats = 0
        self.evicted_early = 0

    def __len__(self) -> int:
        return len(self._ids)

    def first(self, ident: str, ts: float) -> bool:
        """True the first time ``ident`` is seen within the horizon; False for a repeat."""
        d = _digest(ident)
        if d in self._ids:
            self.repeats += 1
            return False
        self._ids[d] = ts
        if ts > self.newest:
            self.newest = ts
        self._evict()
        return True

    def _evict(self) -> None:
        ids = self._ids
        cutoff = self.newest - self.cfg.horizon_s
        while ids:
            d, t = next(iter(ids.items()))
            if t < cutoff:
                del ids[d]
            elif len(ids) > self.cfg.max_ids:
                del ids[d]
                self.evicted_early += 1
            else:
                break

    def counts(self) -> dict:
        return {"ids": len(self._ids), "repeats": self.repeats, "evicted_early": self.evicted_early,
                "max_ids": self.cfg.max_ids, "horizon_s": self.cfg.horizon_s}

    # -- snapshots: arrays and numbers only (they load with torch.load(weights_only=True)) -------------
    def state_dict(self) -> dict:
        return {"digests": np.fromiter(self._ids.keys(), dtype=np.int64, count=len(self._ids)),
                "times": np.fromiter(self._ids.values(), dtype=np.float64, count=len(self._ids)),
                "newest": self.newest, "repeats": self.repeats, "evicted_early": self.evicted_early}

    def load_state_dict(self, state: dict) -> None:
        digests, times = np.asarray(state["digests"]), np.asarray(state["times"])
        self._ids = dict(zip(digests.tolist(), times.tolist()))
        self.newest = float(state["newest"])
        self.repeats, self.evicted_early = int(state["repeats"]), int(state["evicted_early"])
