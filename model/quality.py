"""Data-source quality: how well a source's segment labels match aggregate-only ground truth.

Public surface: ``QualityConfig``, ``fit_ls``, ``bootstrap_ls``, ``fit_em``, ``em_intervals``,
``report_covariance``, ``sandwich_ci``, ``param_bootstrap_ls``, ``fit_gls``, ``campaign_table``, ``assess``, ``adjust_reach``,
``METHODS``, ``VERDICTS``.

The model (papers.md section 5). For a source ``s`` and segment ``g``, campaign ``c`` has a labelled
fraction ``q_c`` (its impressions whose user ``s`` puts in ``g``; ``state/quality_counts.py``) and a
truth report: the measured true fraction ``p_c`` from ``n_c`` measured impressions. With
``a = P(truly in | labelled in)`` and ``b = P(truly in | labelled out)``, constant across campaigns,

    p_c = a q_c + b (1 - q_c),  a, b in [0, 1].

a and b are identifiable only when q_c varies across campaigns. Three fits:

* ``ls``: impression-weighted least squares, min sum_c n_c (p_c - a q_c - b (1 - q_c))^2 over the box
  [0, 1]^2 (exact: the unconstrained 2x2 solution when inside, else the best of the four edges, each a
  clipped 1-D solution), with percentile intervals from a bootstrap over campaigns (vectorized: every
  replicate's weighted sums are one matrix product).
* ``em``: the binomial likelihood k_c ~ Binomial(n_c, a q_c + b (1 - q_c)) maximized by EM (the latent
  split of each campaign's measured in/out counts between labelled and unlabelled impressions; every
  step stays in the box), with Wald intervals from the Fisher information inflated by the Pearson
  dispersion (>= 1).
* ``gls``: generalized least squares with the reports' covariance under the model (below).

**Shared users.** Both the bootstrap and the binomial treat campaigns as independent, but campaigns
share users and each user is truly in the segment or not once, for every campaign they saw: the
reports are correlated, and a heavy user moves several at once. :func:`report_covariance` writes that
covariance from the pair counts ``sum_u n_uc n_uc'`` the counting keeps; ``ls`` and ``em`` get sandwich
intervals from it (``intervals.users``), ``ls`` also a parametric bootstrap that draws the reports
from it (``intervals.users_bootstrap``: box-respecting, asymmetric near 0 and 1), and ``gls`` uses it
as its weight. On generated logs the campaign bootstrap and the binomial Wald interval cover the true
a, b about 60% of the time at 95% nominal, the shared-user intervals 90-94% (``loopline bench
quality``). The report's headline is the ``ls`` fit with its parametric shared-user bootstrap interval
(the campaign bootstrap when the pair counts are missing, or incomplete because ``max_pairs`` bit).

Similarity figures: Pearson correlation of q_c and p_c (plain and impression-weighted), implied
precision = a, recall = P(labelled | truly in) = a qbar / (a qbar + b (1 - qbar)) at the
impression-weighted mean labelled fraction qbar, lift = a / b (null when b = 0), and the gap a - b;
intervals of recall and lift from the corners of the a and b intervals.

Verdict (from the headline interval of the gap at ``coverage``): ``good`` (lower bound >=
``good_gap``), ``weak`` (gap > 0 but not good), ``uninformative`` (the interval holds 0),
``adversarial`` (upper bound < 0: the label points away from the segment); and, without a fit,
``no_truth`` (no truth report for the segment), ``too_few_campaigns``, ``labels_nobody``,
``labels_everyone``, ``no_spread`` (q_c does not vary enough to separate a from b). Sources are ranked
by the gap (the slope of p on q).

>>> import numpy as np
>>> q = np.array([0.2, 0.5, 0.8]); p = 0.9 * q + 0.1 * (1 - q)
>>> a, b = fit_ls(q, p, np.ones(3)); (round(a, 6), round(b, 6))
(0.9, 0.1)
>>> a, b, _ = fit_em(q, p, np.full(3, 1000.0)); (round(a, 4), round(b, 4))
(0.9, 0.1)
>>> r = adjust_reach(1000, (900, 1100), 0.8, (0.8, 0.8))
>>> r["users"], r["users_ci"]
(800.0, [720.0, 880.0])
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from loopline.errors import ConfigError
from loopline.settings import setting
from loopline.state.quality_counts import BOUND_COUNTERS

__all__ = ["QualityConfig", "fit_ls", "bootstrap_ls", "fit_em", "em_intervals", "report_covariance", "sandwich_ci",
           "param_bootstrap_ls", "fit_gls", "campaign_table", "assess", "adjust_reach", "METHODS", "VERDICTS"]

METHODS = ("ls", "em", "gls")
VERDICTS = ("good", "weak", "uninformative", "adversarial", "no_truth", "too_few_campaigns", "labels_nobody",
            "labels_everyone", "no_spread")


@dataclass(frozen=True)
class QualityConfig:
    """Settings of the quality fit; a bad one raises ConfigError naming the field."""

    coverage: float = setting(0.95, "coverage of every interval")
    bootstrap: int = setting(400, "ls bootstrap replicates (percentile intervals)")
    seed: int = 0  # of the bootstrap resampling
    min_impressions: int = setting(50, "a campaign's impressions in the log needed for its q_c to count")
    min_report_impressions: int = 30  # and a truth report measured on at least this many impressions
    # two parameters need spare campaigns
    min_campaigns: int = setting(4, "usable campaigns per (source, segment) needed for a fit")
    min_spread: float = 0.02  # impression-weighted sd of q_c below which a and b cannot be separated
    good_gap: float = 0.3  # verdict "good" when the gap a - b is at least this with `coverage`
    em_max_iter: int = 5000
    em_tol: float = 1e-10  # stop when a and b move less than this in one EM step

    def __post_init__(self):
        if not (isinstance(self.coverage, (int, float)) and 0.5 <= self.coverage < 1):
            raise ConfigError(f"coverage: must be in [0.5, 1), got {self.coverage!r}")
        for name, lo in (("bootstrap", 20), ("min_impressions", 1), ("min_report_impressions", 1),
                         ("min_campaigns", 3), ("em_max_iter", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}: must be an integer >= {lo}, got {v!r}")
        for name in ("min_spread", "good_gap", "em_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf((1 + self.coverage) / 2)


# -- least squares -----------------------------------------------------------------------------------
def _check(q, p, w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q, p, w = (np.asarray(x, dtype=float) for x in (q, p, w))
    if not (q.shape == p.shape == w.shape and q.ndim == 1):
        raise ConfigError(f"q: q, p and weights must be 1-D of one length, got {q.shape}, {p.shape}, {w.shape}")
    for name, x in (("q", q), ("p", p)):
        if not np.all(np.isfinite(x)) or np.any(x < 0) or np.any(x > 1):
            raise ConfigError(f"{name}: fractions must lie in [0, 1]")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError("weights: must be finite and >= 0")
    return q, p, w


def _box_ls(sqq, sqr, srr, sqp, srp) -> tuple[float, float]:
    """argmin over [0,1]^2 of a^2 sqq + 2ab sqr + b^2 srr - 2a sqp - 2b srp (the weighted LS objective
    less its constant), from the weighted sums."""
    def f(a, b):
        return a * a * sqq + 2 * a * b * sqr + b * b * srr - 2 * a * sqp - 2 * b * srp

    det = sqq * srr - sqr * sqr
    if det > 1e-12 * max(sqq * srr, 1e-300):
        a = (srr * sqp - sqr * srp) / det
        b = (sqq * srp - sqr * sqp) / det
        if 0 <= a <= 1 and 0 <= b <= 1:
            return float(a), float(b)
    cands = []
    for a in (0.0, 1.0):
        cands.append((a, min(1.0, max(0.0, (srp - a * sqr) / srr)) if srr > 0 else 0.0))
    for b in (0.0, 1.0):
        cands.append((min(1.0, max(0.0, (sqp - b * sqr) / sqq)) if sqq > 0 else 0.0, b))
    a, b = min(cands, key=lambda ab: f(*ab))
    return float(a), float(b)


def _sums(q, p, w) -> np.ndarray:
    """Per campaign, the five terms whose weighted sums define the LS problem: (C, 5)."""
    r = 1 - q
    return np.stack([w * q * q, w * q * r, w * r * r, w * q * p, w * r * p], axis=1)


def fit_ls(q, p, w) -> tuple[float, float]:
    """Constrained weighted least squares: (a, b) in [0, 1]^2 minimizing sum w (p - a q - b (1-q))^2."""
    q, p, w = _check(q, p, w)
    return _box_ls(*_sums(q, p, w).sum(axis=0))


def bootstrap_ls(q, p, w, replicates: int = 400, seed: int = 0) -> np.ndarray:
    """``(replicates, 2)`` LS fits on campaigns resampled with replacement."""
    q, p, w = _check(q, p, w)
    rng = np.random.default_rng(seed)
    n = q.size
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)  # (B, C)
    return _solve_many(counts @ _sums(q, p, w))  # (B, 5) sums -> (B, 2)


def _solve_many(s: np.ndarray) -> np.ndarray:
    """Box-constrained LS for each row of weighted sums ``(B, 5)``: vectorized where the unconstrained
    solution lies in the box, exact edge search for the others."""
    sqq, sqr, srr, sqp, srp = s.T
    det = sqq * srr - sqr * sqr
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (srr * sqp - sqr * srp) / det
        b = (sqq * srp - sqr * sqp) / det
    ok = (det > 1e-12 * np.maximum(sqq * srr, 1e-300)) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
    out = np.stack([a, b], axis=1)
    bad = ~ok
    if bad.any():  # outside the box or singular: the best of the four edges (as _box_ls, vectorized)
        sqq, sqr, srr, sqp, srp = s[bad].T
        with np.errstate(divide="ignore", invalid="ignore"):
            def along_b(a_):  # a fixed on an edge: the clipped best b
                return np.where(srr > 0, np.clip((srp - a_ * sqr) / srr, 0, 1), 0.0)

            def along_a(b_):
                return np.where(sqq > 0, np.clip((sqp - b_ * sqr) / sqq, 0, 1), 0.0)
            zero, one = np.zeros_like(sqq), np.ones_like(sqq)
            cands = [(zero, along_b(0.0)), (one, along_b(1.0)), (along_a(0.0), zero), (along_a(1.0), one)]
        obj = np.stack([ca * ca * sqq + 2 * ca * cb * sqr + cb * cb * srr - 2 * ca * sqp - 2 * cb * srp
                        for ca, cb in cands])  # (4, bad)
        best = np.argmin(obj, axis=0)
        ca = np.stack([c[0] for c in cands])[best, np.arange(best.size)]
        cb = np.stack([c[1] for c in cands])[best, np.arange(best.size)]
        out[bad] = np.stack([ca, cb], axis=1)
    return out


# -- binomial likelihood by EM -------------------------------------------------------------------------
def fit_em(q, p, n, max_iter: int = 5000, tol: float = 1e-10) -> tuple[float, float, int]:
    """Maximum-likelihood (a, b) of k_c = p_c n_c ~ Binomial(n_c, a q_c + b (1 - q_c)) by EM.

    Latent: of the k_c measured-in impressions, x_c were labelled; of the n_c - k_c measured-out, y_c.
    E-step: x_c = k_c a q_c / (a q_c + b r_c), y_c = (n_c - k_c) (1-a) q_c / ((1-a) q_c + (1-b) r_c);
    M-step: a = sum x / sum (x + y), b = sum (k - x) / sum (n - x - y). Starts at a = b = the pooled
    fraction. Returns (a, b, iterations)."""
    q, p, n = _check(q, p, n)
    k, r = p * n, 1 - q
    a = b = float(k.sum() / n.sum()) if n.sum() > 0 else 0.5
    a, b = min(max(a, 1e-3), 1 - 1e-3), min(max(b, 1e-3), 1 - 1e-3)  # off the boundary, or EM sticks there
    it = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for it in range(1, max_iter + 1):
            pin = a * q + b * r
            pout = (1 - a) * q + (1 - b) * r
            x = np.where(pin > 0, k * a * q / pin, 0.0)
            y = np.where(pout > 0, (n - k) * (1 - a) * q / pout, 0.0)
            lab, unl = (x + y).sum(), (n - x - y).sum()
            a2 = float(x.sum() / lab) if lab > 0 else a
            b2 = float((k - x).sum() / unl) if unl > 0 else b
            done = abs(a2 - a) < tol and abs(b2 - b) < tol
            a, b = a2, b2
            if done:
                break
    return a, b, it


def em_intervals(q, p, n, a: float, b: float, z: float) -> dict:
    """Wald intervals of a, b and the gap from the binomial Fisher information, the covariance
    inflated by the Pearson dispersion max(1, chi2 / (C - 2)); intervals clipped to [0, 1]
    ([-1, 1] for the gap)."""
    q, p, n = _check(q, p, n)
    r = 1 - q
    mu = np.clip(a * q + b * r, 1e-9, 1 - 1e-9)
    wt = n / (mu * (1 - mu))
    info = np.array([[np.sum(wt * q * q), np.sum(wt * q * r)], [np.sum(wt * q * r), np.sum(wt * r * r)]])
    dof = q.size - 2
    disp = max(1.0, float(np.sum(n * (p - mu) ** 2 / (mu * (1 - mu))) / dof)) if dof > 0 else 1.0
    try:
        cov = np.linalg.inv(info) * disp
    except np.linalg.LinAlgError:
        return {"a_ci": None, "b_ci": None, "gap_ci": None, "dispersion": disp}
    sa, sb = math.sqrt(max(cov[0, 0], 0)), math.sqrt(max(cov[1, 1], 0))
    sg = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0))
    return {"a_ci": [max(0.0, a - z * sa), min(1.0, a + z * sa)],
            "b_ci": [max(0.0, b - z * sb), min(1.0, b + z * sb)],
            "gap_ci": [max(-1.0, a - b - z * sg), min(1.0, a - b + z * sg)], "dispersion": disp}


# -- from counts to a report -------------------------------------------------------------------------
def campaign_table(agg: dict, source: str, segment: str, cfg: QualityConfig = QualityConfig()) -> dict:
    """The campaigns usable for ``(source, segment)``: arrays ``campaigns, q, p, n`` and the reports
    left out, by reason (``few_impressions``: the campaign has fewer than ``min_impressions`` in the
    log; ``no_impressions``: none at all; ``small_report``: measured on fewer than
    ``min_report_impressions``; ``no_report``: campaigns in the log without a report for the segment)."""
    labelled = agg["labelled"].get(source, {}).get(segment, {})
    camps, q, p, n = [], [], [], []
    # campaigns seen in the log with no report for this segment cannot enter the fit: counted too
    skipped = {"no_report": sum(1 for c in agg["impressions"] if segment not in agg["truth"].get(c, {})),
               "no_impressions": 0, "few_impressions": 0, "small_report": 0}
    for c in sorted(agg["truth"]):
        report = agg["truth"][c].get(segment)
        if report is None:
            continue
        fraction, measured, _ = report
        seen = agg["impressions"].get(c, 0)
        if seen == 0:
            skipped["no_impressions"] += 1
        elif seen < cfg.min_impressions:
            skipped["few_impressions"] += 1
        elif measured < cfg.min_report_impressions:
            skipped["small_report"] += 1
        else:
            camps.append(c)
            q.append(labelled.get(c, 0) / seen)
            p.append(fraction)
            n.append(float(measured))
    idx = {c: i for i, c in enumerate(camps)}
    m_all, m_lab = np.zeros((len(camps), len(camps))), np.zeros((len(camps), len(camps)))
    lab_pairs = agg.get("labelled_pairs", {}).get(source, {}).get(segment, {})
    for m, pairs in ((m_all, agg.get("pairs", {})), (m_lab, lab_pairs)):
        for c1, row in pairs.items():
            if c1 in idx:
                for c2, v in row.items():
                    if c2 in idx:
                        m[idx[c1], idx[c2]] = m[idx[c2], idx[c1]] = v
    seen = np.array([float(agg["impressions"][c]) for c in camps])
    return {"campaigns": camps, "q": np.array(q), "p": np.array(p), "n": np.array(n), "skipped": skipped,
            # pair sums with entries left out (QualityCountsConfig.max_pairs) would understate the covariance
            "m_all": m_all, "m_lab": m_lab, "seen": seen,
            "has_pairs": bool(agg.get("pairs")) and not agg.get("pairs_dropped", 0)}


def report_covariance(t: dict, a: float, b: float) -> np.ndarray:
    """(C, C) covariance of the truth reports under the model: shared users (each truly in with
    probability a if labelled, else b, independently) plus the measurement's binomial noise.

    Cov(p_c, p_c') = [a(1-a) sum_{u labelled} n_uc n_uc' + b(1-b) sum_{u not} n_uc n_uc'] / (N_c N_c')
    + [c = c'] mu_c (1 - mu_c) / n_c, with N_c the campaign's impressions in the log, n_c the report's
    measured impressions and mu_c = a q_c + b (1 - q_c). a and b are kept in [0.01, 0.99] here so a
    boundary fit does not claim zero user variance."""
    a, b = min(max(a, 0.01), 0.99), min(max(b, 0.01), 0.99)
    q, n, seen = t["q"], t["n"], t["seen"]
    mu = a * q + b * (1 - q)
    users = (a * (1 - a) * t["m_lab"] + b * (1 - b) * (t["m_all"] - t["m_lab"])) / np.outer(seen, seen)
    return users + np.diag(mu * (1 - mu) / n)


def sandwich_ci(t: dict, a: float, b: float, z: float, weights: np.ndarray) -> dict:
    """Intervals of an estimator whose estimating equations are X' diag(weights) (p - X theta) = 0
    (LS: weights n_c; binomial ML: n_c / (mu_c (1 - mu_c))), with the reports' covariance
    :func:`report_covariance`: Var = B^-1 X'W S W X B^-1, B = X'WX."""
    x = np.stack([t["q"], 1 - t["q"]], axis=1)  # (C, 2)
    xw = x * weights[:, None]
    try:
        binv = np.linalg.inv(x.T @ xw)
    except np.linalg.LinAlgError:
        return {"a_ci": None, "b_ci": None, "gap_ci": None}
    cov = binv @ (xw.T @ report_covariance(t, a, b) @ xw) @ binv
    return _wald(a, b, cov, z)


def _wald(a: float, b: float, cov: np.ndarray, z: float) -> dict:
    sa, sb = math.sqrt(max(cov[0, 0], 0)), math.sqrt(max(cov[1, 1], 0))
    sg = math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0))
    return {"a_ci": [max(0.0, a - z * sa), min(1.0, a + z * sa)],
            "b_ci": [max(0.0, b - z * sb), min(1.0, b + z * sb)],
            "gap_ci": [max(-1.0, a - b - z * sg), min(1.0, a - b + z * sg)]}


def param_bootstrap_ls(t: dict, a: float, b: float, replicates: int = 400, seed: int = 0) -> np.ndarray:
    """``(replicates, 2)`` LS fits on reports drawn from the fitted model with the shared-user
    covariance: p* ~ N(a q + b (1 - q), :func:`report_covariance`). Unlike the campaign bootstrap it
    sees the correlation between campaigns; unlike the sandwich it keeps the box (intervals near 0 or 1
    come out asymmetric)."""
    q, n = t["q"], t["n"]
    cov = report_covariance(t, a, b)
    try:
        root = np.linalg.cholesky(cov)  # (C, C); positive definite through the binomial diagonal
    except np.linalg.LinAlgError:  # a square root that tolerates a singular matrix
        vals, vecs = np.linalg.eigh(cov)
        root = vecs * np.sqrt(np.clip(vals, 0, None))
    rng = np.random.default_rng(seed)
    draws = (a * q + b * (1 - q)) + rng.standard_normal((replicates, q.size)) @ root.T  # (B, C)
    r = 1 - q
    fixed = np.array([np.sum(n * q * q), np.sum(n * q * r), np.sum(n * r * r)])
    s = np.column_stack([np.broadcast_to(fixed, (replicates, 3)), draws @ (n * q), draws @ (n * r)])
    return _solve_many(s)


def fit_gls(t: dict, a0: float, b0: float, z: float, rounds: int = 3) -> dict:
    """Generalized least squares with the model's report covariance (:func:`report_covariance`, which
    depends on a and b: refitted ``rounds`` times from (a0, b0)), constrained to [0, 1]^2; intervals
    from (X' S^-1 X)^-1."""
    q, p = t["q"], t["p"]
    x = np.stack([q, 1 - q], axis=1)
    a, b = a0, b0
    for _ in range(rounds):
        si = np.linalg.pinv(report_covariance(t, a, b))
        g = x.T @ si @ x  # (2, 2)
        h = x.T @ si @ p  # (2,)
        a, b = _box_ls(g[0, 0], g[0, 1], g[1, 1], h[0], h[1])
    si = np.linalg.pinv(report_covariance(t, a, b))
    try:
        cov = np.linalg.inv(x.T @ si @ x)
    except np.linalg.LinAlgError:
        return {"a": a, "b": b, "a_ci": None, "b_ci": None, "gap_ci": None}
    return {"a": a, "b": b, **_wald(a, b, cov, z)}


def _pct(x: np.ndarray, cov: float) -> list[float]:
    lo, hi = np.quantile(x, [(1 - cov) / 2, (1 + cov) / 2])
    return [float(lo), float(hi)]


def _corr(x, y, w) -> float | None:
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    vx, vy = np.average((x - mx) ** 2, weights=w), np.average((y - my) ** 2, weights=w)
    if vx <= 0 or vy <= 0:
        return None
    return float(np.average((x - mx) * (y - my), weights=w) / math.sqrt(vx * vy))


def _recall(a, b, qbar):
    den = a * qbar + b * (1 - qbar)
    return np.where(den > 0, a * qbar / np.where(den > 0, den, 1), 0.0)


def _verdict(gap_ci: list[float], cfg: QualityConfig) -> str:
    lo, hi = gap_ci
    if hi < 0:
        return "adversarial"
    if lo <= 0:
        return "uninformative"
    return "good" if lo >= cfg.good_gap else "weak"


def _r(x, nd=6):
    return None if x is None else round(float(x), nd)


def _rounded(x):
    if isinstance(x, float):
        return _r(x)
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def _assess_one(agg: dict, source: str, segment: str, cfg: QualityConfig, methods: tuple) -> dict:
    t = campaign_table(agg, source, segment, cfg)
    q, p, n = t["q"], t["p"], t["n"]
    out = {"source": source, "segment": segment,
           "labelled_users": agg["labelled_users"].get(source, {}).get(segment, 0),
           "campaigns": len(t["campaigns"]), "skipped": t["skipped"], "verdict": None}
    reports = sum(1 for c in agg["truth"].values() if segment in c)
    if reports == 0:
        return {**out, "verdict": "no_truth", "note": f"no truth report for segment {segment!r}"}
    if len(q) < cfg.min_campaigns:
        return {**out, "verdict": "too_few_campaigns",
                "note": f"{len(q)} usable campaigns with truth reports (need {cfg.min_campaigns})"}
    qbar = float(np.average(q, weights=n))
    spread = float(math.sqrt(np.average((q - qbar) ** 2, weights=n)))
    out.update(q_mean=_r(qbar), q_spread=_r(spread), correlation=_r(_corr(q, p, np.ones_like(q))),
               correlation_weighted=_r(_corr(q, p, n)))
    pbar = float(np.average(p, weights=n))
    if qbar == 0:
        return {**out, "verdict": "labels_nobody", "b": _r(pbar),
                "note": "the source labels no impression of these campaigns: a is not identifiable; "
                        "b is the pooled true fraction"}
    if qbar == 1:
        return {**out, "verdict": "labels_everyone", "a": _r(pbar),
                "note": "the source labels every impression of these campaigns: b is not identifiable; "
                        "a is the pooled true fraction"}
    if spread < cfg.min_spread:
        return {**out, "verdict": "no_spread",
                "note": f"q_c varies too little across campaigns (sd {spread:.4f} < {cfg.min_spread}) "
                        "to separate a from b"}
    res = {}
    z = cfg.z
    users_ok = t["has_pairs"] and bool(np.all(t["seen"] > 0))
    if "ls" in methods:
        t0 = time.perf_counter()
        a, b = fit_ls(q, p, n)
        boot = bootstrap_ls(q, p, n, cfg.bootstrap, cfg.seed)
        kinds = {"bootstrap": {"a_ci": _pct(boot[:, 0], cfg.coverage), "b_ci": _pct(boot[:, 1], cfg.coverage),
                               "gap_ci": _pct(boot[:, 0] - boot[:, 1], cfg.coverage)}}
        if users_ok:
            kinds["users"] = sandwich_ci(t, a, b, z, n)
            pb = param_bootstrap_ls(t, a, b, cfg.bootstrap, cfg.seed)
            kinds["users_bootstrap"] = {"a_ci": _pct(pb[:, 0], cfg.coverage), "b_ci": _pct(pb[:, 1], cfg.coverage),
                                        "gap_ci": _pct(pb[:, 0] - pb[:, 1], cfg.coverage)}
        res["ls"] = {"a": a, "b": b, "intervals": kinds}
        res["ls"]["seconds"] = time.perf_counter() - t0
    if "em" in methods:
        t0 = time.perf_counter()
        a, b, iters = fit_em(q, p, n, cfg.em_max_iter, cfg.em_tol)
        wald = em_intervals(q, p, n, a, b, z)
        kinds = {"wald": {k: wald[k] for k in ("a_ci", "b_ci", "gap_ci")}}
        if users_ok:
            mu = np.clip(a * q + b * (1 - q), 1e-6, 1 - 1e-6)
            kinds["users"] = sandwich_ci(t, a, b, z, n / (mu * (1 - mu)))
        res["em"] = {"a": a, "b": b, "intervals": kinds, "dispersion": wald["dispersion"], "iterations": iters,
                     "converged": iters < cfg.em_max_iter, "seconds": time.perf_counter() - t0}
    if "gls" in methods and users_ok:
        t0 = time.perf_counter()
        a0, b0 = (res["ls"]["a"], res["ls"]["b"]) if "ls" in res else fit_ls(q, p, n)
        g = fit_gls(t, a0, b0, z)
        res["gls"] = {"a": g["a"], "b": g["b"], "intervals": {"gls": {k: g[k] for k in ("a_ci", "b_ci", "gap_ci")}},
                      "seconds": time.perf_counter() - t0}
    for r in res.values():  # the method's own interval: a shared-user one where the counts allow
        kind = next((k for k in ("users_bootstrap", "users") if k in r["intervals"]), next(iter(r["intervals"])))
        r.update(r["intervals"][kind], interval=kind)
    name = next(m for m in ("ls", "em", "gls") if m in res) if res else None
    if name is None:  # only gls was asked for, and these counts have no campaign pairs
        return {**out, "verdict": "no_spread", "note": "gls needs the shared-user pair counts; these have none"}
    main = res[name]
    a, b = main["a"], main["b"]
    gap_ci = main["gap_ci"] or [a - b, a - b]
    a_ci, b_ci = main["a_ci"], main["b_ci"]
    recall = float(_recall(np.float64(a), np.float64(b), qbar))
    bounds = a_ci is not None and b_ci is not None
    out.update(method=name, interval=main["interval"], a=_r(a), b=_r(b),
               a_ci=[_r(x) for x in a_ci] if a_ci else None, b_ci=[_r(x) for x in b_ci] if b_ci else None,
               gap=_r(a - b), gap_ci=[_r(x) for x in gap_ci], precision=_r(a), recall=_r(recall),
               # lift and recall move monotonically with a and b: their intervals from the corners
               recall_ci=[_r(float(_recall(np.float64(a_ci[0]), np.float64(b_ci[1]), qbar))),
                          _r(float(_recall(np.float64(a_ci[1]), np.float64(b_ci[0]), qbar)))] if bounds else None,
               lift=_r(a / b) if b > 0 else None,
               lift_ci=[_r(a_ci[0] / b_ci[1]) if b_ci[1] > 0 else None,
                        _r(a_ci[1] / b_ci[0]) if b_ci[0] > 0 else None] if bounds else None,
               verdict=_verdict(gap_ci, cfg), methods={m: _rounded(r) for m, r in res.items()})
    return out


def assess(agg: dict, cfg: QualityConfig = QualityConfig(), methods: tuple = METHODS) -> dict:
    """The quality report of every (source, segment) in a merged aggregate
    (``state/quality_counts.py``), ranked by the gap a - b (sources without a fit last)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"methods: must be a non-empty subset of {', '.join(METHODS)}, got {methods!r}")
    rows = [_assess_one(agg, s, g, cfg, tuple(methods))
            for s in sorted(agg["labelled"]) for g in sorted(agg["labelled"][s])]
    rows.sort(key=lambda r: (r.get("gap") is None, -(r.get("gap") or 0.0), r["source"], r["segment"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i if row.get("gap") is not None else None
    labelled_segments = {g for segs in agg["labelled"].values() for g in segs}
    truth_segments = {g for segs in agg["truth"].values() for g in segs}
    return {"sources": rows, "coverage": cfg.coverage,
            "campaigns": len(agg["impressions"]), "impressions": sum(agg["impressions"].values()),
            "users": agg["users"],
            "truth": {"reports": sum(len(s) for s in agg["truth"].values()),
                      "received": agg["truth_received"], "replaced": agg["truth_replaced"],
                      "segments_without_source": sorted(truth_segments - labelled_segments)},
            "segments": {"assertions": agg["segment_events"], "repeated": agg["segment_repeats"]},
            # how often the counts' bounds bit (state/quality_counts.py); all zero: the counts are exact
            "bounds": {k: int(agg.get(k, 0)) for k in BOUND_COUNTERS}}


# -- quality-adjusted reach --------------------------------------------------------------------------
def adjust_reach(users: float, users_ci, rate: float, rate_ci, coverage: float = 0.95) -> dict:
    """Expected truly-in-segment users among a reach answer's ``users`` when each of them is truly in
    with probability ``rate`` (a source's ``a`` for a rule that requires its label; ``b`` for a rule
    that excludes it).

    The two uncertainties are taken as independent normals with the intervals' half-widths as
    ``z`` standard deviations: Var(U R) = R^2 sd_U^2 + U^2 sd_R^2 + sd_U^2 sd_R^2; the interval is
    U R -/+ z sd, clipped to [0, upper users]. ``users_ci_bounds`` is the conservative product of
    the bounds. A degenerate rate interval gives the reach interval scaled by the rate."""
    cfg = QualityConfig(coverage=coverage)
    vals = [users, rate, *users_ci, *rate_ci]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
        raise ConfigError(f"users: reach and rate figures must be finite numbers, got {vals!r}")
    u_lo, u_hi = (float(x) for x in users_ci)
    r_lo, r_hi = (float(x) for x in rate_ci)
    if not (0 <= u_lo <= users <= u_hi):
        raise ConfigError(f"users_ci: must satisfy 0 <= lo <= users <= hi, got {users} in [{u_lo}, {u_hi}]")
    if not (0 <= r_lo <= rate <= r_hi <= 1):
        raise ConfigError(f"rate_ci: must satisfy 0 <= lo <= rate <= hi <= 1, got {rate} in [{r_lo}, {r_hi}]")
    z = cfg.z
    sd_u, sd_r = (u_hi - u_lo) / (2 * z), (r_hi - r_lo) / (2 * z)
    est = float(users) * float(rate)
    sd = math.sqrt(rate ** 2 * sd_u ** 2 + users ** 2 * sd_r ** 2 + sd_u ** 2 * sd_r ** 2)
    return {"users": est, "users_ci": [max(0.0, est - z * sd), min(u_hi, est + z * sd)],
            "users_ci_bounds": [u_lo * r_lo, u_hi * r_hi], "rate": float(rate), "rate_ci": [r_lo, r_hi],
            "reach_users": float(users), "reach_users_ci": [u_lo, u_hi], "coverage": coverage}
