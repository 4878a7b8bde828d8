"""``loopline demo``: the main job end to end on the embedded broker, and what each part of it answers.

Public surface: ``DemoConfig``, ``run_demo``, ``format_demo``.

The run, in order:

1. **A log**: a synthetic log (``ops/generate.py``) with a distribution shift half-way, some malformed
   lines, and the segment assertions and truth reports of three data sources of known quality.
2. **The loop**: a Tansu broker on a free loopback port, one worker of role ``all`` (ingest, fm, vm,
   reach and quality) and one of role ``monitor`` (drift and model health, ``/metrics``; not part of
   ``all``). The log is replayed with its end-of-log mark; the demo waits for the ingest counts, for
   the fm and vm roles' end-of-run reports (``models.status``), for the serving snapshot, and for the
   reach, quality and monitor roles to have read everything (with rate and ETA on stderr).
3. **What it shows**, each read from the live workers:

   * ``models``: the evaluation table, overall (the roles' reports) and before/after the shift (the
     live score rows of ``model.scores``, the same windows ``evaluate`` computes): FM, LR, DAS and
     every VM variant with its transfer ratio;
   * ``score``: ``POST /score/`` for one user of the log and a few ads of its vertical, with latency;
   * ``reach``: ``GET /reach`` for a rule, the estimate with its 95% interval, beside the true count
     (every user of the log counted offline through the same ingest code);
   * ``quality``: each source's verdict and fitted a/b (``GET /quality``) beside the generator's truth;
   * ``drift``: the change-detector alarms with the event time each fired (and how long after the
     shift), and the window with the largest PSI (``GET /drift`` of the monitor);
   * ``metrics``: the line count of the monitor's Prometheus ``/metrics``;
   * ``report``: an HTML report (``ops/report.py``) of the live run, from the topics' examples and
     score rows, under the run's directory.

4. **The check**: the in-process ``evaluate`` of the same file runs in a thread while the workers
   train; ``matches_evaluate`` is true when the counts (events, examples) are equal and every model's
   ``n``, AUC, NE and log loss are equal, overall and in both windows (what the integration tests of
   ``replay --wait`` and ``bench e2e`` compare: the workers run the same code, so the same numbers).

The run's directory (``workdir``; default ``.loopline-data/demo/<UTC time>``) keeps the log, the
broker's and workers' logs and the report. The workers' data folders are removed at the end: the
broker is memory-only, so the state they hold describes topics that no longer exist.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson

from loopline.settings import setting
from loopline.stream.app import STATUS_TOPIC, TOPICS, control_of

from .broker import EmbeddedBroker, create_topics
from .evaluate import evaluate_records, format_table, with_transfer_ratios
from .eventlog import read_log
from .generate import QUALITY_SOURCES, GenerateConfig, write_log
from .replay import collect_models, collect_results, read_topic, replay
from .worker import WorkerProcess

__all__ = ["DemoConfig", "run_demo", "format_demo"]

METRICS = ("n", "auc", "ne", "logloss")  # equal in a worker and in evaluate (tests/ops/test_cli.py)


@dataclass(frozen=True)
class DemoConfig:
    """What ``loopline demo`` generates, trains and asks, and where it keeps its files."""

    # about 8,100 labelled impressions over 6 days: 32 FM steps of 256, with DAS rows before and after
    # the shift; about 70 s on 2 otherwise idle cores
    users: int = setting(500, "users in the generated log", env="DEMO_USERS")
    days: float = setting(6.0, "days of event time in the generated log", env="DEMO_DAYS")
    seed: int = 1
    partitions: int = 4
    malformed: float = 0.01  # fraction of malformed lines (every kind the generator makes)
    variants: tuple = ("base", "loopfm+kd")  # the vm role's VM variants; vm:base is the TR's baseline
    serve: str = "loopfm+kd"  # the variant POST /score/ answers with
    reach_rule: str = "gender = F and age in (18-24, 25-34)"
    # users the reach sample holds in all (every partition, the whole horizon; the worker's
    # --reach-budget-users): far below the default 20,000, so the demo's few hundred users are sampled,
    # not all held, and the interval has a width
    reach_budget_users: int = 100
    timeout_s: float = 900.0  # the longest wait for any one part (the workers' start, the models, ...)
    workdir: str | None = None  # default: .loopline-data/demo/<UTC time>


class _Progress:
    """``demo: ...`` lines on stderr, and the rate/ETA of a long wait at most every ``every`` seconds."""

    def __init__(self, on: bool, every: float = 5.0):
        self.on, self.every, self.t0 = on, every, time.perf_counter()
        self._last = 0.0

    def say(self, msg: str) -> None:
        if self.on:
            print(f"demo: [{time.perf_counter() - self.t0:5.0f}s] {msg}", file=sys.stderr, flush=True)

    def tick(self, msg) -> None:
        """``msg`` is a callable, formatted only when a line is due."""
        now = time.perf_counter()
        if self.on and now - self._last >= self.every:
            self._last = now
            self.say(msg())


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _run_dir(cfg: DemoConfig) -> Path:
    if cfg.workdir:
        work = Path(cfg.workdir)
    else:
        work = Path(".loopline-data") / "demo" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    return work.resolve()


def _get(port: int, path: str, timeout: float = 10.0) -> bytes | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.read()
    except OSError:  # not serving yet, or a 503 while not ready
        return None


def _view(port: int, path: str) -> dict | None:
    body = _get(port, path)
    return None if body is None else orjson.loads(body)


def _wait(what: str, cond, workers: list[WorkerProcess], timeout: float, progress: _Progress, line=None,
          every: float = 0.5):
    """Poll ``cond()`` until it returns something other than None/False; fail naming ``what`` (with the
    log of a worker that died)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError(f"demo: a worker exited ({w.proc.returncode}) while waiting for {what}; "
                                   f"its log {w.log_path} ends:\n{w.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: no {what} within {timeout:.0f}s (logs: "
                               f"{', '.join(w.log_path for w in workers)})")
        if line is not None:
            progress.tick(line)
        time.sleep(every)


# --- the live models -------------------------------------------------------------------------------

def _live_rows(bootstrap: str, partitions: int) -> list[dict]:
    """The score rows of ``model.scores`` (the fm stage's and the vm stage's row of each example),
    merged by example id, in canonical order (label time, id)."""
    rows: dict[str, dict] = {}
    for m in asyncio.run(read_topic(bootstrap, "model.scores", partitions)):
        if control_of(m.headers) is not None:
            continue
        r = orjson.loads(m.value)
        if r["id"] in rows:
            rows[r["id"]]["scores"].update(r["scores"])  # a repeat re-sends the same scores
        else:
            rows[r["id"]] = {**r, "scores": dict(r["scores"])}
    return sorted(rows.values(), key=lambda r: (r["label_ts"], r["id"]))


def _windows(rows: list[dict], split: float) -> list[dict]:
    """Before/after ``split``, as ``evaluate --split-ts`` computes them from its score rows."""
    from loopline.model.verticals import windowed_report
    if not rows:
        return []
    ts = sorted(r["ts"] for r in rows)
    windows = windowed_report(rows, [ts[0], split, ts[-1] + 1e-6])
    for w, name in zip(windows, ("before", "after")):
        w["window"] = name
        with_transfer_ratios(w["models"])
    return windows


def _same_models(live: dict, want: dict) -> bool:
    return set(live) == set(want) and all(
        {k: live[n][k] for k in METRICS} == {k: want[n][k] for k in METRICS} for n in want)


def _matches(live: dict, ev: dict) -> dict:
    """Which parts of the live run equal ``evaluate``'s (see the module docstring)."""
    lw, ew = live.get("windows", []), ev.get("windows", [])
    return {"counts": all(live[k] == ev[k] for k in ("events", "examples")),
            "models": _same_models(live["models"], ev["models"]),
            "windows": len(lw) == len(ew) and all(_same_models(a["models"], b["models"]) for a, b in zip(lw, ew))}


# --- the other answers -----------------------------------------------------------------------------

def _score(port: int, records, vertical_models: list[str], end_ts: float, variant: str) -> dict:
    """POST /score/ for the user with the most impressions in a vertical the vm serves, with five ads
    of that vertical it was shown; the latency of each of 5 identical requests (the first included)."""
    shown: dict[tuple, dict] = {}
    for rec in records:
        try:
            e = orjson.loads(rec.raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(e, dict) and e.get("type") == "impression" and e.get("vertical") in vertical_models \
                and isinstance(e.get("user"), str) and isinstance(e.get("attrs"), dict):
            s = shown.setdefault((e["user"], e["vertical"]), {"n": 0, "attrs": e["attrs"], "ads": {}})
            s["n"] += 1
            s["ads"].setdefault(e.get("ad"), e.get("campaign"))
    (user, vertical), s = max(shown.items(), key=lambda kv: (kv[1]["n"], kv[0]))
    cands = [{"ad": a, "campaign": c} for a, c in list(s["ads"].items())[:5] if isinstance(a, str) and isinstance(c, str)]
    body = orjson.dumps({"user": user, "vertical": vertical, "attrs": s["attrs"], "candidates": cands, "ts": end_ts})
    lat, status, answer = [], None, None
    for _ in range(5):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/score/", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, answer = r.status, orjson.loads(r.read())
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, orjson.loads(exc.read())
        lat.append(round((time.perf_counter() - t0) * 1000, 2))
    return {"status": status, "user": user, "vertical": vertical, "variant": variant, "ts": end_ts,
            "candidates": cands, "scores": (answer or {}).get("scores"), "error": (answer or {}).get("error"),
            "latency_ms": statistics.median(lat), "latencies_ms": lat}


def _reach(port: int, cfg: DemoConfig, log_path: str) -> dict:
    """The worker's answer for ``cfg.reach_rule``, and the truth: the same rule over a sample of the
    whole log built offline with room for every user (a census)."""
    from loopline.state.reach import ReachConfig, finish, merge_stats, query_stats
    from loopline.state.reach_query import parse_query

    from .reach import ask_workers, samples_from_log
    got = ask_workers([f"http://127.0.0.1:{port}"], cfg.reach_rule, timeout=30.0)
    census = samples_from_log(log_path, cfg.partitions, ReachConfig(budget_users=max(10_000, cfg.users * 2) * cfg.partitions))
    q = parse_query(cfg.reach_rule)
    truth = finish(merge_stats([query_stats(s, q, 30) for s in census]), q.text)
    keep = ("query", "users", "users_ci", "impressions", "impressions_ci", "fallback", "matched_sample_users",
            "sample_users", "budget_users", "sample_bytes", "partial", "elapsed_ms")
    return {**{k: got.get(k) for k in keep},
            "true_users": truth["users"], "true_impressions": truth["impressions"]}


def _quality(port: int, gen: dict) -> dict:
    """Each source's verdict and fitted a/b from the worker's ``/quality``, beside the generator's
    truth (``a``: P(truly in | labelled), ``b``: P(truly in | not labelled))."""
    fit = (_view(port, "/quality") or {}).get("fit") or {}
    truth = {(t["source"], t["segment"]): t for t in (gen.get("quality") or {}).get("sources", [])}
    out = []
    for r in fit.get("sources", []):
        t = truth.get((r["source"], r["segment"])) or {}
        out.append({"source": r["source"], "segment": r["segment"], "verdict": r["verdict"],
                    "a": r.get("a"), "a_ci": r.get("a_ci"), "b": r.get("b"), "b_ci": r.get("b_ci"),
                    "campaigns": r.get("campaigns"), "note": r.get("note"),
                    # the generator's setting, and its realized value among this log's users
                    "set_a": t.get("a"), "set_b": t.get("b"), "true_a": t.get("a_realized"),
                    "true_b": t.get("b_realized")})
    return {"sources": out, "coverage": fit.get("coverage")}


def _drift(report: dict, shift_ts: float) -> dict:
    """The alarms (model, detector, when), each detector's count, and the window whose features moved
    most against the one before it (its five largest PSIs)."""
    health, drift = report["health"], report["drift"]
    alarms = [{"model": a["model"], "detector": a["detector"], "label_ts": a["label_ts"], "at": _utc(a["label_ts"]),
               "hours_after_shift": round((a["label_ts"] - shift_ts) / 3600, 1), "row": a["n"]}
              for a in health["alarms"]]
    windows = [w for w in drift["windows"] if w["features"]]
    top = max(windows, key=lambda w: max(f["psi"] for f in w["features"].values()), default=None)
    most = None
    if top is not None:
        feats = sorted(top["features"].items(), key=lambda kv: -kv[1]["psi"])[:5]
        most = {"start": top["start"], "from": _utc(top["start"]), "reference_from": _utc(top["reference"]["start"]),
                "n": top["n"], "psi": {k: v["psi"] for k, v in feats},
                "label_rate": top["label"].get("rate"), "label_rate_z": top["label"].get("z")}
    return {"alarms": alarms, "alarm_counts": health["alarm_counts"], "largest_psi_window": most,
            "windows": len(drift["windows"]), "examples": drift["examples"], "score_rows": health["rows"]}


def _live_examples(bootstrap: str, partitions: int) -> list[dict]:
    """The examples of ``examples.augmented`` (with their DAS soft label), once each, in canonical order."""
    examples: dict[str, dict] = {}
    for m in asyncio.run(read_topic(bootstrap, "examples.augmented", partitions)):
        if control_of(m.headers) is None:
            e = orjson.loads(m.value)
            examples.setdefault(e["id"], e)
    return sorted(examples.values(), key=lambda e: (e["label_ts"], e["id"]))


def _report(live: dict, examples: list[dict], rows: list[dict], out_dir: Path, title: str) -> dict:
    """The HTML report of the live run (``ops/report.py``): its examples and score rows."""
    from .report import write_report
    out = write_report(live, examples, rows, str(out_dir), title=title)
    return {"path": out["index"], "dir": out["out"], "images": out["images"], "alarms": out["alarms"]}


# --- the run ---------------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the demo (see the module docstring); returns everything it shows as one dict."""
    t_start = time.perf_counter()
    from loopline.model.verticals import VMStageConfig  # imports torch: part of the run's time
    # torchrec's call of a deprecated torch.fx helper logs a warning once per process (the in-process
    # evaluate here): noise for a newcomer, and nothing Loopline can act on
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    p = _Progress(progress)
    work = _run_dir(cfg)
    log_path = work / "events.jsonl"
    gen = write_log(GenerateConfig(users=cfg.users, days=cfg.days, seed=cfg.seed, malformed=cfg.malformed,
                                   quality_sources=QUALITY_SOURCES), str(log_path))
    records = read_log(str(log_path))
    shift_ts, end_ts = gen["shift_ts"], gen["end_ts"]
    p.say(f"generated {len(records):,} lines ({gen['malformed_total']} malformed, a shift at {_utc(shift_ts)}) "
          f"in {log_path}")
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-evaluate")
    broker = EmbeddedBroker(log_path=str(work / "tansu.log")).start()
    started: list[WorkerProcess] = []
    stops = {}
    try:
        p.say(f"broker (Tansu) on {broker.url}")
        create_topics(broker.bootstrap, {**{t: cfg.partitions for t in TOPICS}, STATUS_TOPIC: 1})
        w = WorkerProcess(broker.url, str(work / "worker"), cfg.partitions,
                          extra=("--variants", ",".join(cfg.variants), "--serve", cfg.serve,
                                 "--reach-budget-users", str(cfg.reach_budget_users))).start()
        started.append(w)
        mon = WorkerProcess(broker.url, str(work / "monitor"), cfg.partitions, extra=("--role", "monitor")).start()
        started.append(mon)
        _wait("worker start", lambda: w.ingest_counts() is not None and _view(mon.port, "/readyz") is not None,
              started, cfg.timeout_s, p, lambda: "waiting for the workers to start")
        p.say(f"workers up: role all (pid {w.proc.pid}, http://127.0.0.1:{w.port}/), role monitor "
              f"(pid {mon.proc.pid}, http://127.0.0.1:{mon.port}/)")

        since_ms = int(time.time() * 1000)
        t0 = time.perf_counter()
        sent = asyncio.run(replay(broker.bootstrap, records, cfg.partitions, progress=progress))
        # the reference, in a thread while the workers train (they are other processes)
        evaluation = pool.submit(evaluate_records, records, cfg.partitions, models=True,
                                 vm_cfg=VMStageConfig(variants=tuple(cfg.variants)), split_ts=shift_ts)
        got = asyncio.run(collect_results(broker.bootstrap, cfg.partitions, sent["run_id"], len(records),
                                          timeout=cfg.timeout_s))
        ingest_s = time.perf_counter() - t0
        total = got["examples"]["total"]
        p.say(f"ingest: {got['events']['accepted']:,} accepted, {got['events']['deadletter']} dead-lettered, "
              f"{total:,} examples ({ingest_s:.0f}s); training the FM and the VMs")

        t_models = time.perf_counter()
        first: list = []  # (time, fm examples) of the first reading: the rate is measured from there

        def models_line() -> str:
            fm = ((_view(w.port, "/fm/") or {}).get("counts") or {}).get("examples", 0)
            vm = (_view(w.port, "/vm/") or {}).get("examples", 0)
            now = time.perf_counter()
            first.append((now, fm))
            rate = (fm - first[0][1]) / (now - first[0][0]) if now > first[0][0] else 0.0
            speed = f" ({rate:,.0f}/s, ETA {(total - fm) / rate:.0f}s)" if rate > 0 and fm < total else ""
            ev = "done" if evaluation.done() else "running"
            return f"fm {fm:,}/{total:,} examples{speed}; vm {vm:,}/{total:,}; in-process evaluate {ev}"

        def models_done():
            rep = asyncio.run(collect_models(broker.bootstrap, since_ms, timeout=0))
            return rep if rep["reported_by"] == ["fm", "vm"] else None
        reported = _wait("fm and vm reports", models_done, started, cfg.timeout_s, p, models_line, every=1.0)
        p.say(f"models reported by fm and vm ({time.perf_counter() - t_models:.0f}s)")

        audience = len(asyncio.run(read_topic(broker.bootstrap, "audience", cfg.partitions)))
        ns = {name: m["n"] for name, m in reported["models"].items()}

        def rest_done():
            vm = _view(w.port, "/vm/") or {}
            serving = vm.get("serving", {}).get("verticals") and vm.get("snapshot_at") == vm.get("last_step")
            reach = ((_view(w.port, "/reach") or {}).get("stats") or {}).get("impressions", 0) >= total
            qual = ((_view(w.port, "/quality?fit=0") or {}).get("stats") or {}).get("values", 0) >= audience
            d = _view(mon.port, "/drift") or {}
            seen = {k: m.get("n") for k, m in (d.get("health") or {}).get("models", {}).items()}
            return d if serving and reach and qual and seen == ns else None
        drift_report = _wait("the serving snapshot, reach, quality and monitor catching up", rest_done, started,
                             cfg.timeout_s, p, lambda: "waiting for the serving snapshot, reach, quality and "
                                                       "the monitor to read everything")
        p.say("asking the workers")
        rows = _live_rows(broker.bootstrap, cfg.partitions)
        examples = _live_examples(broker.bootstrap, cfg.partitions)
        live = {**got, "models": reported["models"], "windows": _windows(rows, shift_ts)}
        verticals = (_view(w.port, "/vm/") or {})["serving"]["verticals"]
        score = _score(w.port, records, verticals, end_ts, cfg.serve)
        reach = _reach(w.port, cfg, str(log_path))
        quality = _quality(w.port, gen)
        drift = _drift(drift_report, shift_ts)
        metrics_text = _get(mon.port, "/metrics") or b""
        metrics = {"lines": len(metrics_text.decode().splitlines()), "url": f"http://127.0.0.1:{mon.port}/metrics"}
        elapsed = time.perf_counter() - t0
    finally:
        p.say("stopping the workers and the broker")
        with ThreadPoolExecutor(max_workers=2) as stopping:  # both at once: each takes a few seconds
            stops.update(zip(("worker", "monitor"), stopping.map(WorkerProcess.stop, started)))
        broker.stop()
        pool.shutdown(wait=False)
        p.say(f"workers {', '.join(f'{k} {v}' for k, v in stops.items()) or 'not started'}; broker stopped")
    for name in ("worker", "monitor"):  # their state describes the memory-only broker just stopped
        shutil.rmtree(work / name, ignore_errors=True)
    if not evaluation.done():
        p.say("waiting for the in-process evaluate")
    expected = evaluation.result()
    p.say("writing the report")
    report = _report(live, examples, rows, work / "report", f"Loopline demo: {log_path.name}, {len(records):,} lines")
    matches = _matches(live, expected)
    ev, ex = got["events"], got["examples"]
    out = {
        "accepted": ev["accepted"], "deadlettered": ev["deadletter"], "by_reason": ev["by_reason"],
        "examples": ex["total"], "positives": ex["positive"], "positive_rate": ex["positive_rate"],
        "events_per_s": round(len(records) / ingest_s, 1), "seconds": round(elapsed, 2),
        "log": {"path": str(log_path), "lines": len(records), "malformed": gen["malformed_total"],
                "users": cfg.users, "days": cfg.days, "shift_ts": shift_ts, "shift_at": _utc(shift_ts)},
        "models": {"overall": live["models"], "windows": live["windows"], "split_ts": shift_ts,
                   "table": format_table(live)},
        "score": score, "reach": reach, "quality": quality, "drift": drift, "metrics": metrics,
        "report": report, "matches_evaluate": all(matches.values()), "matches": matches,
        "duplicates_removed": got["duplicates_removed"], "worker_stop": stops.get("worker"),
        "monitor_stop": stops.get("monitor"), "run_dir": str(work),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    return json.loads(json.dumps(out))  # plain JSON types only (the CLI prints it with orjson)


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def format_demo(out: dict) -> str:
    """The readable summary of :func:`run_demo`'s result (``loopline demo`` without ``--json``)."""
    log, sc, re_, dr = out["log"], out["score"], out["reach"], out["drift"]
    reasons = ", ".join(f"{k} {v}" for k, v in out["by_reason"].items())
    lines = [
        f"loopline demo: {log['lines']:,} lines ({log['malformed']} malformed) from {log['users']} users over "
        f"{log['days']:g} days, a shift at {log['shift_at']}; run directory {out['run_dir']}",
        f"ingest: {out['accepted']:,} accepted, {out['deadlettered']} dead-lettered ({reasons}); "
        f"{out['examples']:,} examples, {out['positives']} positive ({out['positive_rate']:.1%})",
        "",
        "models (the live workers; progressive: every prediction made before training on the example; "
        "TR = (NE(vm:base) - NE(vm:X)) / (NE(vm:base) - NE(fm)); before/after the shift):",
        out["models"]["table"],
        "",
    ]
    if sc.get("scores") is not None:
        ads = ", ".join(f"{c['ad']} {s:.4f}" for c, s in zip(sc["candidates"], sc["scores"]))
        lines.append(f"score: POST /score/ user {sc['user']} ({sc['vertical']}, vm:{sc['variant']}): {ads}; "
                     f"{sc['latency_ms']:.1f} ms (median of {len(sc['latencies_ms'])}, first "
                     f"{sc['latencies_ms'][0]:.1f} ms)")
    else:
        lines.append(f"score: POST /score/ answered {sc['status']}: {sc.get('error')}")
    lo, hi = re_["users_ci"]
    lines.append(f"reach: \"{re_['query']}\": {re_['users']:,.0f} users, 95% interval [{lo:,.0f}, {hi:,.0f}] "
                 f"(true {re_['true_users']:,.0f}); {re_['impressions']:,.0f} impressions "
                 f"[{re_['impressions_ci'][0]:,.0f}, {re_['impressions_ci'][1]:,.0f}] (true "
                 f"{re_['true_impressions']:,.0f}); from {re_['sample_users']:,} sampled users (budget "
                 f"{re_.get('budget_users') or 0:,})")
    lines.append("quality of the data sources (fitted a = P(truly in | labelled), b = P(truly in | not), 95% "
                 "intervals; true: the log's realized values):")
    for q in out["quality"]["sources"]:
        lines.append(f"  {q['source']}:{q['segment']}: {q['verdict']}, a {_num(q['a'], '.2f')} {_ci(q['a_ci'])} "
                     f"(true {_num(q['true_a'], '.2f')}), b {_num(q['b'], '.2f')} {_ci(q['b_ci'])} "
                     f"(true {_num(q['true_b'], '.2f')})" + (f"; {q['note']}" if q.get("note") else ""))
    counts = "; ".join(f"{m} " + ", ".join(f"{d} {n}" for d, n in c.items()) for m, c in dr["alarm_counts"].items())
    lines.append(f"drift: {len(dr['alarms'])} alarms ({counts or 'none'})")
    for a in dr["alarms"][:8]:
        lines.append(f"  {a['model']} {a['detector']} at {a['at']} ({a['hours_after_shift']:+.1f} h from the shift, "
                     f"row {a['row']:,})")
    if len(dr["alarms"]) > 8:
        lines.append(f"  ... {len(dr['alarms']) - 8} more (--json has them all)")
    top = dr["largest_psi_window"]
    if top:
        psi = ", ".join(f"{k} {v:.2f}" for k, v in top["psi"].items())
        lines.append(f"  largest feature drift: the window from {top['from']} against {top['reference_from']}: "
                     f"PSI {psi}; label rate z {_num(top['label_rate_z'], '.1f')}")
    lines.append(f"metrics: {out['metrics']['lines']} lines of Prometheus text at {out['metrics']['url']}")
    lines.append(f"report: {out['report']['path']}")
    m = out["matches"]
    lines.append(f"matches evaluate: {'yes' if out['matches_evaluate'] else 'NO'} (counts {m['counts']}, "
                 f"models' n/AUC/NE/log loss overall {m['models']}, before/after {m['windows']})")
    lines.append(f"wall time: {out['wall_s']:.0f}s")
    return "\n".join(lines)
