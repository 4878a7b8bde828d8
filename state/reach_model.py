"""A latent-class model of a reach population: a mixture of classes inside which the attributes are
independent; what the model-assisted estimate borrows from (``state/reach_estimate.py``).

Public surface: ``LatentClasses`` (a fitted model), ``fit_classes`` (EM on a weighted sample),
``ClassStream`` (the classes learned online from a partition's whole impression stream) and
``class_weights`` (each streamed class's users, weighed on a sample's rows).

**Why.** A rule that few sampled users match has a noisy direct estimate. The old synthetic estimate,
``N prod_j share_j``, borrows from each clause's share over the whole sample, and is right only when
the clauses are independent; in a population whose attributes are tied (by affluence, by segment)
rare combinations are far from independent, so it could barely be used there. A latent-class model
(a finite mixture of products of categoricals; Lazarsfeld's latent structure analysis, fitted by EM
as in Dempster, Laird and Rubin 1977) keeps the dependence the classes explain: inside class ``k``
the attributes are independent with value shares ``theta[a][v, k]``, and a conjunction of clauses on
distinct attributes reaches ``sum_k W_k prod_j P_k(C_j)`` users (``W_k`` the class's users). With one
class it is the independence model.

**Fit.** EM on the sampled rows weighted by their ``1/pi`` (a pseudo-likelihood, so the model
describes the population and not the sample's design). The value shares are smoothed toward the
attribute's overall shares by a Dirichlet prior worth ``alpha`` sampled users (MAP EM): a value seen
in one row of one class does not make that class certain of it. A missing attribute is one more
value (the last row of ``theta[a]``), so ``not a = x`` sums the shares of every other value and the
missing one. Impressions: class ``k`` holds ``I_k`` of them, and a rule's impressions are
``sum_k I_k prod_j P_k(C_j)`` (impressions independent of the attributes inside a class).

The start is random but seeded, so a sample always gets the same model.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> seg = rng.integers(0, 2, 4000)  # two segments: a and b agree inside each one
>>> cols = {"a": np.where(rng.random(4000) < 0.9, seg, 1 - seg), "b": np.where(rng.random(4000) < 0.9, seg, 1 - seg)}
>>> m = fit_classes(cols, {"a": 2, "b": 2}, np.ones(4000), np.ones(4000), k=2)
>>> cells = m.cells(("a", "b"))  # users per (a, b) value pair; the last row and column: missing
>>> round(float(cells[0, 0] / 4000), 2), round(float(cells[0, 1] / 4000), 2)  # independence says 0.25, 0.25
(0.41, 0.09)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LatentClasses", "fit_classes", "class_weights", "ClassStream"]


@dataclass(frozen=True)
class LatentClasses:
    """A fitted mixture: ``users[k]`` and ``imps[k]`` the class's weighted users and impressions,
    ``theta[a]`` of shape ``(V_a + 1, K)`` the value shares of attribute ``a`` in each class (the last
    row: missing)."""

    users: np.ndarray
    imps: np.ndarray
    theta: dict

    @property
    def k(self) -> int:
        return len(self.users)

    def clause(self, attr: str, truth: np.ndarray) -> np.ndarray:
        """``P_k(C)`` for a clause on ``attr`` that holds for the codes where ``truth`` (length
        ``V + 1``, the last entry: missing) is true."""
        return truth.astype(np.float64) @ self.theta[attr]

    def total(self, probs: list) -> tuple[float, float]:
        """Users and impressions of a conjunction, given each clause's ``P_k`` (:meth:`clause`; a
        clause the model does not know may pass a constant)."""
        p = np.ones(self.k)
        for x in probs:
            p = p * x
        return float(self.users @ p), float(self.imps @ p)

    def cells(self, attrs: tuple) -> np.ndarray:
        """Predicted users of every combination of values of ``attrs`` (1 to 3 attributes), an array
        with one axis per attribute (``V_a + 1`` long: the last, missing)."""
        t = [self.theta[a] for a in attrs]
        if len(t) == 1:
            return t[0] @ self.users
        if len(t) == 2:
            return (t[0] * self.users) @ t[1].T
        return np.einsum("ak,bk,ck,k->abc", t[0], t[1], t[2], self.users)


def fit_classes(cols: dict, nvalues: dict, w: np.ndarray, y: np.ndarray, k: int, alpha: float = 2.0,
                iters: int = 200, tol: float = 1e-6, seed: int = 0) -> LatentClasses:
    """EM for a ``k``-class model of rows ``cols[a]`` (codes ``0 .. nvalues[a] - 1``, -1 missing)
    weighted by ``w`` (``1/pi``); ``y`` each row's weighted impressions (``w_imps * imps``). ``alpha``:
    the prior's weight in sampled users (module docstring)."""
    resp, users, theta = _em(cols, nvalues, w, k, alpha, iters, tol, seed)
    return LatentClasses(users, resp.T @ np.asarray(y, dtype=np.float64), theta)


def _em(cols: dict, nvalues: dict, w, k: int, alpha: float, iters: int, tol: float, seed: int):
    """:func:`fit_classes`' EM: each row's class responsibilities, the classes' users and value shares."""
    w = np.asarray(w, dtype=np.float64)
    n = len(w)
    attrs = [a for a in cols if nvalues[a] > 0]
    codes = {a: np.where(cols[a] < 0, nvalues[a], cols[a]).astype(np.int64) for a in attrs}
    total = float(w.sum())
    prior = alpha * total / max(n, 1)  # alpha rows of the mean weight
    marg = {a: np.bincount(codes[a], weights=w, minlength=nvalues[a] + 1) / total for a in attrs}
    resp = np.random.default_rng(seed).dirichlet(np.ones(k), n) if k > 1 else np.ones((n, 1))
    users, theta = _m_step(codes, nvalues, w, resp, prior, marg)
    last = -np.inf
    for _ in range(iters if k > 1 and attrs else 0):
        log = np.log(np.maximum(users, 1e-300) / total) + sum(np.log(theta[a][codes[a]]) for a in attrs)
        top = log.max(1, keepdims=True)
        lik = np.exp(log - top)
        norm = lik.sum(1, keepdims=True)
        resp = lik / norm
        users, theta = _m_step(codes, nvalues, w, resp, prior, marg)
        ll = float(w @ (np.log(norm[:, 0]) + top[:, 0])) / total
        if ll - last < tol:
            break
        last = ll
    return resp, users, theta


def _m_step(codes: dict, nvalues: dict, w: np.ndarray, resp: np.ndarray, prior: float, marg: dict):
    """The classes' users and smoothed value shares given each row's class responsibilities."""
    k = resp.shape[1]
    wr = resp * w[:, None]
    users = wr.sum(0)
    theta = {}
    for a, c in codes.items():
        v = nvalues[a] + 1
        counts = np.bincount((c[:, None] * k + np.arange(k)).ravel(), weights=wr.ravel(),
                             minlength=v * k).reshape(v, k)
        theta[a] = (counts + prior * marg[a][:, None]) / (users + prior)
    return users, theta


def class_weights(cols: dict, theta: dict, share: np.ndarray, w: np.ndarray, wi: np.ndarray, y: np.ndarray,
                  iters: int = 50, prior_rows: float = 2.0) -> LatentClasses:
    """Each class's users and impressions in a weighted sample, given what the stream learned: the
    classes' value shares ``theta`` and their ``share`` of the impressions. A class's impressions are
    its share of the sample's estimate of all impressions (``sum wi y``); its users are those over its
    users' mean impressions, measured on the sample's rows (``wi``: the impressions weight, 0 where a
    user's impressions are incomplete), with each row's class from ``theta``. A ratio: its error
    comes from the spread of impressions per user, not from how many of a class's users the sample
    happened to draw, so it is not the direct estimate over again. ``prior_rows`` sampled users of
    the overall mean steady a class the sample barely holds."""
    w, wi, y = (np.asarray(x, dtype=np.float64) for x in (w, wi, y))
    share = np.asarray(share, dtype=np.float64)
    k = len(share)
    logt = np.zeros((len(w), k))
    for a, t in theta.items():
        c = np.where(cols[a] < 0, len(t) - 1, cols[a])
        logt += np.log(np.maximum(np.asarray(t, dtype=np.float64), 1e-300))[c]
    imps_total = float(wi @ y)
    mean = imps_total / max(float(wi.sum()), 1e-300)
    imps = share / max(float(share.sum()), 1e-300) * imps_total
    m0 = prior_rows * float(w.sum()) / max(len(w), 1)
    users = imps / max(mean, 1e-300)
    for _ in range(iters):
        log = logt + np.log(np.maximum(users, 1e-300))
        resp = np.exp(log - log.max(1, keepdims=True))
        resp /= resp.sum(1, keepdims=True)
        mu = (resp.T @ (wi * y) + m0 * mean) / (resp.T @ wi + m0)
        users = imps / np.maximum(mu, 1e-300)
    return LatentClasses(users, imps, dict(theta))


UNSEEN = -2  # a value the vocabulary has no code for: the attribute is left out of that row


class ClassStream:
    """The latent classes of one partition's impression stream, learned online (module docstring)."""

    def __init__(self, classes: int = 16, max_values: int = 256, half_life_s: float = 3.5 * 86400,
                 chunk: int = 1024, alpha: float = 0.5, seed: int = 0):
        self.k, self.max_values, self.half_life_s = max(1, int(classes)), int(max_values), float(half_life_s)
        self.chunk, self.alpha, self.seed = int(chunk), float(alpha), int(seed)
        self.stats: dict[str, np.ndarray] = {}  # attr -> (rows, K): row 0 missing, row c + 1 code c
        self.mass = np.zeros(self.k)
        self.rows: list[dict] = []
        self.t: float | None = None
        self.counts = {"impressions": 0, "chunks": 0, "attrs_left_out": 0}

    def add(self, codes: dict, ts: float) -> None:
        """One impression: ``codes[attr]`` its value's code (``UNSEEN``: no code yet)."""
        self.rows.append(codes)
        if len(self.rows) >= self.chunk:
            self.flush(ts)

    def forget(self, attr: str, code: int | None = None) -> None:
        """The vocabulary gave ``attr``'s value ``code`` (None: the whole name) to another."""
        if attr in self.stats:
            if code is None:
                del self.stats[attr]
            elif code + 1 < len(self.stats[attr]):
                self.stats[attr][code + 1] = 0.0

    def flush(self, ts: float | None = None) -> None:
        """Fold the buffered impressions into the class statistics (one E-step each); the first chunk
        starts the classes with a batch EM of its own."""
        rows, self.rows = self.rows, []
        if not rows:
            return
        if ts is not None:
            if self.t is not None and ts > self.t and self.half_life_s > 0:
                f = 0.5 ** ((ts - self.t) / self.half_life_s)
                self.mass *= f
                for s in self.stats.values():
                    s *= f
            self.t = ts if self.t is None else max(self.t, ts)
        n = len(rows)
        names = sorted({a for r in rows for a in r} | set(self.stats))
        self.counts["impressions"] += n
        if not names:  # impressions without attributes say nothing about the classes
            return
        cols = {}
        for a in names:
            c = np.fromiter((r.get(a, -1) for r in rows), dtype=np.int64, count=n)
            top = int(c.max(initial=-1))
            if top >= self.max_values:
                c[c >= self.max_values] = UNSEEN
                self.counts["attrs_left_out"] += 1
                top = self.max_values - 1
            cols[a] = c + 1  # row 0: missing; UNSEEN becomes -1
            s = self.stats.get(a)
            need = top + 2
            if s is None:
                self.stats[a] = np.zeros((min(max(need, 8), self.max_values + 1), self.k))
            elif len(s) < need:
                grow = min(max(need, 2 * len(s)), self.max_values + 1)  # missing and max_values codes
                self.stats[a] = np.vstack([s, np.zeros((grow - len(s), self.k))])
        if self.mass.sum() <= 0:
            resp = self._warm_start(cols, n)
        else:
            theta = self._theta()
            log = np.log(self.mass / self.mass.sum())[None, :].repeat(n, 0)
            for a, c in cols.items():
                seen = c >= 0
                log[seen] += np.log(theta[a])[c[seen]]  # the log table once, then a gather
            resp = np.exp(log - log.max(1, keepdims=True))
            resp /= resp.sum(1, keepdims=True)
        self.mass += resp.sum(0)
        for a, c in cols.items():
            seen = c >= 0
            s = self.stats[a]
            s += np.bincount((c[seen][:, None] * self.k + np.arange(self.k)).ravel(), weights=resp[seen].ravel(),
                             minlength=len(s) * self.k).reshape(len(s), self.k)
        self.counts["chunks"] += 1

    def _theta(self) -> dict:
        """Each attribute's value shares per class, smoothed toward its overall shares."""
        out = {}
        for a, s in self.stats.items():
            tot = s.sum(0)
            marg = s.sum(1) / max(float(tot.sum()), 1e-300)
            out[a] = (s + self.alpha * marg[:, None]) / (tot + self.alpha)
            out[a] = np.maximum(out[a], 1e-12)
        return out

    def _warm_start(self, cols: dict, n: int) -> np.ndarray:
        nv = {a: int(c.max(initial=0)) + 1 for a, c in cols.items()}
        seen = {a: np.where(c >= 0, c, 0) for a, c in cols.items()}  # an unseen value counts as missing here
        return _em({a: s - 1 for a, s in seen.items()}, {a: nv[a] - 1 for a in seen}, np.ones(n), self.k,
                   self.alpha, 200, 1e-6, self.seed)[0]

    def share(self) -> np.ndarray:
        """Each class's share of the impressions (recent ones weigh more)."""
        self.flush()
        return self.mass / max(float(self.mass.sum()), 1e-300)

    def theta(self, values: dict) -> dict:
        """Value shares per class of the attributes in ``values`` (each ``(len(values[a]) + 1, K)``,
        the last row missing: :class:`LatentClasses`' layout); an attribute the stream has not seen,
        or with more than ``max_values`` values, is left out."""
        self.flush()
        th = self._theta()
        out = {}
        for a, vals in values.items():
            if a not in th or len(vals) > self.max_values:  # values past the cap were never counted
                continue
            t = th[a]
            v = len(vals)
            rows = np.zeros((v + 1, self.k))
            m = min(v, len(t) - 1)
            rows[:m] = t[1:m + 1]
            rows[v] = t[0]
            out[a] = rows / rows.sum(0, keepdims=True)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the statistics (what the frozen sample carries is the same size in float32)."""
        return int(self.mass.nbytes + sum(s.nbytes for s in self.stats.values()))
