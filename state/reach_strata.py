"""Strata for the reach sampler: a tree over user attributes learned greedily from past data, and the
Neyman allocation of a sample over its leaves with a floor per stratum.

Public surface: ``Strata``, ``ScoreModel``, ``learn_strata``, ``allocate``, ``probe_scores``, ``path_of``.

**What the strata are for.** A reach query asks for the size of a segment. Its relative variance under
stratified sampling of ``n_h`` of the ``N_h`` users of stratum ``h`` is about
``sum_h N_h^2 p_hg / (n_h T_g^2)`` (``p_hg``: share of the stratum in segment ``g``, ``T_g`` its size).
Summed over a workload of segments that is ``sum_h N_h^2 S_h^2 / n_h`` with ``S_h^2 = R_h / N_h`` and
``R_h = sum over the stratum's users of r_i``, where a user's *probe score* ``r_i`` is the sum of
``1 / T_g^2`` over the workload segments that contain it (``T_g`` floored at ``t_min`` so that tiny
segments do not take everything). Two consequences:

* **Allocation** (Neyman for that objective): ``n_h`` proportional to ``N_h S_h = sqrt(N_h R_h)``
  (with the score model below: ``S_h`` the stratum's mean ``q``, as ``reach.with_score_model`` sets); then
  a floor ``n_min`` per stratum (a thin stratum still gets enough users to estimate a rate, and a new
  value still has room) and a census cap ``n_h <= N_h``, by water-filling (:func:`allocate`).
* **Learning** (the rule): with that allocation the objective is ``(sum_h sqrt(N_h R_h))^2 / n``, so the
  learner greedily makes the split that lowers ``J = sum_h sqrt(N_h R_h)`` the most: it tries every
  (leaf, attribute not yet used on the leaf's path) pair; the split gives each value holding at least
  ``min_leaf`` (weighted) users a child of its own and merges the other values into one ``*`` child; it
  keeps splitting while the best split lowers ``J`` by at least ``min_gain`` of its value and the tree
  has at most ``max_strata`` leaves (a split that would exceed it keeps only its largest children). Rare
  groups that many probes hit (small segments) end up in strata of their own, which the allocation
  then samples at a much higher rate than the common ones.

Inside a stratum the same objective is minimized user by user by sampling each user with probability
proportional to ``q_i = sqrt(r_i)``: :class:`ScoreModel` is ``r`` as a function of the attributes,
fitted on the past data, which the sampler uses for priority sampling.

The default workload (no query log) is every single attribute value and every pair of values of two
attributes seen in the past data (pairs of attributes with more than ``MAX_PAIR_CELLS`` value
combinations are left out); :func:`probe_scores` takes a list of past queries instead.

A stratum is named by its path from the root, a JSON list of ``[attr, value]`` pairs (value ``"*"``:
every value the siblings do not name, including a missing attribute); the parent of a stratum (its
coarser stratum, for the fuzzy fall-back) is the path less its last pair.

>>> import numpy as np
>>> cols = {"geo": np.array([0] * 90 + [1] * 10), "dev": np.array([0, 1] * 50)}
>>> values = {"geo": ["US", "IS"], "dev": ["ios", "web"]}
>>> st = learn_strata(cols, values, np.ones(100), probe_scores(cols, values, np.ones(100)), max_strata=4, min_leaf=5)
>>> st.keys[0], len(st.keys) <= 4
('[["geo","US"]]', True)
>>> st.assign({"geo": "IS", "dev": "web"}) == st.assign({"geo": "IS", "dev": "ios"}) or len(st.keys) == 4
True
>>> allocate(np.array([1000., 100., 10.]), np.array([1., 1., 1.]), n=100, floor=20).tolist()
[70, 20, 10]
"""

from __future__ import annotations

import itertools

import numpy as np
import orjson

__all__ = ["Strata", "ScoreModel", "learn_strata", "allocate", "probe_scores", "path_of"]


class Strata:
    """A tree of splits; its leaves are the strata. Nodes are dicts ``{"key", "split", "children",
    "rest", "leaf"}``: an internal node splits on attribute ``split``, ``children`` maps a value to a
    child node, ``rest`` is the ``*`` child; a leaf has ``leaf`` = its stratum index.
    ``s`` holds each stratum's S_h (learned), ``n`` its learned population estimate N_h; ``model``
    (a :class:`ScoreModel`, or None: everyone weighs 1) the within-stratum sampling weights."""

    def __init__(self, nodes: list[dict], s: list[float] | None = None, n: list[float] | None = None,
                 model: "ScoreModel | None" = None):
        self.nodes = nodes
        self.model = model
        self.leaves = [i for i, nd in enumerate(nodes) if nd["split"] is None]
        for h, i in enumerate(self.leaves):
            nodes[i]["leaf"] = h
        self.keys = [nodes[i]["key"] for i in self.leaves]
        self.s = list(s) if s is not None else [1.0] * len(self.leaves)
        self.n = list(n) if n is not None else [0.0] * len(self.leaves)

    @classmethod
    def root(cls) -> "Strata":
        """One stratum holding everyone (uniform sampling)."""
        return cls([{"key": "[]", "split": None, "children": {}, "rest": None, "leaf": 0}])

    def __len__(self) -> int:
        return len(self.leaves)

    def q(self, attrs: dict) -> float:
        """A user's within-stratum sampling weight (1 without a score model)."""
        return 1.0 if self.model is None else self.model.q(attrs)

    def q_codes(self, cols: dict, vocab: dict, n: int | None = None) -> np.ndarray:
        """``q`` of many users (``n``: their number, needed only when ``cols`` is empty)."""
        n = _rows(cols, n)
        return np.ones(n) if self.model is None else self.model.q_codes(cols, vocab, n)

    def assign(self, attrs: dict) -> int:
        """The stratum of a user with attributes ``attrs`` (a dict of strings)."""
        nd = self.nodes[0]
        while nd["split"] is not None:
            nd = self.nodes[nd["children"].get(attrs.get(nd["split"]), nd["rest"])]
        return nd["leaf"]

    def assign_codes(self, cols: dict, vocab: dict, n: int | None = None) -> np.ndarray:
        """Strata of many users at once: ``cols[attr]`` integer codes (-1: missing), ``vocab[attr]``
        maps a value to its code (``n``: the number of users, needed only when ``cols`` is empty)."""
        n = _rows(cols, n)
        node = np.zeros(n, dtype=np.int32)
        for i, nd in enumerate(self.nodes):  # parents come before children
            if nd["split"] is None:
                continue
            rows = np.flatnonzero(node == i)
            if not len(rows):
                continue
            col = cols.get(nd["split"])
            if col is None:
                node[rows] = nd["rest"]
                continue
            voc = vocab.get(nd["split"], {})
            lut = np.full(len(voc) + 1, nd["rest"], dtype=np.int32)  # last slot: code -1
            for v, child in nd["children"].items():
                c = voc.get(v)
                if c is not None:
                    lut[c] = child
            node[rows] = lut[col[rows]]
        leaf_of = np.array([nd.get("leaf", -1) for nd in self.nodes], dtype=np.int32)
        return leaf_of[node]

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "s": self.s, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "Strata":
        nodes = [{**nd, "children": dict(nd["children"])} for nd in d["nodes"]]
        return cls(nodes, d.get("s"), d.get("n"))


def _rows(cols: dict, n: int | None) -> int:
    """The number of users in ``cols`` (``n`` when there are no columns: users without attributes)."""
    return len(next(iter(cols.values()))) if cols else (n or 0)


def path_of(key: str) -> list:
    """The ``[attr, value]`` pairs of a stratum key."""
    return orjson.loads(key)


MAX_PAIR_CELLS = 1 << 20  # value pairs of two attributes counted at most (a pair table is this big)
# The model's attributes: the most covered ones (the weight of users with a value). A worker's vocabulary
# admits up to 64 attribute names, junk included, and every pair of them was a table: 2,016 tables to
# look up per user, which made a fresh sample cost most of a worker's CPU (found by the soak). A rule on
# an attribute few users have is rare through that attribute's value, which the estimate's fall-back and
# the uniform floor still cover.
MAX_MODEL_ATTRS = 16


class ScoreModel:
    """The default workload's probe score as a function of a user's attributes, fitted on past data:
    ``r(x) = sum_a u_a(x_a) + sum_{a<b} u_ab(x_a, x_b)`` with ``u = 1 / T^2`` of the value (pair)
    ``T`` users had in the past (floored at ``t_min``; an unseen value scores ``1 / t_min^2``). The
    sampler draws users with probability proportional to ``q = sqrt(r)`` within a stratum: the
    allocation that minimizes the workload's summed relative variance user by user."""

    def __init__(self, u_max: float, values: dict, single: dict, pair: dict, scale: float = 1.0):
        """``values``: attr -> its values in the fitting data (code c + 1 is values[c], 0 missing);
        ``single``: attr -> (cells, u) of its non-zero cells; ``pair``: (a, b) -> (cells, u), a cell
        being ``code_a * (len(values[b]) + 1) + code_b``."""
        self.u_max = u_max
        self.scale = scale  # q is divided by it (its mean on the fitting data is 1)
        self.values = values
        self.attrs = list(single)  # the model's attributes, in fitting order
        self.pairs = list(pair)  # the pairs of them with a table
        # Every table's cells in one sorted int64 array of keys (table index << 32 | cell) and their u,
        # table after table, each in cell order: a dict per table keyed by value tuples took ~150 bytes
        # a cell (44.3 against 5.0 MB for 20,000 users), and the cells grow with the sample (37 per sampled
        # user in `bench soak`, the reach sampler's largest growth)
        self._code = {a: {v: i + 1 for i, v in enumerate(values[a])} for a in self.attrs}
        at = {a: i for i, a in enumerate(self.attrs)}
        self._pair_at = [(at[a], at[b], len(values[b]) + 1) for a, b in self.pairs]
        tables = list(single.values()) + list(pair.values())
        self._keys = np.concatenate([np.zeros(0, np.int64)] + [(t << 32) + c.astype(np.int64) for t, (c, _) in enumerate(tables)])
        self._u = np.concatenate([np.zeros(0)] + [u for _, u in tables])
        self._starts = np.searchsorted(self._keys, np.arange(len(tables) + 1, dtype=np.int64) << 32)

    def _table(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Table ``t``'s (cells, u)."""
        lo, hi = self._starts[t], self._starts[t + 1]
        return self._keys[lo:hi] & 0xFFFFFFFF, self._u[lo:hi]

    @classmethod
    def fit(cls, cols: dict, values: dict, w: np.ndarray, t_min_share: float = 1e-4) -> "ScoreModel":
        total = float(w.sum())
        t_min = max(total * t_min_share, 1e-9)
        cover = {a: float(w[np.asarray(c) >= 0].sum()) for a, c in cols.items()}
        attrs = sorted(sorted(cols, key=lambda a: (-cover[a], a))[:MAX_MODEL_ATTRS])

        def cells(t):  # the non-zero cells of a count table and their u
            nz = np.flatnonzero(t)
            return nz, 1.0 / np.maximum(t[nz], t_min) ** 2

        single = {a: cells(np.bincount(cols[a] + 1, weights=w, minlength=len(values[a]) + 1)) for a in attrs}
        pair = {}
        for a, b in itertools.combinations(attrs, 2):
            vb = len(values[b]) + 1
            if (len(values[a]) + 1) * vb > MAX_PAIR_CELLS:
                continue
            pair[(a, b)] = cells(np.bincount((cols[a] + 1) * vb + cols[b] + 1, weights=w, minlength=(len(values[a]) + 1) * vb))
        model = cls(1.0 / t_min ** 2, {a: list(values[a]) for a in attrs}, single, pair)
        vocab = {a: {v: i for i, v in enumerate(vals)} for a, vals in values.items()}
        q = model.q_codes(cols, vocab, len(w))
        wq = float((w * q).sum())
        model.scale = wq / total if total > 0 and wq > 0 else 1.0
        return model

    def score(self, attrs: dict) -> float:
        """``r`` of one user: the sum of its cell's u in every table (``u_max`` for a cell the fitting
        data did not have: an unseen value)."""
        codes = [0 if (v := attrs.get(a)) is None else self._code[a].get(v, -1) for a in self.attrs]
        keys = [(t << 32) + c if c >= 0 else -1 for t, c in enumerate(codes)]
        n = len(codes)
        keys += [((n + t) << 32) + codes[i] * vb + codes[j] if codes[i] >= 0 and codes[j] >= 0 else -1
                 for t, (i, j, vb) in enumerate(self._pair_at)]
        want = np.array(keys, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._keys, want), max(len(self._keys) - 1, 0))
        found = (self._keys[at] == want) & (want >= 0) if len(self._keys) else np.zeros(len(want), bool)
        # summed table by table in order, as floats: the same r, bit for bit, whatever the look-up
        return sum(np.where(found, self._u[at] if len(self._u) else 0.0, self.u_max).tolist())

    def q(self, attrs: dict) -> float:
        """The sampling weight of one user: ``sqrt(r)``, scaled to mean 1 on the fitting data (1 when
        the model was fitted on no attribute at all)."""
        if not self.attrs:
            return 1.0
        return float(np.sqrt(self.score(attrs))) / self.scale

    def q_codes(self, cols: dict, vocab: dict, n: int | None = None) -> np.ndarray:
        """``q`` of many users: ``cols[attr]`` codes (-1: missing) into ``vocab[attr]``.

        Each table becomes a look-up table over today's codes by moving its cells from the fitting
        data's codes to today's (``remap``, one dict pass per attribute), in numpy: the tables hold up
        to a pair of values per sampled user for every pair of attributes, too many for a Python loop
        each time a view asks for a fresh sample."""
        n = _rows(cols, n)
        if not self.attrs:
            return np.ones(n)
        remap = {}  # attr -> today's code (-1: missing, the look-up tables' last slot) of each fitted code
        for a, vals in self.values.items():
            voc = vocab.get(a, {})
            m = np.full(len(vals) + 1, -2, dtype=np.int64)  # -2: the fitted value has no code today
            m[0] = -1
            m[1:] = [voc.get(v, -2) for v in vals]
            remap[a] = (m, len(voc) + 1)
        r = np.zeros(n)
        for t, a in enumerate(self.attrs):
            nz, u = self._table(t)
            m, size = remap[a]
            lut = np.full(size, self.u_max)
            keep = m[nz] != -2
            lut[m[nz][keep]] = u[keep]
            r += lut[cols[a]] if a in cols else lut[-1]
        for t, ((a, b), (_, _, vb)) in enumerate(zip(self.pairs, self._pair_at)):
            cell, u = self._table(len(self.attrs) + t)
            ca, cb = cell // vb, cell % vb
            # a pair's cells, looked up by one key per (code a, code b), not through a dense (|a|, |b|)
            # table: with vocabularies of thousands of values that table took tens of MB and seconds
            # to fill for every pair of attributes each time a sample was frozen
            (ma, sa), (mb, sb) = remap[a], remap[b]
            xa, xb = ma[ca], mb[cb]
            keep = (xa != -2) & (xb != -2)
            keys, first = np.unique(_pair_key(xa[keep], sa, xb[keep], sb)[::-1], return_index=True)
            cells = u[keep][::-1][first]  # the last cell written for a key wins, as in a table
            want = _pair_key(cols[a] if a in cols else np.full(n, -1), sa, cols[b] if b in cols else np.full(n, -1), sb)
            at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
            r += np.where(keys[at] == want, cells[at], self.u_max) if len(keys) else self.u_max
        return np.sqrt(r) / self.scale


def _pair_key(xa: np.ndarray, sa: int, xb: np.ndarray, sb: int) -> np.ndarray:
    """One int64 per pair of codes; -1 (missing) is each attribute's last slot, as in its look-up table."""
    return np.where(xa < 0, sa - 1, xa).astype(np.int64) * sb + np.where(xb < 0, sb - 1, xb)


def probe_scores(cols: dict, values: dict, w: np.ndarray, queries: list | None = None,
                 vocab: dict | None = None, t_min_share: float = 1e-4) -> np.ndarray:
    """Each row's probe score ``r_i = sum over workload segments g containing it of 1 / T_g^2``.

    The workload is ``queries`` (parsed query trees, evaluated on the rows) or, by default, every
    single value and every pair of values of two attributes. ``T_g`` is the weighted segment size,
    floored at ``t_min_share`` of the total weight."""
    total = float(w.sum())
    t_min = max(total * t_min_share, 1e-9)
    r = np.zeros(len(w))
    if queries is not None:
        from .reach_query import evaluate
        for tree in queries:
            m = evaluate(tree, cols, vocab)
            t = max(float(w[m].sum()), t_min)
            r[m] += 1.0 / (t * t)
        return r
    attrs = sorted(cols)
    for a in attrs:
        code = cols[a] + 1  # 0 = missing
        t = np.maximum(np.bincount(code, weights=w, minlength=len(values[a]) + 1), t_min)
        r += 1.0 / (t[code] ** 2)
    for a, b in itertools.combinations(attrs, 2):
        vb = len(values[b]) + 1
        if (len(values[a]) + 1) * vb > MAX_PAIR_CELLS:  # high-cardinality pairs: singles only
            continue
        code = (cols[a] + 1) * vb + cols[b] + 1
        t = np.maximum(np.bincount(code, weights=w, minlength=(len(values[a]) + 1) * vb), t_min)
        r += 1.0 / (t[code] ** 2)
    return r


def learn_strata(cols: dict, values: dict, w: np.ndarray, r: np.ndarray, max_strata: int = 64,
                 min_leaf: float = 50.0, min_gain: float = 1e-3, attrs: tuple = ()) -> Strata:
    """Greedy strata (see the module docstring): ``cols[attr]`` codes into ``values[attr]`` (-1:
    missing), ``w`` each row's population weight, ``r`` its probe score. ``attrs`` limits the
    attributes that may split (empty: all)."""
    allowed = [a for a in sorted(cols) if not attrs or a in attrs]
    wr = w * r
    nodes = [{"key": "[]", "split": None, "children": {}, "rest": None, "leaf": -1}]
    rows = {0: np.arange(len(w))}
    used = {0: set()}

    def cost(idx) -> float:
        return float(np.sqrt(w[idx].sum() * wr[idx].sum()))

    def best_split(i: int, budget: int):
        idx = rows[i]
        here = cost(idx)
        best = None
        for a in allowed:
            if a in used[i] or budget < 1:
                continue
            code = cols[a][idx] + 1
            nv = len(values[a]) + 1
            nw = np.bincount(code, weights=w[idx], minlength=nv)
            nr = np.bincount(code, weights=wr[idx], minlength=nv)
            own = [c for c in np.argsort(-np.sqrt(nw * nr)) if c > 0 and nw[c] >= min_leaf][:budget]
            if not own:
                continue
            rest = np.ones(nv, dtype=bool)
            rest[own] = False
            after = float(np.sqrt(nw[own] * nr[own]).sum() + np.sqrt(nw[rest].sum() * nr[rest].sum()))
            gain = here - after
            if best is None or gain > best[0]:
                best = (gain, a, [int(c) for c in own])
        return best

    total = cost(rows[0])
    while True:
        leaves = [i for i, nd in enumerate(nodes) if nd["split"] is None]
        budget = max_strata - len(leaves)  # children a split may add beyond the one it replaces
        if budget < 1:
            break
        cands = [(best_split(i, budget), i) for i in leaves]
        cands = [(b, i) for b, i in cands if b is not None]
        if not cands:
            break
        (gain, a, own), i = max(cands, key=lambda t: t[0][0])
        if gain < min_gain * total:
            break
        nd = nodes[i]
        nd["split"] = a
        idx = rows.pop(i)
        code = cols[a][idx] + 1
        path = path_of(nd["key"])
        for c in own:
            v = values[a][c - 1]
            nd["children"][v] = len(nodes)
            rows[len(nodes)] = idx[code == c]
            used[len(nodes)] = used[i] | {a}
            nodes.append({"key": orjson.dumps(path + [[a, v]]).decode(), "split": None, "children": {},
                          "rest": None, "leaf": -1})
        nd["rest"] = len(nodes)
        rows[len(nodes)] = idx[~np.isin(code, own)]
        used[len(nodes)] = used[i] | {a}
        nodes.append({"key": orjson.dumps(path + [[a, "*"]]).decode(), "split": None, "children": {},
                      "rest": None, "leaf": -1})
    st = Strata(nodes)
    st.n = [float(w[rows[i]].sum()) for i in st.leaves]
    st.s = [float(np.sqrt(wr[rows[i]].sum() / max(w[rows[i]].sum(), 1e-12))) for i in st.leaves]
    return st


def allocate(N: np.ndarray, S: np.ndarray, n: int, floor: int) -> np.ndarray:
    """Sample sizes per stratum: ``n_h`` proportional to ``N_h S_h`` (Neyman), at least
    ``min(floor, N_h)``, at most ``N_h`` (a census), summing to about ``n`` (water-filling)."""
    N = np.asarray(N, dtype=float)
    score = np.asarray(N * np.maximum(S, 0), dtype=float)
    if score.sum() <= 0:
        score = N.copy() if N.sum() > 0 else np.ones_like(N)
    lo = np.minimum(floor, N)
    if lo.sum() > n:  # floors alone exceed the budget: shrink them evenly
        lo = lo * (n / lo.sum())
    k = np.zeros_like(N)
    fixed = np.zeros(len(N), dtype=bool)
    for _ in range(len(N) + 1):
        free = ~fixed
        budget = n - k[fixed].sum()
        if not free.any():
            break
        sc = score[free]
        k[free] = budget * (sc / sc.sum() if sc.sum() > 0 else np.full(len(sc), 1.0 / len(sc)))
        low = free & (k < lo)
        high = free & (k > N)
        if not low.any() and not high.any():
            break
        k[low] = lo[low]
        k[high] = N[high]
        fixed |= low | high
    return np.maximum(np.floor(k + 1e-9), np.minimum(1, N)).astype(np.int64)
