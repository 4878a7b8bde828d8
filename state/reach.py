"""Audience reach: a stratified sample of the users in the impression stream, and estimates of how many
users and impressions a targeting query reaches, with a 95% interval.

Public surface: ``ReachConfig``, ``ReachSampler``, ``Sample``, ``user_hash``, ``segment_attr``, ``query_stats``,
``merge_stats``, ``finish``, ``answer``, ``build_sample``, ``with_score_model``, ``ThetaBaseline``,
``exact_answer``.

**The sample** (:class:`ReachSampler`, one per partition of the user-keyed ``audience`` topic). Event
time is cut into epochs of ``epoch_s``; the horizon is the last ``horizon_epochs`` of them. Each epoch
keeps, per stratum ``h`` of the strata in force when it opened (``state/reach_strata.py``), a bottom-k
sample by priority ``hash(user) / q(user)``: the ``k_h`` users of the epoch with the smallest
priorities, and the threshold ``theta_h`` (the priority of the last user it dropped, infinite while
nothing was dropped). ``hash`` is a seeded hash of the user id, uniform in [0, 1); ``q`` is the user's
sampling weight from the strata's score model (``sqrt`` of its probe score: users whose attribute
values and pairs of values were rare in the past weigh more; 1 before strata are learned), so a user
is in the sample with probability ``min(1, q theta_h)`` (priority sampling). That is reservoir
sampling without replacement that sees a user's repeated impressions as one user and is independent
of arrival order; each sampled user carries its attributes and its impressions per epoch.
At each epoch boundary (every ``restratify_epochs``) the strata are learned again from the epoch that
just ended (its users weighted by ``1/theta``) and the new epoch opens with them and a fresh Neyman
allocation, so the allocation follows the stream; older epochs keep their own strata until they leave
the horizon. Memory: at most ``sample_users`` users per epoch (plus ``min_per_stratum`` per empty
stratum), a user seen in several epochs held once; :meth:`ReachSampler.memory` reports the bytes.

**The estimates** (Horvitz-Thompson). For the horizon, a sampled user ``u`` is in the sample with
probability ``pi_u = max`` over the epochs it was sampled in of that epoch's ``min(1, q theta)`` for
its stratum (a user seen in an epoch with a larger one would have been sampled there), so the users
estimate is ``sum 1/pi_u`` over matching sampled users, with variance estimate ``sum (1-pi_u)/pi_u^2``.
For impressions every epoch's count must be there: a user's impressions are complete if its hash is
below ``pi_min(u) = min`` over the horizon's epochs of ``min(1, q theta)`` for the stratum its
attributes fall in there, so impressions are ``sum y_u / pi_min(u)`` over those users. The answer is a sum over strata (the newest
strata), and so are the variances; the interval is ``estimate +- 1.96 sd``, its lower end at least what
the sample saw.

**Fuzzy fall-back**, in two forms, both listed in the answer (``fallback``, ``fallback_strata``).

*Few matches* (the common case: a small segment). In a stratum where fewer than ``n_min`` sampled
users match, the direct estimate is mixed with a synthetic one: the stratum's size times the rate, over
the whole sample, of the query's *residual* once the stratum's own attribute values are put in (for
``geo = IS and interest = golf`` in a stratum ``geo = IS``: the rate of ``interest = golf``; a stratum
the query excludes stays at 0). The weights are the two estimates' mean squared errors: the direct
one's variance (evaluated at the synthetic rate, so no match is not taken as certainty), the synthetic
one's squared bias estimated from the gap between the two and never below ``SYNTHETIC_REL_BIAS`` of
it (the borrowed rate assumes the residual attributes are distributed in the stratum as in the whole
sample, which a stratum where they are not shows by a gap larger than its noise). The interval uses
the mixture's mean squared error.

*A thin stratum.* A stratum that holds fewer than ``n_min`` sampled users (and is not a census) gives
an unreliable match rate. Its rate is then shrunk towards the rate of its nearest coarser stratum (the
path less its last attribute, then less another, until one holds ``n_min`` users):
``p = (n p_direct + a p_parent) / (n + a)``, ``a = n_min - n``. The parent's rate is measured on the
parent's sampled users *as if they were in the thin stratum*: the attributes that define the thin
stratum below the parent are set to its values (for a ``*`` group, to the values its own users have),
so a query that excludes the stratum still gets 0 from it. Such strata are listed in the answer
(``fallback``). The variance adds the parent's binomial term to the uncertainty of the stratum's size.

**Distributed answers.** :func:`query_stats` gives per-stratum sums (keyed by the stratum's path, so
partitions whose strata agree pool) and, for locally thin strata, the parent sums at every depth the
fall-back may need; they add up across partitions and workers (:func:`merge_stats`), and :func:`finish`
turns the pooled sums into the answer. The sums of a set of partitions are exactly the sums of the
merged sample (:meth:`Sample.merge`).

**Baselines** for ``loopline bench reach``: a uniform bottom-k sample (one stratum) and a proportional
stratified sample (the same strata, ``n_h`` proportional to ``N_h``, ``q = 1``, no fall-back), both through
:func:`build_sample`; :class:`ThetaBaseline`, Apache DataSketches theta sketches per attribute value
combined by set operations, sized to the same bytes; :func:`exact_answer`, the truth.

>>> s = ReachSampler(ReachConfig(sample_users=50, min_per_stratum=5))
>>> for i in range(200):
...     s.observe(f"u{i}", 100.0 + i, {"gender": "F" if i % 4 else "M", "age": "18-24"}, impressions=2)
>>> sample = s.snapshot()
>>> sample.n
50
>>> a = answer(sample, "gender = M")
>>> a["users_ci"][0] <= a["users"] <= a["users_ci"][1], abs(a["impressions"] - 2 * a["users"]) < 0.2
(True, True)
"""

from __future__ import annotations

import hashlib
import heapq
import re
import sys
from dataclasses import dataclass

import numpy as np
import orjson

from loopline.errors import ConfigError

from .reach_query import Query, evaluate, parse_query
from .reach_strata import ScoreModel, Strata, allocate, learn_strata, path_of, probe_scores
from .reach_vocab import Vocabulary

__all__ = ["ReachConfig", "ReachSampler", "Sample", "user_hash", "segment_attr", "query_stats", "merge_stats", "finish",
           "answer", "build_sample", "with_score_model", "ThetaBaseline", "exact_answer"]

Z95 = 1.959964  # two-sided 95% normal quantile


@dataclass(frozen=True)
class ReachConfig:
    """Settings of one partition's sampler; each is checked, a bad one raises ``ConfigError``."""

    sample_users: int = 20_000  # users per epoch the sample holds (the memory bound, with horizon_epochs)
    max_strata: int = 64  # leaves of the learned strata tree
    min_per_stratum: int = 30  # n_min: the allocation's floor and the fall-back threshold
    epoch_s: float = 86_400.0  # event-time length of an epoch (the horizon moves in these steps)
    horizon_epochs: int = 7  # the horizon: this many newest epochs (7 days by default)
    restratify_epochs: int = 1  # learn the strata again at every this many epoch boundaries
    min_leaf_share: float = 5e-4  # smallest stratum the learner makes, as a share of the population
    attrs: tuple = ()  # attributes the strata may split on; empty: every attribute seen
    # the vocabulary (state/reach_vocab.py): names and values with codes; past a cap a new one is missing
    # until it is seen more than twice as often as the least used one, which it then replaces (pruned)
    max_values: int = 4096  # distinct values per attribute encoded
    max_attrs: int = 64  # distinct attribute names encoded (the event contract allows 64 per event); also
    # the most segment labels one user holds
    vocab_candidates: int = 256  # Misra-Gries counters for names (and per name, values) waiting for a code
    # users whose segment labels are held (labelled before their first impression, or re-coded when they
    # come back); the oldest labelled are forgotten first. About 200 bytes each
    max_segment_users: int = 200_000
    # the reach role's ``reach.answers`` table (stream/reach.py): a partition's share of an answer is
    # deleted once older than this (wall-clock seconds; its reader waits a few), or when the partition
    # holds more than max_answers (oldest first)
    answers_ttl_s: float = 600.0
    max_answers: int = 10_000
    seed: int = 0  # seeds the user hash: the same seed gives the same sample on every worker

    def __post_init__(self):
        for name, lo in (("sample_users", 1), ("max_strata", 1), ("min_per_stratum", 1), ("horizon_epochs", 1),
                         ("restratify_epochs", 1), ("max_values", 1), ("max_attrs", 1), ("vocab_candidates", 1),
                         ("max_segment_users", 1), ("max_answers", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name}: must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.epoch_s, (int, float)) and self.epoch_s > 0 and np.isfinite(self.epoch_s)):
            raise ConfigError(f"epoch_s: must be a positive number of seconds, got {self.epoch_s!r}")
        ttl = self.answers_ttl_s
        if not (isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 and np.isfinite(ttl)):
            raise ConfigError(f"answers_ttl_s: must be a positive number of seconds, got {self.answers_ttl_s!r}")
        if not 0 <= self.min_leaf_share < 1:
            raise ConfigError(f"min_leaf_share: must be in [0, 1), got {self.min_leaf_share!r}")


def user_hash(user: str, seed: int = 0) -> float:
    """A user's sampling priority: a uniform number in [0, 1) from a keyed BLAKE2b of its id.

    >>> 0 <= user_hash("u1") < 1, user_hash("u1") == user_hash("u1"), user_hash("u1", 1) != user_hash("u1")
    (True, True, True)
    """
    d = hashlib.blake2b(user.encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return (int.from_bytes(d, "little") >> 11) * (1.0 / (1 << 53))


def segment_attr(source: str, segment: str) -> str:
    """The query attribute of a data source's segment label (``segment`` events; value ``yes``):
    a rule such as ``seg.s1.female = yes and age = 25-34`` targets the users source ``s1`` puts in
    ``female``. Characters the query language's names do not allow become ``_``.

    >>> segment_attr("dmp-2", "auto intender")
    'seg.dmp_2.auto_intender'
    """
    return f"seg.{re.sub(r'[^A-Za-z0-9_]', '_', source)}.{re.sub(r'[^A-Za-z0-9_]', '_', segment)}"


class _Epoch:
    __slots__ = ("strata", "cap", "heaps", "theta")

    def __init__(self, strata: Strata, cap: list[int]):
        self.strata = strata
        self.cap = list(cap)
        self.heaps: list[list] = [[] for _ in cap]  # (-priority, user): the largest priority on top
        self.theta = [float("inf")] * len(cap)  # priority threshold: in the sample iff hash / q < theta


class ReachSampler:
    """The stratified bottom-k sample of one partition over the event-time horizon (module docstring).

    ``observe`` takes one accepted impression; ``snapshot`` freezes the horizon's sample into a
    :class:`Sample` for queries."""

    def __init__(self, cfg: ReachConfig = ReachConfig(), partition: int = 0):
        self.cfg = cfg
        self.partition = partition
        self.vocabulary = Vocabulary(cfg.max_attrs, cfg.max_values, cfg.vocab_candidates, self._pruned)
        self.records: dict[str, list] = {}  # user -> [hash, codes (tuple), {epoch: [stratum, impressions]}]
        self.epochs: dict[int, _Epoch] = {}
        self.current: int | None = None
        self.strata = Strata.root()
        self.cap = [cfg.sample_users]
        self.since_learn = 0
        self.version = 0  # changes whenever the sample does
        self.counts = {"impressions": 0, "too_old": 0, "restratified": 0,
                       "segment_users_evicted": 0, "segments_dropped": 0}
        # user -> {segment attr: "yes"} for every user a source labelled (before or after its
        # impressions: the quality counts' rule), so rules can name a source's segment; at most
        # max_segment_users users, the least recently labelled forgotten first (a sampled user keeps
        # the labels its record holds)
        self.segments: dict[str, dict[str, str]] = {}

    # the vocabulary's tables, read by the strata and the samples
    @property
    def attrs(self) -> list[str]:
        return self.vocabulary.attrs

    @property
    def attr_index(self) -> dict[str, int]:
        return self.vocabulary.attr_index

    @property
    def values(self) -> dict[str, list[str]]:
        return self.vocabulary.values

    @property
    def vocab(self) -> dict[str, dict[str, int]]:
        return self.vocabulary.vocab

    def bounds(self) -> dict:
        """Every bound of this sampler and how often it bit: the vocabulary's caps and pruning
        (``state/reach_vocab.py``) and the segment labels held."""
        return {**self.vocabulary.bounds(), "segment_users": len(self.segments),
                "max_segment_users": self.cfg.max_segment_users,
                "segment_users_evicted": self.counts["segment_users_evicted"],
                "segments_dropped": self.counts["segments_dropped"]}

    # -- the stream ------------------------------------------------------------------------------------
    def observe(self, user: str, ts: float, attrs: dict, impressions: int = 1) -> None:
        """One accepted impression of ``user`` at event time ``ts`` with targeting ``attrs``."""
        cfg = self.cfg
        own = attrs  # the strata see the impression's own attributes only (see _learn)
        seg = self.segments.get(user)
        if seg:
            attrs = {**attrs, **seg}
        e = int(ts // cfg.epoch_s)
        if self.current is None:
            self.current = e
        elif e > self.current:
            self._advance(e)
        if e <= self.current - cfg.horizon_epochs:
            self.counts["too_old"] += 1
            return
        self.counts["impressions"] += impressions
        ep = self.epochs.get(e)
        if ep is None:
            ep = self.epochs[e] = _Epoch(self.strata, self.cap)
        rec = self.records.get(user)
        if rec is not None:
            ent = rec[2].get(e)
            if ent is not None:
                ent[1] += impressions
                rec[1] = self._recode(rec[1], attrs, seg)
                self.version += 1
                return
            hu = rec[0]
        else:
            hu = user_hash(user, cfg.seed)
        leaf = ep.strata.assign(own)
        q = ep.strata.q(own)
        priority = hu / q
        if priority >= ep.theta[leaf]:
            return
        if rec is None:
            rec = self.records[user] = [hu, self._encode(attrs), {}]
        else:
            rec[1] = self._recode(rec[1], attrs, seg)
        rec[2][e] = [leaf, impressions, q]
        heap = ep.heaps[leaf]
        heapq.heappush(heap, (-priority, user))
        if len(heap) > ep.cap[leaf]:
            neg, gone = heapq.heappop(heap)
            ep.theta[leaf] = -neg
            self._drop(gone, e)
        self.version += 1

    def assert_segment(self, user: str, source: str, segment: str) -> None:
        """A ``segment`` event: ``source`` puts ``user`` in ``segment``. A user already in the sample
        gets the attribute at once; a later one with its first impression."""
        key = segment_attr(source, segment)
        seg = self.segments.pop(user, None)
        if seg is None:
            seg = {}
            while len(self.segments) >= self.cfg.max_segment_users:  # forget the least recently labelled
                del self.segments[next(iter(self.segments))]
                self.counts["segment_users_evicted"] += 1
        self.segments[user] = seg  # the most recently labelled last
        if key in seg:
            return
        if len(seg) >= self.cfg.max_attrs:
            self.counts["segments_dropped"] += 1
            return
        seg[key] = "yes"
        rec = self.records.get(user)
        if rec is not None:
            extra = self._encode({key: "yes"})
            codes = list(rec[1]) + [-1] * (len(extra) - len(rec[1]))
            rec[1] = tuple(c if e == -1 else e for c, e in zip(codes, extra))
            self.version += 1

    def _encode(self, attrs: dict) -> tuple:
        return self.vocabulary.encode(attrs)

    def _recode(self, old: tuple, attrs: dict, seg: dict | None) -> tuple:
        """A sampled user's codes from its newest impression's ``attrs`` (segments included). A user
        whose segment labels were forgotten (``max_segment_users``) keeps the ones its record holds."""
        codes = self._encode(attrs)
        slots = self.vocabulary.seg_slots
        if seg is None and slots:
            carry = [j for j in slots if j < len(old) and old[j] != -1]
            if carry:
                keep = list(codes)
                for j in carry:
                    if keep[j] == -1:
                        keep[j] = old[j]
                codes = tuple(keep)
        return codes

    def _pruned(self, j: int, code: int | None) -> None:
        """The vocabulary gave slot ``j`` (``code`` None) or its value ``code`` to another: every
        sampled user's code for the old one becomes missing."""
        for rec in self.records.values():
            codes = rec[1]
            if j < len(codes) and codes[j] != -1 and (code is None or codes[j] == code):
                rec[1] = codes[:j] + (-1,) + codes[j + 1:]
        self.version += 1

    def _drop(self, user: str, e: int) -> None:
        rec = self.records[user]
        del rec[2][e]
        if not rec[2]:
            del self.records[user]

    def _advance(self, e: int) -> None:
        cfg = self.cfg
        ended, self.current = self.current, e
        for _ in range(min(e - ended, 64)):  # the vocabulary's hit counts halve at every boundary
            self.vocabulary.decay()
        for old in [k for k in self.epochs if k <= e - cfg.horizon_epochs]:
            ep = self.epochs.pop(old)
            for heap in ep.heaps:
                for _, user in heap:
                    self._drop(user, old)
        self.since_learn += e - ended
        if self.since_learn >= cfg.restratify_epochs and ended in self.epochs:
            self.since_learn = 0
            self._learn(ended)
        self.version += 1

    def _learn(self, e: int) -> None:
        """New strata and allocation from the users of epoch ``e`` (weighted by 1/theta)."""
        cfg = self.cfg
        ep = self.epochs[e]
        users = [u for heap in ep.heaps for _, u in heap]
        if len(users) < 2 * cfg.min_per_stratum:
            return
        # segment labels are query attributes only: they may come before or after a user's impressions,
        # so strata (and so inclusion probabilities) built on them would depend on arrival order
        cols = {a: c for a, c in self._columns([self.records[u][1] for u in users]).items() if not a.startswith("seg.")}
        w = np.array([1.0 / min(1.0, ent[2] * ep.theta[ent[0]]) for ent in (self.records[u][2][e] for u in users)])
        r = probe_scores(cols, self.values, w)
        # at most as many strata as keep the floors within half the sample
        max_strata = max(1, min(cfg.max_strata, cfg.sample_users // (2 * cfg.min_per_stratum)))
        st = learn_strata(cols, self.values, w, r, max_strata=max_strata,
                          min_leaf=max(2.0 * cfg.min_per_stratum, cfg.min_leaf_share * float(w.sum())),
                          attrs=cfg.attrs)
        with_score_model(st, cols, self.values, w, self.vocab)
        cap = allocate(np.array(st.n), np.array(st.s), cfg.sample_users, cfg.min_per_stratum)
        self.strata, self.cap = st, [int(max(c, cfg.min_per_stratum)) for c in cap]
        self.counts["restratified"] += 1

    def _columns(self, codes: list[tuple]) -> dict:
        mat = np.full((len(codes), len(self.attrs)), -1, dtype=np.int32)
        for i, c in enumerate(codes):
            mat[i, :len(c)] = c
        return {a: mat[:, j] for j, a in enumerate(self.attrs)}

    # -- the answers -----------------------------------------------------------------------------------
    def snapshot(self) -> "Sample":
        """The horizon's sample, frozen for queries (see the module docstring for the weights)."""
        window = sorted(k for k in self.epochs if self.current is not None and k > self.current - self.cfg.horizon_epochs)
        recs = list(self.records.values())
        cols = self._columns([r[1] for r in recs])
        hashes = np.array([r[0] for r in recs], dtype=np.float64)
        imps = np.array([sum(v[1] for k, v in r[2].items()) for r in recs], dtype=np.float64)
        pmax = np.array([max(min(1.0, v[2] * self.epochs[k].theta[v[0]]) for k, v in r[2].items()) for r in recs],
                        dtype=np.float64)
        pmin = np.ones(len(recs))
        for k in window:
            ep = self.epochs[k]
            theta = np.asarray(ep.theta)[ep.strata.assign_codes(cols, self.vocab, len(recs))]
            pmin = np.minimum(pmin, np.minimum(1.0, ep.strata.q_codes(cols, self.vocab, len(recs)) * theta))
        complete = hashes < pmin
        newest = self.epochs[window[-1]].strata if window else self.strata
        stratum = newest.assign_codes(cols, self.vocab, len(recs)) if len(recs) else np.zeros(0, dtype=np.int32)
        info = {"partitions": [self.partition], "epochs": window, "epoch_s": self.cfg.epoch_s,
                "impressions_seen": self.counts["impressions"], "strata_learned": self.counts["restratified"]}
        return Sample(cols, self.values, 1.0 / np.maximum(pmax, 1e-300),
                      np.where(complete, 1.0 / np.maximum(pmin, 1e-300), 0.0), imps, stratum, newest.keys, info)

    def memory(self) -> dict:
        """Bytes held (deep ``sys.getsizeof`` of up to 200 records, scaled) and bytes per sampled user."""
        n = len(self.records)
        if not n:
            return {"sampled_users": 0, "bytes": 0, "bytes_per_user": 0.0}
        sizes = []
        for user, rec in list(self.records.items())[:200]:
            b = sys.getsizeof(user) + sys.getsizeof(rec) + sys.getsizeof(rec[0]) + sys.getsizeof(rec[1])
            b += sys.getsizeof(rec[2]) + sum(sys.getsizeof(v) + 2 * 28 for v in rec[2].values())
            b += 100 * len(rec[2])  # the heap's (-hash, user) tuple and the records dict's slot
            sizes.append(b)
        per = float(np.mean(sizes))
        return {"sampled_users": n, "bytes": int(per * n), "bytes_per_user": round(per, 1)}


class Sample:
    """A frozen, mergeable sample: per sampled user its attribute codes, its users weight ``1/pi``, its
    impressions weight (0 when its impressions may be incomplete), its impressions and its stratum.

    ``cols[attr]``: int16/int32 codes into ``values[attr]`` (-1: missing); ``keys``: stratum paths."""

    def __init__(self, cols: dict, values: dict, w_users, w_imps, imps, stratum, keys: list, info: dict | None = None):
        n = len(w_users)
        self.values = {a: list(values[a]) for a in cols}
        big = max((len(v) for v in self.values.values()), default=0) >= 32767
        self.cols = {a: np.asarray(c, dtype=np.int32 if big else np.int16) for a, c in cols.items()}
        self.w_users = np.asarray(w_users, dtype=np.float64)
        self.w_imps = np.asarray(w_imps, dtype=np.float64)
        self.imps = np.asarray(imps, dtype=np.float32)
        self.stratum = np.asarray(stratum, dtype=np.int32)
        if len(self.stratum) and (np.diff(self.stratum) < 0).any():  # rows grouped by stratum (see query_stats)
            order = np.argsort(self.stratum, kind="stable")
            self.cols = {a: c[order] for a, c in self.cols.items()}
            self.w_users, self.w_imps, self.imps, self.stratum = (
                self.w_users[order], self.w_imps[order], self.imps[order], self.stratum[order])
        self.keys = list(keys)
        self.info = dict(info or {})
        self.vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in self.values.items()}
        assert all(len(c) == n for c in self.cols.values()) and len(self.stratum) == n, "ragged sample"

    @property
    def n(self) -> int:
        return len(self.w_users)

    @property
    def nbytes(self) -> int:
        return int(sum(c.nbytes for c in self.cols.values()) + self.w_users.nbytes + self.w_imps.nbytes
                   + self.imps.nbytes + self.stratum.nbytes)

    def precomputed(self) -> tuple[np.ndarray, np.ndarray]:
        """What every query needs and no query changes: per-stratum totals ``(11, K)`` (rows, users
        weight, its variance term, impressions weight, then the totals of the 7 per-row terms) and the
        per-row terms ``(7, n)``; built once."""
        if getattr(self, "_pre", None) is None:
            K, s = len(self.keys), self.stratum
            wu, wi, y = self.w_users, self.w_imps, self.imps.astype(np.float64)
            per_row = np.ascontiguousarray(np.stack([np.ones_like(wu), wu, wu * (wu - 1), wi * y,
                                                     y * y * wi * np.maximum(wi - 1, 0), wi * y * y, y]))
            base = np.stack([np.bincount(s, minlength=K).astype(np.float64), np.bincount(s, wu, minlength=K),
                             np.bincount(s, wu * (wu - 1), minlength=K), np.bincount(s, wi, minlength=K),
                             *[np.bincount(s, col, minlength=K) for col in per_row]])
            self._pre = (base, per_row)
        return self._pre

    def known_values(self) -> list[dict]:
        """Per stratum, the attribute values its path fixes, and for a ``*`` group the frozenset of
        the values its named siblings took."""
        if getattr(self, "_known", None) is None:
            paths = [path_of(k) for k in self.keys]
            named: dict = {}
            for p in paths:
                for d, (a, v) in enumerate(p):
                    if v != "*":
                        named.setdefault((repr(p[:d]), a), set()).add(v)
            self._known = [{a: v if v != "*" else frozenset(named.get((repr(p[:d]), a), ()))
                            for d, (a, v) in enumerate(p)} for p in paths]
        return self._known

    def synthetic_rows(self) -> tuple[dict, np.ndarray, list]:
        """The rows the fuzzy fall-back measures residual rates on: every row, or a systematic subsample
        of ``SYNTHETIC_ROWS`` of them (rows are grouped by stratum, so every stratum keeps its share);
        their columns, their per-row terms (users weight, impressions weight x impressions, the same x
        impressions) and totals (users weight, impressions weight, rows)."""
        if getattr(self, "_synth", None) is None:
            step = max(1, -(-self.n // SYNTHETIC_ROWS))
            take = np.arange(0, self.n, step)
            cols = {a: c[take] for a, c in self.cols.items()} if step > 1 else self.cols
            y = self.imps[take].astype(np.float64)
            wu, wi = self.w_users[take], self.w_imps[take]
            rows = np.stack([wu, wi * y, wi * y * y])
            self._synth = (cols, rows, [float(wu.sum()), float(wi.sum()), float(len(take))])
        return self._synth

    def describe(self) -> dict:
        return {"sampled_users": self.n, "population_estimate": round(float(self.w_users.sum())),
                "strata": len(self.keys), "bytes": self.nbytes,
                "bytes_per_user": round(self.nbytes / self.n, 1) if self.n else 0.0, **self.info}

    @classmethod
    def merge(cls, samples: list["Sample"]) -> "Sample":
        """One sample holding every row of ``samples`` (codes re-encoded to one vocabulary, strata
        pooled by key)."""
        values: dict[str, list] = {}
        vocab: dict[str, dict] = {}
        keys: list = []
        kidx: dict = {}
        for s in samples:
            for a, vals in s.values.items():
                voc = vocab.setdefault(a, {})
                for v in vals:
                    if v not in voc:
                        voc[v] = len(voc)
                        values.setdefault(a, []).append(v)
                values.setdefault(a, [])
            for k in s.keys:
                if k not in kidx:
                    kidx[k] = len(keys)
                    keys.append(k)
        cols = {a: [] for a in values}
        parts = {"w_users": [], "w_imps": [], "imps": [], "stratum": []}
        info: dict = {"partitions": []}
        for s in samples:
            for a in values:
                if a in s.cols:
                    lut = np.array([vocab[a][v] for v in s.values[a]] + [-1], dtype=np.int32)
                    cols[a].append(lut[s.cols[a]])
                else:
                    cols[a].append(np.full(s.n, -1, dtype=np.int32))
            parts["w_users"].append(s.w_users)
            parts["w_imps"].append(s.w_imps)
            parts["imps"].append(s.imps)
            parts["stratum"].append(np.array([kidx[k] for k in s.keys] + [0], dtype=np.int32)[s.stratum])
            info["partitions"] += s.info.get("partitions", [])
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return cls({a: cat(c) for a, c in cols.items()}, values, cat(parts["w_users"]), cat(parts["w_imps"]),
                   cat(parts["imps"]), cat(parts["stratum"]).astype(np.int32), keys, info)

    def to_bytes(self) -> bytes:
        """JSON (orjson): the sample file ``loopline reach --sample`` reads."""
        return orjson.dumps({"format": "loopline-reach-sample/1", "values": self.values,
                             "cols": self.cols, "w_users": self.w_users, "w_imps": self.w_imps,
                             "imps": self.imps, "stratum": self.stratum, "keys": self.keys, "info": self.info},
                            option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Sample":
        try:
            d = orjson.loads(data)
            if d.get("format") != "loopline-reach-sample/1":
                raise ConfigError("sample: not a loopline reach sample file")
            return cls({a: np.asarray(c, dtype=np.int32) for a, c in d["cols"].items()}, d["values"],
                       d["w_users"], d["w_imps"], d["imps"], d["stratum"], d["keys"], d["info"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"sample: not a valid reach sample file ({type(exc).__name__})") from None


# -- estimates -----------------------------------------------------------------------------------------
_FIELDS = ("n", "nw", "vn", "m", "u", "vu", "i", "vi", "nwi", "i2", "y")  # per-stratum sums
_BORROW = ("bn", "bw", "bu", "bwi", "by", "by2")  # a parent's sums, as if its users were in the stratum


def _q(query) -> Query:
    return query if isinstance(query, Query) else parse_query(query)


def query_stats(sample: Sample, query, n_min: int = 30, composite: bool = True) -> dict:
    """Per-stratum sums for ``query`` (text or parsed), additive over partitions (:func:`merge_stats`).
    ``composite=False`` leaves out the sums of the fuzzy fall-back for strata with few matches."""
    q = _q(query)
    K = len(sample.keys)
    base, per_row = sample.precomputed()
    mask = evaluate(q.tree, sample.cols, sample.vocab)
    flip = 2 * int(np.count_nonzero(mask)) > len(mask)  # most rows match: sum the others and subtract
    idx = np.flatnonzero(~mask if flip else mask)
    sm = sample.stratum[idx]  # sorted: the sample's rows are grouped by stratum
    rows = per_row[:, idx]  # (7, rows): 1, wu, wu(wu-1), wi y, y^2 wi(wi-1), wi y^2, y
    matched = np.zeros((rows.shape[0], K))
    if len(idx):
        present = np.flatnonzero(np.r_[True, sm[1:] != sm[:-1]])  # first row of each stratum
        matched[:, sm[present]] = np.add.reduceat(rows, present, axis=1)
    if flip:
        matched = np.maximum(base[4:] - matched, 0.0)
    # the _FIELDS order: n, nw, vn | m, u, vu, i, vi | nwi | i2, y
    sums = np.column_stack([base[0], base[1], base[2], *matched[:5], base[3], matched[5], matched[6]])
    stats = {sample.keys[h]: sums[h].tolist() for h in range(K) if sums[h, 0] > 0}
    residual, synthetic = _synthetic(sample, q, base, per_row) if composite else ({}, {})
    borrow: dict = {}
    thin = [h for h in range(K) if 0 < sums[h, 0] < n_min and sums[h, 1] > sums[h, 0] * (1 + 1e-9) + 1e-9]
    if thin:
        paths = [path_of(k) for k in sample.keys]
        for h in thin:
            borrow[sample.keys[h]] = _borrow(sample, q, h, paths, n_min)
    return {"strata": stats, "borrow": borrow, "n_min": n_min, "residual": residual, "synthetic": synthetic}


_UNKNOWN = object()


def _partial(node: tuple, known: dict):
    """``node`` with the attributes in ``known`` substituted (attr -> its value, or the frozenset of
    values it is known not to have): True, False, or the residual tree over the other attributes."""
    kind = node[0]
    if kind == "in":
        v = known.get(node[1], _UNKNOWN)
        if isinstance(v, frozenset):  # a "*" group: none of these values
            return False if v.issuperset(node[2]) else node
        return node if v is _UNKNOWN else v in node[2]
    if kind == "not":
        c = _partial(node[1], known)
        return (not c) if isinstance(c, bool) else ("not", c)
    if kind in ("and", "or"):
        out = []
        for sub in node[1]:
            c = _partial(sub, known)
            if isinstance(c, bool):
                if c == (kind == "or"):
                    return c
                continue
            out.append(c)
        if not out:
            return kind == "and"
        return out[0] if len(out) == 1 else (kind, tuple(out))
    return True


def _synthetic(sample: Sample, q: Query, base: np.ndarray, per_row: np.ndarray) -> tuple[dict, dict]:
    """For every stratum, the query's residual once the stratum's own attribute values are put in
    (``residual``: stratum key -> residual key), and for every residual its weighted match sums over
    the whole sample (``synthetic``): what the fuzzy fall-back borrows for strata with few matches."""
    residual, synthetic = {}, {}
    cols, rows, tot = sample.synthetic_rows()
    for key, known in zip(sample.keys, sample.known_values()):
        r = _partial(q.tree, known)
        if isinstance(r, bool):
            continue
        rk = repr(r)
        residual[key] = rk
        if rk not in synthetic:
            m = evaluate(r, cols, sample.vocab)
            synthetic[rk] = [tot[0], float(rows[0][m].sum()), tot[1], float(rows[1][m].sum()),
                             float(rows[2][m].sum()), tot[2]]
    return residual, synthetic


def _borrow(sample: Sample, q: Query, h: int, paths: list, n_min: int) -> dict:
    """The parent sums of thin stratum ``h`` at each depth, from the nearest parent up to the first
    that holds ``n_min`` sampled users here."""
    path = paths[h]
    own = np.flatnonzero(sample.stratum == h)
    out = {}
    for d in range(len(path) - 1, -1, -1):
        prefix = path[:d]
        members = np.array([k for k, p in enumerate(paths) if p[:d] == prefix], dtype=np.int32)
        rows = np.flatnonzero(np.isin(sample.stratum, members))
        cols = {a: c[rows] for a, c in sample.cols.items()}
        for attr, val in path[d:]:  # as if these users were in stratum h
            if attr not in cols:
                continue
            col = cols[attr].astype(np.int32)
            if val != "*":
                col[:] = sample.vocab[attr].get(val, len(sample.values[attr]))
            elif len(own):
                donors = sample.cols[attr][own]
                col = donors[np.arange(len(rows)) % len(own)].astype(np.int32)
            cols[attr] = col
        m = evaluate(q.tree, cols, sample.vocab)
        wu, wi, y = sample.w_users[rows], sample.w_imps[rows], sample.imps[rows].astype(np.float64)
        out[str(d)] = [float(len(rows)), float(wu.sum()), float(wu[m].sum()), float(wi.sum()),
                       float((wi * y)[m].sum()), float((wi * y * y)[m].sum())]
        if len(rows) >= n_min:
            break
    return out


def merge_stats(parts: list[dict]) -> dict:
    """Add the sums of several partitions or workers."""
    strata: dict = {}
    borrow: dict = {}
    residual: dict = {}
    synthetic: dict = {}
    n_min = None
    for p in parts:
        n_min = p["n_min"] if n_min is None else n_min
        for k, v in p["strata"].items():
            cur = strata.get(k)
            strata[k] = list(v) if cur is None else [a + b for a, b in zip(cur, v)]
        residual.update(p.get("residual", {}))
        for k, v in p.get("synthetic", {}).items():
            cur = synthetic.get(k)
            synthetic[k] = list(v) if cur is None else [a + b for a, b in zip(cur, v)]
        for k, depths in p["borrow"].items():
            tgt = borrow.setdefault(k, {})
            for d, v in depths.items():
                cur = tgt.get(d)
                tgt[d] = list(v) if cur is None else [a + b for a, b in zip(cur, v)]
    return {"strata": strata, "borrow": borrow, "n_min": n_min if n_min is not None else 30,
            "residual": residual, "synthetic": synthetic}


def finish(stats: dict, query_text: str | None = None) -> dict:
    """The answer from pooled sums: users and impressions with variances and 95% intervals, and which
    strata fell back to a coarser one."""
    n_min = stats["n_min"]
    users = var_u = imps = var_i = 0.0
    seen_users = seen_imps = 0.0
    n_total = 0.0
    exact_u = exact_i = 0.0  # from strata sampled whole (every weight 1): no sampling error
    wmax = 0.0  # the largest mean weight of a sampled (not census) stratum: what one unseen match may stand for
    imp_tot = imp_w = 0.0
    fallback = []
    for key, v in stats["strata"].items():
        f = dict(zip(_FIELDS, v))
        n_total += f["n"]
        if f["vn"] > 1e-12:
            wmax = max(wmax, f["nw"] / f["n"])
        imp_tot, imp_w = imp_tot + f["i"], imp_w + f["u"]
        seen_users += f["m"]
        seen_imps += f["y"]
        depths = stats["borrow"].get(key)
        thin = f["n"] < n_min and f["nw"] > f["n"] * (1 + 1e-9) + 1e-9 and depths
        if thin:
            ok = [int(d) for d, b in depths.items() if b[0] >= n_min]
            d = str(max(ok) if ok else min(int(x) for x in depths))
            b = dict(zip(_BORROW, depths[d]))
            n, nw = f["n"], f["nw"]
            a = n_min - n
            p_dir = f["u"] / nw
            p_par = b["bu"] / b["bw"] if b["bw"] > 0 else 0.0
            p = (n * p_dir + a * p_par) / (n + a)
            r_dir, r2_dir = (f["i"] / f["nwi"], f["i2"] / f["nwi"]) if f["nwi"] > 0 else (0.0, 0.0)
            r_par, r2_par = (b["by"] / b["bwi"], b["by2"] / b["bwi"]) if b["bwi"] > 0 else (0.0, 0.0)
            r = (n * r_dir + a * r_par) / (n + a)
            r2 = (n * r2_dir + a * r2_par) / (n + a)
            if p != p_dir or r != r_dir:
                fallback.append(key)
            users += nw * p
            var_u += nw * nw * p * (1 - p) / (n + a) + p * p * f["vn"]
            imps += nw * r
            var_i += nw * nw * max(r2 - r * r, 0.0) / (n + a) + r * r * f["vn"]
        elif f["m"] < n_min and f["vn"] > 1e-12 and stats.get("residual", {}).get(key) in stats.get("synthetic", {}):
            sy = stats["synthetic"][stats["residual"][key]]
            eu, vu_, ei, vi_, moved = _composite(f, sy)
            if moved:
                fallback.append(key)
            users += eu
            var_u += vu_
            imps += ei
            var_i += vi_
        else:
            users += f["u"]
            var_u += f["vu"]
            imps += f["i"]
            var_i += f["vi"]
            if f["vn"] <= 1e-12:
                exact_u += f["u"]
                exact_i += f["i"]
    imp_mean = imp_tot / imp_w if imp_w > 0 else 1.0
    lo_u, hi_u = _interval(users - exact_u, var_u, wmax)
    lo_i, hi_i = _interval(imps - exact_i, var_i, wmax * max(imp_mean, 1.0))
    out = {"users": round(users, 1),
           "users_ci": [round(max(exact_u + lo_u, seen_users), 1), round(exact_u + hi_u, 1)],
           "users_se": round(float(np.sqrt(var_u)), 2),
           "impressions": round(imps, 1),
           "impressions_ci": [round(max(exact_i + lo_i, seen_imps), 1), round(exact_i + hi_i, 1)],
           "impressions_se": round(float(np.sqrt(var_i)), 2),
           "fallback": bool(fallback), "fallback_strata": sorted(fallback),
           "matched_sample_users": int(seen_users), "sample_users": int(n_total), "strata": len(stats["strata"])}
    if query_text is not None:
        out = {"query": query_text, **out}
    return out


SYNTHETIC_ROWS = 20_000  # residual rates are measured on at most this many rows (a systematic subsample)
SYNTHETIC_REL_BIAS = 0.5  # the borrowed rate is always allowed this much relative bias (bench reach: coverage vs error)


def _composite(f: dict, sy: list) -> tuple[float, float, float, float, bool]:
    """A stratum with few matches: the direct estimate mixed with the synthetic one (the stratum's
    size times the residual query's rate over the whole sample), weighted by their mean squared
    errors (the synthetic's bias estimated from the gap between the two, and at least
    ``SYNTHETIC_REL_BIAS``). Returns users, its variance, impressions, its variance, and whether the
    synthetic part counted."""
    sw, su, swi, sy1, sy2, sn = sy
    n, nw, nwi = f["n"], f["nw"], f["nwi"]
    out = []
    for direct, v_dir, size, rate, rate2 in ((f["u"], f["vu"], nw, su / sw if sw > 0 else 0.0, None),
                                             (f["i"], f["vi"], nwi, sy1 / swi if swi > 0 else 0.0,
                                              sy2 / swi if swi > 0 else 0.0)):
        second = rate if rate2 is None else rate2  # E[x^2] of the per-user value (match, or impressions)
        synth = size * rate
        v_model = size * size * max(second - rate * rate, 0.0) / n + rate * rate * f["vn"]
        v_d = max(v_dir, v_model)  # no matches here does not mean no variance
        v_syn = size * size * max(second - rate * rate, 0.0) / max(sn, 1.0)
        mse_s = max((direct - synth) ** 2 - v_d, (SYNTHETIC_REL_BIAS * synth) ** 2) + v_syn
        phi = mse_s / (mse_s + v_d) if mse_s + v_d > 0 else 1.0
        out.append((phi * direct + (1 - phi) * synth, phi * phi * v_d + (1 - phi) ** 2 * mse_s, phi < 0.999))
    (eu, vu_, mu), (ei, vi_, mi) = out
    return eu, vu_, ei, vi_, mu or mi


def _chi2(p_z: float, k: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile with ``k`` degrees of freedom at the
    normal quantile ``p_z``."""
    if k <= 0:
        return 0.0
    c = 2.0 / (9.0 * k)
    return k * max(1.0 - c + p_z * np.sqrt(c), 0.0) ** 3


def _interval(est: float, var: float, w0: float) -> tuple[float, float]:
    """A 95% interval for a Horvitz-Thompson total of few matches: Garwood's Poisson interval on the
    effective number of matches ``est^2 / var``, scaled by the effective weight ``var / est`` (close
    to ``est +- 1.96 sd`` when there are many). No match at all: ``[0, 3.69 w0]``."""
    if est <= 0 or var <= 0:
        return (max(est, 0.0), max(est, 0.0) + (3.689 * w0 if est <= 0 else 0.0))
    m = est * est / var
    scale = var / est
    return float(scale * _chi2(-Z95, 2 * m) / 2), float(scale * _chi2(Z95, 2 * m + 2) / 2)


def answer(sample: Sample, query, n_min: int = 30, composite: bool = True) -> dict:
    """The answer of one sample (a partition, or several merged) to ``query``."""
    q = _q(query)
    return finish(query_stats(sample, q, n_min, composite), q.text)


# -- the bulk builder and the comparison baselines -------------------------------------------------------
def with_score_model(st: Strata, cols: dict, values: dict, w: np.ndarray, vocab: dict) -> Strata:
    """Give learned strata the within-stratum score model, and set each stratum's ``S_h`` to its mean
    ``q`` (Neyman allocation for sampling proportional to ``q`` inside strata: ``n_h`` proportional to
    the sum of ``q`` over the stratum)."""
    st.model = ScoreModel.fit(cols, values, w)
    q = st.model.q_codes(cols, vocab, len(w))
    leaf = st.assign_codes(cols, vocab, len(w))
    K = len(st)
    N = np.bincount(leaf, weights=w, minlength=K)
    st.s = (np.bincount(leaf, weights=w * q, minlength=K) / np.maximum(N, 1e-12)).tolist()
    return st


def build_sample(cols: dict, values: dict, hashes: np.ndarray, imps: np.ndarray, strata: Strata,
                 caps, info: dict | None = None) -> Sample:
    """The bottom-k sample of a static population (one epoch) with the given strata and per-stratum
    sizes: what :class:`ReachSampler` holds after that epoch, built with numpy."""
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    leaf = strata.assign_codes(cols, vocab, len(hashes))
    q = strata.q_codes(cols, vocab, len(hashes))
    priority = hashes / q
    order = np.lexsort((priority, leaf))
    leaf_sorted = leaf[order]
    starts = np.searchsorted(leaf_sorted, np.arange(len(strata) + 1))
    keep, weights = [], []
    for h in range(len(strata)):
        idx = order[starts[h]:starts[h + 1]]
        k = int(caps[h])
        theta = float(priority[idx[k]]) if len(idx) > k else float("inf")
        keep.append(idx[:k])
        weights.append(1.0 / np.minimum(1.0, q[idx[:k]] * theta))
    rows = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
    w = np.concatenate(weights) if weights else np.zeros(0)
    return Sample({a: c[rows] for a, c in cols.items()}, values, w, w, imps[rows], leaf[rows], strata.keys, info)


class ThetaBaseline:
    """Theta sketches (Apache DataSketches): one per attribute value and one of all users, with
    ``lg_k`` chosen as the largest that fits ``budget_bytes`` of retained hashes (8 bytes each; at least
    5, the smallest DataSketches allows). A query
    is answered by set operations: ``in`` a union, ``and`` an intersection, ``or`` a union, ``not`` an
    a-not-b from all users. Users only (a theta sketch counts distinct keys, not impressions)."""

    def __init__(self, cols: dict, values: dict, budget_bytes: int):
        import datasketches as ds
        self.ds = ds
        n = len(next(iter(cols.values())))
        sizes = [n] + [int(x) for a in cols for x in np.bincount(cols[a][cols[a] >= 0], minlength=len(values[a]))]
        def fits(lg: int) -> bool:  # trimmed sketches retain at most 2^lg hashes each
            return sum(min(s, 2 ** lg) for s in sizes) * 8 <= budget_bytes
        self.lg_k = 5  # the smallest DataSketches allows
        while self.lg_k < 26 and fits(self.lg_k + 1):
            self.lg_k += 1
        self.vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
        sk_all = ds.update_theta_sketch(self.lg_k)
        sk = {a: [ds.update_theta_sketch(self.lg_k) for _ in values[a]] for a in cols}
        for i in range(n):
            sk_all.update(i)
        for a, col in cols.items():
            lst = sk[a]
            for i, c in enumerate(col.tolist()):
                if c >= 0:
                    lst[c].update(i)
        for s in [sk_all] + [s for lst in sk.values() for s in lst]:
            s.trim()  # down to the nominal 2^lg_k hashes, so the bytes are what was budgeted
        self.all = sk_all.compact()
        self.sk = {a: [s.compact() for s in lst] for a, lst in sk.items()}
        self.nbytes = 8 * (self.all.num_retained + sum(s.num_retained for lst in self.sk.values() for s in lst))

    def _eval(self, node: tuple):
        ds = self.ds
        kind = node[0]
        if kind == "all":
            return self.all
        if kind == "in":
            u = ds.theta_union(self.lg_k)
            for v in node[2]:
                c = self.vocab.get(node[1], {}).get(v)
                if c is not None:
                    u.update(self.sk[node[1]][c])
            return u.get_result()
        if kind == "not":
            return ds.theta_a_not_b().compute(self.all, self._eval(node[1]))
        if kind == "and":
            it = ds.theta_intersection()
            for sub in node[1]:
                it.update(self._eval(sub))
            return it.get_result()
        u = ds.theta_union(self.lg_k)
        for sub in node[1]:
            u.update(self._eval(sub))
        return u.get_result()

    def answer(self, query) -> dict:
        r = self._eval(_q(query).tree)
        return {"users": float(r.get_estimate()), "users_ci": [float(r.get_lower_bound(2)), float(r.get_upper_bound(2))]}


def exact_answer(cols: dict, values: dict, imps: np.ndarray, query) -> dict:
    """The true users and impressions of ``query`` over a whole population."""
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    m = evaluate(_q(query).tree, cols, vocab)
    return {"users": int(m.sum()), "impressions": float(imps[m].sum())}
