"""Reach estimates from a frozen sample: users and impressions a targeting rule reaches, each an
:class:`Estimate` that names its bounds.

Public surface: ``Estimate``, ``query_stats``, ``merge_stats``, ``finish``, ``answer``, ``users_estimate``,
``exact_answer``, ``score_interval``.

**Direct estimate** (Horvitz-Thompson). Users: ``U = sum 1/pi_u`` over the sampled users the rule
matches, variance estimate ``V = sum (1 - pi_u) / pi_u^2`` (the sample is a priority sample: given its
threshold, users are in independently, so this is the Poisson-sampling variance). Impressions: the same
with ``y_u / pi_u`` over the users whose impressions in the range are complete.

**Interval** (score type, with a small-count correction). A total of few matches is far from normal, so
the 95% interval is the Wilson/score interval of a Poisson count on the *effective* number of matches
``m = U^2 / V`` (``U / m`` users per effective match): ``m + z^2/2 +- z sqrt(m + z^2/4)``, scaled back.
With many matches it is ``U +- 1.96 sqrt(V)``; with none it is ``[0, z^2 (w - 1)]`` (``w`` the
sample's largest weight: ``w - 1`` unseen users stand beside each sampled one). Users the sample holds with ``pi = 1`` are exact
(zero width). The lower end is never below the users the sample saw.

**Model-assisted estimate** (flagged: ``fallback``, when the model moved the answer). A latent-class
model of the attributes (``state/reach_model.py``) gives a second estimate ``S = sum_k W_k prod_j
P_k(C_j)`` of any rule whose ``and``/``or``/``not`` parts read distinct attributes (inside a class
the attributes are independent). Its classes' value shares come from the partition's whole
impression stream (the sample's block: ``state/reach_sample.py``), its classes' users ``W_k`` from
the sample (``class_weights``); a sample without them gets independence fitted on itself (a
conjunction of two clauses or more, with its shares' variance by the delta method). The answer mixes
the two by their mean squared errors, ``phi = MSE_S / (MSE_S + V_D)``: ``V_D`` the direct one's
variance (at least what ``S`` implies, so "no match" is not taken as certainty), ``MSE_S`` the
model's, estimated from the gap ``(D - S)^2 - V_D`` and never below ``(c S)^2 + S``: ``S`` the
Poisson scatter of a real count around the model's expectation, ``c`` the model's relative error,
*measured on the sample itself, at the rule's order and size*: over every single value, pair and
triple of values the sample holds, each cell's ``((D - S) / S)^2`` less its sampling noise ``V / S^2``
and its Poisson scatter ``1 / S`` (unbiased however few its matches), averaged within size classes of
2x of ``S / N`` (``BIAS_BINS``; neighbouring classes pooled until ``BIAS_MIN_CELLS`` cells; fewer in
all: ``BIAS_DEFAULT``), the class of the rule's ``S`` taken (``BIAS_FLOOR <= c <= BIAS_MAX``); a rule
of more than three attributes extrapolates from triples. Rare cells often deviate from any model far
more than common ones, so the measurement is read at the rule's size. The interval uses the
mixture's MSE.

**Distributed.** :func:`query_stats` gives sums that add across partitions (:func:`merge_stats`);
:func:`finish` makes the answer from pooled sums, the same as :func:`answer` on the merged sample.

>>> import numpy as np
>>> from loopline.state.reach_sample import Sample
>>> s = Sample({"g": np.array([0, 1, 1, 0])}, {"g": ["a", "b"]}, [1.0, 1.0, 1.0, 1.0], [1.0] * 4, [2, 1, 1, 3])
>>> a = answer(s, "g = a")
>>> a["users"], a["users_ci"], a["impressions"]
(2.0, [2.0, 2.0], 5.0)
>>> users_estimate(query_stats(s, "g = b"))
Estimate(estimate=2.0, lower=2.0, upper=2.0, level=0.95, se=0.0)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from .reach_model import LatentClasses, class_weights, fit_classes
from .reach_query import Query, attrs_of, evaluate, parse_query
from .reach_sample import Sample

__all__ = ["Estimate", "query_stats", "merge_stats", "finish", "answer", "users_estimate", "exact_answer",
           "score_interval"]

Z95 = 1.959964  # two-sided 95% normal quantile
BIAS_FLOOR = 0.05  # the model is always allowed this much relative error (beyond the Poisson scatter)
BIAS_DEFAULT = 0.5  # ... and this much when the sample has too few cells to measure it on
BIAS_MAX = 4.0  # the largest relative bias measured (the direct estimate takes over long before)
BIAS_BINS = 24  # size classes of the bias measurement: shares 2^-1 ... 2^-23 and everything smaller
BIAS_MIN_CELLS = 30  # cells a size class pools at least (neighbouring classes join until then)
MAX_PAIR_CELLS = 1 << 16  # value combinations of one group of attributes the error measurement looks at, at most
ORDERS = 3  # the model's error is measured on single values, pairs and triples of values


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its two-sided interval at ``level`` and standard error."""

    estimate: float
    lower: float
    upper: float
    level: float = 0.95
    se: float = 0.0

    def __post_init__(self):
        assert self.lower <= self.estimate + 1e-6 and self.estimate <= self.upper + 1e-6, \
            f"bounds do not hold the estimate: {self.lower} <= {self.estimate} <= {self.upper}"

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval."""
        return self.lower <= value <= self.upper


def _q(query) -> Query:
    return query if isinstance(query, Query) else parse_query(query)


def _terms(sample: Sample) -> np.ndarray:
    """Per-row terms ``(6, n)``: 1, w, w(w-1), wi y, y^2 wi(wi-1), wi (``w = 1/pi``; ``wi`` the impressions
    weight, 0 where impressions are incomplete)."""
    def build():
        w, wi, y = sample.w_users, sample.w_imps, sample.imps.astype(np.float64)
        return np.ascontiguousarray(np.stack([np.ones_like(w), w, w * (w - 1), wi * y,
                                              y * y * wi * np.maximum(wi - 1, 0), wi]))
    return sample.cached("terms", build)


def _bin(share: float) -> int:
    """The size class of a synthetic estimate that is ``share`` of all users (``BIAS_BINS`` classes of a
    factor of 2 each, the last one everything smaller)."""
    if share <= 0:
        return BIAS_BINS - 1
    return int(min(BIAS_BINS - 1, max(0, math.floor(-math.log2(min(share, 1.0))))))


def _attrs(sample: Sample) -> list[str]:
    """The attributes the model covers: the strata's, never a data source's segments."""
    return [a for a in sorted(sample.cols) if not a.startswith("seg.")]


def _model(sample: Sample) -> LatentClasses:
    """The latent-class model the synthetic estimate uses (``state/reach_model.py``), built once per
    sample: the classes the partition's whole impression stream taught (the sample's block), with
    each class's users and impressions weighed on the sample's rows; a sample without them (built
    offline from a static population) gets the one-class model, independence."""
    def build():
        cl = sample.blocks[0][2]
        attrs = [a for a in _attrs(sample) if not cl or a in cl["theta"]]
        if cl and attrs:
            return class_weights({a: sample.cols[a] for a in attrs}, {a: cl["theta"][a] for a in attrs}, cl["share"],
                                 sample.w_users, sample.w_imps, sample.imps)
        return fit_classes({a: sample.cols[a] for a in attrs}, {a: len(sample.values[a]) for a in attrs},
                           sample.w_users, sample.w_imps * sample.imps, k=1)
    return sample.cached("model", build)


def _bias(sample: Sample, n_min: int) -> list[float]:
    """Per order (single values, pairs, triples of values) and size class (:func:`_bin` of the model's
    share), the sum of the model's squared relative error over the cells of that order and size, each
    less its sampling noise, then the number of cells: ``ORDERS`` blocks of ``[sum_0, ..., sum_{B-1},
    count_0, ..., count_{B-1}]`` (module docstring)."""
    def build():
        acc, cnt = np.zeros((ORDERS, BIAS_BINS)), np.zeros((ORDERS, BIAS_BINS))
        w = sample.w_users
        total = float(w.sum())
        if total > 0 and sample.n >= 2 * n_min:
            model = _model(sample)
            attrs = [a for a in _attrs(sample) if a in model.theta]
            for order in range(1, ORDERS + 1):
                for group in itertools.combinations(attrs, order):
                    sizes = [len(sample.values[a]) for a in group]
                    if int(np.prod(sizes)) > MAX_PAIR_CELLS:
                        continue
                    cs = [sample.cols[a].astype(np.int64) for a in group]
                    ok = np.logical_and.reduce([c >= 0 for c in cs])
                    code = np.ravel_multi_index([c[ok] for c in cs], sizes)
                    cells = int(np.prod(sizes))
                    d = np.bincount(code, weights=w[ok], minlength=cells)
                    v = np.bincount(code, weights=(w * (w - 1))[ok], minlength=cells)
                    s = model.cells(group)[tuple(slice(0, n) for n in sizes)].ravel()
                    held = np.ones((), dtype=bool)
                    for c, n in zip(cs, sizes):  # every value held in the sample, however rare the cell
                        held = np.logical_and.outer(held, np.bincount(c[c >= 0], minlength=n) > 0)
                    keep = (s > 0) & held.ravel()
                    if keep.any():
                        r = (d[keep] - s[keep]) / s[keep]
                        # the squared relative error less the direct's noise and the Poisson scatter of a
                        # real count around the model's expectation (the answer adds that one back per rule)
                        dev = r * r - v[keep] / s[keep] ** 2 - 1.0 / s[keep]
                        bins = np.clip(np.floor(-np.log2(s[keep] / total)), 0, BIAS_BINS - 1).astype(np.int64)
                        acc[order - 1] += np.bincount(bins, weights=dev, minlength=BIAS_BINS)
                        cnt[order - 1] += np.bincount(bins, minlength=BIAS_BINS)
        return np.concatenate([np.concatenate([a, c]) for a, c in zip(acc, cnt)]).tolist()
    return np.asarray(sample.cached(("bias", n_min), build))


def query_stats(sample: Sample, query, n_min: int = 30, composite: bool = True) -> dict:
    """Sums for ``query`` (text or parsed) over one sample, additive over partitions
    (:func:`merge_stats`). ``composite=False`` leaves out what the fall-back needs."""
    q = _q(query)
    terms = _terms(sample)
    tree = q.tree
    if sample.cols:
        mask = evaluate(tree, sample.cols, sample.vocab)
    else:  # users without any attribute: every row is the same
        none = {a: np.full(1, -1, dtype=np.int32) for a in q.attrs or ("_",)}
        mask = np.full(sample.n, bool(evaluate(tree, none, {})[0]))
    m = mask.astype(np.float64)
    d = terms[:5] @ m  # matched: rows, users, users variance, impressions, impressions variance
    out = {"n": sample.n, "n_min": n_min, "users_total": float(terms[1].sum()),
           "imps_total": float(terms[3].sum()), "mean_w": float(terms[1].sum() / max(sample.n, 1)),
           "wmax": float(sample.w_users.max()) if sample.n else 0.0,
           "exact": [float((terms[1] * m * (terms[2] == 0)).sum()), float((terms[3] * m * (terms[4] == 0)).sum())],
           "direct": d.tolist(), "bytes": sample.nbytes, "range": sample.info.get("range"),
           "budget_users": int(sample.info.get("budget_users", 0))}
    order = len(q.attrs)
    if composite and order and sample.n:
        # one model per block (a source partition: state/reach_sample.py), so that a merged sample
        # answers what its partitions' sums do
        total, var, bias = np.zeros(2), np.zeros(2), np.zeros(2 * BIAS_BINS * ORDERS)
        for i in range(len(sample.blocks)):
            blk = sample.block(i)
            if not blk.n:
                continue
            terms_b = _terms(blk)
            if blk.blocks[0][2] is None:  # independence fitted on the block itself: conjunctions only
                got = _independence(tree, blk, terms_b)
                if got is None:
                    break
                total += got[0]
                var += got[1]
            else:
                model = _model(blk)
                probs = _class_probs(tree, model, blk, terms_b)
                if probs is None:
                    break
                total += model.total([probs])
            bias += _bias(blk, n_min)
        else:
            out["model"] = total.tolist()
            out["model_var"] = var.tolist()
            out["order"] = order
            out["bias"] = bias.tolist()
            out["imps_sq"] = sample.cached("imps_sq", lambda: float(sample.w_imps @ (sample.imps.astype(np.float64) ** 2)))
    return out


def _independence(tree: tuple, sample: Sample, terms: np.ndarray):
    """The one-class model of a sample without stream classes: ``N prod_j (U_j / N)`` over the clauses
    of a conjunction on distinct attributes (each clause measured on the whole sample), users and
    impressions, and the variance its clause shares bring (delta method); None for any other rule (a
    single clause: the model would be the direct estimate over again)."""
    clauses = list(tree[1]) if tree[0] == "and" else []
    names = [attrs_of(c) for c in clauses]
    if len(clauses) < 2 or sum(len(x) for x in names) != len(set().union(*names)):
        return None
    n_tot, i_tot = float(terms[1].sum()), float(terms[3].sum())
    su, si, rel_u, rel_i = n_tot, i_tot, 0.0, 0.0
    for c in clauses:
        cu, cvu, ci, cvi = terms[1:5] @ evaluate(c, sample.cols, sample.vocab).astype(np.float64)
        su *= cu / n_tot if n_tot > 0 else 0.0
        si *= ci / i_tot if i_tot > 0 else 0.0
        rel_u += cvu / cu ** 2 if cu > 0 else 0.0
        rel_i += cvi / ci ** 2 if ci > 0 else 0.0
    return np.array([su, si]), np.array([su * su * rel_u, si * si * rel_i])


def _class_probs(node: tuple, model: LatentClasses, sample: Sample, terms: np.ndarray) -> np.ndarray | None:
    """Each class's share of users a (sub)tree matches under the model, or None where the model cannot
    say: an ``and``/``or`` whose parts read a common attribute are not independent inside a class. A
    clause on an attribute the model does not cover counts as independent of the rest (its share)."""
    kind = node[0]
    if kind == "all":
        return np.ones(model.k)
    if kind == "in":
        a = node[1]
        if a in model.theta:
            codes = np.r_[np.arange(len(sample.values.get(a, []))), -1].astype(np.int32)
            return model.clause(a, evaluate(node, {a: codes}, sample.vocab))
        n_tot = float(terms[1].sum())
        col = sample.cols.get(a)
        share = float(terms[1] @ evaluate(node, sample.cols, sample.vocab)) / n_tot if col is not None and n_tot > 0 else 0.0
        return np.full(model.k, share)
    if kind == "not":
        p = _class_probs(node[1], model, sample, terms)
        return None if p is None else 1.0 - p
    names = [attrs_of(c) for c in node[1]]
    if sum(len(x) for x in names) != len(set().union(*names)):
        return None
    parts = [_class_probs(c, model, sample, terms) for c in node[1]]
    if any(p is None for p in parts):
        return None
    if kind == "and":
        return np.prod(parts, axis=0)
    return 1.0 - np.prod([1.0 - p for p in parts], axis=0)


def merge_stats(parts: list[dict]) -> dict:
    """Add the sums of several partitions or workers (disjoint users)."""
    if not parts:
        return {"n": 0, "n_min": 30, "users_total": 0.0, "imps_total": 0.0, "mean_w": 0.0, "wmax": 0.0,
                "exact": [0.0, 0.0], "direct": [0.0] * 5, "bytes": 0, "range": None, "budget_users": 0}
    add = lambda xs: [float(sum(v)) for v in zip(*xs)]  # noqa: E731
    n = sum(p["n"] for p in parts)
    ranges = [p["range"] for p in parts if p.get("range")]
    out = {"n": n, "n_min": parts[0]["n_min"], "users_total": sum(p["users_total"] for p in parts),
           "imps_total": sum(p["imps_total"] for p in parts), "wmax": max(p["wmax"] for p in parts),
           "exact": add([p["exact"] for p in parts]), "direct": add([p["direct"] for p in parts]),
           "bytes": sum(p["bytes"] for p in parts), "budget_users": sum(p.get("budget_users", 0) for p in parts),
           "range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None}
    out["mean_w"] = out["users_total"] / n if n else 0.0
    if all("model" in p for p in parts):
        out["model"] = add([p["model"] for p in parts])
        out["imps_sq"] = sum(p["imps_sq"] for p in parts)
        out["model_var"] = add([p["model_var"] for p in parts])
        out["order"] = parts[0]["order"]
        out["bias"] = add([p["bias"] for p in parts])
    return out


def score_interval(est: float, var: float, w0: float, z: float = Z95) -> tuple[float, float]:
    """The score interval of a total ``est`` with variance ``var`` on its effective number of matches
    (module docstring); ``w0``: the largest weight, for the bound of no match at all.

    >>> [round(x, 1) for x in score_interval(100.0, 100.0, 1.0)]  # 100 matches of weight 1: 100 +- 1.96 * 10
    [82.2, 121.6]
    """
    if est <= 0:
        return 0.0, z * z * max(w0 - 1.0, 0.0)  # w0 - 1 unseen users per seen one (0 in a census)
    if var <= 1e-12:
        return est, est
    m, scale = est * est / var, var / est
    half = z * np.sqrt(m + z * z / 4)
    return float(scale * max(m + z * z / 2 - half, 0.0)), float(scale * (m + z * z / 2 + half))


def _bias_c(stats: dict, share: float, order: int = 2) -> float:
    """The model's relative error at the size of the query's model estimate (``share`` of all users) and
    its ``order`` (attributes read; triples stand for more): measured on the cells of that order of
    about that size, the classes next to it pooled until at least ``BIAS_MIN_CELLS`` cells are in."""
    b = stats.get("bias", [])
    if len(b) != 2 * BIAS_BINS * ORDERS:
        return BIAS_DEFAULT
    at = 2 * BIAS_BINS * (min(max(order, 1), ORDERS) - 1)
    acc, cnt = np.asarray(b[at:at + BIAS_BINS]), np.asarray(b[at + BIAS_BINS:at + 2 * BIAS_BINS])
    k = _bin(share)
    for r in range(BIAS_BINS):
        lo, hi = max(0, k - r), min(BIAS_BINS, k + r + 1)
        if cnt[lo:hi].sum() >= BIAS_MIN_CELLS or (lo == 0 and hi == BIAS_BINS):
            break
    n = float(cnt[lo:hi].sum())
    if n < BIAS_MIN_CELLS:  # too few cells of this order to tell the model's error: barely borrow
        return BIAS_DEFAULT
    return float(min(BIAS_MAX, max(BIAS_FLOOR, np.sqrt(max(float(acc[lo:hi].sum()) / n, 0.0)))))


def _composite(direct: float, v_dir: float, synth: float, v_syn: float, unit: float, c: float):
    """Mix a direct and a synthetic estimate by their mean squared errors; (estimate, its MSE, phi)."""
    v_d = max(v_dir, synth * max(unit - 1.0, 0.0))  # no match is not certainty
    mse_s = max((direct - synth) ** 2 - v_d, (c * synth) ** 2 + v_syn)
    phi = mse_s / (mse_s + v_d) if mse_s + v_d > 0 else 1.0
    return phi * direct + (1 - phi) * synth, phi * phi * v_d + (1 - phi) ** 2 * mse_s, phi


def _parts(stats: dict) -> tuple[tuple, tuple, bool, float]:
    """Users (estimate, variance, exact part) and impressions the same, whether the fall-back moved
    the answer, and the synthetic share."""
    m, u, vu, i, vi = stats["direct"]
    ex_u, ex_i = stats["exact"]
    users, imps = (u, vu, ex_u), (i, vi, ex_i)
    model = stats.get("model")
    n_tot, i_tot = stats["users_total"], stats["imps_total"]
    if not model or n_tot <= 0 or vu <= 0 and m > 0:
        return users, imps, False, 0.0
    su, si = model
    order = stats["order"]
    c = _bias_c(stats, su / n_tot, order)
    if order > ORDERS:  # measured up to triples (two joins); each further join a like factor of spread
        c = float(np.sqrt((1 + c * c) ** ((order - 1) / (ORDERS - 1)) - 1))
    mean_imps = i_tot / n_tot
    # the model gives a population's expected count; the real one scatters around it by a Poisson
    # count's variance (users: su; impressions: si times the users' mean square over mean impressions)
    mvu, mvi = stats.get("model_var", (0.0, 0.0))
    eu, mu, phi_u = _composite(u, vu, su, su + mvu, stats["mean_w"], c)
    eu = max(eu, m)  # the users the sample saw are there
    imps_sq = stats.get("imps_sq", 0.0) / i_tot if i_tot > 0 else 1.0
    ei, mi, phi_i = _composite(i, vi, si, si * imps_sq + mvi, stats["mean_w"] * max(mean_imps, 1.0), c)
    moved = phi_u < 0.999 or phi_i < 0.999
    return (eu, mu, 0.0), (ei, mi, 0.0), moved, round(1 - phi_u, 4)


def users_estimate(stats: dict) -> Estimate:
    """The users estimate of pooled sums."""
    return _estimates(stats)[0]


def _estimates(stats: dict) -> tuple[Estimate, Estimate, bool, float]:
    (u, vu, ex_u), (i, vi, ex_i), moved, share = _parts(stats)
    wmax = stats["wmax"]
    imp_mean = stats["imps_total"] / stats["users_total"] if stats["users_total"] > 0 else 1.0
    seen = stats["direct"][0]
    lo_u, hi_u = score_interval(u - ex_u, vu, wmax)
    lo_i, hi_i = score_interval(i - ex_i, vi, 1.0 + (wmax - 1.0) * max(imp_mean, 1.0))
    eu = Estimate(round(u, 1), round(max(ex_u + lo_u, min(seen, u)), 1), round(ex_u + hi_u, 1),
                  se=round(float(np.sqrt(vu)), 2))
    ei = Estimate(round(i, 1), round(ex_i + lo_i, 1), round(ex_i + hi_i, 1), se=round(float(np.sqrt(vi)), 2))
    return eu, ei, moved, share


def finish(stats: dict, query_text: str | None = None) -> dict:
    """The answer from pooled sums: users and impressions with 95% intervals, the fall-back's share,
    the event-time range covered and the bytes the sample takes."""
    eu, ei, moved, share = _estimates(stats)
    rng = stats.get("range")
    out = {"users": eu.estimate, "users_ci": [eu.lower, eu.upper], "users_se": eu.se,
           "impressions": ei.estimate, "impressions_ci": [ei.lower, ei.upper], "impressions_se": ei.se,
           "level": eu.level, "fallback": moved, "fallback_share": share,
           "matched_sample_users": int(stats["direct"][0]), "sample_users": int(stats["n"]),
           "budget_users": int(stats.get("budget_users", 0)), "sample_bytes": int(stats.get("bytes", 0)),
           "range": {"from": rng[0], "to": rng[1], "seconds": round(rng[1] - rng[0], 3)} if rng else None}
    if query_text is not None:
        out = {"query": query_text, **out}
    return out


def answer(sample: Sample, query, n_min: int = 30, composite: bool = True) -> dict:
    """The answer of one sample (a partition, or several merged) to ``query``."""
    q = _q(query)
    return finish(query_stats(sample, q, n_min, composite), q.text)


def exact_answer(cols: dict, values: dict, imps: np.ndarray, query) -> dict:
    """The true users and impressions of ``query`` over a whole population (codes into ``values``)."""
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    m = evaluate(_q(query).tree, cols, vocab)
    return {"users": int(m.sum()), "impressions": float(imps[m].sum())}
