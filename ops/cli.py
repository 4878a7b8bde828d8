"""The ``loopline`` command line. Every sub-command takes ``--json`` where it prints results.

Public surface: ``main``, ``build_parser``.

Errors: the CLI catches only :class:`~loopline.errors.LooplineError`, prints ``Type: message`` on
one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orjson

from loopline.errors import ConfigError, LooplineError
from loopline.state.attribution import AttributionConfig

__all__ = ["main", "build_parser"]


def _emit(obj: dict, as_json: bool, title: str = "", file=None) -> None:
    """``obj`` as indented JSON or as an indented list, to ``file`` (default: stdout)."""
    file = file or sys.stdout
    if as_json:
        file.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if title:
        print(title, file=file)

    def walk(d, indent=0):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                print("  " * indent + f"{k}:", file=file)
                walk(v, indent + 1)
            else:
                print("  " * indent + f"{k}: {v}", file=file)
    walk(obj)


def _attribution_args(p: argparse.ArgumentParser) -> None:
    d = AttributionConfig()
    p.add_argument("--window", type=float, default=None,
                   help=f"attribution window, seconds of event time (default {d.window_s:g}, or the data set's)")
    p.add_argument("--lateness", type=float, default=d.lateness_s, help="allowed lateness, seconds")
    p.add_argument("--target-kind", default=d.target_kind, help="conversion kind that labels positive")


def _attribution_cfg(a) -> AttributionConfig:
    window = a.window
    if window is None:
        from .datasets import DATASET_WINDOWS
        window = DATASET_WINDOWS.get(getattr(a, "dataset", None), AttributionConfig.window_s)
    bucket = min(AttributionConfig.bucket_s, max(window, 1.0))  # a short window closes promptly too
    return AttributionConfig(window_s=window, lateness_s=a.lateness, target_kind=a.target_kind, bucket_s=bucket,
                             dedup_horizon_s=max(window, AttributionConfig.dedup_horizon_s))


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--events", metavar="FILE", help="a JSONL event log")
    g.add_argument("--dataset", metavar="NAME", help="a real data set: movielens-100k")


def _records(a):
    from .eventlog import order_records, read_log
    if a.events:
        try:
            return read_log(a.events)
        except OSError as exc:
            raise ConfigError(f"events: cannot read {a.events!r}: {exc.strerror}") from None
    from .datasets import dataset_lines
    return order_records(dataset_lines(a.dataset))


def _broker(a) -> str:
    from .broker import parse_broker_url
    return parse_broker_url(a.broker)


def _variants(text: str) -> tuple:
    from loopline.model.verticals import parse_variants
    return parse_variants(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="loopline", description="Streaming online learning for ads.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1")
    p.add_argument("--port", type=int, default=9092)

    p = sub.add_parser("worker", help="a long-lived Faust worker")
    p.add_argument("--role", default="all", help="all | ingest | fm | vm | reach | monitor")
    p.add_argument("--broker", default="kafka://127.0.0.1:9092")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--data-dir", default=".loopline-data/worker")
    p.add_argument("--web-port", type=int, default=6066)
    p.add_argument("--web-host", default="127.0.0.1", help="address the HTTP views bind to (loopback by default)")
    p.add_argument("--web-tables", action="store_true",
                   help="serve Faust's /table/... and /router/ endpoints (table contents; off by default)")
    p.add_argument("--view-cache", type=float, default=1.0,
                   help="seconds an HTTP view's answer is reused (computed off the event loop; 0: every request)")
    p.add_argument("--view-stale", type=float, default=30.0,
                   help="seconds an expired answer is still served at once while a new one is computed "
                        "(0: wait for it)")
    p.add_argument("--on-broker-reset", default="stop", choices=["stop", "reset"],
                   help="when the broker lost the data this worker's state describes: stop (exit 75, state "
                        "kept) or reset (empty the data dir, exit 75 for a clean restart)")
    p.add_argument("--stall", type=float, default=300.0,
                   help="seconds one batch may take before /healthz reports the role stalled (503)")
    p.add_argument("--evaluation", action="store_true",
                   help="honour end_of_log control messages (replay-driven evaluation runs); a production "
                        "worker counts and ignores them")
    p.add_argument("--app-id", default="loopline")
    p.add_argument("--grace", type=float, default=20.0, help="seconds to stop before the exit is forced")
    p.add_argument("--variants", default="base,loopfm+kd", help="vm role: the VM variants trained (comma-separated)")
    p.add_argument("--serve", default="loopfm+kd", help="vm role: the variant POST /score/ answers with")
    p.add_argument("--loglevel", default="warn", choices=["crit", "error", "warn", "info", "debug"])
    _attribution_args(p)
    p.add_argument("--reach-budget-users", type=int, default=20000, help="reach: users the sample holds in all")
    p.add_argument("--reach-epoch", type=float, default=86400.0, help="reach: epoch, seconds of event time")
    p.add_argument("--reach-horizon", type=int, default=7, help="reach: epochs in the horizon")

    p = sub.add_parser("replay", help="send an event log to the broker in event-time order")
    _source_args(p)
    p.add_argument("--broker", default="kafka://127.0.0.1:9092")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--no-end-of-log", action="store_true", help="do not close the windows at the end")
    p.add_argument("--wait", action="store_true",
                   help="wait for the workers; print their counts and the models of the fm and vm roles running")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("evaluate", help="replay in-process through the same code and print counts and metrics")
    _source_args(p)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--no-models", action="store_true", help="counts only: skip the FM stage")
    p.add_argument("--variants", default=None,
                   help="VM variants trained side by side, comma-separated, or 'none' (default: the table's seven)")
    p.add_argument("--split-ts", type=float, default=None,
                   help="event time splitting the before/after windows (default: the middle)")
    p.add_argument("--scores", metavar="FILE", default=None, help="also write every example's score row (JSONL)")
    p.add_argument("--fp8", action="store_true",
                   help="also score each VM through emulated FP8 Linear layers (rows vm:VARIANT@fp8)")
    _attribution_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="write a synthetic event log")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malformed", type=float, default=0.0, metavar="FRACTION")
    p.add_argument("--quality", action="store_true",
                   help="add segment assertions of three sources of known quality and truth reports")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the log's path; '-' writes it to stdout (the summary then goes to stderr)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the main job end to end on the embedded broker")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--days", type=float, default=3.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("quality", help="score targeting data sources against aggregate truth reports")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--events", metavar="FILE", help="offline: a JSONL event log")
    g.add_argument("--workers", metavar="URL,...", help="running reach workers' HTTP addresses (host:port)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--methods", default="ls,em,gls",
                   help="fits: ls (weighted least squares), em (binomial likelihood), gls (shared-user covariance)")
    p.add_argument("--coverage", type=float, default=0.95, help="of every interval")
    p.add_argument("--bootstrap", type=int, default=400, help="ls bootstrap replicates")
    p.add_argument("--min-impressions", type=int, default=50, help="a campaign's impressions needed for its q_c")
    p.add_argument("--min-campaigns", type=int, default=4, help="usable campaigns needed for a fit")
    p.add_argument("--adjust-reach", metavar="SOURCE:SEGMENT", default=None,
                   help="quality-adjusted reach for a rule using this source's segment")
    p.add_argument("--reach-json", metavar="FILE", help="the reach answer to adjust (loopline reach --json)")
    p.add_argument("--users", type=float, default=None, help="or the reach answer's users ...")
    p.add_argument("--users-ci", type=float, nargs=2, metavar=("LO", "HI"), default=None, help="... and interval")
    p.add_argument("--exclude", action="store_true", help="the rule excludes the segment (uses b, not a)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fp8", help="LoKA FP8: probe and dispatch a model, print the per-layer decision table")
    p.add_argument("action", choices=["report"])
    p.add_argument("--snapshot", metavar="FILE", help="print the table saved with this snapshot instead")
    p.add_argument("--save", metavar="FILE", help="also save the measured table (torch.save of plain data)")
    p.add_argument("--threshold", type=float, default=0.2, help="MERE a candidate must stay below")
    p.add_argument("--min-speedup", type=float, default=1.05, help="speedup over high precision it must beat")
    p.add_argument("--rows", type=int, default=None, help="rows per timed GEMM (default: the calibration batch)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("drift", help="current drift and model-health figures of a monitor worker")
    p.add_argument("--worker", default="http://127.0.0.1:6066", help="the monitor worker's base URL")
    p.add_argument("--json", action="store_true", help="the whole /drift report, not the summary")

    p = sub.add_parser("report", help="an HTML report with plots: drift, model health, alarms, transfer ratio")
    _source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for index.html and the PNGs")
    p.add_argument("--every", type=float, default=86400.0, help="event-time window of the figures, seconds")
    p.add_argument("--variants", default=None, help="VM variants as for evaluate, or 'none'")
    p.add_argument("--partitions", type=int, default=4)
    _attribution_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reach", help="audience reach of a targeting query, with 95% intervals")
    from .reach import reach_args
    reach_args(p)

    p = sub.add_parser("chaos", help="kill -9s, a broker restart, damaged snapshots, a full disk, view load and a "
                                     "standby fm on a role-split deployment: the final numbers must not change")
    p.add_argument("--events", type=int, default=5000, help="lines of the generated log")
    p.add_argument("--kills", type=int, default=3, help="kill -9s in the kills scenario")
    p.add_argument("--seed", type=int, default=0, help="seeds the log, the kill moments and the roles killed")
    p.add_argument("--scenarios", default=None, help="comma-separated subset (default: all, see ops/chaos.py)")
    p.add_argument("--workdir", default=None, help="keep logs and data directories here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="benchmarks, writing JSON")
    p.add_argument("what", choices=["ingest", "history", "fm", "fp8", "quality", "drift", "reach", "score", "soak",
                                    "stage", "e2e"])
    p.add_argument("--events", type=int, default=20000, help="ingest, stage, e2e: events in the benchmark log")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=20, help="quality: generated logs to fit")
    p.add_argument("--out", default=None, help="JSON file (default bench-WHAT.json)")
    p.add_argument("--profile", action="store_true", help="also profile the ingest path in-process")
    p.add_argument("--minutes", type=float, default=10.0, help="soak: minutes of traffic")
    p.add_argument("--rate", type=float, default=None, help="soak: events/s (default: SoakConfig.rate)")
    p.add_argument("--speedup", type=float, default=None, help="soak: event-time seconds per wall second")
    p.add_argument("--json", action="store_true")
    return ap


def _run(a) -> int:
    if a.cmd == "broker":
        from .broker import run_forever
        return run_forever(a.port)
    if a.cmd == "worker":
        from loopline.state.reach import ReachConfig
        from loopline.stream.app import WorkerConfig
        from .worker import run_worker
        cfg = WorkerConfig(broker=_broker(a), role=a.role, partitions=a.partitions, data_dir=a.data_dir,
                           web_port=a.web_port, web_host=a.web_host, web_tables=a.web_tables,
                           view_cache_s=a.view_cache, view_stale_s=a.view_stale, app_id=a.app_id,
                           attribution=_attribution_cfg(a), evaluation=a.evaluation, stall_s=a.stall, on_broker_reset=a.on_broker_reset, vm_variants=_variants(a.variants), vm_serve=a.serve,
                           loglevel=a.loglevel, reach=ReachConfig(budget_users=a.reach_budget_users,
                                                                  epoch_s=a.reach_epoch, horizon_epochs=a.reach_horizon))
        run_worker(cfg, grace_s=a.grace)
        return 0
    if a.cmd == "evaluate":
        from .evaluate import evaluate_records, format_table
        vm_cfg = None
        if a.variants != "none" and not a.no_models:
            from loopline.model.verticals import VMStageConfig
            vm_cfg = VMStageConfig(variants=_variants(a.variants) if a.variants else VMStageConfig.variants,
                                   fp8=a.fp8)
        out = evaluate_records(_records(a), a.partitions, _attribution_cfg(a), progress=True,
                               models=not a.no_models, vm_cfg=vm_cfg, scores=bool(a.scores), split_ts=a.split_ts)
        if a.scores:
            with open(a.scores, "wb") as f:
                f.writelines(orjson.dumps(r) + b"\n" for r in out.pop("scores"))
        if a.json:
            _emit(out, True)
        else:
            _emit({k: v for k, v in out.items() if k not in ("models", "windows")}, False, "loopline evaluate")
            print(format_table(out))
        return 0
    if a.cmd == "replay":
        from .broker import create_topics
        from loopline.stream.app import TOPICS
        from loopline.stream.app import STATUS_TOPIC
        from .evaluate import format_table
        from .replay import collect_models, collect_results, replay
        bootstrap = _broker(a)
        records = _records(a)
        if a.wait and a.no_end_of_log:
            raise ConfigError("wait: needs the end-of-log watermark; drop --no-end-of-log")
        create_topics(bootstrap, {**{t: a.partitions for t in TOPICS}, STATUS_TOPIC: 1})
        since_ms = int(time.time() * 1000)
        sent = asyncio.run(replay(bootstrap, records, a.partitions, end_of_log=not a.no_end_of_log,
                                  progress=not a.json))
        out = {"replay": sent}
        if a.wait:
            t0 = time.monotonic()
            out.update(asyncio.run(collect_results(bootstrap, a.partitions, sent["run_id"], len(records),
                                                   timeout=a.timeout, progress=not a.json)))
            left = max(1.0, a.timeout - (time.monotonic() - t0))
            out.update(asyncio.run(collect_models(bootstrap, since_ms, timeout=left, progress=not a.json)))
        _emit({k: v for k, v in out.items() if a.json or k != "models"}, a.json, "loopline replay")
        if a.wait and not a.json:
            print(format_table(out))
        return 0
    if a.cmd == "generate":
        from .generate import GenerateConfig, write_log
        from .generate import QUALITY_SOURCES
        summary = write_log(GenerateConfig(users=a.users, days=a.days, seed=a.seed, malformed=a.malformed,
                                           quality_sources=QUALITY_SOURCES if a.quality else ()), a.out)
        to_stdout = a.out == "-"  # stdout holds the log alone, so it can be piped
        _emit(summary, a.json, f"loopline generate: wrote {'stdout' if to_stdout else a.out}",
              file=sys.stderr if to_stdout else None)
        return 0
    if a.cmd == "demo":
        from .demo import DemoConfig, run_demo
        out = run_demo(DemoConfig(users=a.users, days=a.days), progress=not a.json)
        _emit(out, a.json, "loopline demo")
        return 0
    if a.cmd == "reach":
        from .reach import run_reach
        one, many = run_reach(a)
        if many is not None:
            for o in many:
                sys.stdout.write(orjson.dumps(o).decode() + "\n")
        else:
            _emit(one, a.json, "loopline reach")
        return 0
    if a.cmd == "quality":
        from .quality import format_quality, run_quality
        out = run_quality(a)
        if a.json:
            _emit(out, True)
        else:
            print(format_quality(out))
        return 0
    if a.cmd == "fp8":
        from .fp8 import run_fp8_report
        return run_fp8_report(a)
    if a.cmd == "drift":
        from .drift import drift_summary, fetch_drift
        out = fetch_drift(a.worker)
        _emit(out if a.json else drift_summary(out), a.json, f"loopline drift ({a.worker})")
        return 0
    if a.cmd == "report":
        from .report import ReportConfig, run_report
        vm_cfg = None
        if a.variants != "none":
            from loopline.model.verticals import VMStageConfig
            vm_cfg = VMStageConfig(variants=_variants(a.variants)) if a.variants else VMStageConfig()
        out = run_report(_records(a), _attribution_cfg(a), a.out, ReportConfig(window_s=a.every),
                         title=f"Loopline report: {a.events or a.dataset}", progress=True, vm_cfg=vm_cfg)
        _emit(out, a.json, "loopline report")
        return 0
    if a.cmd == "chaos":
        from .chaos import SCENARIOS, ChaosConfig, format_chaos, run_chaos
        names = tuple(x.strip() for x in a.scenarios.split(",") if x.strip()) if a.scenarios else SCENARIOS
        out = run_chaos(ChaosConfig(events=a.events, kills=a.kills, seed=a.seed, scenarios=names,
                                    workdir=a.workdir))
        if a.json:
            _emit(out, True)
        else:
            print(format_chaos(out))
        return 0 if out["ok"] else 1
    if a.cmd == "bench":
        path = a.out or f"bench-{a.what}.json"
        if a.what == "ingest":
            from .bench import bench_ingest
            out = bench_ingest(n_events=a.events, repeats=a.repeats, out_path=path, profile=a.profile)
        elif a.what == "reach":
            from .bench_reach import bench_reach
            out = bench_reach(repeats=a.repeats, out_path=path)
        elif a.what == "quality":
            from .bench_quality import bench_quality
            out = bench_quality(seeds=a.seeds, out_path=path, progress=not a.json)
        elif a.what == "history":
            from .bench_history import bench_history
            out = bench_history(repeats=a.repeats, out_path=path)
        elif a.what == "drift":  # --repeats: generated logs (seeds 1..N)
            from .bench_drift import bench_drift
            out = bench_drift(repeats=a.repeats, out_path=path, progress=not a.json)
        elif a.what == "score":
            from .bench_score import bench_score
            out = bench_score(repeats=a.repeats, out_path=path, progress=not a.json)
        elif a.what == "soak":  # also writes a PNG of RSS and data-directory size beside the JSON
            from .bench_soak import SoakConfig, bench_soak
            extra = {k: v for k, v in (("rate", a.rate), ("speedup", a.speedup)) if v is not None}
            out = bench_soak(SoakConfig(minutes=a.minutes, **extra), out_path=path, progress=True)
        elif a.what == "stage":  # --events: lines of the generated log
            from .bench_stage import bench_stage
            out = bench_stage(n_events=a.events, repeats=a.repeats, out_path=path, progress=True)
        elif a.what == "e2e":  # a role all worker against evaluate on the same log
            from .bench_e2e import bench_e2e
            out = bench_e2e(n_events=a.events, repeats=a.repeats, out_path=path, progress=True)
        elif a.what == "fp8":
            from .bench_fp8 import bench_fp8
            out = bench_fp8(repeats=a.repeats, out_path=path)
        else:
            from .bench_fm import bench_fm
            out = bench_fm(repeats=a.repeats, out_path=path)
        _emit(out, a.json, f"loopline bench {a.what} (written to {path})")
        return 0
    raise ConfigError(f"command: unknown {a.cmd!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except LooplineError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loopline generate --out - | head`: the reader has what it wanted
        # stdout is gone; point it at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
