"""``loopline quality``: data-source quality from an event log (offline) or from running ``reach`` workers.

Public surface: ``quality_counts_from_records``, ``gather_worker_counts``, ``quality_report``,
``adjusted_reach``, ``format_quality``, ``QualityCommand`` and ``run_quality`` (``loopline quality``).

Offline, the log goes through the same code the workers run: each partition's
:class:`~loopline.state.ingest.IngestCore` (so invalid lines are dead-lettered with their reasons and
duplicate impressions rejected), its ``audience`` outputs into
:class:`~loopline.state.quality_counts.QualityCounts`. The counts do not depend on the order or the
partitioning of the values, so the offline report equals the one from workers that consumed the same
log. From workers, ``GET /quality?fit=0`` on each gives its partitions' aggregates; they are summed and
fitted here, with every truth report seen so far.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

import orjson

from loopline.errors import ConfigError
from loopline.model.quality import METHODS, QualityConfig, adjust_reach, assess
from loopline.settings import argument, nested, same_as, setting
from loopline.state.quality_counts import QualityCounts, merge_aggregates
from loopline.stream.app import WorkerConfig

from .eventlog import LogRecord

__all__ = ["quality_counts_from_records", "gather_worker_counts", "quality_report", "adjusted_reach",
           "format_quality", "QualityCommand", "run_quality"]


def quality_counts_from_records(records: list[LogRecord], partitions: int = 4,
                                progress: bool = False) -> tuple[dict, dict]:
    """(merged quality aggregate, event counts ``{"read", "accepted", "deadletter", "by_reason"}``)."""
    from .evaluate import ingest_outputs
    qc = QualityCounts({})
    dead: dict[str, int] = {}
    for o in ingest_outputs(records, partitions, progress="quality" if progress else None, audience=True):
        if o.kind == "audience":
            qc.learn_one(o.value)
        elif o.kind == "deadletter":
            dead[o.value["reason"]] = dead.get(o.value["reason"], 0) + 1
    nd = sum(dead.values())
    events = {"read": len(records), "accepted": len(records) - nd, "deadletter": nd,
              "by_reason": dict(sorted(dead.items()))}
    return qc.aggregate(), events


def gather_worker_counts(urls: list[str], partitions: int | None = None, timeout: float = 10.0) -> tuple[dict, dict]:
    """Sum the ``/quality`` aggregates of running workers: (aggregate, ``{"workers", "partitions",
    "missing_partitions", "duplicate_partitions"}``). A partition reported by two workers (during a
    rebalance) counts once."""
    parts: dict[str, dict] = {}
    dup = []
    for url in urls:
        u = url.rstrip("/")
        if not u.startswith(("http://", "https://")):
            u = "http://" + u
        try:
            with urllib.request.urlopen(f"{u}/quality?fit=0", timeout=timeout) as r:
                body = orjson.loads(r.read())
        except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as exc:
            raise ConfigError(f"workers: cannot read {u}/quality: {exc}") from None
        for p, agg in body.get("partitions", {}).items():
            if p in parts:
                dup.append(int(p))
                continue
            parts[p] = agg
    held = sorted(int(p) for p in parts)
    missing = sorted(set(range(partitions)) - set(held)) if partitions else []
    return merge_aggregates(parts.values()), {"workers": len(urls), "partitions": held,
                                              "missing_partitions": missing, "duplicate_partitions": sorted(dup)}


def quality_report(agg: dict, cfg: QualityConfig = QualityConfig(), methods: tuple = METHODS) -> dict:
    """The fit (``loopline.model.quality.assess``) of a merged aggregate."""
    return assess(agg, cfg, methods)


def adjusted_reach(report: dict, source: str, segment: str, users: float, users_ci, exclude: bool = False) -> dict:
    """Quality-adjusted reach for a rule that requires (``exclude``: excludes) ``source``'s
    ``segment`` label: expected truly-in-segment users out of a reach answer's ``users``, from the
    report's a (b) and its interval."""
    row = next((r for r in report["sources"] if r["source"] == source and r["segment"] == segment), None)
    if row is None:
        known = ", ".join(f"{r['source']}:{r['segment']}" for r in report["sources"]) or "none"
        raise ConfigError(f"adjust_reach: no source {source!r} with segment {segment!r} (known: {known})")
    key = "b" if exclude else "a"
    if row.get(key) is None or row.get(f"{key}_ci") is None:
        raise ConfigError(f"adjust_reach: {source}:{segment} has no fitted {key} with an interval "
                          f"(verdict {row['verdict']}: {row.get('note', '')})")
    out = adjust_reach(users, users_ci, row[key], row[f"{key}_ci"], report["coverage"])
    return {"source": source, "segment": segment, "labelled": not exclude, "verdict": row["verdict"], **out}


def _fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v, nd) for v in x) + "]"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def format_quality(out: dict) -> str:
    """A readable table of the report (the JSON has every figure)."""
    rows = [("rank", "source", "segment", "verdict", "camp", "a [ci]", "b [ci]", "lift", "precision", "recall",
             "corr")]
    for r in out["report"]["sources"]:
        rows.append((_fmt(r.get("rank")), r["source"], r["segment"], r["verdict"], str(r["campaigns"]),
                     f"{_fmt(r.get('a'))} {_fmt(r.get('a_ci'))}", f"{_fmt(r.get('b'))} {_fmt(r.get('b_ci'))}",
                     _fmt(r.get("lift"), 2), _fmt(r.get("precision")), _fmt(r.get("recall")),
                     _fmt(r.get("correlation"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for r in out["report"]["sources"]:
        if r.get("note"):
            lines.append(f"note {r['source']}:{r['segment']}: {r['note']}")
    if "adjusted_reach" in out:
        ar = out["adjusted_reach"]
        lines.append(f"quality-adjusted reach ({ar['source']}:{ar['segment']}): {ar['users']:.0f} users truly in, "
                     f"interval {_fmt(ar['users_ci'], 0)} (reach {ar['reach_users']:.0f} {_fmt(ar['reach_users_ci'], 0)})")
    return "\n".join(lines)


@dataclass(frozen=True)
class QualityCommand:
    """``loopline quality``: where the counts come from, the fits, and (optionally) a reach answer to adjust."""

    events: str | None = argument(None, "offline: a JSONL event log", metavar="FILE", exclusive="source",
                                  required=True)
    workers: str | None = argument(None, "running reach workers' HTTP addresses (host:port)", metavar="URL,...",
                                   exclusive="source", required=True)
    partitions: int = same_as(WorkerConfig, "partitions")
    methods: tuple = setting(METHODS, "fits: ls (weighted least squares), em (binomial likelihood), gls "
                                      "(shared-user covariance)")
    fit: QualityConfig = nested(QualityConfig)
    adjust_reach: str | None = argument(None, "quality-adjusted reach for a rule using this source's segment",
                                        metavar="SOURCE:SEGMENT")
    reach_json: str | None = argument(None, "the reach answer to adjust (loopline reach --json)", metavar="FILE")
    users: float | None = argument(None, "or the reach answer's users ...")
    users_ci: tuple | None = argument(None, "... and interval", nargs=2, parse=float, metavar=("LO", "HI"))
    exclude: bool = argument(False, "the rule excludes the segment (uses b, not a)")


def run_quality(cfg: QualityCommand, progress: bool = True) -> dict:
    """The quality report of the log or of the workers, and the adjusted reach when asked for."""
    if cfg.events:
        from .eventlog import read_log
        try:
            records = read_log(cfg.events)
        except OSError as exc:
            raise ConfigError(f"events: cannot read {cfg.events!r}: {exc.strerror}") from None
        agg, events = quality_counts_from_records(records, cfg.partitions, progress=progress)
        out = {"events": events}
    else:
        urls = [u for u in (cfg.workers or "").split(",") if u.strip()]
        if not urls:
            raise ConfigError("workers: give at least one worker URL (host:port)")
        agg, info = gather_worker_counts(urls, cfg.partitions)
        out = {"workers": info}
    out["report"] = quality_report(agg, cfg.fit, cfg.methods)
    if cfg.adjust_reach:
        source, sep, segment = cfg.adjust_reach.partition(":")
        if not sep or not source or not segment:
            raise ConfigError(f"adjust_reach: expected SOURCE:SEGMENT, got {cfg.adjust_reach!r}")
        if cfg.reach_json:
            try:
                with open(cfg.reach_json, "rb") as f:
                    reach = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise ConfigError(f"reach_json: cannot read {cfg.reach_json!r}: {exc}") from None
            if not isinstance(reach, dict) or "users" not in reach or "users_ci" not in reach:
                raise ConfigError("reach_json: expected a reach answer with 'users' and 'users_ci'")
            users, users_ci = reach["users"], reach["users_ci"]
        elif cfg.users is not None and cfg.users_ci is not None:
            users, users_ci = cfg.users, list(cfg.users_ci)
        else:
            raise ConfigError("adjust_reach: needs --reach-json FILE or --users N --users-ci LO HI")
        out["adjusted_reach"] = adjusted_reach(out["report"], source, segment, users, users_ci, cfg.exclude)
    return out
