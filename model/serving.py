"""Scoring candidate ads for one user with a vertical model: the core of ``POST /score/``.

Public surface: ``ScoreRequest``, ``parse_score_request``, ``score_candidates``, ``score_answer``,
``MAX_CANDIDATES``.

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

import time
from dataclasses import dataclass

import numpy as np
import orjson

from loopline.errors import ConfigError, LooplineError, NotFound, TooLarge

from .vm import VMFeaturizer, VMLearner

__all__ = ["ScoreRequest", "parse_score_request", "score_candidates", "score_answer", "MAX_CANDIDATES"]

MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class ScoreRequest:
    user: str
    vertical: str
    candidates: tuple  # of {"ad", "campaign", "features"} dicts
    attrs: dict
    ts: float


def _string(obj: dict, name: str, where: str = "") -> str:
    v = obj.get(name)
    if not isinstance(v, str) or not v or len(v) > 256:
        raise ConfigError(f"{where}{name}: must be a non-empty string of at most 256 characters")
    return v


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
        where = f"candidates[{i}]."
        if not isinstance(c, dict):
            raise ConfigError(f"candidates[{i}]: must be an object")
        parsed.append({"ad": _string(c, "ad", where), "campaign": _string(c, "campaign", where),
                       "features": _str_map(c, "features", where)})
    ts = obj.get("ts", time.time())
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not np.isfinite(ts):
        raise ConfigError("ts: must be a finite number (seconds since the epoch)")
    return ScoreRequest(user=user, vertical=vertical, candidates=tuple(parsed), attrs=_str_map(obj, "attrs"),
                        ts=float(ts))


def score_candidates(learner: VMLearner, featurizer: VMFeaturizer, history, req: ScoreRequest) -> np.ndarray:
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
                 "scores": [round(float(s), 6) for s in scores]}
