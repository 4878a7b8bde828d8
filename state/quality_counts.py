"""Per-campaign labelled fractions q_c and the truth reports: the counts the data-source quality fit needs.

Public surface: ``QualityCounts``, ``merge_aggregates``, ``empty_aggregate``.

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
the partition's aggregate (the only thing a query reads) sits under ``agg``. Writes are buffered and
written once per batch by :meth:`QualityCounts.flush`.

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
from typing import Iterable, MutableMapping

from .errors import ConfigError

__all__ = ["QualityCounts", "merge_aggregates", "empty_aggregate"]

COUNTERS = ("impression_events", "segment_events", "segment_repeats", "truth_received", "truth_replaced",
            "ignored")


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
            **{k: 0 for k in COUNTERS}}


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


class QualityCounts:
    """One partition's counts over ``store``; feed it the ``audience`` topic's values with
    :meth:`learn_one` and call :meth:`flush` once per batch."""

    def __init__(self, store: MutableMapping, prefix: str = ""):
        self.store = store
        self.p = prefix
        agg = store.get(self.p + "agg")
        self.agg = copy.deepcopy(agg) if agg is not None else empty_aggregate()
        self._users: dict[str, dict] = {}  # users read or written in this batch

    # -- events --------------------------------------------------------------------------------------
    def learn_one(self, ev: dict) -> None:
        """Count one ``audience`` value: an impression, a segment assertion or a truth report.

        Values of another type are counted under ``ignored`` (the topic may carry more kinds later)."""
        kind = ev.get("type")
        if kind == "impression":
            self._impression(ev["user"], ev["campaign"])
        elif kind == "segment":
            self._segment(ev["source"], ev["user"], ev["segment"])
        elif kind == "truth":
            self.agg["truth_received"] += 1
            report = [float(ev["fraction"]), int(ev["impressions"]), float(ev["ts"])]
            if _put_truth(self.agg["truth"], ev["campaign"], ev["segment"], report):
                self.agg["truth_replaced"] += 1
        else:
            self.agg["ignored"] += 1

    def _user(self, user: str) -> dict:
        rec = self._users.get(user)
        if rec is None:
            stored = self.store.get(self.p + "u:" + user)
            if stored is None:
                rec = {"l": [], "c": {}}
                self.agg["users"] += 1
            else:
                rec = {"l": [list(x) for x in stored["l"]], "c": dict(stored["c"])}
            self._users[user] = rec
        return rec

    def _impression(self, user: str, campaign: str) -> None:
        a = self.agg
        a["impression_events"] += 1
        a["impressions"][campaign] = a["impressions"].get(campaign, 0) + 1
        rec = self._user(user)
        seen = rec["c"]
        # n_uc goes up by one: sum_u n_uc n_uc' grows by n_uc' (c' != c) and n_uc^2 by 2 n_uc + 1
        deltas = [(c2, n if c2 != campaign else 2 * n + 1) for c2, n in seen.items()]
        if campaign not in seen:
            deltas.append((campaign, 1))
        seen[campaign] = seen.get(campaign, 0) + 1
        targets = [a["pairs"]] + [a["labelled_pairs"][s][g] for s, g in rec["l"]]
        for pairs in targets:
            for c2, d in deltas:
                _add_pair(pairs, campaign, c2, d)
        for source, segment in rec["l"]:
            per = a["labelled"][source][segment]
            per[campaign] = per.get(campaign, 0) + 1

    def _segment(self, source: str, user: str, segment: str) -> None:
        a = self.agg
        a["segment_events"] += 1
        rec = self._user(user)
        if [source, segment] in rec["l"]:
            a["segment_repeats"] += 1
            return
        rec["l"].append([source, segment])
        per = a["labelled"].setdefault(source, {}).setdefault(segment, {})
        users = a["labelled_users"].setdefault(source, {})
        users[segment] = users.get(segment, 0) + 1
        for campaign, n in rec["c"].items():
            per[campaign] = per.get(campaign, 0) + n
        pairs = a["labelled_pairs"].setdefault(source, {}).setdefault(segment, {})
        items = list(rec["c"].items())
        for i, (c1, n1) in enumerate(items):
            for c2, n2 in items[i:]:
                _add_pair(pairs, c1, c2, n1 * n2)

    # -- storage -------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write this batch's user records and the aggregate (copies: a Faust table may serialize later)."""
        for user, rec in self._users.items():
            self.store[self.p + "u:" + user] = {"l": [list(x) for x in rec["l"]], "c": dict(rec["c"])}
        self._users.clear()
        self.store[self.p + "agg"] = copy.deepcopy(self.agg)

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
        for k in COUNTERS + ("users",):
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
