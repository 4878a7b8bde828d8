"""``loopline bench WHAT``: which benchmark, its sizes, and where its JSON goes.

Public surface: ``BENCHMARKS``, ``BenchCommand``, ``run_bench``.

Each benchmark lives in its own module (``ops/bench.py`` is ``ingest``, ``ops/bench_WHAT.py`` the others)
and is imported only when it runs. ``--events`` sizes the log of ``ingest``, ``stage``, ``e2e`` and ``scale``;
``--repeats`` the repeats of each (``drift``: the generated logs, seeds 1..N); ``--seeds`` the logs of
``quality``; the soak's flags are :class:`~loopline.ops.bench_soak.SoakConfig`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from loopline.settings import argument, nested, setting

from .bench_soak import SoakConfig

__all__ = ["BENCHMARKS", "BenchCommand", "run_bench"]

BENCHMARKS = ("ingest", "history", "fm", "fp8", "quality", "drift", "reach", "score", "soak", "stage", "e2e",
              "scale")


@dataclass(frozen=True)
class BenchCommand:
    """``loopline bench``: one benchmark's settings; the JSON goes to ``path``."""

    what: str = argument("ingest", "the benchmark", choices=BENCHMARKS, positional=True, required=True)
    events: int = setting(20000, "ingest, stage, e2e, scale: events in the benchmark log", env="BENCH_EVENTS")
    repeats: int = setting(3, "repeats of the measurement (drift: generated logs)", env="BENCH_REPEATS")
    seeds: int = setting(20, "quality: generated logs to fit", env="BENCH_SEEDS")
    out: str | None = argument(None, "JSON file (default bench-WHAT.json)", metavar="FILE")
    # LOOPLINE_PROFILE is the profile's path inside the benchmarked worker (ops/bench.py)
    profile: bool = setting(False, "ingest: also profile the ingest path in-process", env="BENCH_PROFILE")
    soak: SoakConfig = nested(SoakConfig)

    @property
    def path(self) -> str:
        return self.out or f"bench-{self.what}.json"


def run_bench(cfg: BenchCommand, progress: bool = True) -> dict:
    """Run ``cfg.what``; its JSON (also written to ``cfg.path``)."""
    path, what = cfg.path, cfg.what
    if what == "ingest":
        from .bench import bench_ingest
        return bench_ingest(n_events=cfg.events, repeats=cfg.repeats, out_path=path, profile=cfg.profile)
    if what == "reach":
        from .bench_reach import bench_reach
        return bench_reach(repeats=cfg.repeats, out_path=path)
    if what == "quality":
        from .bench_quality import bench_quality
        return bench_quality(seeds=cfg.seeds, out_path=path, progress=progress)
    if what == "history":
        from .bench_history import bench_history
        return bench_history(repeats=cfg.repeats, out_path=path)
    if what == "drift":  # repeats: generated logs (seeds 1..N)
        from .bench_drift import bench_drift
        return bench_drift(repeats=cfg.repeats, out_path=path, progress=progress)
    if what == "score":
        from .bench_score import bench_score
        return bench_score(repeats=cfg.repeats, out_path=path, progress=progress)
    if what == "soak":  # also writes a PNG of RSS and data-directory size beside the JSON
        from .bench_soak import bench_soak
        return bench_soak(cfg.soak, out_path=path, progress=True)
    if what == "stage":  # events: lines of the generated log
        from .bench_stage import bench_stage
        return bench_stage(n_events=cfg.events, repeats=cfg.repeats, out_path=path, progress=True)
    if what == "e2e":  # a role all worker against evaluate on the same log
        from .bench_e2e import bench_e2e
        return bench_e2e(n_events=cfg.events, repeats=cfg.repeats, out_path=path, progress=True)
    if what == "scale":  # the ingest role with 1 and 2 workers in one group, the FM stage over 1 and 2 ranks
        from .bench_scale import bench_scale
        return bench_scale(n_events=cfg.events, repeats=cfg.repeats, out_path=path, progress=progress)
    if what == "fp8":
        from .bench_fp8 import bench_fp8
        return bench_fp8(repeats=cfg.repeats, out_path=path)
    from .bench_fm import bench_fm
    return bench_fm(repeats=cfg.repeats, out_path=path)
