"""Scoring candidate ads for one user with a vertical model: the core of ``POST /score/``.

Public surface: ``ScoreRequest``, ``parse_score_request``, ``score_candidates``, ``MAX_CANDIDATES``.

A request names a user, a vertical and up to ``MAX_CANDIDATES`` candidates (each an ad and its campaign,
optionally extra features); the user's attrs come with the request, and the user's LoopFM sequence is
read from the history store strictly before ``ts`` (default: now), once for all candidates. Bad
requests raise :class:`~loopline.state.errors.ConfigError` whose message names the field.

>>> r = parse_score_request({"user": "u1", "vertical": "feed", "candidates": [{"ad": "a1", "campaign": "c1"}]},
...                         verticals={"feed"})
>>> r.user, len(r.candidates)
('u1', 1)
>>> parse_score_request({"user": "u1", "vertical": "shop", "candidates": []}, verticals={"feed"})
Traceback (most recent call last):
...
loopline.state.errors.ConfigError: vertical: no model for 'shop'; known: feed
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from loopline.state.errors import ConfigError

from .vm import VMFeaturizer, VMLearner

__all__ = ["ScoreRequest", "parse_score_request", "score_candidates", "MAX_CANDIDATES"]

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
        raise ConfigError(f"vertical: no model for {vertical!r}; known: {', '.join(sorted(verticals)) or '(none yet)'}")
    cands = obj.get("candidates")
    if not isinstance(cands, list):
        raise ConfigError("candidates: must be a list of {ad, campaign} objects")
    if len(cands) > max_candidates:
        raise ConfigError(f"candidates: at most {max_candidates} per request, got {len(cands)}")
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
