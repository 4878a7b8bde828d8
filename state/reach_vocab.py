"""The reach sampler's vocabulary: which attribute names and values get codes, bounded, with the rare ones
pruned so that junk cannot lock out the attributes queries name.

Public surface: ``HeavyHitters``, ``Vocabulary``, ``ADMIT_MIN``.

A sampled user's attributes are kept as a tuple of small integer codes, one per attribute *slot*
(``attrs[j]`` names slot ``j``; ``values[name][c]`` is code ``c``). Names and values come from the
events, so both are capped (``ReachConfig.max_attrs`` names, ``max_values`` values per name). Handing
codes out first come, first served would let the first 64 junk names take every slot for good, and a
real attribute such as ``age`` that arrives later would never be coded (queries on it would match
nobody). The rule instead:

* **Room left: first come.** While a cap is not reached, a new name (value) gets a code the first time
  it is encoded. Under the caps nothing differs from an unbounded vocabulary.
* **Hits.** Every :meth:`Vocabulary.encode` counts a hit for each name and value it codes; the counts
  halve at every :meth:`Vocabulary.decay` (the sampler calls it at each epoch boundary), so they
  measure recent use and a name that stops coming loses its place.
* **Candidates.** Once full, a new name goes to a Misra-Gries table (:class:`HeavyHitters`) of
  ``candidates`` entries, a value to its name's own table. A candidate's count never exceeds how often
  it was seen, and anything seen in more than ``1 / (candidates + 1)`` of the encodes that missed
  stays in the table; one-off names come and go at no cost.
* **Admission and pruning.** A candidate takes the slot of the least-hit admitted name (value) once its
  count is at least ``ADMIT_MIN`` and more than twice that name's hits (the margin stops two names of
  similar frequency from trading the slot back and forth). The loser is pruned: ``on_prune(slot,
  code)`` tells the sampler to set every sampled user's code for it to missing (``code`` None: the
  whole slot), and it starts over as a candidate. A slot the current encode has already filled is
  never the one pruned. A prune walks the sample's records, so at most ``candidates`` prunes happen
  between two decays (an epoch): a stream crafted to make names trade places costs a bounded time.

Counters (in :attr:`Vocabulary.counts`; the sampler adds them to its own): ``attrs_pruned`` and
``values_pruned`` (names and values that lost their code), ``attrs_dropped`` and ``values_dropped``
(encodes that left a name or value out because the vocabulary was full).

>>> pruned = []
>>> v = Vocabulary(max_attrs=2, max_values=8, candidates=4, on_prune=lambda j, c: pruned.append((j, c)))
>>> v.encode({"junk1": "x", "junk2": "x"}), v.encode({"age": "18-24"})
((0, 0), (-1, -1))
>>> for _ in range(3): _ = v.encode({"age": "18-24"})
>>> v.attrs, pruned, v.encode({"age": "25-34", "junk1": "y"})
(['age', 'junk2'], [(0, None)], (1, -1))
>>> v.counts["attrs_pruned"], v.counts["attrs_dropped"]
(1, 3)
"""

from __future__ import annotations

from typing import Callable

__all__ = ["HeavyHitters", "Vocabulary", "ADMIT_MIN"]

ADMIT_MIN = 3  # a candidate needs at least this count (and twice the loser's hits) to take a slot


class HeavyHitters:
    """Misra-Gries frequent items in ``capacity`` counters: :meth:`add` returns the item's count after
    it (0 when the table was full, which costs every counter one). A count is at most the item's true
    frequency and at least that less ``n / (capacity + 1)`` over ``n`` adds. Amortized O(1) per add.

    >>> hh = HeavyHitters(2)
    >>> [hh.add(x) for x in "aabca"]
    [1, 2, 1, 0, 2]
    >>> hh.counts
    {'a': 2}
    """

    __slots__ = ("capacity", "counts")

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.counts: dict[str, int] = {}

    def add(self, key: str) -> int:
        c = self.counts.get(key)
        if c is not None:
            self.counts[key] = c + 1
            return c + 1
        if len(self.counts) < self.capacity:
            self.counts[key] = 1
            return 1
        self.counts = {k: n - 1 for k, n in self.counts.items() if n > 1}  # every counter pays one
        return 0

    def pop(self, key: str) -> None:
        self.counts.pop(key, None)

    def decay(self) -> None:
        self.counts = {k: n // 2 for k, n in self.counts.items() if n > 1}

    def __len__(self) -> int:
        return len(self.counts)


class Vocabulary:
    """Attribute names and values to codes, bounded (module docstring). ``attrs``, ``attr_index``,
    ``values`` and ``vocab`` are read directly by the sampler and the samples it freezes."""

    def __init__(self, max_attrs: int, max_values: int, candidates: int,
                 on_prune: Callable[[int, int | None], None] = lambda j, c: None):
        self.max_attrs, self.max_values, self.candidates = max_attrs, max_values, candidates
        self.on_prune = on_prune
        self.attrs: list[str] = []  # slot -> name
        self.seg_slots: set[int] = set()  # slots of segment labels (names ``seg.*``: reach.segment_attr)
        self.attr_index: dict[str, int] = {}
        self.values: dict[str, list[str]] = {}  # name -> code -> value
        self.vocab: dict[str, dict[str, int]] = {}  # name -> value -> code
        self._attr_hits: list[int] = []
        self._value_hits: dict[str, list[int]] = {}
        self._attr_cands = HeavyHitters(candidates)
        self._value_cands: dict[str, HeavyHitters] = {}  # made when a name's values fill up
        self._attr_floor = 0  # at most the least attribute hit count (recomputed when a candidate beats it)
        self._value_floor: dict[str, int] = {}
        self._budget = candidates  # prunes left until the next decay
        self.counts = {"attrs_pruned": 0, "values_pruned": 0, "attrs_dropped": 0, "values_dropped": 0}

    def encode(self, attrs: dict) -> tuple:
        """The codes of ``attrs`` (-1: missing or left out), one per slot; counts the hits."""
        codes = [-1] * len(self.attrs)
        for k, v in attrs.items():
            j = self.attr_index.get(k)
            if j is None:
                j = self._admit_attr(k, codes)
                if j is None:
                    continue
            self._attr_hits[j] += 1
            c = self.vocab[k].get(v)
            if c is None:
                c = self._admit_value(k, v, j)
                if c is None:
                    continue
            self._value_hits[k][c] += 1
            codes[j] = c
        return tuple(codes)

    def decay(self) -> None:
        """Halve every hit count (recent use weighs more); the sampler calls it at epoch boundaries."""
        self._attr_hits = [h // 2 for h in self._attr_hits]
        self._value_hits = {k: [h // 2 for h in hs] for k, hs in self._value_hits.items()}
        self._attr_cands.decay()
        for hh in self._value_cands.values():
            hh.decay()
        self._attr_floor //= 2
        self._budget = self.candidates
        self._value_floor = {k: f // 2 for k, f in self._value_floor.items()}

    def bounds(self) -> dict:
        """Sizes, caps and counters (safe to call from a view's thread: it reads copies)."""
        return {"attrs": len(self.attrs), "max_attrs": self.max_attrs,
                "values": sum(map(len, list(self.values.values()))), "max_values": self.max_values,
                "candidates": len(self._attr_cands) + sum(map(len, list(self._value_cands.values()))),
                **dict(self.counts)}

    # -- admission -----------------------------------------------------------------------------------
    def _admit_attr(self, k: str, codes: list) -> int | None:
        if len(self.attrs) < self.max_attrs:
            j = self.attr_index[k] = len(self.attrs)
            self.attrs.append(k)
            self._install(k, j)
            self._attr_hits.append(0)
            codes.append(-1)
            return j
        n = self._attr_cands.add(k)
        if n < ADMIT_MIN or n <= 2 * self._attr_floor or self._budget <= 0:
            self.counts["attrs_dropped"] += 1
            return None
        self._attr_floor = min(self._attr_hits)
        free = [(h, i) for i, h in enumerate(self._attr_hits) if codes[i] == -1]  # not filled by this encode
        if not free or n <= 2 * min(free)[0]:
            self.counts["attrs_dropped"] += 1
            return None
        j = min(free)[1]
        old = self.attrs[j]
        del self.attr_index[old]
        for d in (self.values, self.vocab, self._value_hits, self._value_cands, self._value_floor):
            d.pop(old, None)
        self.attrs[j] = k
        self.attr_index[k] = j
        self.seg_slots.discard(j)
        self._install(k, j)
        self._attr_hits[j] = n
        self._attr_cands.pop(k)
        self.counts["attrs_pruned"] += 1
        self._budget -= 1
        self.on_prune(j, None)
        return j

    def _install(self, k: str, j: int) -> None:
        self.values[k], self.vocab[k], self._value_hits[k] = [], {}, []
        if k.startswith("seg."):
            self.seg_slots.add(j)

    def _admit_value(self, k: str, v: str, j: int) -> int | None:
        voc, vals, hits = self.vocab[k], self.values[k], self._value_hits[k]
        if len(vals) < self.max_values:
            c = voc[v] = len(vals)
            vals.append(v)
            hits.append(0)
            return c
        hh = self._value_cands.get(k)
        if hh is None:
            hh = self._value_cands[k] = HeavyHitters(self.candidates)
        n = hh.add(v)
        if n < ADMIT_MIN or n <= 2 * self._value_floor.get(k, 0) or self._budget <= 0:
            self.counts["values_dropped"] += 1
            return None
        h, c = min((h, i) for i, h in enumerate(hits))
        self._value_floor[k] = h
        if n <= 2 * h:
            self.counts["values_dropped"] += 1
            return None
        del voc[vals[c]]
        vals[c] = v
        voc[v] = c
        hits[c] = n
        hh.pop(v)
        self.counts["values_pruned"] += 1
        self._budget -= 1
        self.on_prune(j, c)
        return c
