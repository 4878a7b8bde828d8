"""The reach sampler: one partition's sample of the users in the impression stream over the event-time
horizon, within a fixed share of a total memory budget.

Public surface: ``ReachSampler``, ``user_hash``, ``segment_attr``.

**The horizon** is the last ``horizon_epochs * epoch_s`` seconds of event time (7 days by default),
measured back from the partition's newest event time ``now``, on a grid of ``epoch_s /
buckets_per_epoch`` (an hour by default): the sample covers ``[from, now]`` with ``from`` the start of
the bucket holding ``now - horizon``, so at least the whole horizon and at most one bucket more, and
every answer says which range (``range``; never before the first event's bucket). A user is in it if it had an impression in the range (its
newest event time is kept exactly); its impressions are counted per bucket, and buckets older than
``from`` are forgotten.

**One sample of users, not one per epoch, drawn by two thresholds.** The partition keeps at most
``k = ceil(budget_users / partitions)`` users seen in the range, in two parts that share one hash
``h`` per user:

* the *uniform part*: the ``k_u = round((1 - rare_share) k)`` users with the smallest hashes, below the
  threshold ``tau_u`` (a bottom-k sample of users: every user's chance is ``tau_u``);
* the *rare part*: among the others, those with the smallest priorities ``h / q`` below ``tau_r``,
  ``q`` the score model's weight (``state/reach_strata.py``: large for users whose attribute values or
  pairs of values were rare in the past).

A user is in when ``h < max(tau_u, q tau_r)``: with probability ``pi = min(1, max(tau_u, q tau_r))``,
once however many impressions it has, whatever their order. When the uniform part outgrows ``k_u`` its
largest hash leaves it and ``tau_u`` drops to that hash (the user stays if the rare part admits it);
when the two parts outgrow ``k`` the rare part's largest priority leaves and ``tau_r`` drops to it.
So ``tau_u`` is set by the budget alone: **whatever the model says** (a model learned from few users
gives huge ``q`` to users with values it never saw), every user keeps ``pi >= tau_u``, about
``1 - rare_share`` of the uniform rate ``k / N``, and a common rule's variance is at most
``1 / (1 - rare_share)`` of a uniform sample's of the same memory (about 1.15x its error at the
default 0.25). The rare part spends the rest where the model says. (The previous design, one priority
``h / g`` with ``g = 0.7 + 0.3 q``, let many large ``q`` push ``tau`` and so everyone's rate down: 1.3-1.7x
uniform's error on common rules at a 0.5% budget.)

When users leave the horizon and the sample is less than half full, both thresholds rise (at most 2x
per bucket) so new and returning users fill it again. The thresholds in force are kept per bucket (their
smallest values there, per model), and so a user is counted with ``pi_u = min(1, min over the buckets
from its newest impression to now of max(tau_u, q tau_r))``: the users the sample still holds and that
rule admits are exactly those that were never turned away since; its impressions are complete when the
same holds from ``from`` on (``w_imps``, ``state/reach_sample.py``). The model is learned again at
every epoch boundary from the sample (weighted by ``1/pi``); the rare part's priorities follow it.
Before the first model ``q = 1`` (the rare part is uniform too).

**The estimator's classes.** Every accepted impression, sampled user or not, also goes to a
:class:`~loopline.state.reach_model.ClassStream` (``model_classes`` latent classes, 0: none), which
learns the attributes' value shares per class online; a snapshot carries them, and the estimate borrows
from them for rules the sample holds few users of (``state/reach_estimate.py``).

>>> s = ReachSampler(_config(budget_users=50, min_per_stratum=5))
>>> for i in range(200):
...     s.observe(f"u{i}", 100.0 + i, {"gender": "F" if i % 4 else "M"}, impressions=2)
>>> sample = s.snapshot()
>>> sample.n, sample.info["range"]
(50, [0.0, 299.0])
"""

from __future__ import annotations

import hashlib
import heapq
import math
import re
import sys

import numpy as np

from .reach_model import UNSEEN, ClassStream
from .reach_sample import Sample
from .reach_strata import ScoreModel
from .reach_vocab import Vocabulary

__all__ = ["ReachSampler", "user_hash", "segment_attr"]

def _config(**kw):
    from .reach import ReachConfig
    return ReachConfig(**kw)


def user_hash(user: str, seed: int = 0) -> float:
    """A user's sampling hash: a uniform number in (0, 1) from a keyed BLAKE2b of its id.

    >>> 0 < user_hash("u1") < 1, user_hash("u1") == user_hash("u1"), user_hash("u1", 1) != user_hash("u1")
    (True, True, True)
    """
    d = hashlib.blake2b(user.encode(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return ((int.from_bytes(d, "little") >> 11) + 0.5) * (1.0 / (1 << 53))


def segment_attr(source: str, segment: str) -> str:
    """The query attribute of a data source's segment label (``segment`` events; value ``yes``):
    a rule such as ``seg.s1.female = yes and age = 25-34`` targets the users source ``s1`` puts in
    ``female``. Characters the query language's names do not allow become ``_``.

    >>> segment_attr("dmp-2", "auto intender")
    'seg.dmp_2.auto_intender'
    """
    return f"seg.{re.sub(r'[^A-Za-z0-9_]', '_', source)}.{re.sub(r'[^A-Za-z0-9_]', '_', segment)}"


class _User:
    """A sampled user: hash, attribute codes (newest impression's), newest event time, impressions per
    bucket, its rare-part priority ``h / q`` under the model in force, and whether the uniform part
    holds it (``h < tau_u``)."""

    __slots__ = ("h", "codes", "last", "imps", "rho", "uniform")

    def __init__(self, h: float, codes: tuple, last: float, rho: float):
        self.h, self.codes, self.last, self.rho = h, codes, last, rho
        self.uniform = False
        self.imps: dict[int, int] = {}


# Users whose q a frozen sample computes one by one (``ScoreModel.q``, about 0.1 ms each with 16
# attributes) rather than in one ``q_codes`` pass over the model's cells (tens of ms for a sample of
# thousands of users, whatever the number asked for)
FEW_MISSES = 256


class ReachSampler:
    """The sample of one partition (module docstring). ``observe`` takes one accepted impression;
    ``snapshot`` freezes the horizon's sample into a :class:`~loopline.state.reach_sample.Sample`."""

    def __init__(self, cfg=None, partition: int = 0, partitions: int = 1):
        cfg = cfg if cfg is not None else _config()
        self.cfg = cfg
        self.partition = partition
        self.partitions = max(1, int(partitions))
        self.k = max(1, math.ceil(cfg.budget_users / self.partitions))  # this partition's share of the budget
        self.k_u = round((1 - cfg.rare_share) * self.k)  # the uniform part's share of it
        self.horizon_s = cfg.epoch_s * cfg.horizon_epochs
        self.bucket_s = cfg.epoch_s / cfg.buckets_per_epoch
        self.vocabulary = Vocabulary(cfg.max_attrs, cfg.max_values, cfg.vocab_candidates, self._pruned)
        # the estimator's latent classes, learned from every impression of the partition (not only the
        # sampled users'), over the horizon's half-life
        self.classes = ClassStream(cfg.model_classes, half_life_s=self.horizon_s / 2, seed=cfg.seed) \
            if cfg.model_classes else None
        self.records: dict[str, _User] = {}
        self.uni: list = []  # the uniform part: (-hash, user), the largest hash on top
        self.rare: list = []  # the rare part: (-priority, user), lazily cleaned: the largest priority on top
        self.tau_u = math.inf
        self.tau_r = math.inf
        self.now: float | None = None
        self.bucket: int | None = None  # the bucket of ``now``
        self.first_bucket = 0  # the bucket of the first event (the range starts no earlier)
        self.epoch: int | None = None
        # bucket -> {model id in force: [smallest tau_u, smallest tau_r] under it}
        self.taus: dict[int, dict[int, list]] = {}
        self.models: dict[int, ScoreModel | None] = {0: None}
        self.model_id = 0
        # model id -> {a user's attribute codes: q under that model}: freezing a sample (every view
        # refresh) needs every held user's q under every model in force, the same each time while the
        # codes mean the same values (a prune drops the entries holding the pruned code)
        self._qcache: dict[int, dict[tuple, float]] = {}
        self.version = 0  # changes whenever the sample does
        self.counts = {"impressions": 0, "too_old": 0, "evicted": 0, "expired": 0, "models_learned": 0,
                       "tau_raised": 0, "segment_users_evicted": 0, "segments_dropped": 0,
                       "q_cache_cleared": 0}
        # user -> {segment attr: "yes"} for every user a source labelled (before or after its
        # impressions: the quality counts' rule), so rules can name a source's segment; at most
        # max_segment_users users, the least recently labelled forgotten first (a sampled user keeps
        # the labels its record holds)
        self.segments: dict[str, dict[str, str]] = {}

    # the vocabulary's tables
    @property
    def attrs(self) -> list[str]:
        return self.vocabulary.attrs

    @property
    def values(self) -> dict[str, list[str]]:
        return self.vocabulary.values

    @property
    def vocab(self) -> dict[str, dict[str, int]]:
        return self.vocabulary.vocab

    def bounds(self) -> dict:
        """Every bound of this sampler and how often it bit: the budget, the vocabulary's caps and
        pruning (``state/reach_vocab.py``) and the segment labels held."""
        return {**self.vocabulary.bounds(), "budget_users": self.k, "uniform_users": self.k_u,
                "sampled_users": len(self.records),
                "evicted": self.counts["evicted"], "segment_users": len(self.segments),
                "max_segment_users": self.cfg.max_segment_users,
                "segment_users_evicted": self.counts["segment_users_evicted"],
                "segments_dropped": self.counts["segments_dropped"],
                "model_classes": self.cfg.model_classes,
                "model_attrs_left_out": self.classes.counts["attrs_left_out"] if self.classes is not None else 0}

    def range(self) -> list[float] | None:
        """The event-time range ``[from, to]`` the sample covers (module docstring)."""
        if self.now is None:
            return None
        return [max(self._start_bucket(), self.first_bucket) * self.bucket_s, self.now]

    def _start_bucket(self) -> int:
        return math.floor((self.now - self.horizon_s) / self.bucket_s)

    # -- the stream ------------------------------------------------------------------------------------
    def observe(self, user: str, ts: float, attrs: dict, impressions: int = 1) -> None:
        """One accepted impression of ``user`` at event time ``ts`` with targeting ``attrs``."""
        own = attrs  # the weight g sees the impression's own attributes only (segments may come later)
        seg = self.segments.get(user)
        if seg:
            attrs = {**attrs, **seg}
        if self.now is None:
            self._start(ts)
        elif ts > self.now:
            self._advance(ts)
        b = math.floor(ts / self.bucket_s)
        if b < self._start_bucket():
            self.counts["too_old"] += 1
            return
        self.counts["impressions"] += impressions
        if self.classes is not None:
            vocab = self.vocab
            # names the vocabulary has no slot for say nothing (and would grow the statistics without bound)
            self.classes.add({a: vocab[a].get(v, UNSEEN) for a, v in own.items()
                              if a in vocab and not a.startswith("seg.")}, ts)
        rec = self.records.get(user)
        if rec is not None:
            rec.imps[b] = rec.imps.get(b, 0) + impressions
            rec.last = max(rec.last, ts)
            rec.codes = self._recode(rec.codes, attrs, seg)
            self.version += 1
            return
        h = user_hash(user, self.cfg.seed)
        rho = h / self._q(own)
        if h >= self.tau_u and rho >= self.tau_r:
            return
        rec = self.records[user] = _User(h, self.vocabulary.encode(attrs), ts, rho)
        rec.imps[b] = impressions
        if h < self.tau_u:
            rec.uniform = True
            heapq.heappush(self.uni, (-h, user))
        else:
            heapq.heappush(self.rare, (-rho, user))
        self._evict()
        self.version += 1

    def _q(self, attrs: dict, model_id: int | None = None) -> float:
        """q of one user's attributes under the model in force (or ``model_id``'s)."""
        model = self.models[self.model_id if model_id is None else model_id]
        if model is None:
            return 1.0
        return model.q({k: v for k, v in attrs.items() if not k.startswith("seg.")})

    def _q_codes(self, model_id: int, cols: dict, n: int) -> np.ndarray:
        model = self.models[model_id]
        if model is None:
            return np.ones(n)
        return model.q_codes({k: c for k, c in cols.items() if not k.startswith("seg.")}, self.vocab, n)

    def _q_held(self, model_id: int, recs: list, cols: dict) -> np.ndarray:
        """``_q_codes`` of held users, each distinct code tuple computed once per model (cached)."""
        cache = self._qcache.setdefault(model_id, {})
        if len(cache) > 2 * len(self.records) + 1024:  # tuples of users gone: start over (bounded)
            cache.clear()
            self.counts["q_cache_cleared"] += 1
        miss = [i for i, r in enumerate(recs) if r.codes not in cache]
        if len(miss) <= FEW_MISSES:
            # user by user: ``q_codes`` costs a pass over every cell of the model whatever the users,
            # and between two views only the users new since are missing (it took a fifth of a core in
            # `bench soak`, in the thread whose GIL the event loop waits for); the same q, bit for bit
            for i in miss:
                codes = recs[i].codes
                cache[codes] = self._q({a: self.values[a][c] for a, c in zip(self.attrs, codes) if c >= 0}, model_id)
        else:
            at = np.array(miss, dtype=np.int64)
            got = self._q_codes(model_id, {a: c[at] for a, c in cols.items()}, len(miss))
            for i, q in zip(miss, got.tolist()):
                cache[recs[i].codes] = q
        return np.fromiter((cache[r.codes] for r in recs), dtype=np.float64, count=len(recs))

    def _evict(self) -> None:
        """The two parts back within their shares (module docstring): the uniform part's largest hashes
        move to the rare part (or leave), then the rare part's largest priorities leave."""
        while len(self.uni) > self.k_u:
            neg, user = heapq.heappop(self.uni)
            rec = self.records[user]
            self.tau_u = -neg
            rec.uniform = False
            if rec.rho < self.tau_r:
                heapq.heappush(self.rare, (-rec.rho, user))
            else:
                del self.records[user]
                self.counts["evicted"] += 1
        while len(self.records) > self.k and self.rare:
            neg, user = heapq.heappop(self.rare)
            rec = self.records.get(user)
            if rec is None or rec.uniform or rec.rho != -neg:
                continue  # stale: gone, moved to the uniform part, or re-prioritized under a newer model
            del self.records[user]
            self.tau_r = min(self.tau_r, -neg)
            self.counts["evicted"] += 1
        if self.bucket is not None:
            t = self.taus[self.bucket].setdefault(self.model_id, [math.inf, math.inf])
            t[0], t[1] = min(t[0], self.tau_u), min(t[1], self.tau_r)

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
            extra = self.vocabulary.encode({key: "yes"})
            codes = list(rec.codes) + [-1] * (len(extra) - len(rec.codes))
            rec.codes = tuple(c if e == -1 else e for c, e in zip(codes, extra))
            self.version += 1

    def _recode(self, old: tuple, attrs: dict, seg: dict | None) -> tuple:
        """A sampled user's codes from its newest impression's ``attrs`` (segments included). A user
        whose segment labels were forgotten (``max_segment_users``) keeps the ones its record holds."""
        codes = self.vocabulary.encode(attrs)
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
            codes = rec.codes
            if j < len(codes) and codes[j] != -1 and (code is None or codes[j] == code):
                rec.codes = codes[:j] + (-1,) + codes[j + 1:]
        if self.classes is not None:  # the class statistics of the old name or value start over
            for a in [a for a in self.classes.stats if a not in self.vocabulary.attr_index]:
                self.classes.forget(a)
            if j < len(self.attrs):
                self.classes.forget(self.attrs[j], code)
        for cache in self._qcache.values():  # the old code may come to stand for another value
            for key in [k for k in cache if j < len(k) and k[j] != -1 and (code is None or k[j] == code)]:
                del cache[key]
        self.version += 1

    # -- time ------------------------------------------------------------------------------------------
    def _start(self, ts: float) -> None:
        self.now = ts
        self.bucket = self.first_bucket = math.floor(ts / self.bucket_s)
        self.epoch = math.floor(ts / self.cfg.epoch_s)
        self.taus[self.bucket] = {self.model_id: [self.tau_u, self.tau_r]}

    def _advance(self, ts: float) -> None:
        self.now = ts
        b = math.floor(ts / self.bucket_s)
        if b > self.bucket:
            self.bucket = b
            self._expire()
            self.taus[b] = {}
            if len(self.records) < self.k / 2 and (self.tau_u < math.inf or self.tau_r < math.inf):
                self._raise(min(2.0, 0.75 * self.k / max(len(self.records), 1)))
            self.taus[b] = {self.model_id: [self.tau_u, self.tau_r]}
        e = math.floor(ts / self.cfg.epoch_s)
        if e > self.epoch:
            for _ in range(min(e - self.epoch, 64)):  # the vocabulary's hit counts halve at every boundary
                self.vocabulary.decay()
            self.epoch = e
            self._learn()
        self.version += 1

    def _raise(self, factor: float) -> None:
        """Both thresholds up by ``factor``; held users the uniform threshold now admits join its part."""
        self.tau_u *= factor
        self.tau_r *= factor
        for user, rec in self.records.items():
            if not rec.uniform and rec.h < self.tau_u:
                rec.uniform = True
                heapq.heappush(self.uni, (-rec.h, user))
        self._evict()
        self.counts["tau_raised"] += 1

    def _expire(self) -> None:
        start = self._start_bucket()
        for old in [k for k in self.taus if k < start]:
            del self.taus[old]
        t0 = start * self.bucket_s
        gone = [u for u, r in self.records.items() if r.last < t0]
        for user in gone:
            del self.records[user]
            self.counts["expired"] += 1
        if gone:
            self.uni = [(-r.h, u) for u, r in self.records.items() if r.uniform]
            heapq.heapify(self.uni)
        for rec in self.records.values():
            if min(rec.imps) < start:
                rec.imps = {k: v for k, v in rec.imps.items() if k >= start}
        live = {m for t in self.taus.values() for m in t} | {self.model_id}
        for m in [m for m in self.models if m not in live]:
            del self.models[m]
            self._qcache.pop(m, None)

    def _learn(self) -> None:
        """A new score model from the sample (weighted by 1/pi); held users are re-prioritized under
        it and those it no longer admits leave."""
        users, cols, h, pi, _ = self._frozen()
        if len(users) < 2 * self.cfg.min_per_stratum:
            return
        fit_cols = {a: c for a, c in cols.items() if not a.startswith("seg.")
                    and (not self.cfg.attrs or a in self.cfg.attrs)}
        if not fit_cols:
            return
        model = ScoreModel.fit(fit_cols, self.values, 1.0 / pi)
        self.model_id += 1
        self.models[self.model_id] = model
        # the rest of this bucket runs under the new model
        self.taus[self.bucket][self.model_id] = [self.tau_u, self.tau_r]
        rho = h / self._q_codes(self.model_id, cols, len(users))
        for user, r in zip(users, rho.tolist()):
            self.records[user].rho = r
        for user, rec in list(self.records.items()):
            if not rec.uniform and rec.rho >= self.tau_r:
                del self.records[user]
                self.counts["evicted"] += 1
        self.rare = [(-rec.rho, u) for u, rec in self.records.items() if not rec.uniform]
        heapq.heapify(self.rare)
        self._evict()
        self.counts["models_learned"] += 1

    # -- the answers -----------------------------------------------------------------------------------
    def _columns(self, codes: list[tuple]) -> dict:
        mat = np.full((len(codes), len(self.attrs)), -1, dtype=np.int32)
        for i, c in enumerate(codes):
            mat[i, :len(c)] = c
        return {a: mat[:, j] for j, a in enumerate(self.attrs)}

    def _frozen(self):
        """The users the rule admits: ids, columns, hashes, ``pi`` and the impressions ``pi``
        (0 where their impressions may be incomplete)."""
        if self.now is None:
            return [], {a: np.zeros(0, dtype=np.int32) for a in self.attrs}, np.zeros(0), np.ones(0), np.zeros(0)
        start = self._start_bucket()
        t0 = start * self.bucket_s
        users = [u for u, r in self.records.items() if r.last >= t0]
        recs = [self.records[u] for u in users]
        n = len(recs)
        cols = self._columns([r.codes for r in recs])
        h = np.array([r.h for r in recs], dtype=np.float64)
        last_b = np.array([math.floor(r.last / self.bucket_s) for r in recs], dtype=np.int64)
        a_user = np.full(n, np.inf)
        a_all = np.full(n, np.inf)
        for m in sorted({m for t in self.taus.values() for m in t}):
            # the buckets of the range where model m was in force, and its thresholds there
            bs = np.array(sorted(b for b, t in self.taus.items() if m in t and b >= start), dtype=np.int64)
            if not len(bs):
                continue
            tu = np.array([self.taus[b][m][0] for b in bs])
            tr = np.array([self.taus[b][m][1] for b in bs])
            q = self._q_held(m, recs, cols)
            for lo in range(0, n, 4096):  # (chunk, buckets): each user's threshold in each bucket
                sl = slice(lo, lo + 4096)
                t = np.maximum(tu[None, :], q[sl, None] * tr[None, :])
                suffix = np.minimum.accumulate(t[:, ::-1], axis=1)[:, ::-1]  # smallest from each bucket on
                first = np.searchsorted(bs, last_b[sl])  # the first bucket at or after the newest impression
                has = first < len(bs)
                a_user[sl] = np.minimum(a_user[sl], np.where(has, suffix[np.arange(len(first)), np.minimum(first, len(bs) - 1)], np.inf))
                a_all[sl] = np.minimum(a_all[sl], suffix[:, 0])
        keep = h < a_user
        pi = np.minimum(1.0, a_user)
        pi_imps = np.where(h < a_all, np.minimum(1.0, a_all), 0.0)
        users = [u for u, k in zip(users, keep.tolist()) if k]
        cols = {a: c[keep] for a, c in cols.items()}
        return users, cols, h[keep], pi[keep], pi_imps[keep]

    def snapshot(self) -> Sample:
        """The horizon's sample, frozen for queries (module docstring for the weights)."""
        users, cols, h, pi, pi_imps = self._frozen()
        start = self._start_bucket() if self.now is not None else 0
        imps = np.array([sum(v for b, v in self.records[u].imps.items() if b >= start) for u in users],
                        dtype=np.float64)
        w_imps = np.where(pi_imps > 0, 1.0 / np.maximum(pi_imps, 1e-300), 0.0)
        info = {"partitions": [self.partition], "range": self.range(), "budget_users": self.k,
                "held_users": len(self.records), "impressions_seen": self.counts["impressions"],
                "models_learned": self.counts["models_learned"]}
        classes = None
        if self.classes is not None and self.classes.counts["impressions"] + len(self.classes.rows) > 0:
            classes = {"share": self.classes.share(),
                       "theta": self.classes.theta({a: v for a, v in self.values.items() if not a.startswith("seg.")})}
        return Sample(cols, self.values, 1.0 / pi, w_imps, imps, info, classes=classes)

    def memory(self) -> dict:
        """Bytes held by the streaming structure (deep ``sys.getsizeof`` of up to 200 records, scaled,
        plus the heap) and per sampled user."""
        n = len(self.records)
        if not n:
            model = self.classes.nbytes if self.classes is not None else 0
            return {"sampled_users": 0, "budget_users": self.k, "bytes": model, "bytes_per_user": 0.0,
                    "model_bytes": model}
        sizes = []
        for user, rec in list(self.records.items())[:200]:
            b = sys.getsizeof(user) + sys.getsizeof(rec) + sys.getsizeof(rec.codes) + 2 * sys.getsizeof(rec.h)
            b += sys.getsizeof(rec.imps) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in rec.imps.items())
            b += 100  # the records dict's slot and the heap's (-priority, user) tuple
            sizes.append(b)
        per = float(np.mean(sizes))
        cached = sum(sys.getsizeof(c) + 24 * len(c) for c in self._qcache.values())  # the dicts and their floats
        model = self.classes.nbytes if self.classes is not None else 0
        return {"sampled_users": n, "budget_users": self.k, "bytes": int(per * n) + cached + model,
                "bytes_per_user": round(per, 1), "model_bytes": model}
