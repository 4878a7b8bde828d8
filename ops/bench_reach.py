"""Reach benchmark: accuracy of the stratified sample with fall-back against uniform, proportional and
theta-sketch baselines of the same memory, and query latency.

Public surface: ``bench_reach``, ``population``, ``random_queries``.

* **Population** (in-process, numpy): ``users`` users (1M by default) with Zipf attributes over the
  generator's value lists (``ops/generate.py``: age, gender, geo, device, interest; exponent 1.1), the
  device distribution depending on the geo (so attributes are not independent), and a heavy-tailed
  number of impressions per user (1 + Poisson of a lognormal rate).
* **Past data**: the strata are learned from a uniform 5% sample of a *second*, independent draw of
  the population (the previous period), weighted by 1/0.05; workload: every value and pair of values.
* **Samples of the same memory**: ours (learned strata, Neyman allocation with the floor
  ``min_per_stratum``, fall-back) with ``sample_share`` of the users (2%), and the same sample answered
  without either fall-back (``ours_no_fallback``, an ablation); uniform (one stratum, same
  number of users); proportional (our strata, ``n_h`` proportional to ``N_h``, no fall-back); theta
  sketches sized to our sample's bytes. All built from the same hashes.
* **Queries**: random conjunctions of 1 to 3 predicates (``=``, ``in``, ``not``, ``!=``) on distinct
  attributes, values drawn uniformly from each attribute's values (so rare values are frequent), and
  some ``or`` of two; each is bucketed by its true share (>= 10%, 1-10%, 0.1-1%, < 0.1%; at least 20
  users) and up to ``per_bucket`` per bucket are kept.
* **Figures** per bucket and method: the median and p90 relative error of the users estimate (and of
  impressions for the sampling methods) and the share of queries whose 95% interval holds the truth;
  and the ratio of ours to uniform's median error.
* **Latency**: ``answer`` on a sample of ``latency_users`` users (100k), in-process: p50/p99 over the
  query set, repeated; and over HTTP: an embedded broker and 2 real ``reach`` workers are given the
  first ``latency_users`` users (one impression each, produced to ``audience``; each worker holds half
  the partitions, the whole population as its sample), then ``ask_workers`` (what ``loopline reach
  --workers`` runs) is timed from this process, fan-out, both answers and the merge included.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

from loopline.errors import ConfigError
from loopline.state.reach import ThetaBaseline, answer, build_sample, exact_answer, with_score_model
from loopline.state.reach_query import evaluate, parse_query
from loopline.state.reach_strata import Strata, allocate, learn_strata, probe_scores

from .generate import AGES, DEVICES, GENDER_WEIGHTS, GENDERS, GEOS, INTERESTS

__all__ = ["bench_reach", "population", "random_queries"]

BUCKETS = (("10%+", 0.10, 1.01), ("1-10%", 0.01, 0.10), ("0.1-1%", 0.001, 0.01), ("<0.1%", 0.0, 0.001))
VALUES = {"age": list(AGES), "gender": list(GENDERS), "geo": list(GEOS), "device": list(DEVICES),
          "interest": list(INTERESTS)}


def _zipf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** s
    return p / p.sum()


def population(users: int, seed: int, zipf_s: float = 1.1) -> tuple[dict, np.ndarray]:
    """Attribute codes (``VALUES`` order) and impressions per user."""
    rng = np.random.default_rng(seed)
    cols = {
        "age": rng.choice(len(AGES), users, p=_zipf(len(AGES), zipf_s)),
        "gender": rng.choice(len(GENDERS), users, p=np.array(GENDER_WEIGHTS) / sum(GENDER_WEIGHTS)),
        "geo": rng.choice(len(GEOS), users, p=_zipf(len(GEOS), zipf_s)),
        "interest": rng.choice(len(INTERESTS), users, p=_zipf(len(INTERESTS), zipf_s)),
    }
    # device depends on geo: each geo rotates the Zipf order of devices by its rank mod 5
    base = rng.choice(len(DEVICES), users, p=_zipf(len(DEVICES), zipf_s))
    cols["device"] = (base + cols["geo"] % len(DEVICES)) % len(DEVICES)
    cols = {a: c.astype(np.int32) for a, c in cols.items()}
    rate = np.exp(rng.normal(0.5, 1.0, users))
    imps = (1 + rng.poisson(rate)).astype(np.float64)
    return cols, imps


def random_queries(n: int, seed: int) -> list[str]:
    """``n`` random query texts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    attrs = list(VALUES)

    def predicate(a: str) -> str:
        vals = VALUES[a]
        kind = rng.random()
        if kind < 0.65:
            return f"{a} = {vals[rng.integers(len(vals))]}"
        if kind < 0.85:
            k = int(rng.integers(2, min(4, len(vals)) + 1))
            pick = rng.choice(len(vals), k, replace=False)
            return f"{a} in ({', '.join(vals[i] for i in pick)})"
        if kind < 0.93:
            return f"not {a} = {vals[rng.integers(len(vals))]}"
        return f"{a} != {vals[rng.integers(len(vals))]}"

    def conj() -> str:
        k = int(rng.integers(1, 4))
        return " and ".join(predicate(a) for a in rng.choice(attrs, k, replace=False))

    out = []
    for _ in range(n):
        out.append(f"({conj()}) or ({conj()})" if rng.random() < 0.1 else conj())
    return out


def _http_latency(cols: dict, n_users: int, texts: list[str], repeats: int, n_min: int) -> dict:
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
            names = list(VALUES)
            for i in range(n_users):
                attrs = {a: VALUES[a][int(cols[a][i])] for a in names}
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
            extra = ("--role", "reach", "--reach-sample-users", str(n_users), "--reach-epoch", "1e9")
            workers = [WorkerProcess(broker.url, f"{tmp}/w{i}", 4, extra=extra).start() for i in range(2)]
            urls = [f"http://127.0.0.1:{w.port}" for w in workers]
            t0 = time.perf_counter()
            asyncio.run(produce(broker.bootstrap))
            _progress(f"  produced {n_users:,} audience messages in {time.perf_counter() - t0:.1f}s; waiting for the workers")
            deadline = time.monotonic() + 300
            while True:
                a = ask_workers(urls, "*", timeout=5.0, n_min=n_min)
                if not a["partial"] and a["sample_users"] >= n_users:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"reach workers did not take the sample in time: {a}\n{workers[0].tail()}")
                time.sleep(1.0)
            _progress(f"  workers hold {a['sample_users']:,} users after {time.perf_counter() - t0:.1f}s; timing")
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


def _pct(xs, q) -> float | None:
    return round(float(np.percentile(xs, q)), 4) if len(xs) else None


def _progress(msg: str) -> None:
    print(f"bench reach: {msg}", file=sys.stderr, flush=True)


def bench_reach(users: int = 1_000_000, sample_share: float = 0.02, per_bucket: int = 200, candidates: int = 4000,
                min_per_stratum: int = 30, max_strata: int = 64, latency_users: int = 100_000, repeats: int = 3,
                seed: int = 0, out_path: str | None = "bench-reach.json", http_workers: bool = True) -> dict:
    """Run the benchmark; write and return its JSON."""
    if users < 1000:
        raise ConfigError(f"users: at least 1000, got {users}")
    if not 0 < sample_share <= 0.5:
        raise ConfigError(f"sample_share: must be in (0, 0.5], got {sample_share}")
    t_start = time.perf_counter()
    _progress(f"population of {users:,} users")
    cols, imps = population(users, seed)
    rng = np.random.default_rng(seed + 1)
    hashes = rng.random(users)
    vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in VALUES.items()}

    _progress("learning strata from past data (5% of an independent draw)")
    t0 = time.perf_counter()
    past_cols, _ = population(users, seed + 100)
    keep = np.random.default_rng(seed + 2).random(users) < 0.05
    past_cols = {a: c[keep] for a, c in past_cols.items()}
    w = np.full(int(keep.sum()), 1 / 0.05)
    r = probe_scores(past_cols, VALUES, w)
    n = int(round(users * sample_share))
    max_strata = max(1, min(max_strata, n // (2 * min_per_stratum)))  # floors take at most half the sample
    strata = learn_strata(past_cols, VALUES, w, r, max_strata=max_strata,
                          min_leaf=max(2.0 * min_per_stratum, 5e-4 * users))
    plain = Strata(strata.nodes, strata.s, strata.n)  # the same strata, everyone weighing 1 inside them
    with_score_model(strata, past_cols, VALUES, w, vocab)
    learn_s = time.perf_counter() - t0
    caps = allocate(np.array(strata.n), np.array(strata.s), n, min_per_stratum)
    ours = build_sample(cols, VALUES, hashes, imps, strata, caps)
    uniform = build_sample(cols, VALUES, hashes, imps, Strata.root(), [ours.n])
    prop_caps = allocate(np.array(plain.n), np.ones(len(plain)), ours.n, 0)
    proportional = build_sample(cols, VALUES, hashes, imps, plain, prop_caps)
    _progress(f"samples: ours {ours.n:,} users in {len(strata)} strata ({ours.nbytes:,} bytes), uniform {uniform.n:,}, "
              f"proportional {proportional.n:,}; building theta sketches of the same bytes")
    theta = ThetaBaseline(cols, VALUES, ours.nbytes)

    _progress(f"{candidates} candidate queries, bucketed by true size")
    qrng = np.random.default_rng(seed + 3)
    texts = random_queries(candidates, seed + 4)
    by_bucket: dict[str, list] = {b[0]: [] for b in BUCKETS}
    for i, text in enumerate(texts):
        q = parse_query(text)
        size = int(evaluate(q.tree, cols, vocab).sum())
        share = size / users
        if size < 20:
            continue
        for name, lo, hi in BUCKETS:
            if lo <= share < hi:
                by_bucket[name].append(q)
        if (i + 1) % 1000 == 0:
            _progress(f"  {i + 1}/{candidates} candidates evaluated")
    chosen = {}
    for name, qs in by_bucket.items():
        uniq = list({q.text: q for q in qs}.values())
        idx = qrng.permutation(len(uniq))[:per_bucket]
        chosen[name] = [uniq[i] for i in sorted(idx)]

    methods = {
        "ours": lambda q: answer(ours, q, min_per_stratum),
        "ours_no_fallback": lambda q: answer(ours, q, 0, composite=False),
        "uniform": lambda q: answer(uniform, q, 0),
        "proportional": lambda q: answer(proportional, q, 0),
        "theta": theta.answer,
    }
    results: dict = {}
    examples = []
    done = 0
    total_q = sum(len(v) for v in chosen.values())
    t0 = time.perf_counter()
    for name, qs in chosen.items():
        per: dict = {m: {"err": [], "cover": [], "ierr": [], "icover": []} for m in methods}
        fallbacks = 0
        for q in qs:
            truth = exact_answer(cols, VALUES, imps, q)
            for m, fn in methods.items():
                a = fn(q)
                p = per[m]
                p["err"].append(abs(a["users"] - truth["users"]) / truth["users"])
                p["cover"].append(a["users_ci"][0] <= truth["users"] <= a["users_ci"][1])
                if "impressions" in a:
                    p["ierr"].append(abs(a["impressions"] - truth["impressions"]) / truth["impressions"])
                    p["icover"].append(a["impressions_ci"][0] <= truth["impressions"] <= a["impressions_ci"][1])
                if m == "ours":
                    fallbacks += a["fallback"]
                    if len(examples) < 8 and len(qs) and q is qs[0]:
                        examples.append({"bucket": name, "truth": truth, "ours": a})
            done += 1
            if done % 50 == 0:
                rate = done / (time.perf_counter() - t0)
                _progress(f"  answered {done}/{total_q} queries x {len(methods)} methods, {rate:.0f}/s, "
                          f"ETA {(total_q - done) / rate:.0f}s")
        results[name] = {"queries": len(qs), "ours_fallback_share": round(fallbacks / len(qs), 3) if qs else None}
        for m, p in per.items():
            results[name][m] = {
                "users_median_rel_err": _pct(p["err"], 50), "users_p90_rel_err": _pct(p["err"], 90),
                "users_coverage": round(float(np.mean(p["cover"])), 3) if p["cover"] else None,
            }
            if p["ierr"]:
                results[name][m].update({
                    "impressions_median_rel_err": _pct(p["ierr"], 50),
                    "impressions_p90_rel_err": _pct(p["ierr"], 90),
                    "impressions_coverage": round(float(np.mean(p["icover"])), 3)})
        u, o = results[name]["uniform"]["users_median_rel_err"], results[name]["ours"]["users_median_rel_err"]
        results[name]["ours_over_uniform_median_err"] = round(o / u, 3) if u else None

    _progress(f"latency on a {latency_users:,}-user sample")
    lat_caps = allocate(np.array(strata.n), np.array(strata.s), latency_users, min_per_stratum)
    big = build_sample(cols, VALUES, hashes, imps, strata, lat_caps)
    all_q = [q for qs in chosen.values() for q in qs]
    times = []
    for _ in range(repeats):
        for q in all_q:
            t = time.perf_counter()
            answer(big, q.text, min_per_stratum)  # parse included, as a server does
            times.append(time.perf_counter() - t)
    times_ms = np.array(times) * 1000
    http = None
    if http_workers:
        _progress(f"latency over HTTP: 2 reach workers holding a {latency_users:,}-user sample")
        http = _http_latency(cols, latency_users, [q.text for q in all_q], repeats, min_per_stratum)
    out = {
        "population": {"users": users, "impressions": int(imps.sum()), "attributes": {a: len(v) for a, v in VALUES.items()},
                       "zipf_s": 1.1},
        "sample": {"share": sample_share, "ours": ours.describe(), "uniform_users": uniform.n,
                   "proportional_users": proportional.n, "theta_lg_k": theta.lg_k, "theta_bytes": theta.nbytes,
                   "min_per_stratum": min_per_stratum, "max_strata": max_strata, "strata_learn_s": round(learn_s, 2)},
        "buckets": results,
        "latency_in_process_ms": {"sample_users": big.n, "strata": len(big.keys), "queries": len(times),
                                  "p50": round(float(np.percentile(times_ms, 50)), 3),
                                  "p99": round(float(np.percentile(times_ms, 99)), 3)},
        "latency_http_ms": http,
        "examples": examples,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if out_path:
        with open(out_path, "w") as f:
            json.dump(out, f, indent=2)
    return out
