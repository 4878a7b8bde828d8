"""``loopline bench reach``: reach accuracy by segment size against uniform, proportional and theta-sketch
baselines of the same memory, on several generated populations and budgets, and query latency.

Public surface: ``bench_reach``, ``POPULATIONS``, ``random_queries``, ``ThetaSketches``, ``proportional_sample``.

* **Populations** (numpy, generated here; ``users`` each, 200,000 by default), three correlation
  structures:
  - ``independent``: six attributes drawn independently (Zipf-like geo and interest with long tails,
    a geometric income);
  - ``correlated``: the issue's kind: heavy-tailed attributes tied by a latent affluence (age, income
    and device follow it; device depends on geo and age too, interest on age and gender) and
    impressions that grow with affluence;
  - ``clustered``: 40 latent segments of Zipf sizes, each with its own concentrated distribution of
    every attribute (a mixture model: strong within-segment correlation).
  Each user has 1 + Poisson(lognormal) impressions.
* **Past data**: the score model of ours is learned from a uniform sample of the budget's size of a
  *second*, independent draw of the population (weighted by N/n): what the sampler has from the
  previous epoch. The proportional baseline's strata are learned from the same past sample.
* **Methods, the same memory**: at each budget (0.5%, 1%, 2%, 5% of the users) ours (the two-threshold
  design, a uniform part and a rare part, and the estimator of ``state/reach_sampler.py`` /
  ``state/reach_estimate.py``, built by :func:`~loopline.state.reach_sample.build_sample`); ``uniform`` (one bottom-k sample of users, the same
  number, Horvitz-Thompson, no fall-back); ``proportional`` (strata, ``n_h`` proportional to ``N_h``); and
  ``theta`` (:class:`ThetaSketches`, KMV sketches of every attribute value and of all users, sized to
  our frozen sample's bytes, answered by set operations); and ``oracle``, a feasibility check rather
  than a method: our design (the same floor, the same size) with a perfect score model, the rare part
  weighted by the bench's own rules on the true population (``q = sqrt(sum of 1 / T^2)`` over the rules
  holding the user: the summed relative variance's optimum), Horvitz-Thompson without fall-back. The sample methods hold the same users, so the same bytes.
* **Queries**: random rules of 1 to 3 predicates (``=``, ``in``, ``not``, ``!=``; some ``or``) with values
  drawn uniformly (so rare values are common), bucketed by true share (>= 10%, 1-10%, 0.1-1%, < 0.1%;
  at least 20 users); ``per_bucket`` per bucket. Each method is run on ``reps`` independent hash seeds
  (16: the rules of one bucket share most of a seed's error, the big ones above all, so a bucket's
  coverage over 4 seeds is a few independent trials and moved by 0.05-0.1 from run to run).
* **Figures**, per population, budget, bucket and method: the median relative error of users over all
  (rule, seed) pairs, its p90, the share of 95% intervals that hold the truth; impressions' the same for
  the sample methods; and per population and budget the groups ``>=1%`` and ``<1%`` with ours over
  uniform, and whether the goals hold (``>=1%``: at most 1.25x uniform; ``<1%``: at most 0.5x; every
  bucket's coverage in 0.90-0.98).
* **Latency**: :func:`~loopline.state.reach_estimate.answer` on a ``latency_users`` sample in-process
  (parse included), and over HTTP: an embedded broker and 2 real ``reach`` workers holding the same
  users (produced to ``audience``), timed through ``ask_workers`` (what ``loopline reach --workers``
  runs: fan-out, both answers and the merge).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from loopline.errors import ConfigError
from loopline.state.reach import ReachConfig
from loopline.state.reach_estimate import answer, score_interval
from loopline.state.reach_model import ClassStream
from loopline.state.reach_query import evaluate, parse_query
from loopline.state.reach_sample import Sample, build_sample
from loopline.state.reach_strata import ScoreModel, learn_strata, probe_scores

from .generate import AGES, DEVICES, GENDERS, GEOS, INTERESTS

__all__ = ["bench_reach", "POPULATIONS", "random_queries", "ThetaSketches", "proportional_sample"]

BUCKETS = (("10%+", 0.10, 1.01), ("1-10%", 0.01, 0.10), ("0.1-1%", 0.001, 0.01), ("<0.1%", 0.0, 0.001))
GROUPS = {">=1%": ("10%+", "1-10%"), "<1%": ("0.1-1%", "<0.1%")}
BUDGETS = (0.005, 0.01, 0.02, 5e-2)
# the generator's value lists (random_queries' default)
VALUES = {"age": list(AGES), "gender": list(GENDERS), "geo": list(GEOS), "device": list(DEVICES),
          "interest": list(INTERESTS)}


def _zipf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def _names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def _imps(rng, log_rate) -> np.ndarray:
    return (1 + rng.poisson(np.exp(log_rate))).astype(np.float64)


def independent(users: int, seed: int) -> tuple[dict, dict, np.ndarray]:
    """Six independent attributes with long tails."""
    rng = np.random.default_rng(seed)
    values = {"age": _names("a", 7), "gender": ["F", "M", "U"], "geo": _names("g", 60), "device": _names("d", 5),
              "interest": _names("i", 40), "income": _names("inc", 10)}
    probs = {"age": [.22, .2, .18, .15, .12, .08, .05], "gender": [.52, .45, .03], "geo": _zipf(60, 1.1),
             "device": _zipf(5, 1.2), "interest": _zipf(40, 1.0), "income": 0.5 ** np.arange(1, 11)}
    cols = {a: rng.choice(len(values[a]), users, p=np.asarray(probs[a]) / np.sum(probs[a])).astype(np.int32)
            for a in values}
    return cols, values, _imps(rng, rng.normal(0.5, 1.0, users))


def correlated(users: int, seed: int) -> tuple[dict, dict, np.ndarray]:
    """Heavy-tailed attributes tied by a latent affluence (module docstring)."""
    rng = np.random.default_rng(seed)
    n = users
    values = {"gender": ["F", "M", "U"], "age": _names("a", 7), "geo": _names("g", 80), "device": _names("d", 6),
              "interest": _names("i", 50), "income": _names("inc", 8)}
    aff = rng.normal(0, 1, n)
    gender = rng.choice(3, n, p=[.53, .44, .03])
    age = np.clip(np.round(2 + 1.3 * rng.normal(0, 1, n) + 0.4 * (gender == 1) + 0.3 * aff), 0, 6).astype(int)
    geo = rng.choice(80, n, p=_zipf(80, 1.3))
    income = np.clip(np.floor(3 + 1.5 * aff + 0.8 * (geo % 7 == 0) - 0.5 * (geo > 40) + rng.normal(0, .7, n)),
                     0, 7).astype(int)
    logits = np.stack([np.zeros(n), 0.4 * aff + 0.3 * (age < 3), -1 + 0.2 * (age > 3), -2.5 + 0.5 * aff,
                       -4 + 0.8 * (geo > 50), -5 + 0.6 * (age == 6)], 1)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    device = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    interest = (rng.choice(50, n, p=_zipf(50, 1.2)) + 7 * age + 13 * gender) % 50
    cols = {"gender": gender, "age": age, "geo": geo, "device": device, "interest": interest, "income": income}
    return {a: c.astype(np.int32) for a, c in cols.items()}, values, _imps(rng, rng.normal(0.3 + 0.3 * aff, 1.2))


def clustered(users: int, seed: int) -> tuple[dict, dict, np.ndarray]:
    """40 latent segments, each with its own concentrated attribute distributions."""
    rng = np.random.default_rng(seed)
    k = 40
    values = {"age": _names("a", 7), "gender": ["F", "M", "U"], "geo": _names("g", 50), "device": _names("d", 5),
              "interest": _names("i", 60), "lang": _names("l", 12)}
    seg = rng.choice(k, users, p=_zipf(k, 1.2))
    cols = {}
    for a, vals in values.items():
        v = len(vals)
        cum = np.stack([rng.dirichlet(_zipf(v, 1.0) * v * 0.5 + 0.05) for _ in range(k)]).cumsum(1)
        cols[a] = (cum[seg] > rng.random((users, 1))).argmax(1).astype(np.int32)
    return cols, values, _imps(rng, rng.normal(0.2 + 0.05 * (seg % 5), 1.0))


POPULATIONS = {"independent": independent, "correlated": correlated, "clustered": clustered}


def random_queries(n: int, seed: int, values: dict | None = None) -> list[str]:
    """``n`` random rules over ``values`` (default: the generator's): conjunctions of 1 to 3 predicates
    on distinct attributes, values drawn uniformly, one in ten an ``or`` of two."""
    values = values or VALUES
    rng = np.random.default_rng(seed)
    attrs = list(values)

    def predicate(a: str) -> str:
        vals = values[a]
        kind = rng.random()
        if kind < 0.65:
            return f"{a} = {vals[rng.integers(len(vals))]}"
        if kind < 0.85:
            k = int(rng.integers(2, min(4, len(vals)) + 1))
            return f"{a} in ({', '.join(vals[i] for i in rng.choice(len(vals), k, replace=False))})"
        if kind < 0.93:
            return f"not {a} = {vals[rng.integers(len(vals))]}"
        return f"{a} != {vals[rng.integers(len(vals))]}"

    def conj() -> str:
        return " and ".join(predicate(a) for a in rng.choice(attrs, int(rng.integers(1, 4)), replace=False))

    return [f"({conj()}) or ({conj()})" if rng.random() < 0.1 else conj() for _ in range(n)]


class ThetaSketches:
    """KMV (theta) sketches: one of all users and one per attribute value, each the ``k`` smallest user
    hashes (``k`` the largest that fits ``budget_bytes`` at 8 bytes a hash) and its threshold ``theta``
    (1 while the sketch holds everyone). A rule is answered by set operations on the hashes below the
    smaller threshold: ``in``/``or`` a union, ``and`` an intersection, ``not`` all users less the operand;
    the estimate is ``|S| / theta`` and its interval the score interval of the count (users only: a
    theta sketch counts distinct keys)."""

    def __init__(self, cols: dict, values: dict, hashes: np.ndarray, budget_bytes: int):
        n = len(hashes)
        sizes = [n] + [int(x) for a in cols for x in np.bincount(cols[a][cols[a] >= 0], minlength=len(values[a]))]
        self.k = 16
        while sum(min(s, self.k * 2) for s in sizes) * 8 <= budget_bytes and self.k < n:
            self.k *= 2
        lo, hi = self.k, self.k * 2  # the largest k that fits, between the powers of two
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if sum(min(s, mid) for s in sizes) * 8 <= budget_bytes else (lo, mid)
        self.k = lo
        self.vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
        self.all = self._sketch(hashes)
        self.sk = {a: [self._sketch(hashes[cols[a] == c]) for c in range(len(values[a]))] for a in cols}
        self.nbytes = 8 * (len(self.all[1]) + sum(len(s[1]) for lst in self.sk.values() for s in lst))

    def _sketch(self, h: np.ndarray) -> tuple[float, np.ndarray]:
        if len(h) <= self.k:
            return 1.0, np.sort(h)
        part = np.partition(h, self.k)
        return float(part[self.k]), np.sort(part[:self.k])

    def _eval(self, node: tuple) -> tuple[float, np.ndarray]:
        kind = node[0]
        if kind == "all":
            return self.all
        if kind == "in":
            parts = [self.sk[node[1]][c] for v in node[2] if (c := self.vocab.get(node[1], {}).get(v)) is not None]
            return self._union(parts) if parts else (1.0, np.zeros(0))
        if kind == "not":
            t, h = self._eval(node[1])
            theta = min(t, self.all[0])
            a = self.all[1][self.all[1] < theta]
            return theta, np.setdiff1d(a, h[h < theta], assume_unique=True)
        subs = [self._eval(s) for s in node[1]]
        if kind == "or":
            return self._union(subs)
        theta = min(t for t, _ in subs)
        out = subs[0][1][subs[0][1] < theta]
        for _, h in subs[1:]:
            out = np.intersect1d(out, h[h < theta], assume_unique=True)
        return theta, out

    @staticmethod
    def _union(parts: list) -> tuple[float, np.ndarray]:
        theta = min(t for t, _ in parts)
        return theta, np.unique(np.concatenate([h[h < theta] for _, h in parts]))

    def answer(self, query) -> dict:
        theta, h = self._eval(parse_query(query).tree if isinstance(query, str) else query.tree)
        m = len(h)
        est = m / theta
        lo, hi = score_interval(est, m * (1 - theta) / theta ** 2, 1 / theta)
        return {"users": est, "users_ci": [lo, hi]}


def proportional_sample(cols: dict, values: dict, hashes: np.ndarray, imps: np.ndarray, past: dict,
                        past_w: np.ndarray, k: int, max_strata: int = 64, min_per_stratum: int = 30) -> Sample:
    """Stratified sampling with proportional allocation: strata learned from the past sample (the old
    sampler's learner), ``n_h`` proportional to the past estimate of ``N_h``, a bottom-k sample of each."""
    max_strata = max(1, min(max_strata, k // (2 * min_per_stratum)))
    st = learn_strata(past, values, past_w, probe_scores(past, values, past_w), max_strata=max_strata,
                      min_leaf=max(2.0 * min_per_stratum, 5e-4 * float(past_w.sum())))
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    leaf = st.assign_codes(cols, vocab, len(hashes))
    share = np.asarray(st.n) / max(sum(st.n), 1e-12)
    parts = []
    for h in range(len(st)):
        rows = np.flatnonzero(leaf == h)
        if len(rows):
            kh = max(1, int(round(k * share[h])))
            parts.append(build_sample({a: c[rows] for a, c in cols.items()}, values, hashes[rows], imps[rows],
                                      np.ones(len(rows)), kh))
    return Sample.merge(parts)


def our_weights(cols: dict, values: dict, past: dict, past_w: np.ndarray) -> np.ndarray:
    """The rare part's weight ``q`` of every user under the score model learned from the past sample
    (the sampler's rule)."""
    model = ScoreModel.fit(past, values, past_w)
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    return model.q_codes(cols, vocab, len(next(iter(cols.values()))))


MODEL_SHARE = 0.1  # the class model takes at most this share of the budget's bytes


def model_classes(values: dict, k: int, share: float = MODEL_SHARE, max_classes: int = 16) -> int:
    """Latent classes whose value shares (float32) fit in ``share`` of a ``k``-user frozen sample's bytes
    (``2 x attributes + 20`` a user); at least 1."""
    per_class = 4 * (sum(len(v) for v in values.values()) + len(values))
    return int(max(1, min(max_classes, share * k * (2 * len(values) + 20) // per_class)))


def stream_classes(cols: dict, values: dict, imps: np.ndarray, classes: int, seed: int) -> dict:
    """What a partition's :class:`~loopline.state.reach_model.ClassStream` learns from this population's
    impressions (each user's ``imps`` of them, in a random order): the value shares per class."""
    attrs = list(values)
    users = len(imps)
    order = np.random.default_rng(seed).permutation(np.repeat(np.arange(users), imps.astype(np.int64)))
    mat = np.stack([cols[a] for a in attrs], 1)[order]
    stream = ClassStream(classes=classes, half_life_s=0, seed=seed)
    for lo in range(0, len(order), stream.chunk):
        for row in mat[lo:lo + stream.chunk].tolist():
            stream.add(dict(zip(attrs, row)), 0.0)
    return {"share": stream.share(), "theta": stream.theta(values)}


def _progress(msg: str) -> None:
    print(f"bench reach: {msg}", file=sys.stderr, flush=True)


def _pct(xs, q) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if len(xs) else None


def _choose(cols: dict, values: dict, candidates: int, per_bucket: int, seed: int) -> dict:
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    n = len(next(iter(cols.values())))
    chosen: dict = {b[0]: [] for b in BUCKETS}
    seen = set()
    for text in random_queries(candidates, seed, values):
        q = parse_query(text)
        if q.text in seen:
            continue
        seen.add(q.text)
        m = evaluate(q.tree, cols, vocab)
        size = int(m.sum())
        if size < 20:
            continue
        for name, lo, hi in BUCKETS:
            if lo <= size / n < hi and len(chosen[name]) < per_bucket:
                chosen[name].append((q, m))
    return chosen


def _accuracy(name: str, users: int, budgets, per_bucket: int, candidates: int, reps: int, min_per_stratum: int,
              seed: int) -> dict:
    gen = POPULATIONS[name]
    cols, values, imps = gen(users, seed)
    past_all, _, _ = gen(users, seed + 100)
    chosen = _choose(cols, values, candidates, per_bucket, seed + 4)
    truth = {b: [(int(m.sum()), float(imps[m].sum())) for _, m in qs] for b, qs in chosen.items()}
    # the oracle: our design with the rare part weighted by the bench's own rules on the true population
    # (each user q = sqrt(sum over the rules holding it of 1 / T^2)): what a score model cannot beat at
    # the same floor and memory, the feasibility check of the rare goal
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
    q_oracle = np.sqrt(probe_scores(cols, values, np.ones(users), [q.tree for qs in chosen.values() for q, _ in qs],
                                    vocab, t_min_share=0.0))
    q_oracle = np.maximum(q_oracle, q_oracle[q_oracle > 0].min() if (q_oracle > 0).any() else 1.0)
    out = {"users": users, "attributes": {a: len(v) for a, v in values.items()},
           "rules": {b: len(qs) for b, qs in chosen.items()}, "budgets": {}}
    streams: dict = {}
    for share in budgets:
        k = max(1, int(round(users * share)))
        classes = model_classes(values, k)
        if classes not in streams:
            streams[classes] = stream_classes(cols, values, imps, classes, seed + 3)
        shares = streams[classes]
        # the same memory: ours holds fewer users, the model's bytes' worth
        k_ours = k - int(np.ceil(4 * (shares["share"].size + sum(t.size for t in shares["theta"].values()))
                                 / (2 * len(values) + 20)))
        past_rows = np.random.default_rng(seed + 2).choice(users, min(k, users), replace=False)
        past = {a: c[past_rows] for a, c in past_all.items()}
        past_w = np.full(len(past_rows), users / len(past_rows))
        g = our_weights(cols, values, past, past_w)
        rare_share = ReachConfig().rare_share
        acc = {m: {b: {"err": [], "cover": [], "ierr": [], "icover": []} for b in chosen}
               for m in ("ours", "uniform", "proportional", "theta", "oracle")}
        nbytes = theta_k = 0
        fallbacks = 0
        for r in range(reps):
            hashes = np.random.default_rng(seed + 1000 + r).random(users)
            ours = build_sample(cols, values, hashes, imps, g, k_ours, uniform_k=round((1 - rare_share) * k_ours))
            ours = Sample(ours.cols, ours.values, ours.w_users, ours.w_imps, ours.imps, ours.info, classes=shares)
            uniform = build_sample(cols, values, hashes, imps, np.ones(users), k)
            prop = proportional_sample(cols, values, hashes, imps, past, past_w, k, min_per_stratum=min_per_stratum)
            theta = ThetaSketches(cols, values, hashes, ours.nbytes)
            oracle = build_sample(cols, values, hashes, imps, q_oracle, k, uniform_k=round((1 - rare_share) * k))
            nbytes, theta_k = ours.nbytes, theta.k
            methods = {"ours": lambda q: answer(ours, q, min_per_stratum),
                       "uniform": lambda q: answer(uniform, q, min_per_stratum, composite=False),
                       "proportional": lambda q: answer(prop, q, min_per_stratum, composite=False),
                       "theta": theta.answer,
                       "oracle": lambda q: answer(oracle, q, min_per_stratum, composite=False)}
            for b, qs in chosen.items():
                for (q, _), (tu, ti) in zip(qs, truth[b]):
                    for m, fn in methods.items():
                        a = fn(q)
                        p = acc[m][b]
                        p["err"].append(abs(a["users"] - tu) / tu)
                        p["cover"].append(a["users_ci"][0] <= tu <= a["users_ci"][1])
                        if "impressions" in a:
                            p["ierr"].append(abs(a["impressions"] - ti) / ti)
                            p["icover"].append(a["impressions_ci"][0] <= ti <= a["impressions_ci"][1])
                        if m == "ours":
                            fallbacks += a["fallback"]
        res: dict = {"sample_users": k, "sample_bytes": nbytes, "theta_k": theta_k, "buckets": {}, "groups": {},
                     "ours_fallback_share": round(fallbacks / max(1, reps * sum(len(q) for q in chosen.values())), 3)}
        for b in chosen:
            res["buckets"][b] = {m: _figures(acc[m][b]) for m in acc}
        for grp, members in GROUPS.items():
            res["groups"][grp] = {m: _figures({k2: sum((acc[m][b][k2] for b in members), []) for k2 in acc[m][members[0]]})
                                  for m in acc}
            u, o = res["groups"][grp]["uniform"]["users_median_rel_err"], res["groups"][grp]["ours"]["users_median_rel_err"]
            res["groups"][grp]["ours_over_uniform"] = round(o / u, 3) if u else None
            orc = res["groups"][grp]["oracle"]["users_median_rel_err"]
            res["groups"][grp]["oracle_over_uniform"] = round(orc / u, 3) if u else None
        cov = [res["buckets"][b]["ours"]["users_coverage"] for b in chosen if res["buckets"][b]["ours"]["users_coverage"] is not None]
        common, rare = res["groups"][">=1%"]["ours_over_uniform"], res["groups"]["<1%"]["ours_over_uniform"]
        res["goals"] = {"common_within_1.25x": common is not None and common <= 1.25,
                        "rare_at_most_half": rare is not None and rare <= 0.5,
                        "coverage_0.90_0.98": bool(cov) and all(0.90 <= c <= 0.98 for c in cov)}
        out["budgets"][f"{share:g}"] = res
        _progress(f"  {name} at {share:.1%}: ours/uniform >=1% {common}, <1% {rare}; coverage {cov}")
    return out


def _figures(p: dict) -> dict:
    f = {"users_median_rel_err": _pct(p["err"], 50), "users_p90_rel_err": _pct(p["err"], 90),
         "users_coverage": round(float(np.mean(p["cover"])), 3) if p["cover"] else None, "n": len(p["err"])}
    if p["ierr"]:
        f.update({"impressions_median_rel_err": _pct(p["ierr"], 50),
                  "impressions_coverage": round(float(np.mean(p["icover"])), 3)})
    return f


def _http_latency(cols: dict, values: dict, n_users: int, texts: list[str], repeats: int, n_min: int) -> dict:
    """Start a broker and 2 reach workers, give them ``n_users`` users (one impression each, produced
    straight to ``audience``), and time ``loopline reach --workers`` fan-outs from this process."""
    import asyncio
    import tempfile

    import orjson
    from aiokafka import AIOKafkaProducer

    from loopline.stream.app import TOPICS

    from .broker import EmbeddedBroker, create_topics
    from .reach import ask_workers
    from .worker import WorkerProcess

    async def produce(bootstrap: str) -> None:
        prod = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024)
        await prod.start()
        try:
            for i in range(n_users):
                attrs = {a: values[a][int(cols[a][i])] for a in values}
                v = {"type": "impression", "id": f"i{i}", "user": f"u{i}", "ts": 1_700_000_000.0 + i * 0.01,
                     "campaign": "c1", "attrs": attrs}
                await prod.send("audience", orjson.dumps(v), key=f"u{i}".encode())
            await prod.flush()
        finally:
            await prod.stop()

    with tempfile.TemporaryDirectory(prefix="loopline-bench-reach-") as tmp:
        broker = EmbeddedBroker(log_path=f"{tmp}/tansu.log").start()
        workers = []
        try:
            create_topics(broker.bootstrap, {t: 4 for t in TOPICS})
            # a budget with room for every user (partitions are uneven): the workers hold all n_users
            extra = ("--role", "reach", "--reach-budget-users", str(2 * n_users), "--reach-epoch", "1e9")
            workers = [WorkerProcess(broker.url, f"{tmp}/w{i}", 4, extra=extra).start() for i in range(2)]
            urls = [f"http://127.0.0.1:{w.port}" for w in workers]
            t0 = time.perf_counter()
            asyncio.run(produce(broker.bootstrap))
            _progress(f"  produced {n_users:,} audience messages in {time.perf_counter() - t0:.1f}s; waiting")
            deadline = time.monotonic() + 300
            while True:
                a = ask_workers(urls, "*", timeout=5.0, n_min=n_min)
                if not a["partial"] and a["sample_users"] >= n_users:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reach workers did not take the sample in time: {a}\n{workers[0].tail()}")
                time.sleep(1.0)
            for text in texts[:20]:  # warm-up: the frozen samples are built on first use
                ask_workers(urls, text, timeout=5.0, n_min=n_min)
            times, partial, server = [], 0, []
            for _ in range(repeats):
                for text in texts:
                    t = time.perf_counter()
                    a = ask_workers(urls, text, timeout=5.0, n_min=n_min)
                    times.append(time.perf_counter() - t)
                    partial += a["partial"]
                    server.append(max(v for v in a["worker_ms"].values() if v is not None))
        finally:
            for w in workers:
                w.stop()
            broker.stop()
    ms = np.array(times) * 1000
    return {"workers": 2, "sample_users": int(a["sample_users"]), "queries": len(times), "partial_answers": partial,
            "p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "slower_worker_compute_p50": round(float(np.percentile(server, 50)), 3),
            "slower_worker_compute_p99": round(float(np.percentile(server, 99)), 3)}


def bench_reach(users: int = 200_000, budgets=BUDGETS, populations=tuple(POPULATIONS), per_bucket: int = 60,
                candidates: int = 2000, reps: int = 16, min_per_stratum: int = 30, latency_users: int = 40_000,
                repeats: int = 3, seed: int = 0, out_path: str | None = "bench-reach.json",
                http_workers: bool = True) -> dict:
    """Run the benchmark; write and return its JSON."""
    if users < 1000:
        raise ConfigError(f"users: at least 1000, got {users}")
    if not budgets or not all(0 < b <= 0.5 for b in budgets):
        raise ConfigError(f"budgets: shares in (0, 0.5], got {budgets}")
    unknown = set(populations) - set(POPULATIONS)
    if unknown:
        raise ConfigError(f"populations: unknown {sorted(unknown)}; known: {sorted(POPULATIONS)}")
    t_start = time.perf_counter()
    pops = {}
    for name in populations:
        _progress(f"population {name}: {users:,} users, budgets {[f'{b:.1%}' for b in budgets]}, {reps} seeds")
        pops[name] = _accuracy(name, users, budgets, per_bucket, candidates, reps, min_per_stratum, seed)

    _progress(f"latency on a {latency_users:,}-user sample")
    name = populations[0]
    cols, values, imps = POPULATIONS[name](max(users, latency_users), seed)
    cols = {a: c[:latency_users] for a, c in cols.items()}
    big = build_sample(cols, values, np.random.default_rng(seed).random(latency_users), imps[:latency_users],
                       np.ones(latency_users), latency_users)
    texts = random_queries(200, seed + 9, values)
    times = []
    for _ in range(repeats):
        for text in texts:
            t = time.perf_counter()
            answer(big, text, min_per_stratum)  # parse included, as a server does
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1000
    http = None
    if http_workers:
        _progress(f"latency over HTTP: 2 reach workers holding {latency_users:,} users")
        http = _http_latency(cols, values, latency_users, texts, repeats, min_per_stratum)
    out = {"populations": pops,
           "goals_at_2pct": {p: r["budgets"].get("0.02", {}).get("goals") for p, r in pops.items()},
           "latency_in_process_ms": {"sample_users": big.n, "queries": len(times),
                                     "p50": round(float(np.percentile(ms, 50)), 3),
                                     "p99": round(float(np.percentile(ms, 99)), 3)},
           "latency_http_ms": http,
           "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "seconds": round(time.perf_counter() - t_start, 1)}
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def table(out: dict, budget: str = "0.02") -> str:
    """The README's table: per population and bucket at one budget, median relative error of users and
    coverage for each method."""
    lines = ["| population | bucket | rule x seed | ours | uniform | proportional | theta | ours / uniform "
             "| oracle / uniform |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, r in out["populations"].items():
        res = r["budgets"][budget]
        rows = [(b, res["buckets"][b]) for b in res["buckets"]] + [(g, res["groups"][g]) for g in GROUPS]
        for b, f in rows:
            cells = [f"{f[m]['users_median_rel_err']:.3f}, {f[m]['users_coverage']:.2f}"
                     if f[m]["users_median_rel_err"] is not None else "-" for m in ("ours", "uniform", "proportional", "theta")]
            u, o = f["uniform"]["users_median_rel_err"], f["ours"]["users_median_rel_err"]
            ratio = f"{o / u:.2f}" if u else "-"
            orc = f"{f['oracle']['users_median_rel_err'] / u:.2f}" if u and "oracle" in f else "-"
            lines.append(f"| {p} | {b} | {f['ours']['n']} | " + " | ".join(cells) + f" | {ratio} | {orc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m loopline.ops.bench_reach: the table of a JSON file
    with open(sys.argv[1]) as f:
        print(table(json.load(f), sys.argv[2] if len(sys.argv) > 2 else "0.02"))
