"""Scoring candidate ads for one user with a vertical model: the core of ``POST /score/``.

Public surface: ``ScoreRequest``, ``parse_score_request``, ``score_candidates``, ``score_answer``,
``ServingModel``, ``MAX_CANDIDATES``.

A request names a user, a vertical and up to ``MAX_CANDIDATES`` candidates (each an ad and its campaign,
optionally extra features); the user's attrs come with the request, and the user's LoopFM sequence is
read from the history store strictly before ``ts`` (default: now), once for all candidates. Bad
requests raise :class:`~loopline.errors.ConfigError` whose message names the field; its subclasses
carry the HTTP status: a vertical with no model is :class:`~loopline.errors.NotFound` (404), more than
``MAX_CANDIDATES`` candidates :class:`~loopline.errors.TooLarge` (413), anything else 400.
:func:`score_answer` is the whole handler without the web framework: body in, ``(status, JSON object)``
out.

>>> r = parse_score_request({"user": "u1", "vertical": "feed", "candidates": [{"ad": "a1", "campaign": "c1"}]},
...                         verticals={"feed"})
>>> r.user, len(r.candidates)
('u1', 1)
>>> parse_score_request({"user": "u1", "vertical": "shop", "candidates": []}, verticals={"feed"})
Traceback (most recent call last):
...
loopline.errors.NotFound: vertical: no model for 'shop'; known: feed
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
import orjson
import torch
from torch import nn

from loopline.errors import ConfigError, LooplineError, NotFound, TooLarge
from loopline.kernels.dispatch import DispatchLinear

from .vm import VMBatch, VMConfig, VMFeaturizer, VMLearner

__all__ = ["ScoreRequest", "parse_score_request", "score_candidates", "score_answer", "ServingModel",
           "MAX_CANDIDATES"]

MAX_CANDIDATES = 1000
MAX_STRING = 256  # characters of a user, vertical, ad or campaign


@dataclass(frozen=True)
class ScoreRequest:
    user: str
    vertical: str
    candidates: tuple  # of {"ad", "campaign", "features"} dicts
    attrs: dict
    ts: float


def _string(obj: dict, name: str, where: str = "") -> str:
    v = obj.get(name)
    if not isinstance(v, str) or not v or len(v) > MAX_STRING:
        raise ConfigError(f"{where}{name}: must be a non-empty string of at most {MAX_STRING} characters")
    return v


# the features of every candidate that has none: one shared, read-only map, so that the featurizer sees
# one map for the whole request and hashes it once
_NO_FEATURES = MappingProxyType({})


def _str_map(obj: dict, name: str, where: str = "") -> dict:
    v = obj.get(name) or {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise ConfigError(f"{where}{name}: must be an object of strings")
    return v


def parse_score_request(obj, verticals: set, max_candidates: int = MAX_CANDIDATES) -> ScoreRequest:
    if not isinstance(obj, dict):
        raise ConfigError("request: must be a JSON object")
    user = _string(obj, "user")
    vertical = _string(obj, "vertical")
    if vertical not in verticals:
        raise NotFound(f"vertical: no model for {vertical!r}; known: {', '.join(sorted(verticals)) or '(none yet)'}")
    cands = obj.get("candidates")
    if not isinstance(cands, list):
        raise ConfigError("candidates: must be a list of {ad, campaign} objects")
    if len(cands) > max_candidates:
        raise TooLarge(f"candidates: at most {max_candidates} per request, got {len(cands)}")
    parsed = []
    for i, c in enumerate(cands):
        if type(c) is dict:
            # the common candidate, checked in one expression: two short strings and no extra features
            ad, campaign = c.get("ad"), c.get("campaign")
            # (what _string and _str_map accept, checked at once; tests/model/test_serving.py compares them)
            if (type(ad) is str and type(campaign) is str and 0 < len(ad) <= MAX_STRING
                    and 0 < len(campaign) <= MAX_STRING and not c.get("features")):
                parsed.append({"ad": ad, "campaign": campaign, "features": _NO_FEATURES})
                continue
        where = f"candidates[{i}]."
        if not isinstance(c, dict):
            raise ConfigError(f"candidates[{i}]: must be an object")
        parsed.append({"ad": _string(c, "ad", where), "campaign": _string(c, "campaign", where),
                       "features": _str_map(c, "features", where) or _NO_FEATURES})
    ts = obj.get("ts", time.time())
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not np.isfinite(ts):
        raise ConfigError("ts: must be a finite number (seconds since the epoch)")
    return ScoreRequest(user=user, vertical=vertical, candidates=tuple(parsed), attrs=_str_map(obj, "attrs"),
                        ts=float(ts))


class _Flat(nn.Module):
    """The VM's serving probability as a function of plain tensors (what ``torch.jit.trace`` takes)."""

    def __init__(self, model: nn.Module, fields: tuple):
        super().__init__()
        self.model, self.fields = model, fields

    def forward(self, codes, code_mask, raw_ad, raw_campaign, raw_mask, labels, *ids):
        b = VMBatch(ids={f: (ids[2 * i], ids[2 * i + 1]) for i, f in enumerate(self.fields)}, codes=codes,
                    code_mask=code_mask, raw_ad=raw_ad, raw_campaign=raw_campaign, raw_mask=raw_mask,
                    labels=labels, soft=labels, size=labels.shape[0])
        return torch.sigmoid(self.model(b)["logit"])


def _flat(b: VMBatch, fields: tuple) -> tuple:
    return (b.codes, b.code_mask, b.raw_ad, b.raw_campaign, b.raw_mask, b.labels,
            *[t for f in fields for t in b.ids[f]])


def _probe_batches(cfg: VMConfig) -> list[VMBatch]:
    """Two small batches of different sizes and sequence lengths: one to trace on, one to check the trace."""
    f = VMFeaturizer(replace(cfg, hash_cache=0))
    out = []
    for n, seq in ((3, 2), (5, cfg.seq_len)):
        exs = [{"ad": f"a{i}", "campaign": f"c{i % 2}", "attrs": {"age": str(i)}, "features": {"k": str(i)} if i else {},
                "vertical": "v", "label": 0} for i in range(n)]
        codes = [np.linspace(-1, 1, seq * cfg.code_dim, dtype=np.float32).reshape(seq, cfg.code_dim)] * n
        raw = [[(float(t), f"a{t}", f"c{t}", "impression") for t in range(seq)]] * n
        out.append(f.batch(exs, codes, raw))
    return out


class _OneId(nn.Module):
    """A mean ``EmbeddingBag`` of the fields whose every bag holds one id (the featurizer's ad and
    campaign): the mean of one row is that row, so a plain lookup gives the same numbers, bit for bit,
    without the bag kernel's bookkeeping (about 40 us a call here, and the VM makes six such calls)."""

    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.weight = bag.weight  # the same Parameter: its name in the state dict is unchanged

    def forward(self, ids, offsets):
        return nn.functional.embedding(ids, self.weight)


def _one_id_lookups(model: nn.Module) -> nn.Module:
    """``model`` with its one-id bags (the ``ad`` and ``campaign`` fields of ``bags`` and ``first``) as
    plain lookups; serving only: training keeps the bag's backward, and its numbers."""
    for table in (model.bags, model.first):
        for f in ("ad", "campaign"):
            bag = table[f] if f in table else None
            if (isinstance(bag, nn.EmbeddingBag) and bag.mode == "mean" and bag.max_norm is None
                    and bag.padding_idx is None and not bag.include_last_offset):
                table[f] = _OneId(bag)
    return model


class ServingModel:
    """A VM's serving copy for ``POST /score/``: its weights, traced once (TorchScript), refreshed in place.

    Why traced: in a role ``all`` worker the FM and VM training threads hold the GIL most of the time, and
    an eager forward gives it up and waits for it again at each of its ~60 torch ops (each wait up to the
    switch interval): measured, a 20-candidate request took 46 ms at the median in ``bench soak`` against
    4 ms alone. A traced forward is one call that releases the GIL once. It runs without the JIT's
    optimizations (``optimized_execution(False)``), so it computes what the eager model does, bit for bit;
    a trace that does not reproduce the eager model on a second probe batch, or a model with layers the
    LoKA dispatch put on FP8 kernels (their quantized weights are prepared per weight version, which a
    trace would freeze), is served eagerly. The traced copy looks its one-id fields up instead of bagging
    them (``_OneId``: half the forward was the bag kernel's bookkeeping), and the check on the probe batch
    compares it with the model as trained, so it covers that swap too.

    Refreshing copies the new weights into the one serving copy under a lock that a forward holds too (a
    traced forward releases the GIL, and a refresh comes from the vm's thread): no new trace (TorchScript
    keeps every traced class for the life of the process, about 0.7 MB each, so tracing at every refresh
    would grow without bound), no allocation, and no request sees half-copied weights. (Two copies, one
    refreshed while the other served, took 1.3 MB more per served vertical, which the vm role's memory
    grew by in `bench soak` while verticals kept coming; a forward waits at most one copy of the
    weights, well under a millisecond.)

    >>> learner = VMLearner(VMConfig(table_size=64, history="mean", seq_len=4, code_dim=3))
    >>> s = ServingModel(learner.model, learner.cfg)
    >>> s.traced, s.cfg is learner.cfg
    (True, True)
    >>> b = _probe_batches(learner.cfg)[1]
    >>> bool(np.array_equal(s.predict_many(b), learner.predict_many(b)))
    True
    """

    def __init__(self, model: nn.Module, cfg: VMConfig):
        self.cfg = cfg
        self._model, self._fn = self._prepare(copy.deepcopy(model))
        self._lock = threading.Lock()
        self.traced = self._fn is not None

    def _prepare(self, model: nn.Module) -> tuple[nn.Module, object]:
        model.eval().requires_grad_(False)
        if any(isinstance(m, DispatchLinear) for m in model.modules()):
            return model, None
        probe, check = _probe_batches(self.cfg)
        served = _one_id_lookups(copy.deepcopy(model))
        flat = _Flat(served, self.cfg.fields)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on shapes read as Python numbers
                fn = torch.jit.trace(flat, _flat(probe, self.cfg.fields), check_trace=False)
                with torch.jit.optimized_execution(False):
                    # against the model as trained: checks the lookups and the trace together
                    same = torch.equal(fn(*_flat(check, self.cfg.fields)),
                                       _Flat(model, self.cfg.fields)(*_flat(check, self.cfg.fields)))
        except Exception:  # noqa: BLE001 - a model the tracer cannot follow is served eagerly
            return model, None
        return (served, fn) if same else (model, None)

    def refresh(self, model: nn.Module) -> None:
        """Serve ``model``'s current weights (a model of the same structure)."""
        state = model.state_dict()
        with self._lock:
            self._model.load_state_dict(state)

    @torch.inference_mode()
    def predict_many(self, b: VMBatch) -> np.ndarray:
        with self._lock:
            if self._fn is None:
                return torch.sigmoid(self._model(b)["logit"]).numpy().astype(np.float64)
            with torch.jit.optimized_execution(False):
                return self._fn(*_flat(b, self.cfg.fields)).numpy().astype(np.float64)


def score_candidates(learner: VMLearner | ServingModel, featurizer: VMFeaturizer, history, req: ScoreRequest) -> np.ndarray:
    """The serving head's probability for each candidate, in request order."""
    examples = [{"ad": c["ad"], "campaign": c["campaign"], "features": c["features"], "attrs": req.attrs,
                 "vertical": req.vertical, "label": 0} for c in req.candidates]
    if not examples:
        return np.zeros(0)
    codes = raw = None
    uses = learner.cfg.uses
    L = learner.cfg.seq_len
    if "fm" in uses:
        c = history.last_embeddings(req.user, req.ts, L)["codes"]
        codes = [c] * len(examples)
    if "raw" in uses:
        r = history.last_events(req.user, req.ts, L)
        raw = [r] * len(examples)
    return learner.predict_many(featurizer.batch(examples, codes, raw))


def score_answer(body: bytes, serving: dict, featurizer, history, variant: str) -> tuple[int, dict]:
    """``POST /score/`` from the request body to ``(HTTP status, JSON object)``. ``serving`` maps each
    vertical to its serving learner; ``featurizer()`` returns the featurizer of the served variant (called
    only for a valid request). A :class:`~loopline.errors.LooplineError` answers its ``http_status`` and
    ``{"error": message}``."""
    try:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"request: not JSON ({exc})") from None
        req = parse_score_request(obj, set(serving))
        scores = score_candidates(serving[req.vertical], featurizer(), history, req)
    except LooplineError as exc:  # a bad request (4xx), or e.g. the history store closed at shutdown (503)
        return exc.http_status, {"error": str(exc)}
    return 200, {"user": req.user, "vertical": req.vertical, "variant": variant,
                 "scores": np.round(scores, 6).tolist()}
