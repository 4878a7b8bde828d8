"""What a command reads (an event log or a data set) and the attribution join that goes with it.

Public surface: ``SourceConfig``, ``JoinConfig``.

``evaluate``, ``replay`` and ``report`` read ``--events FILE`` or ``--dataset NAME`` (exactly one);
``worker``, ``evaluate`` and ``report`` take the join's ``--window``, ``--lateness`` and ``--target-kind``.
The window is the one setting whose default depends on the input: a data set brings its own
(``ops/datasets.py`` ``DATASET_WINDOWS``: MovieLens' is 60 s), anything else gets
``AttributionConfig``'s day. So ``JoinConfig.window_s`` is None until :meth:`JoinConfig.attribution`
resolves it, and the due-work bucket and the de-duplication horizon follow the window there (a short
window closes promptly too).

>>> JoinConfig(window_s=60.0).attribution().bucket_s
60.0
>>> JoinConfig().attribution("movielens-100k").window_s
60.0
"""

from __future__ import annotations

from dataclasses import dataclass

from loopline.errors import ConfigError
from loopline.settings import argument, same_as, setting
from loopline.state.attribution import AttributionConfig

__all__ = ["SourceConfig", "JoinConfig"]


@dataclass(frozen=True)
class SourceConfig:
    """The input of one run: a JSONL event log or a named data set."""

    events: str | None = argument(None, "a JSONL event log", metavar="FILE", exclusive="source", required=True)
    dataset: str | None = argument(None, "a real data set: movielens-100k, or movielens-100k-genres (a vertical per genre)", metavar="NAME", exclusive="source",
                                   required=True)

    def __post_init__(self):
        if (self.events is None) == (self.dataset is None):
            raise ConfigError("events: give either an event log (events) or a data set (dataset)")

    @property
    def name(self) -> str:
        return self.events if self.events is not None else self.dataset

    def records(self) -> list:
        """The log's records in event-time order (a data set's are ordered here; a log is read as is)."""
        from .eventlog import order_records, read_log
        if self.events is not None:
            try:
                return read_log(self.events)
            except OSError as exc:
                raise ConfigError(f"events: cannot read {self.events!r}: {exc.strerror}") from None
        from .datasets import dataset_lines
        return order_records(dataset_lines(self.dataset))


@dataclass(frozen=True)
class JoinConfig:
    """The attribution join's flags; :meth:`attribution` makes the ``AttributionConfig``."""

    window_s: float | None = setting(None, "attribution window, seconds of event time (default: the data "
                                           f"set's, else {AttributionConfig.window_s:g})", flag="window")
    lateness_s: float = same_as(AttributionConfig, "lateness_s")
    target_kind: str = same_as(AttributionConfig, "target_kind")

    def attribution(self, dataset: str | None = None) -> AttributionConfig:
        """The join's config for ``dataset`` (None: an event log)."""
        window = self.window_s
        if window is None:
            from .datasets import DATASET_WINDOWS
            window = DATASET_WINDOWS.get(dataset, AttributionConfig.window_s)
        bucket = min(AttributionConfig.bucket_s, max(window, 1.0))  # a short window closes promptly too
        return AttributionConfig(window_s=window, lateness_s=self.lateness_s, target_kind=self.target_kind,
                                 bucket_s=bucket, dedup_horizon_s=max(window, AttributionConfig.dedup_horizon_s))
