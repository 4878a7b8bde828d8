"""Audience reach: how many users and impressions a targeting rule reaches over the event-time horizon,
with a 95% interval, from a small sample of users kept within one memory budget.

Public surface: ``ReachConfig`` (here), and from the modules that hold them (one idea each):
``ReachSampler``, ``user_hash``, ``segment_attr`` (``reach_sampler.py``: the streaming sample of a
partition over the horizon), ``Sample``, ``build_sample`` (``reach_sample.py``: the frozen, mergeable
sample), ``Estimate``, ``query_stats``, ``merge_stats``, ``finish``, ``answer``, ``users_estimate``,
``exact_answer`` (``reach_estimate.py``: Horvitz-Thompson estimates, the fall-back and the intervals).
The query language is ``reach_query.py``, the score model ``reach_strata.py``, the vocabulary
``reach_vocab.py``. The baselines (uniform, proportional, theta sketches) live in ``ops/bench_reach.py``.

**Memory.** One knob, ``budget_users``: the users the sample holds in all, shared by the partitions
(each holds ``ceil(budget_users / partitions)``), the whole horizon and every kind of user. The default,
20,000 users, is a 2% sample of a million-user audience; a frozen sample takes ``2 * attributes + 20``
bytes per user (about 34 with 7 attributes), the streaming structure a few hundred (Python objects);
answers say ``sample_bytes``, ``GET /reach`` both.

>>> s = ReachSampler(ReachConfig(budget_users=50, min_per_stratum=5))
>>> for i in range(200):
...     s.observe(f"u{i}", 100.0 + i, {"gender": "F" if i % 4 else "M", "age": "18-24"}, impressions=2)
>>> sample = s.snapshot()
>>> sample.n
50
>>> a = answer(sample, "gender = M")
>>> a["users_ci"][0] <= a["users"] <= a["users_ci"][1], abs(a["impressions"] - 2 * a["users"]) < 0.2
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loopline.errors import ConfigError
from loopline.settings import setting

__all__ = ["ReachConfig", "ReachSampler", "user_hash", "segment_attr", "Sample", "build_sample", "Estimate",
           "query_stats", "merge_stats", "finish", "answer", "users_estimate", "exact_answer"]


@dataclass(frozen=True)
class ReachConfig:
    """Settings of the reach sample; each is checked, a bad one raises ``ConfigError``."""

    # the memory bound: users held in all, over every partition and the whole horizon (a 2% sample of
    # a million users)
    budget_users: int = setting(20_000, "users the reach sample holds in all (every partition, the whole horizon)",
                                env="REACH_BUDGET_USERS")
    # n_min: the fewest sampled users the score model is learned from; the estimate's model error is
    # measured on samples of at least 2 n_min users (state/reach_estimate.py)
    min_per_stratum: int = setting(30, "n_min: the fewest sampled users the score model is learned from "
                                       "(the model's error is measured from 2 n_min)", env="REACH_MIN_PER_STRATUM")
    # event-time length of an epoch (the score model is learned again at every epoch boundary)
    epoch_s: float = setting(86_400.0, "epoch length, seconds of event time", flag="epoch", env="REACH_EPOCH")
    # the horizon: the last horizon_epochs * epoch_s seconds of event time (7 days by default)
    horizon_epochs: int = setting(7, "epochs in the horizon", flag="horizon", env="REACH_HORIZON")
    # the horizon's grid: it covers at most one bucket (epoch_s / buckets_per_epoch: an hour) more than asked
    buckets_per_epoch: int = 24
    # the rare part's share of the budget (state/reach_sampler.py); the uniform part keeps the rest, so
    # every user keeps 1 - rare_share of the uniform rate whatever the score model says, and a common
    # rule's error is at most sqrt(1 / 0.75) = 1.15x a uniform sample's (a bit more near a census: at a
    # 5% budget 1.17x); 0.3 measured up to 1.24x on the 10%+ rules at 5%
    rare_share: float = 0.25
    attrs: tuple = ()  # attributes the score model may use; empty: every attribute seen
    # the vocabulary (state/reach_vocab.py): names and values with codes; past a cap a new one is missing
    # until it is seen more than twice as often as the least used one, which it then replaces (pruned)
    max_values: int = 4096  # distinct values per attribute encoded
    max_attrs: int = 64  # distinct attribute names encoded (the event contract allows 64 per event); also
    # the most segment labels one user holds
    vocab_candidates: int = 256  # Misra-Gries counters for names (and per name, values) waiting for a code
    # users whose segment labels are held (labelled before their first impression, or re-coded when they
    # come back); the oldest labelled are forgotten first. About 200 bytes each
    max_segment_users: int = 200_000
    # the reach role's ``reach.answers`` table (stream/reach.py): a partition's share of an answer is
    # deleted once older than this (wall-clock seconds; its reader waits a few), or when the partition
    # holds more than max_answers (oldest first)
    answers_ttl_s: float = 600.0
    max_answers: int = 10_000
    seed: int = 0  # seeds the user hash: the same seed gives the same sample on every worker
    # latent classes the estimator's model learns from each partition's whole impression stream
    # (state/reach_model.py); its statistics take classes x (values + attributes) x 8 bytes per partition
    # (about 19 kB at 16 classes, 7 attributes and 150 values); 0: no stream model (independence)
    model_classes: int = 16

    def __post_init__(self):
        for name, lo in (("budget_users", 1), ("min_per_stratum", 1), ("horizon_epochs", 1), ("buckets_per_epoch", 1),
                         ("max_values", 1), ("max_attrs", 1), ("vocab_candidates", 1), ("max_segment_users", 1),
                         ("max_answers", 1), ("model_classes", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name}: must be an integer >= {lo}, got {v!r}")
        if not (isinstance(self.epoch_s, (int, float)) and self.epoch_s > 0 and np.isfinite(self.epoch_s)):
            raise ConfigError(f"epoch_s: must be a positive number of seconds, got {self.epoch_s!r}")
        ttl = self.answers_ttl_s
        if not (isinstance(ttl, (int, float)) and not isinstance(ttl, bool) and ttl > 0 and np.isfinite(ttl)):
            raise ConfigError(f"answers_ttl_s: must be a positive number of seconds, got {self.answers_ttl_s!r}")
        if not (isinstance(self.rare_share, (int, float)) and 0 <= self.rare_share < 1):
            raise ConfigError(f"rare_share: must be in [0, 1), got {self.rare_share!r}")


from .reach_estimate import Estimate, answer, exact_answer, finish, merge_stats, query_stats, users_estimate  # noqa: E402
from .reach_sample import Sample, build_sample  # noqa: E402
from .reach_sampler import ReachSampler, segment_attr, user_hash  # noqa: E402
