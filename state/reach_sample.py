"""A frozen reach sample: the sampled users of one partition (or several merged) over one event-time
range, each with its attribute codes, its users weight ``1/pi`` and its impressions weight, ready for
queries.

Public surface: ``Sample``, ``build_sample``.

A row is a sampled user. ``w_users`` is ``1/pi_u``, ``pi_u`` the user's inclusion probability (the
design is in ``state/reach_sampler.py``); ``w_imps`` is ``1/pi`` again for a user whose impressions in
the range are all held, 0 for one whose earlier impressions may be missing (it came back after the
sample had no room for it); ``imps`` the user's impressions in the range. Any total over users is
then estimated by Horvitz-Thompson (``state/reach_estimate.py``), and the samples of disjoint
partitions merge by stacking their rows (:meth:`Sample.merge`): the merged sample answers exactly what
the partitions' answers sum to.

``info`` says where the sample comes from: ``partitions``, the event-time ``range`` ``[from, to]`` it
covers (seconds), ``budget_users`` and the held users.

:func:`build_sample` is the same design on a static population, in numpy: the benchmark's builder and
the reference the streaming sampler is tested against.

>>> import numpy as np
>>> cols = {"g": np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.int32)}
>>> s = build_sample(cols, {"g": ["a", "b"]}, np.linspace(0.05, 0.95, 8), np.ones(8), np.ones(8), k=4)
>>> s.n, round(float(s.w_users.sum()), 3)
(4, 7.089)
"""

from __future__ import annotations

import numpy as np
import orjson

from loopline.errors import ConfigError

__all__ = ["Sample", "build_sample"]

FORMAT = "loopline-reach-sample/2"


class Sample:
    """A frozen, mergeable sample (module docstring). ``cols[attr]``: int16/int32 codes into
    ``values[attr]`` (-1: missing)."""

    def __init__(self, cols: dict, values: dict, w_users, w_imps, imps, info: dict | None = None,
                 classes: dict | None = None, blocks: list | None = None):
        n = len(w_users)
        self.values = {a: list(values[a]) for a in cols}
        big = max((len(v) for v in self.values.values()), default=0) >= 32767
        self.cols = {a: np.asarray(c, dtype=np.int32 if big else np.int16) for a, c in cols.items()}
        self.w_users = np.asarray(w_users, dtype=np.float64)
        self.w_imps = np.asarray(w_imps, dtype=np.float64)
        self.imps = np.asarray(imps, dtype=np.float32)
        self.info = dict(info or {})
        # what each partition's impression stream taught the estimator's model (``state/reach_model.py``),
        # one block per source partition (a merged sample keeps its partitions' rows apart, so that it
        # answers what their sums do): [(start, stop, classes)], classes {"share": (K,) each latent
        # class's share of the impressions, "theta": {attr: (len(values[attr]) + 1, K) value shares per
        # class, the last row missing}} or None
        self.blocks = [(0, n, _classes(classes, self.cols))] if blocks is None else \
            [(int(a), int(b), _classes(c, self.cols)) for a, b, c in blocks]
        self.vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in self.values.items()}
        assert all(len(c) == n for c in self.cols.values()) and len(self.imps) == n == len(self.w_imps), \
            f"ragged sample: {n} weights, {len(self.imps)} impressions, columns {[len(c) for c in self.cols.values()]}"
        self._cache: dict = {}

    @property
    def n(self) -> int:
        return len(self.w_users)

    @property
    def nbytes(self) -> int:
        """Bytes of the frozen sample's arrays (what a query reads)."""
        return int(sum(c.nbytes for c in self.cols.values()) + self.w_users.nbytes + self.w_imps.nbytes
                   + self.imps.nbytes + sum(_class_bytes(c) for _, _, c in self.blocks))

    def block(self, i: int) -> "Sample":
        """Block ``i``'s rows as a sample of their own (same vocabulary), with its classes."""
        if len(self.blocks) == 1:
            return self
        a, b, c = self.blocks[i]
        return self.cached(("block", i), lambda: Sample({k: v[a:b] for k, v in self.cols.items()}, self.values,
                                                        self.w_users[a:b], self.w_imps[a:b], self.imps[a:b],
                                                        self.info, classes=c))

    def cached(self, name: str, build):
        """A per-sample value no query changes (the estimators' per-row terms), built once."""
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    def describe(self) -> dict:
        return {"sampled_users": self.n, "population_estimate": round(float(self.w_users.sum())),
                "bytes": self.nbytes, "bytes_per_user": round(self.nbytes / self.n, 1) if self.n else 0.0,
                **self.info}

    @classmethod
    def merge(cls, samples: list["Sample"]) -> "Sample":
        """One sample holding every row of ``samples`` (disjoint users: partitions), codes re-encoded to
        one vocabulary; the range is the union of theirs."""
        values: dict[str, list] = {}
        vocab: dict[str, dict] = {}
        for s in samples:
            for a, vals in s.values.items():
                voc = vocab.setdefault(a, {})
                out = values.setdefault(a, [])
                for v in vals:
                    if v not in voc:
                        voc[v] = len(voc)
                        out.append(v)
        cols = {a: [] for a in values}
        for s in samples:
            for a in values:
                if a in s.cols:
                    lut = np.array([vocab[a][v] for v in s.values[a]] + [-1], dtype=np.int32)
                    cols[a].append(lut[s.cols[a]])
                else:
                    cols[a].append(np.full(s.n, -1, dtype=np.int32))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        info: dict = {"partitions": sorted(p for s in samples for p in s.info.get("partitions", []))}
        ranges = [s.info["range"] for s in samples if s.info.get("range")]
        if ranges:
            info["range"] = [min(r[0] for r in ranges), max(r[1] for r in ranges)]
        for k in ("budget_users", "held_users"):
            if any(k in s.info for s in samples):
                info[k] = sum(int(s.info.get(k, 0)) for s in samples)
        blocks, at = [], 0
        for s in samples:
            for a, b, c in s.blocks:
                if c:  # value shares re-indexed into the merged vocabulary (values a block never coded: 0)
                    theta = {}
                    for attr, t in c["theta"].items():
                        rows = np.zeros((len(values[attr]) + 1, t.shape[1]), dtype=np.float32)
                        rows[[vocab[attr][v] for v in s.values[attr]]] = t[:-1]
                        rows[-1] = t[-1]
                        theta[attr] = rows
                    c = {"share": c["share"], "theta": theta}
                blocks.append((at + a, at + b, c))
            at += s.n
        return cls({a: cat(c) for a, c in cols.items()}, values, cat([s.w_users for s in samples]),
                   cat([s.w_imps for s in samples]), cat([s.imps for s in samples]), info, blocks=blocks)

    def to_bytes(self) -> bytes:
        """JSON (orjson): the sample file ``loopline reach --sample`` reads."""
        return orjson.dumps({"format": FORMAT, "values": self.values, "cols": self.cols, "w_users": self.w_users,
                             "w_imps": self.w_imps, "imps": self.imps, "info": self.info,
                             "blocks": [[a, b, c] for a, b, c in self.blocks]},
                            option=orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Sample":
        try:
            d = orjson.loads(data)
            if d.get("format") != FORMAT:
                raise ConfigError(f"sample: not a loopline reach sample file ({FORMAT})")
            s = cls({a: np.asarray(c, dtype=np.int32) for a, c in d["cols"].items()}, d["values"],
                    d["w_users"], d["w_imps"], d["imps"], d["info"], blocks=d.get("blocks"))
            _check_blocks(s)
            return s
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, AssertionError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"sample: not a valid reach sample file ({type(exc).__name__})") from None


def _classes(classes: dict | None, cols: dict) -> dict | None:
    if not classes or not classes.get("theta"):
        return None
    return {"share": np.asarray(classes["share"], dtype=np.float32),
            "theta": {a: np.asarray(t, dtype=np.float32) for a, t in classes["theta"].items() if a in cols}}


def _class_bytes(c: dict | None) -> int:
    """Bytes of a block's classes: the rows of values its partition coded (a merged sample pads the
    others with zeros, which a partition's own sample does not hold)."""
    if not c:
        return 0
    k = c["share"].nbytes
    return int(k + sum(int(np.count_nonzero(t.any(axis=1))) * k for t in c["theta"].values()))


def _check_blocks(s: "Sample") -> None:
    """A sample file's blocks cover its rows in order, and each one's classes have the right shapes
    and are finite shares (raises ``ValueError``)."""
    at = 0
    for a, b, c in s.blocks:
        if a != at or b < a or b > s.n:
            raise ValueError("blocks")
        at = b
        if c:
            k = c["share"].shape
            if len(k) != 1 or not np.all(np.isfinite(c["share"])) or (c["share"] < 0).any():
                raise ValueError("classes")
            for attr, t in c["theta"].items():
                if t.shape != (len(s.values[attr]) + 1, k[0]) or not np.all(np.isfinite(t)) or (t < 0).any():
                    raise ValueError("classes")
    if at != s.n:
        raise ValueError("blocks")


def build_sample(cols: dict, values: dict, hashes: np.ndarray, imps: np.ndarray, q: np.ndarray, k: int,
                 info: dict | None = None, uniform_k: int | None = None) -> Sample:
    """The sample of a static population, in numpy (the streaming sampler's design).

    ``uniform_k`` None: a priority sample, the ``k`` users with the smallest ``hash / q`` (``q``: each
    user's sampling weight, 1 for a uniform sample), each with ``pi = min(1, q tau)``, ``tau`` the
    ``k+1``-th smallest priority. ``uniform_k`` given: the two-threshold design of
    ``state/reach_sampler.py``: the ``uniform_k`` users with the smallest hashes (threshold ``tau_u``,
    the next hash), then, among the others, the ``k - uniform_k`` with the smallest ``hash / q``
    (threshold ``tau_r``); ``pi = min(1, max(tau_u, q tau_r))``, never below the uniform part's
    ``tau_u`` whatever ``q`` is. No sampling while ``k`` holds everyone."""
    n = len(hashes)
    q = np.broadcast_to(np.asarray(q, dtype=np.float64), (n,))
    if k >= n:
        rows, pi = np.arange(n), np.ones(n)
    elif uniform_k is None:
        priority = hashes / q
        part = np.argpartition(priority, k)[:k + 1]
        part = part[np.argsort(priority[part], kind="stable")]
        rows, tau = part[:k], float(priority[part[k]])
        pi = np.minimum(1.0, q[rows] * tau)
    else:
        ku = min(max(int(uniform_k), 0), k)
        tau_u = float(np.partition(hashes, ku)[ku])  # the (ku+1)-th smallest hash
        rest = np.flatnonzero(hashes >= tau_u)
        rho = hashes[rest] / q[rest]
        kr = k - ku
        tau_r = float(np.partition(rho, kr)[kr]) if kr < len(rest) else np.inf
        keep = (hashes < tau_u) | (hashes / q < tau_r)
        rows = np.flatnonzero(keep)
        pi = np.minimum(1.0, np.maximum(tau_u, q[rows] * tau_r))
    w = 1.0 / pi
    return Sample({a: c[rows] for a, c in cols.items()}, values, w, w, imps[rows],
                  {"partitions": [0], "budget_users": int(k), "held_users": int(len(rows)), **(info or {})})
