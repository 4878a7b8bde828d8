"""Per-campaign labelled fractions q_c and the truth reports: the counts the data-source quality fit needs.

Public surface: ``QualityCounts``, ``QualityCountsConfig``, ``merge_aggregates``, ``empty_aggregate``,
``load_aggregate``, ``BOUND_COUNTERS``.

For a data source ``s`` and a segment ``g`` (``"female"``), ``q_c`` is the fraction of campaign ``c``'s
impressions whose user ``s`` asserts to be in ``g``; a truth report gives the measured true fraction
``p_c`` (papers.md section 5). This module only counts; ``loopline.model.quality`` fits.

**The labelling rule.** An impression counts as *labelled in* for ``(s, g)`` when ``s`` has asserted its
user in ``g`` at any event time (an assertion describes the user, not a moment; the earliest assertion
time is not used). Two reasons: (1) the result does not depend on processing order, so a worker that
sees a user's assertion after some of that user's impressions (they travel through different ingest
partitions) ends with the same counts as the offline pass; (2) the per-user state is the user's labels
and a count per campaign, not a list of impression times. Assertions are positive memberships only;
a user never asserted by ``s`` is *labelled out* for every segment of ``s``.

**Truth reports.** One report per ``(campaign, segment)`` counts: the one with the latest ``ts`` (ties:
more impressions, then the larger fraction), so the result is again order independent and a
re-delivered report changes nothing. Replaced reports are counted (``truth_replaced``), never silent.

**Shared users.** A campaign's true fraction is a sum over its users, and campaigns share users, so
the truth reports are correlated. The aggregate keeps, for every campaign pair, ``sum_u n_uc n_uc'``
over all users (``pairs``) and over each (source, segment)'s labelled users (``labelled_pairs``;
``n_uc`` = user u's impressions of campaign c): with them the fit computes the reports' covariance under
the model (each user truly in with probability a or b) and intervals that account for it. Pairs are
stored once, the smaller campaign name first. Memory grows with the campaign pairs that share a user.

The state lives in a key-value store (a ``dict`` offline, a RocksDB-backed Faust table keyed by user in
the ``reach`` worker role): ``u:<user>`` holds ``{"l": [[source, segment], ...], "c": {campaign: n}}``;
the partition's aggregate (the only thing a query reads) sits under ``agg`` (read it with
:func:`load_aggregate`). Writes are buffered and written once per batch by :meth:`QualityCounts.flush`.

**Aggregate layout.** The aggregate grows with campaigns, segments and pairs, and each table value is
one changelog message, bounded by ``MAX_VALUE_BYTES`` (``state/sizes.py``). So it is stored as entries
in chunks: ``agg`` is a small head, ``{"counts": {counter: n}, "chunks": {section: number of chunks}}``;
``agg|<section>|<i>`` is a list of entries ``[*path, value]`` of one section (``impressions``: path
``[campaign]``; ``labelled``: ``[source, segment, campaign]``; ``pairs``: ``[c1, c2]``; ...). An entry keeps
its chunk for good (entries are never removed); a new one joins the section's last chunk while that is
under ``CHUNK_BYTES`` (counting room for its value to grow), else a new chunk. A flush writes the head
and the chunks whose entries changed. A store holding a whole aggregate under ``agg`` (the earlier
layout) is read as such and rewritten in chunks by the next flush.

**Bounds** (:class:`QualityCountsConfig`; each counted in the aggregate when it bites, the counters in
``BOUND_COUNTERS``, summed by :func:`merge_aggregates` and shown in the fit's ``bounds``):

* users: at most ``max_users`` user records per store. A user takes the next slot of a ring of that
  many (``ring:<slot>``, the head under ``ring``); the user that held the slot is forgotten
  (``users_evicted``) unless it has taken a newer slot since. A user seen again when more than half
  the ring has gone by since its slot moves to the head, so the users forgotten are the ones not
  seen for longest. A forgotten user that comes back starts afresh: it is counted in ``users``
  again, its labels are gone until re-asserted, and its earlier impressions no longer meet its later
  ones in the pair sums;
* per user: at most ``max_user_campaigns`` campaigns with a count (impressions of more go to the
  campaign and label counts but not the pair sums: ``user_campaigns_dropped``) and ``max_user_labels``
  labels (``user_labels_dropped``);
* per aggregate: at most ``max_campaigns`` campaigns (impressions of later ones are not counted:
  ``campaign_impressions_dropped``), ``max_segments`` (source, segment) pairs
  (``segments_dropped``), ``max_pairs`` campaign-pair entries over ``pairs`` and ``labelled_pairs``
  (``pairs_dropped``; the fit then falls back to intervals that do not need them) and ``max_truth``
  truth reports (``truth_dropped``).

The first ones seen keep their place. Under the bounds the counts are exact and order independent;
once one bites they depend on the order (and a worker, which bounds each partition, can differ from
the offline pass, which bounds one aggregate).

>>> qc = QualityCounts({})
>>> qc.learn_one({"type": "impression", "user": "u1", "campaign": "c1", "ts": 1.0})
>>> qc.learn_one({"type": "segment", "source": "s1", "user": "u1", "segment": "female", "ts": 2.0})
>>> qc.learn_one({"type": "impression", "user": "u2", "campaign": "c1", "ts": 3.0})
>>> agg = qc.aggregate()
>>> agg["impressions"]["c1"], agg["labelled"]["s1"]["female"]["c1"]
(2, 1)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Iterable, Iterator, Mapping, MutableMapping

from loopline.errors import ConfigError

from .sizes import size_of

__all__ = ["QualityCounts", "QualityCountsConfig", "merge_aggregates", "empty_aggregate", "load_aggregate",
           "BOUND_COUNTERS"]

COUNTERS = ("impression_events", "segment_events", "segment_repeats", "truth_received", "truth_replaced",
            "ignored", "impression_repeats")
# Impression ids remembered per user (in the user's record, so they persist with the counts they
# guard): a re-sent or redelivered impression is a repeat of one of its user's latest ids, and counts once.
RECENT_IDS = 64
# how often each bound bit (module docstring)
BOUND_COUNTERS = ("users_evicted", "user_campaigns_dropped", "user_labels_dropped", "campaign_impressions_dropped",
                  "segments_dropped", "pairs_dropped", "truth_dropped")
# The aggregate's sections of entries and the length of an entry's path (the rest are counters)
SECTIONS = {"impressions": 1, "labelled": 3, "labelled_users": 2, "pairs": 2, "labelled_pairs": 4, "truth": 2}
_VALUE_ROOM = 72  # bytes an entry's value may take: a count (20 digits) or a report [fraction, n, ts]


@dataclass(frozen=True)
class QualityCountsConfig:
    """The bounds of one store's counts (module docstring); a bad one raises ``ConfigError``."""

    # user records kept per store (a partition's, in a worker): a few hundred bytes each on disk
    max_users: int = 200_000
    max_user_campaigns: int = 64  # campaigns with a per-user count (the pair sums need them)
    max_user_labels: int = 64  # (source, segment) labels per user
    max_campaigns: int = 10_000  # campaigns counted per aggregate
    max_segments: int = 1_000  # (source, segment) pairs counted per aggregate
    # campaign-pair entries (pairs and labelled_pairs together); the aggregate is copied at every flush,
    # so this also bounds the time a batch takes
    max_pairs: int = 100_000
    max_truth: int = 50_000  # (campaign, segment) truth reports kept

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{f.name}: must be an integer >= 1, got {v!r}")


def empty_aggregate() -> dict:
    """The aggregate of no events. Fields:

    ``impressions`` {campaign: n}; ``labelled`` {source: {segment: {campaign: n}}} (impressions whose
    user the source labels in the segment); ``labelled_users`` {source: {segment: n}};
    ``pairs`` {c1: {c2: sum_u n_uc1 n_uc2}} (c1 <= c2); ``labelled_pairs`` {source: {segment: pairs
    over the labelled users}}; ``truth``
    {campaign: {segment: [fraction, impressions, ts]}}; ``users`` (distinct users seen); and the
    counters in ``COUNTERS``."""
    return {"impressions": {}, "labelled": {}, "labelled_users": {}, "pairs": {}, "labelled_pairs": {},
            "truth": {}, "users": 0,
            **{k: 0 for k in COUNTERS}, **{k: 0 for k in BOUND_COUNTERS}}


def _add_pair(pairs: dict, c1: str, c2: str, n: int) -> None:
    if c2 < c1:
        c1, c2 = c2, c1
    row = pairs.setdefault(c1, {})
    row[c2] = row.get(c2, 0) + n


def _report_key(r: list) -> tuple:
    fraction, impressions, ts = r
    return (ts, impressions, fraction)


def _put_truth(truth: dict, campaign: str, segment: str, report: list) -> bool:
    """Keep the preferred report of (campaign, segment); True when one was already there."""
    seg = truth.setdefault(campaign, {})
    old = seg.get(segment)
    if old is None:
        seg[segment] = list(report)
        return False
    if _report_key(report) > _report_key(old):
        seg[segment] = list(report)
    return True


def _entries(tree: dict, depth: int, path: tuple = ()) -> Iterator[tuple]:
    """The paths of ``tree``'s values ``depth`` levels down."""
    for k, v in tree.items():
        if depth == 1:
            yield path + (k,)
        else:
            yield from _entries(v, depth - 1, path + (k,))


def _value(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _row(tree: dict, path: tuple) -> list:
    """The stored entry of ``path``: ``[*path, value]`` (a list value copied)."""
    v = _value(tree, path)
    return [*path, list(v) if isinstance(v, list) else v]


def _read(store: Mapping, p: str) -> tuple[dict, dict, bool] | None:
    """``(aggregate, {section: [[path, ...] per chunk]}, legacy)`` from ``store``, or None if absent."""
    head = store.get(p + "agg")
    if head is None:
        return None
    agg = empty_aggregate()
    if "impressions" in head:  # the single-value layout
        agg.update(copy.deepcopy(head))
        return agg, {}, True
    agg.update(head["counts"])
    members: dict[str, list] = {}
    for section, n in head["chunks"].items():
        root, depth = agg[section], SECTIONS[section]
        members[section] = chunks = []
        for i in range(n):
            paths = []
            for entry in store.get(f"{p}agg|{section}|{i}") or ():  # named but not written: empty
                path = tuple(entry[:depth])
                node = root
                for k in path[:-1]:
                    node = node.setdefault(k, {})
                node[path[-1]] = entry[depth]
                paths.append(path)
            chunks.append(paths)
    # a segment asserted for users without impressions has no entries: its (empty) maps come back
    for s, segs in agg["labelled_users"].items():
        for g in segs:
            agg["labelled"].setdefault(s, {}).setdefault(g, {})
            agg["labelled_pairs"].setdefault(s, {}).setdefault(g, {})
    return agg, members, False


def load_aggregate(store: Mapping, prefix: str = "") -> dict | None:
    """The aggregate :class:`QualityCounts` stored under ``prefix`` (reassembled from its chunks), or
    None when there is none.

    >>> store = {}
    >>> qc = QualityCounts(store, prefix="3|")
    >>> qc.learn_one({"type": "impression", "user": "u1", "campaign": "c1", "ts": 1.0})
    >>> qc.flush()
    >>> load_aggregate(store, "3|") == qc.aggregate(), load_aggregate(store, "4|")
    (True, None)
    """
    got = _read(store, prefix)
    return None if got is None else got[0]


class QualityCounts:
    """One partition's counts over ``store``; feed it the ``audience`` topic's values with
    :meth:`learn_one` and call :meth:`flush` once per batch."""

    # The aggregate's chunks (module docstring; a test may use a smaller one). A flush rewrites every
    # chunk holding a changed entry, and a batch's entries are spread over all of them, so a flush
    # writes about (chunks touched) x (chunk size): with CHUNK_BYTES (256 KiB) chunks a small batch's
    # flush held the event loop up to 363 ms in `loopline bench soak`; 16 KiB keeps it small.
    CHUNK_BYTES = 16 * 1024

    def __init__(self, store: MutableMapping, prefix: str = "", cfg: QualityCountsConfig = QualityCountsConfig()):
        self.store = store
        self.p = prefix
        self.cfg = cfg
        got = _read(store, prefix)
        self.agg, members, legacy = got if got is not None else (empty_aggregate(), {}, False)
        # where each entry of the aggregate is stored (the module docstring's layout): each chunk's rows
        # as last written, ``[*path, value]``, and each path's (chunk, row); a flush replaces the rows of
        # the entries that changed instead of rebuilding whole chunks (that held the loop up to 373 ms)
        members = {s: members.get(s, []) for s in SECTIONS}
        self._chunks: dict[str, list[list[list]]] = {
            s: [[_row(self.agg[s], path) for path in c] for c in chunks] for s, chunks in members.items()}
        self._sizes: dict[str, list[int]] = {s: [2 + sum(size_of(list(path)) + _VALUE_ROOM for path in c) for c in chunks]
                                             for s, chunks in members.items()}
        self._at = {s: {path: (i, j) for i, c in enumerate(chunks) for j, path in enumerate(c)}
                    for s, chunks in members.items()}
        self._touched: set[tuple[str, tuple]] = set()  # (section, path) entries changed since the last flush
        if legacy or got is None:
            self._touched.update((s, path) for s, depth in SECTIONS.items() for path in _entries(self.agg[s], depth))
        self._users: dict[str, dict] = {}  # users read or written in this batch
        self._ring: dict[int, str] = {}  # ring slots written in this batch
        self._head = int(store.get(self.p + "ring") or 0)  # the next ring position (slot: head % max_users)
        lab = self.agg["labelled_pairs"]
        self._pair_entries = sum(len(row) for row in self.agg["pairs"].values()) + sum(
            len(row) for segs in lab.values() for pairs in segs.values() for row in pairs.values())
        self._truth_entries = sum(len(segs) for segs in self.agg["truth"].values())
        self._segments = sum(len(segs) for segs in self.agg["labelled"].values())

    # -- events --------------------------------------------------------------------------------------
    def learn_one(self, ev: dict) -> None:
        """Count one ``audience`` value: an impression, a segment assertion or a truth report.

        Values of another type are counted under ``ignored`` (the topic may carry more kinds later)."""
        kind = ev.get("type")
        if kind == "impression":
            self._impression(ev["user"], ev["campaign"], ev.get("id"))
        elif kind == "segment":
            self._segment(ev["source"], ev["user"], ev["segment"])
        elif kind == "truth":
            self.agg["truth_received"] += 1
            report = [float(ev["fraction"]), int(ev["impressions"]), float(ev["ts"])]
            if ev["segment"] not in self.agg["truth"].get(ev["campaign"], {}):
                if self._truth_entries >= self.cfg.max_truth:
                    self.agg["truth_dropped"] += 1
                    return
                self._truth_entries += 1
            if _put_truth(self.agg["truth"], ev["campaign"], ev["segment"], report):
                self.agg["truth_replaced"] += 1
            self._touched.add(("truth", (ev["campaign"], ev["segment"])))
        else:
            self.agg["ignored"] += 1

    def _user(self, user: str) -> dict:
        rec = self._users.get(user)
        if rec is None:
            stored = self.store.get(self.p + "u:" + user)
            if stored is None:
                rec = {"l": [], "c": {}, "r": []}
                self.agg["users"] += 1
            else:
                rec = {"l": [list(x) for x in stored["l"]], "c": dict(stored["c"]), "r": list(stored.get("r", ()))}
            rec["s"] = stored.get("s") if stored is not None else None
            self._users[user] = rec
        if rec["s"] is None or self._head - rec["s"] > self.cfg.max_users // 2:
            self._take_slot(user, rec)  # new, or more than half the ring ago: to the head
        return rec

    def _take_slot(self, user: str, rec: dict) -> None:
        """Give ``user`` the ring's next slot, forgetting the user that holds it (if it still does)."""
        pos, n = self._head, self.cfg.max_users
        self._head += 1
        slot = pos % n
        old = self._ring.get(slot)
        if old is None:
            old = self.store.get(f"{self.p}ring:{slot}")
        if old is not None and old != user:
            held = self._users.get(old)
            if held is None:
                held = self.store.get(self.p + "u:" + old)
            if held is not None and held.get("s") == pos - n:  # it still lives in this slot: forget it
                self._users.pop(old, None)
                if self.p + "u:" + old in self.store:
                    del self.store[self.p + "u:" + old]
                self.agg["users_evicted"] += 1
        self._ring[slot] = user
        rec["s"] = pos

    def _add_pair(self, at: tuple, pairs: dict, c1: str, c2: str, n: int) -> None:
        """``_add_pair`` within ``max_pairs`` entries (a new entry past it is counted, not kept); ``at``:
        where ``pairs`` is, ``("pairs",)`` or ``("labelled_pairs", source, segment)``."""
        lo, hi = (c1, c2) if c1 <= c2 else (c2, c1)
        row = pairs.get(lo)
        if row is None or hi not in row:
            if self._pair_entries >= self.cfg.max_pairs:
                self.agg["pairs_dropped"] += 1
                return
            self._pair_entries += 1
        _add_pair(pairs, lo, hi, n)
        self._touched.add((at[0], at[1:] + (lo, hi)))

    def _impression(self, user: str, campaign: str, ident: str | None = None) -> None:
        a = self.agg
        rec = self._user(user)
        if ident is not None:
            if ident in rec["r"]:
                a["impression_repeats"] += 1
                return
            rec["r"] = (rec["r"] + [ident])[-RECENT_IDS:]
        a["impression_events"] += 1
        if campaign not in a["impressions"] and len(a["impressions"]) >= self.cfg.max_campaigns:
            a["campaign_impressions_dropped"] += 1
            return
        a["impressions"][campaign] = a["impressions"].get(campaign, 0) + 1
        touched = self._touched
        touched.add(("impressions", (campaign,)))
        seen = rec["c"]
        if campaign not in seen and len(seen) >= self.cfg.max_user_campaigns:
            a["user_campaigns_dropped"] += 1  # counted for the campaign and its labels, not in the pair sums
            for source, segment in rec["l"]:
                per = a["labelled"][source][segment]
                per[campaign] = per.get(campaign, 0) + 1
                touched.add(("labelled", (source, segment, campaign)))
            return
        # n_uc goes up by one: sum_u n_uc n_uc' grows by n_uc' (c' != c) and n_uc^2 by 2 n_uc + 1
        deltas = [(c2, n if c2 != campaign else 2 * n + 1) for c2, n in seen.items()]
        if campaign not in seen:
            deltas.append((campaign, 1))
        seen[campaign] = seen.get(campaign, 0) + 1
        targets = [(("pairs",), a["pairs"])] + [(("labelled_pairs", s, g), a["labelled_pairs"][s][g]) for s, g in rec["l"]]
        for at, pairs in targets:
            for c2, d in deltas:
                self._add_pair(at, pairs, campaign, c2, d)
        for source, segment in rec["l"]:
            per = a["labelled"][source][segment]
            per[campaign] = per.get(campaign, 0) + 1
            touched.add(("labelled", (source, segment, campaign)))

    def _segment(self, source: str, user: str, segment: str) -> None:
        a = self.agg
        a["segment_events"] += 1
        rec = self._user(user)
        if [source, segment] in rec["l"]:
            a["segment_repeats"] += 1
            return
        if len(rec["l"]) >= self.cfg.max_user_labels:
            a["user_labels_dropped"] += 1
            return
        if segment not in a["labelled"].get(source, {}):
            if self._segments >= self.cfg.max_segments:
                a["segments_dropped"] += 1
                return
            self._segments += 1
        rec["l"].append([source, segment])
        per = a["labelled"].setdefault(source, {}).setdefault(segment, {})
        users = a["labelled_users"].setdefault(source, {})
        users[segment] = users.get(segment, 0) + 1
        touched = self._touched
        touched.add(("labelled_users", (source, segment)))
        for campaign, n in rec["c"].items():
            per[campaign] = per.get(campaign, 0) + n
            touched.add(("labelled", (source, segment, campaign)))
        pairs = a["labelled_pairs"].setdefault(source, {}).setdefault(segment, {})
        at = ("labelled_pairs", source, segment)
        items = list(rec["c"].items())
        for i, (c1, n1) in enumerate(items):
            for c2, n2 in items[i:]:
                self._add_pair(at, pairs, c1, c2, n1 * n2)

    # -- storage -------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write this batch's user records and the aggregate's head and changed chunks (copies: a Faust
        table may serialize later)."""
        for user, rec in self._users.items():
            self.store[self.p + "u:" + user] = {"l": [list(x) for x in rec["l"]], "c": dict(rec["c"]),
                                                "r": list(rec["r"]), "s": rec["s"]}
        self._users.clear()
        for slot, user in self._ring.items():
            self.store[f"{self.p}ring:{slot}"] = user
        self._ring.clear()
        self.store[self.p + "ring"] = self._head
        self._flush_aggregate()

    def _flush_aggregate(self) -> None:
        dirty: set[tuple[str, int]] = set()
        a = self.agg
        for section, path in self._touched:
            at, chunks = self._at[section], self._chunks[section]
            row = _row(a[section], path)
            where = at.get(path)
            if where is None:  # a new entry: the section's last chunk, or a new one
                sizes = self._sizes[section]
                if not chunks or sizes[-1] >= self.CHUNK_BYTES:
                    chunks.append([])
                    sizes.append(2)
                where = at[path] = (len(chunks) - 1, len(chunks[-1]))
                chunks[-1].append(row)
                sizes[-1] += size_of(list(path)) + _VALUE_ROOM
            else:  # a new row, never one changed in place: a dict store holds the lists it was given
                chunks[where[0]][where[1]] = row
            dirty.add((section, where[0]))
        self._touched.clear()
        # the head first: a chunk it names that a crash kept from the store reads as empty
        self.store[self.p + "agg"] = {"counts": {k: a[k] for k in ("users",) + COUNTERS + BOUND_COUNTERS},
                                      "chunks": {s: len(c) for s, c in self._chunks.items() if c}}
        for section, i in sorted(dirty):
            self.store[f"{self.p}agg|{section}|{i}"] = list(self._chunks[section][i])

    def aggregate(self) -> dict:
        """A copy of this partition's aggregate (see :func:`empty_aggregate`)."""
        return copy.deepcopy(self.agg)


def merge_aggregates(aggs: Iterable[dict]) -> dict:
    """Sum partition aggregates (disjoint users and campaigns' impressions; truth reports: the
    preferred report per (campaign, segment), a second one counted as replaced)."""
    out = empty_aggregate()
    for agg in aggs:
        if not isinstance(agg, dict) or "impressions" not in agg:
            raise ConfigError(f"aggregate: not a quality aggregate: {str(agg)[:80]!r}")
        for k in COUNTERS + BOUND_COUNTERS + ("users",):
            out[k] += int(agg.get(k, 0))
        for c, n in agg["impressions"].items():
            out["impressions"][c] = out["impressions"].get(c, 0) + n
        for s, segs in agg["labelled"].items():
            for g, per in segs.items():
                dst = out["labelled"].setdefault(s, {}).setdefault(g, {})
                for c, n in per.items():
                    dst[c] = dst.get(c, 0) + n
        for c1, row in agg.get("pairs", {}).items():
            for c2, n in row.items():
                _add_pair(out["pairs"], c1, c2, n)
        for s, segs in agg.get("labelled_pairs", {}).items():
            for g, pairs in segs.items():
                dst = out["labelled_pairs"].setdefault(s, {}).setdefault(g, {})
                for c1, row in pairs.items():
                    for c2, n in row.items():
                        _add_pair(dst, c1, c2, n)
        for s, segs in agg["labelled_users"].items():
            for g, n in segs.items():
                dst = out["labelled_users"].setdefault(s, {})
                dst[g] = dst.get(g, 0) + n
        for c, segs in agg["truth"].items():
            for g, report in segs.items():
                if _put_truth(out["truth"], c, g, report):
                    out["truth_replaced"] += 1
    return out
