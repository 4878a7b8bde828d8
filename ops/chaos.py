"""``loopline chaos``: faults injected into a role-split deployment on the embedded broker, and proof that
the final numbers come out the same.

Public surface: ``ChaosConfig``, ``SCENARIOS``, ``prepare``, ``run_scenario``, ``run_chaos``, ``format_chaos``.

**The deployment.** Every scenario starts its own embedded broker (Tansu) and four workers, one per role:
``ingest``, ``fm``, ``vm`` (variants ``base`` and ``loopfm+kd``) and ``reach`` (with the quality agent), each
with its own data directory, started as ``loopline worker --role ROLE --evaluation`` children. The log
is generated here (``ops/generate.py``, seeded, 1% malformed lines), cut to ``--events`` lines and
replayed by ``loopline replay``'s code.

**What "the same numbers" means.** The expected numbers come from one in-process ``evaluate`` of the
same log (``models=True`` with the vm role's two variants) and the offline reach sample of the same log
(``ops/reach.py`` ``samples_from_log``):

* ``counts``: what ``loopline replay --wait`` collects from the topics (``collect_results``: events,
  dead letters by reason, examples, positives, attribution counters), equal to evaluate's;
* ``fm``: ``/fm/``'s ``models`` (FM and logistic baseline: AUC, NE, log loss, calibration, n), equal;
* ``vm``: ``/vm/``'s ``models`` (each VM variant), equal to evaluate's without the transfer ratio;
* ``reach``: the impressions the reach role applied (``/reach`` stats; repeats excluded) and the
  answers to three queries through ``/reach?q=`` (users, impressions, users' interval, sampled users),
  equal to the offline sample's. The reach sampler is independent of arrival order within an epoch
  (bottom-k by a hash of the user), but not across epoch boundaries (the strata are learned from the
  epoch that ended, and which events arrived before the boundary depends on how ingest interleaved its
  partitions). The chaos deployment therefore runs reach with one epoch that holds the whole log
  (``--reach-epoch 1e10 --reach-horizon 1``), which makes its answers exactly comparable with the
  offline pass, and so with an unkilled run as well.

All four are compared exactly (``==``), never within a tolerance.

**Scenarios** (``SCENARIOS``; ``--scenarios a,b`` runs a subset, always in this order):

* ``view_load``: first the clean run: the log replayed, the final numbers read (they are "the run
  without kills" of the next scenario). Then, on the same deployment, ingest's throughput: a second log
  of ``throughput_events`` lines (another seed, ids prefixed ``t``) that starts where the first ends and
  spans 0.8 days of event time, so no attribution window closes in it and the fm and the vm stay idle
  (on a shared 2-core machine their training would otherwise decide the figure: measured on the main
  log, the chunks after the fm started were slower loaded or not). It goes in sixteen equal chunks,
  unloaded and loaded in ABBA order (each pair of neighbours is one of each), each sent at once after
  ingest finished the previous one. While a chunk is "loaded",
  ``clients`` threads of a child process (``python -m loopline.ops.chaos load-clients``: the measuring
  process keeps its GIL; at ``nice`` 10, as clients are other machines in a deployment) hit every view
  of every worker (``/ingest/``, ``/fm/``, ``/vm/``, ``POST /score/``, ``/reach``, ``/reach?q=``,
  ``/quality``, ``/healthz``, ``/readyz``, ``/views``) back to back with a short pause. For the
  measurement the ingest worker and the broker run on one core and every other process on the others
  (``sched_setaffinity``, where there are two cores or more; ``cpus`` in the result), as roles have
  machines of their own in a deployment: the figure is what serving views costs ingest, and not how
  five processes and the clients share two cores (unpinned, the other roles' extra view work took
  cores from ingest, and the ratio moved between 0.74 and 0.81 from run to run). Each chunk records
  the cores every process used (``cores_used``). A chunk's ingest time runs from its first send to the moment ingest's
  watermark marks (which it sends after each batch's outputs to the fm's inputs) show every partition
  past the chunk's last event; the expected marks come from the ingest core run offline on the same
  chunks. The figure (``ratio``) is the median, over the eight neighbour pairs, of the loaded chunk's
  throughput over the unloaded one's: the other roles' work on the same two cores (the fm's history
  store, the reach samples) drifts over tens of seconds and neighbours see about the same of it
  (``pooled_ratio``, all loaded chunks against all unloaded ones, is reported beside it, and so is the
  ingest process's own CPU time per event, loaded and not, from ``/proc``). Passes when
  the final numbers equal evaluate's, ``ratio`` is at least ``min_ratio``, no request got a 5xx (or no
  answer) and no consumer group changed members (no rebalance).
* ``kills``: the log is replayed at a steady pace over about the time the FM needs for it (evaluate's
  model time), and ``kills`` times, at seeded moments between 10% and 150% of that span, a seeded role
  is killed with ``kill -9`` and at once restarted on its data directory. The roles come in shuffled
  rounds of four, so four kills hit every role; a kill may land while the role is still starting from
  the previous one, which is a moment too. The final numbers must equal evaluate's and the clean run's
  (the ``view_load`` run, or one made here when that scenario is not selected).
* ``broker_restart``: half the log goes in, the broker is killed with ``kill -9`` and started again on
  the same port (memory-only: a new, empty cluster with a new cluster id). The chosen policy is the
  default, ``--on-broker-reset stop``: every worker must exit 75 with the ``broker reset detected`` line
  and keep its data directory (nothing is processed against the empty broker, nothing lost silently).
  The operator's answer, restarting them with ``--on-broker-reset reset`` and replaying the log from
  its source, must end with evaluate's numbers.
* ``corrupt_snapshot``: once the fm and the vm each have two snapshots, both are killed, their newest
  snapshot truncated to half and a stale ``.snapshot-*.tmp`` left beside it; restarted, each must load
  the previous snapshot (``restored``), remove the temporary, and end with evaluate's numbers.
* ``disk_full``: the fm's data directory is a size-limited tmpfs (``mount -t tmpfs``, as root). The log
  goes in by eighths until the fm has a snapshot; then the filesystem is filled with a ballast file and
  the rest goes in; the fm must exit non-zero with one
  ``loopline worker: ...`` line naming the error, and, once the ballast is removed and the fm
  restarted, end with evaluate's numbers. Where mounting is not permitted, a simulated full disk
  stands in (below); the result says which was used.
* ``standby``: a second fm member starts as a standby; once the active one has a snapshot it is
  killed with ``kill -9``. ``takeover_s`` runs from the kill to the standby's first finished start-up
  as the active member (its ``/healthz`` fm batches leave 0: uncached, unlike ``/fm/``); the final
  numbers come from the new active member.

**Chaos workers.** Workers start as ``python -m loopline.ops.chaos worker ...``, which is ``loopline
worker`` with two knobs read from the environment, for chaos runs only:

* ``LOOPLINE_CHAOS_SNAPSHOT_EVERY``: the fm and vm roles snapshot every this many FM steps instead of
  ``SNAPSHOT_EVERY`` (20), so that a short log still leaves the two snapshots the fall-back needs
  (``snapshot_every``: by default a quarter of the log's FM steps, at most 20).
* ``LOOPLINE_CHAOS_DISK_FULL=PATH``: the simulated full disk. While the file ``PATH`` exists, snapshot
  writes (``state.snapshots.write_atomic``) and history-store appends raise ``OSError(ENOSPC)``, as
  they would on a full filesystem; removing the file is the space coming back.

Progress goes to stderr, one line per phase with the elapsed time. The result: ``scenarios`` maps each
scenario to ``ok``, ``did`` (what it did), ``compared`` (each section against evaluate and, for
``kills``, the clean run: ``"equal"`` or the two values), ``checks`` (the scenario's own conditions)
and its measured figures; ``ok`` at the top is true when every scenario passed.

>>> ChaosConfig(events=2000, scenarios=("kills", "standby")).scenarios
('kills', 'standby')
>>> ChaosConfig(scenarios=("nope",))
Traceback (most recent call last):
...
loopline.errors.ConfigError: scenarios: unknown 'nope' (known: view_load, kills, broker_restart, corrupt_snapshot, disk_full, standby)
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loopline.errors import ConfigError
from loopline.settings import argument, setting

__all__ = ["ChaosConfig", "SCENARIOS", "prepare", "run_scenario", "run_chaos", "format_chaos"]

SCENARIOS = ("view_load", "kills", "broker_restart", "corrupt_snapshot", "disk_full", "standby")
ROLES = ("ingest", "fm", "vm", "reach")
VM_VARIANTS = ("base", "loopfm+kd")  # the vm role's default variants (WorkerConfig.vm_variants)
QUERIES = ("gender = F", "gender = F and not geo = US-CA", "age in (18-24, 25-34) and device = ios")
REACH_EPOCH_S = 1e10  # one epoch for the whole log: the sample is then independent of arrival order
CHECK_EVERY = 0.2  # seconds between two polls of a worker's views
ENV_SNAPSHOT_EVERY = "LOOPLINE_CHAOS_SNAPSHOT_EVERY"
ENV_DISK_FULL = "LOOPLINE_CHAOS_DISK_FULL"


@dataclass(frozen=True)
class ChaosConfig:
    """One ``loopline chaos`` run. A bad field raises :class:`~loopline.errors.ConfigError` naming it."""

    events: int = setting(5000, "lines of the generated log (cut to exactly this many)", env="CHAOS_EVENTS")
    kills: int = setting(3, "kill -9s in the kills scenario", env="CHAOS_KILLS")
    seed: int = setting(0, "seeds the log, the kill moments and the roles killed", env="CHAOS_SEED")
    scenarios: tuple = setting(SCENARIOS, "the scenarios run, comma-separated (always in this order)",
                               env="CHAOS_SCENARIOS")
    partitions: int = 4
    days: float = 3.0  # event time the log spans (attribution windows are a day: examples come all along)
    malformed: float = 0.01  # malformed lines, as a fraction of the valid ones (the dead letters are counted too)
    # users the reach sample holds in all (the worker's --reach-budget-users): well below the log's users,
    # so it really samples
    reach_budget_users: int = 240
    snapshot_every: int | None = None  # fm/vm FM steps between snapshots (None: a quarter of the log's, <= 20)
    clients: int = 4  # view_load: client threads
    client_pause_s: float = 0.02  # view_load: each client's pause between two requests
    min_ratio: float = 0.8  # view_load: loaded ingest throughput at least this share of the unloaded
    # view_load: lines of the throughput log, timed in 16 chunks (ingest works in batches of up to 2,000
    # events; a chunk of 5,000 is a few of them, and the idle consumer's fetch wait, at most 0.5 s, is
    # small beside its ~3 s)
    throughput_events: int = 80_000
    disk: str = "auto"  # disk_full: tmpfs | simulated | auto (tmpfs where mounting is permitted)
    tmpfs_mb: int = 512  # disk_full: size of the fm's filesystem (it holds two snapshots and a temporary)
    wait_s: float | None = None  # longest wait for one phase (None: 300 s + 60 ms per event)
    workdir: str | None = argument(None, "keep logs and data directories here (default: a temporary directory)",
                                   metavar="DIR")
    keep: bool = False  # keep the work directory (it is always kept when a scenario fails)

    def __post_init__(self):
        for name, lo in (("events", 100), ("kills", 0), ("seed", 0), ("partitions", 1), ("reach_budget_users", 1),
                         ("clients", 1), ("tmpfs_mb", 64), ("throughput_events", 100)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}: must be an integer >= {lo}, got {v!r}")
        if self.snapshot_every is not None and (isinstance(self.snapshot_every, bool)
                                                or not isinstance(self.snapshot_every, int) or self.snapshot_every < 1):
            raise ConfigError(f"snapshot_every: must be an integer >= 1 or None, got {self.snapshot_every!r}")
        for name, lo, hi in (("days", 0.01, 365.0), ("malformed", 0.0, 1.0), ("client_pause_s", 0.0, 10.0),
                             ("min_ratio", 0.0, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"{name}: must be a number in [{lo:g}, {hi:g}], got {v!r}")
        if self.wait_s is not None and (not isinstance(self.wait_s, (int, float)) or not self.wait_s > 0):
            raise ConfigError(f"wait_s: must be a positive number of seconds or None, got {self.wait_s!r}")
        if self.disk not in ("auto", "tmpfs", "simulated"):
            raise ConfigError(f"disk: must be auto, tmpfs or simulated, got {self.disk!r}")
        if isinstance(self.scenarios, str) or not self.scenarios:
            raise ConfigError(f"scenarios: must be a non-empty tuple of names, got {self.scenarios!r}")
        for s in self.scenarios:
            if s not in SCENARIOS:
                raise ConfigError(f"scenarios: unknown {s!r} (known: {', '.join(SCENARIOS)})")
        object.__setattr__(self, "scenarios", tuple(s for s in SCENARIOS if s in self.scenarios))

    @property
    def wait(self) -> float:
        return self.wait_s if self.wait_s is not None else 300.0 + 0.06 * self.events


class ChaosFailure(Exception):
    """A scenario could not go on (a wait timed out, a worker died on its own); the message says what."""


# -- the run's shared context ----------------------------------------------------------------------------
@dataclass
class _Context:
    cfg: ChaosConfig
    work: Path
    t0: float
    progress: bool
    log_path: str = ""
    records: list = field(default_factory=list)
    expected: dict = field(default_factory=dict)  # the normalized final numbers evaluate gives
    evaluate_s: float = 0.0  # evaluate's model time: about what the fm needs for the log
    snapshot_every: int = 20
    generated: dict = field(default_factory=dict)
    clean: dict | None = None  # the final numbers of a run without faults, once one was made

    def say(self, msg: str) -> None:
        if self.progress:
            print(f"chaos [{time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def prepare(cfg: ChaosConfig, progress: bool = True, workdir: str | None = None) -> _Context:
    """Generate the log, run ``evaluate`` and the offline reach pass over it: the numbers every scenario
    must end with."""
    from loopline.model.verticals import VMStageConfig
    from loopline.state.reach import ReachConfig, Sample, answer

    from .evaluate import evaluate_records, ingest_outputs
    from .eventlog import read_log
    from .generate import GenerateConfig, write_log
    from .reach import samples_from_log

    work = Path(workdir or cfg.workdir or tempfile.mkdtemp(prefix="loopline-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = _Context(cfg=cfg, work=work, t0=time.monotonic(), progress=progress)
    users = max(20, round(cfg.events / (cfg.days * 3.3)))
    raw_path = work / "generated.jsonl"
    while True:
        summary = write_log(GenerateConfig(users=users, days=cfg.days, seed=cfg.seed, malformed=cfg.malformed),
                            str(raw_path))
        if summary["lines"] >= cfg.events:
            break
        users = math.ceil(users * 1.3 * cfg.events / max(summary["lines"], 1))
    records = list(read_log(str(raw_path)))[:cfg.events]  # event-time order; the first N events
    ctx.log_path = str(work / "events.jsonl")
    with open(ctx.log_path, "wb") as f:
        f.writelines(r.raw + b"\n" for r in records)
    ctx.records = list(read_log(ctx.log_path))
    assert [r.raw for r in ctx.records] == [r.raw for r in records], "the cut log reads back in another order"
    ctx.generated = {"users": users, "days": cfg.days, "events": len(records), "seed": cfg.seed,
                     "malformed": cfg.malformed, "path": ctx.log_path}
    ctx.say(f"generated {len(records)} events ({users} users, {cfg.days:g} days, seed {cfg.seed}); evaluating")
    t = time.monotonic()
    ev = evaluate_records(ctx.records, cfg.partitions, models=True, vm_cfg=VMStageConfig(variants=VM_VARIANTS))
    ctx.evaluate_s = time.monotonic() - t
    steps = math.ceil(ev["examples"]["total"] / 256)  # the FM trainer's micro-batch (TrainerConfig.batch_size)
    ctx.snapshot_every = cfg.snapshot_every or max(1, min(20, steps // 4))
    rcfg = ReachConfig(budget_users=cfg.reach_budget_users, epoch_s=REACH_EPOCH_S, horizon_epochs=1)
    merged = Sample.merge(samples_from_log(ctx.log_path, cfg.partitions, rcfg))
    impressions = sum(1 for o in ingest_outputs(ctx.records, cfg.partitions, audience=True)
                      if o.kind == "audience" and o.value.get("type") == "impression")
    ctx.expected = {
        "counts": {k: ev[k] for k in ("events", "examples", "attribution")},
        "fm": {k: v for k, v in ev["models"].items() if not k.startswith("vm:")},
        "vm": {k: {m: x for m, x in v.items() if m != "tr"} for k, v in ev["models"].items() if k.startswith("vm:")},
        "reach": {"impressions": impressions,
                  "answers": {q: _answer_numbers(answer(merged, q, rcfg.min_per_stratum)) for q in QUERIES}},
    }
    ctx.say(f"evaluate: {ev['examples']['total']} examples, {steps} FM steps in {ctx.evaluate_s:.0f}s; "
            f"snapshots every {ctx.snapshot_every} steps")
    return ctx


def _answer_numbers(a: dict) -> dict:
    """The parts of a reach answer that must agree exactly (not the timings, nor who answered)."""
    return {k: a.get(k) for k in ("users", "users_ci", "impressions", "sample_users")}


# -- workers and a deployment ----------------------------------------------------------------------------
def _get(port: int, path: str, timeout: float = 5.0, body: bytes | None = None) -> tuple[int | None, bytes]:
    """``(HTTP status, body)`` of one request to a worker; status None when nothing answered."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body else "GET",
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return None, b""


def _view(port: int, path: str, timeout: float = 5.0) -> dict | None:
    status, body = _get(port, path, timeout)
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


class _Deployment:
    """An embedded broker and named workers (``ingest``, ``fm``, ``vm``, ``reach``, ``fm-b``...), each
    with its data directory under ``dir``; restarts keep the name, the data directory and the log."""

    def __init__(self, ctx: _Context, name: str):
        from .broker import EmbeddedBroker
        self.ctx, self.name = ctx, name
        self.dir = ctx.work / name
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.broker = EmbeddedBroker(log_path=str(self.dir / "tansu.log"))
        self.workers: dict = {}  # name -> WorkerProcess
        self.specs: dict = {}  # name -> (role, data dir, extra args, env)
        self.expect_exit: set = set()  # names whose exit is part of the scenario

    def start_broker(self, port: int = 0) -> None:
        from loopline.stream.app import TOPICS

        from .broker import EmbeddedBroker, create_topics
        if port:
            self.broker = EmbeddedBroker(port=port, log_path=str(self.dir / "tansu.log"))
        self.broker.start()
        create_topics(self.broker.bootstrap, {t: self.ctx.cfg.partitions for t in TOPICS})

    def start(self, name: str, role: str | None = None, data_dir: str | None = None, extra: tuple = (),
              env: dict | None = None):
        from .worker import WorkerProcess
        if name not in self.specs:
            role = role or name
            args = ("--role", role)
            if role == "reach":
                args += ("--reach-budget-users", str(self.ctx.cfg.reach_budget_users),
                         "--reach-epoch", repr(REACH_EPOCH_S), "--reach-horizon", "1")
            self.specs[name] = (role, data_dir or str(self.dir / name), args + tuple(extra),
                                {ENV_SNAPSHOT_EVERY: str(self.ctx.snapshot_every), **(env or {})})
        role, data, args, wenv = self.specs[name]
        w = WorkerProcess(self.broker.url, data, self.ctx.cfg.partitions, extra=args, env=wenv)
        w.args[w.args.index("loopline.ops.cli")] = "loopline.ops.chaos"  # loopline worker + the chaos knobs
        self.workers[name] = w.start()
        self.expect_exit.discard(name)
        return w

    def set_extra(self, name: str, extra: tuple) -> None:
        role, data, args, env = self.specs[name]
        self.specs[name] = (role, data, args + tuple(extra), env)

    def kill9(self, name: str) -> None:
        self.expect_exit.add(name)
        w = self.workers[name]
        if w.proc.poll() is None:
            w.kill9()
        w.stop()  # already exited: closes its log file

    def port(self, name: str) -> int:
        return self.workers[name].port

    def check_alive(self) -> None:
        """Raise when a worker exited that the scenario did not stop."""
        for name, w in self.workers.items():
            if name not in self.expect_exit and w.proc.poll() is not None:
                raise ChaosFailure(f"worker {name} exited with {w.proc.returncode} on its own: {_last_line(w)}")

    def wait(self, fn, what: str, timeout: float | None = None, every: float = CHECK_EVERY):
        """Poll ``fn()`` until it returns something truthy; fail naming ``what`` (and any worker that died)."""
        deadline = time.monotonic() + (timeout or self.ctx.cfg.wait)
        while True:
            got = fn()
            if got:
                return got
            self.check_alive()
            if time.monotonic() > deadline:
                raise ChaosFailure(f"timed out after {timeout or self.ctx.cfg.wait:.0f}s waiting for {what}")
            time.sleep(every)

    def wait_ready(self, names) -> None:
        for name in names:
            self.wait(lambda n=name: _get(self.port(n), "/readyz", 2.0)[0] == 200, f"{name} to be ready")

    def replay(self, records, end_of_log: bool = True) -> dict:
        from .replay import replay
        return asyncio.run(replay(self.broker.bootstrap, records, self.ctx.cfg.partitions, end_of_log=end_of_log,
                                  progress=False))

    def close(self) -> None:
        """SIGTERM to every worker at once, then each one's ``stop`` (which waits, and kills after its grace)."""
        import signal
        for w in self.workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers.values():
            try:
                w.stop()
            except Exception:  # noqa: BLE001 - a cleanup step never hides the scenario's own result
                pass
        self.broker.stop()


def _reasons(w) -> list[str]:
    """The one-line reasons a worker gave for stopping (``loopline worker: ...``, not the start-up line;
    once the app runs, its logging prefixes stderr lines with a time stamp)."""
    try:
        text = w.tail(200_000)
    except OSError:
        return []
    return [ln[ln.index("loopline worker:"):] for ln in text.splitlines()
            if "loopline worker:" in ln and "loopline worker: role=" not in ln]


def _last_line(w) -> str:
    """The worker's last one-line reason, else its last log line."""
    try:
        lines = [ln for ln in w.tail(20000).splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return (_reasons(w) or lines or ["(empty log)"])[-1][:400]


def _start_roles(dep: _Deployment, roles=ROLES) -> None:
    for role in roles:
        dep.start(role)
    dep.wait_ready(roles)


def _final(dep: _Deployment, run_id: str, fm: str = "fm") -> dict:
    """Wait for every role's end of the log, then read the final numbers (the shape of ``expected``)."""
    from loopline.ops.reach import ask_workers

    from .replay import collect_results
    ctx = dep.ctx
    want = ctx.expected
    total = want["counts"]["examples"]["total"]
    out: dict = {}
    got = asyncio.run(collect_results(dep.broker.bootstrap, ctx.cfg.partitions, run_id, len(ctx.records),
                                      timeout=ctx.cfg.wait))
    out["counts"] = {k: got[k] for k in ("events", "examples", "attribution")}

    def fm_done():
        v = _view(dep.port(fm), "/fm/") or {}
        return v if v.get("finished") and v.get("counts", {}).get("examples") == total else None
    out["fm"] = dep.wait(fm_done, f"the fm to train on all {total} examples")["models"]

    def vm_done():
        v = _view(dep.port("vm"), "/vm/") or {}
        return v if v.get("examples") == total else None
    out["vm"] = dep.wait(vm_done, f"the vm to train on all {total} examples")["models"]

    imps = want["reach"]["impressions"]
    dep.wait(lambda: ((_view(dep.port("reach"), "/reach") or {}).get("stats") or {}).get("impressions") == imps,
             f"reach to apply all {imps} impressions")
    time.sleep(2.5)  # a partition's frozen sample and a view's answer are each reused for up to a second
    url = f"http://127.0.0.1:{dep.port('reach')}"
    out["reach"] = {"impressions": imps, "answers": {}}
    for q in QUERIES:
        a = ask_workers([url], q, timeout=10.0)
        if a["partial"]:
            raise ChaosFailure(f"reach answered {q!r} partially: {a['workers']}")
        out["reach"]["answers"][q] = _answer_numbers(a)
    return out


def _compare(got: dict, want: dict) -> dict:
    """Per section: ``"equal"``, or the first differing entries."""
    out = {}
    for sec, w in want.items():
        g = got.get(sec)
        if g == w:
            out[sec] = "equal"
        elif isinstance(g, dict) and isinstance(w, dict):
            diff = {k: {"got": g.get(k), "want": w.get(k)} for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k)}
            out[sec] = {"differs": dict(list(diff.items())[:4])}
        else:
            out[sec] = {"differs": {"got": g, "want": w}}
    return out


def _result(ctx: _Context, did: str, got: dict, checks: dict, clean: bool = False, **figures) -> dict:
    compared = {"evaluate": _compare(got, ctx.expected)}
    if clean and ctx.clean is not None:
        compared["clean_run"] = _compare(got, ctx.clean)
    ok = all(v == "equal" for c in compared.values() for v in c.values()) and all(checks.values())
    return {"ok": ok, "did": did, "compared": compared, "checks": checks, **figures}


# -- view_load: the clean run under view load ------------------------------------------------------------
def _expected_marks(ctx: _Context, chunks: list) -> list[dict]:
    """Per chunk, the watermark each ingest partition reports once it has processed that chunk (the
    ingest core run offline over the same records, partitioned as replay sends them)."""
    from loopline.state.ingest import IngestCore

    from .eventlog import partition_for
    P = ctx.cfg.partitions
    cores = [IngestCore({}, p, history=True, audience=True) for p in range(P)]
    offsets = [0] * P
    out = []
    for chunk in chunks:
        for rec in chunk:
            p = partition_for(rec.key, rec.raw, P)
            cores[p].acked(cores[p].handle(rec.raw, offsets[p]))
            offsets[p] += 1
        out.append({p: cores[p].watermark() for p in range(P)})
    return out


def _load_clients_main() -> int:
    """``python -m loopline.ops.chaos load-clients``: the view load, in a process of its own (its GIL is
    not the measuring process's). Reads one JSON line ``{"targets": [[port, key, path, body], ...],
    "clients", "pause_s"}`` from stdin, then commands, one a line: ``on``, ``off``, ``stop``. While on,
    ``clients`` threads request the targets round-robin; at ``stop`` it prints the status counts per
    target as one JSON line and exits."""
    # Clients are other machines in a deployment; on this one they are niced, so that what the figure
    # charges to the workers is serving the requests, not making them
    os.nice(10)
    conf = json.loads(sys.stdin.readline())
    targets = [(port, key, path, body.encode() if body else None) for port, key, path, body in conf["targets"]]
    on, stop, lock = threading.Event(), threading.Event(), threading.Lock()
    statuses: dict[str, dict] = {}

    def client(i: int) -> None:
        n = i
        while not stop.is_set():
            if not on.wait(0.1):
                continue
            port, key, path, body = targets[n % len(targets)]
            n += 1
            status, _ = _get(port, path, timeout=10.0, body=body)
            with lock:
                per = statuses.setdefault(key, {})
                s = str(status) if status is not None else "no answer"
                per[s] = per.get(s, 0) + 1
            if conf["pause_s"]:
                time.sleep(conf["pause_s"])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(conf["clients"])]
    for t in threads:
        t.start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "on":
            on.set()
        elif cmd == "off":
            on.clear()
        elif cmd == "stop":
            break
    stop.set()
    for t in threads:
        t.join(15)
    with lock:
        sys.stdout.write(json.dumps(statuses) + "\n")
    sys.stdout.flush()
    return 0


class _ViewLoad:
    """The view load: every view of every worker of ``dep``, from ``clients`` threads in a child process
    (``python -m loopline.ops.chaos load-clients``); ``on()``/``off()`` switch it, ``close()`` collects."""

    def __init__(self, dep: _Deployment, clients: int, pause_s: float):
        q = urllib.parse.quote(QUERIES[1])
        common = ("/healthz", "/readyz", "/views")
        score = json.dumps({"user": "u1", "vertical": "feed",
                            "candidates": [{"ad": f"a{k}", "campaign": f"c{k % 7}"} for k in range(100)]})
        paths = {"ingest": ("/ingest/",) + common, "fm": ("/fm/",) + common, "vm": ("/vm/", "POST /score/") + common,
                 "reach": ("/reach", f"/reach?q={q}", "/quality") + common}
        targets = [(dep.port(name), f"{name} {path}", path.removeprefix("POST "),
                    score if path.startswith("POST ") else None) for name, ps in paths.items() for path in ps]
        self.proc = subprocess.Popen([sys.executable, "-m", "loopline.ops.chaos", "load-clients"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._send(json.dumps({"targets": targets, "clients": clients, "pause_s": pause_s}))
        self.statuses: dict | None = None

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def on(self) -> None:
        self._send("on")

    def off(self) -> None:
        self._send("off")

    def close(self) -> dict:
        if self.statuses is not None:
            return self.statuses
        try:
            out, _ = self.proc.communicate("stop\n", timeout=60)
            self.statuses = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as exc:
            self.proc.kill()
            self.statuses = {"(the load process)": {f"no answer ({type(exc).__name__})": 1}}
        return self.statuses

    @property
    def requests(self) -> int:
        return sum(sum(v.values()) for v in (self.statuses or {}).values())

    def bad(self) -> dict:
        return {k: {s: c for s, c in v.items() if s.startswith("no answer") or s.startswith("5")}
                for k, v in (self.statuses or {}).items()
                if any(s.startswith("no answer") or s.startswith("5") for s in v)}


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used, from ``/proc`` (None where there is none)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def _phases(dep: _Deployment, chunks: list, marks: list, loaded: tuple, load: _ViewLoad | None) -> list:
    """Send each chunk at once and time ingest on it: from the first send until ingest's watermark marks
    (followed on partition 0 of ``history.events``) show every partition past it. Ingest is idle between
    chunks, so a chunk's time is a whole number of its batches (plus one consumer fetch wait, at most half
    a second, the same loaded or not). One producer and one follower for all chunks, so neither's start-up
    is timed."""
    from aiokafka import AIOKafkaProducer

    from loopline.stream.app import control_of, follow_topic

    from .eventlog import partition_for
    from .replay import MAX_REQUEST
    ctx = dep.ctx
    P = ctx.cfg.partitions
    seen: dict[int, float] = {}

    async def follow() -> None:
        async for msgs in follow_topic(dep.broker.bootstrap, ("history.events",), 1, max_records=5000, timeout_ms=10):
            for m in msgs:
                kind, _, rest = (control_of(m.headers) or "").partition(":")
                if kind == "watermark":  # b"watermark:<ingest partition>:<time>" (stream/app.py)
                    p, _, t = rest.partition(":")
                    seen[int(p)] = max(seen.get(int(p), -math.inf), float(t))

    producer = AIOKafkaProducer(bootstrap_servers=dep.broker.bootstrap, max_request_size=MAX_REQUEST, linger_ms=5,
                                max_batch_size=256 * 1024, request_timeout_ms=30000)
    await producer.start()
    follower = asyncio.ensure_future(follow())
    phases = []
    # every process's CPU per chunk: where a loaded chunk's time goes on a machine the roles share
    pids = {name: w.proc.pid for name, w in dep.workers.items()}
    pids["broker"] = dep.broker.proc.pid
    if load is not None:
        pids["clients"] = load.proc.pid

    def cpus() -> dict:
        return {name: _cpu_s(p) for name, p in pids.items()}
    try:
        for i, (chunk, on) in enumerate(zip(chunks, loaded)):
            on = on and load is not None
            if on:
                load.on()
            before = cpus()
            t = time.perf_counter()
            deadline = time.monotonic() + ctx.cfg.wait
            futures = [await producer.send("events", r.raw, key=r.key, partition=partition_for(r.key, r.raw, P))
                       for r in chunk]
            await asyncio.gather(*futures)
            while not all(seen.get(p, -math.inf) >= w for p, w in marks[i].items()):
                if follower.done():
                    raise ChaosFailure(f"following ingest's marks failed: {follower.exception()!r}")
                dep.check_alive()
                if time.monotonic() > deadline:
                    raise ChaosFailure(f"timed out waiting for ingest to process chunk {i + 1}")
                await asyncio.sleep(0.005)
            dt = time.perf_counter() - t
            used = {name: c - before[name] for name, c in cpus().items()
                    if c is not None and before.get(name) is not None}  # CPU seconds in the chunk
            if on:
                load.off()
            phases.append({"events": len(chunk), "loaded": on, "seconds": round(dt, 3),
                           "events_per_s": round(len(chunk) / dt, 1),
                           "ingest_cpu_ms_per_event": round(1000 * used["ingest"] / len(chunk), 4)
                           if "ingest" in used else None,
                           "cores_used": {name: round(c / dt, 3) for name, c in used.items()}})
            ctx.say(f"{dep.name}: chunk {i + 1}/{len(chunks)} ({'loaded' if on else 'unloaded'}) ingested at "
                    f"{len(chunk) / dt:,.0f} events/s")
    finally:
        follower.cancel()
        try:
            await follower
        except BaseException:  # noqa: BLE001 - cancelled, or its error already reported
            pass
        await producer.stop()
    return phases


async def _groups(bootstrap: str) -> dict:
    """Each Loopline consumer group's state and members (a rebalance that dropped a member changes them)."""
    from aiokafka.admin import AIOKafkaAdminClient
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        out = {}
        for name in (f"loopline-{r}" for r in ROLES):  # one at a time: Tansu 0.6 garbles a multi-group answer
            for resp in await admin.describe_consumer_groups([name]):
                for g in resp.groups:
                    out[g[1]] = {"state": g[2], "members": sorted(m[0] for m in g[5])}
        return out
    finally:
        await admin.close()


def _pin(pid: int, cpus: set) -> None:
    """Every thread of process ``pid`` on ``cpus`` (threads it starts later inherit the mask)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def _pin_ingest(dep: _Deployment, clients: _ViewLoad) -> dict | None:
    """For the measurement, ingest and the broker on one core and every other process (the other roles,
    the load clients) on the rest, as a deployment gives roles machines of their own: the figure is then
    what serving views costs ingest (its own views, and the broker's extra fetches), not how five
    processes share two cores. Without two cores or ``sched_setaffinity``, nothing is pinned (None)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    mine, rest = {cpus[0]}, set(cpus[1:])
    _pin(dep.workers["ingest"].proc.pid, mine)
    _pin(dep.broker.proc.pid, mine)
    for name, w in dep.workers.items():
        if name != "ingest":
            _pin(w.proc.pid, rest)
    _pin(clients.proc.pid, rest)
    return {"ingest+broker": sorted(mine), "others": sorted(rest)}


def _throughput_log(ctx: _Context) -> list:
    """The view_load measurement's own log: ``throughput_events`` lines after the main log's end, over
    0.8 days of event time (no attribution window closes in it, so the fm and the vm stay idle), ids
    prefixed with ``t`` so that none repeats an id of the main log."""
    import orjson

    from .eventlog import order_records
    from .generate import GenerateConfig, generate
    days, want = 0.8, ctx.cfg.throughput_events
    users = max(20, round(want / (days * 3.3)))
    end = max(r.ts for r in ctx.records)
    while True:
        lines = []
        for raw in generate(GenerateConfig(users=users, days=days, seed=ctx.cfg.seed + 1, start_ts=end + 1.0)):
            ev = orjson.loads(raw)
            for k in ("id", "impression"):
                if isinstance(ev.get(k), str):
                    ev[k] = "t" + ev[k]
            lines.append(orjson.dumps(ev))
        if len(lines) >= want:
            return order_records(lines)[:want]
        users = math.ceil(users * 1.1 * want / max(len(lines), 1))


def _clean_run(ctx: _Context, load: bool) -> dict:
    """The deployment without faults: the log replayed, the final numbers read. With ``load``, then the
    ``view_load`` measurement on a second log (module docstring)."""
    cfg = ctx.cfg
    dep = _Deployment(ctx, "view_load" if load else "clean")
    clients = None
    try:
        dep.start_broker()
        _start_roles(dep)
        ctx.say(f"{dep.name}: broker and workers up")
        got = ctx.clean = _final(dep, dep.replay(ctx.records)["run_id"])
        ctx.say(f"{dep.name}: final numbers read")
        if not load:
            return got
        extra = _throughput_log(ctx)
        n = len(extra)
        cuts = [round(n * i / 16) for i in range(17)]
        chunks = [extra[a:b] for a, b in zip(cuts, cuts[1:])]
        loaded = (False, True, True, False) * 4  # ABBA: each pair of neighbours is one of each
        marks = _expected_marks(ctx, chunks)
        clients = _ViewLoad(dep, cfg.clients, cfg.client_pause_s)
        pinned = _pin_ingest(dep, clients)
        groups_before = asyncio.run(_groups(dep.broker.bootstrap))
        phases = asyncio.run(_phases(dep, chunks, marks, loaded, clients))
        groups_after = asyncio.run(_groups(dep.broker.bootstrap))
        clients.close()
        dep.check_alive()
    finally:
        if clients is not None:
            clients.close()
        dep.close()

    def rate(ps: list) -> float:
        return sum(p["events"] for p in ps) / max(sum(p["seconds"] for p in ps), 1e-9)
    # The other roles' work (the fm's history store, the reach samples) competes for the same two cores
    # and drifts over tens of seconds; neighbouring chunks see about the same of it, so the figure is the
    # median over the neighbour pairs (one loaded, one not) of loaded/unloaded
    pairs = [sorted(phases[i:i + 2], key=lambda p: p["loaded"]) for i in range(0, len(phases), 2)]
    ratio = statistics.median(rate([b]) / rate([a]) for a, b in pairs)
    pooled = rate([p for p in phases if p["loaded"]]) / rate([p for p in phases if not p["loaded"]])

    def cpu(on: bool) -> float | None:  # ingest's own CPU per event: its work, whatever the cores' contention
        ps = [p for p in phases if p["loaded"] == on and p["ingest_cpu_ms_per_event"] is not None]
        return round(sum(p["ingest_cpu_ms_per_event"] * p["events"] for p in ps) / sum(p["events"] for p in ps), 4) \
            if ps else None
    checks = {f"loaded ingest throughput >= {cfg.min_ratio:g} of unloaded": ratio >= cfg.min_ratio,
              "no request got a 5xx or no answer": not clients.bad(),
              "no consumer group changed members (no rebalance)": groups_before == groups_after
              and all(g["state"] == "Stable" for g in groups_after.values())}
    return _result(ctx, f"replayed the log and read the final numbers; then a second log of {n} events after it "
                   "(under a day: no window closes, the fm and the vm stay idle) in 16 chunks, unloaded and "
                   f"loaded in ABBA order, {cfg.clients} clients requesting every view of every worker during the "
                   f"loaded ones ({clients.requests} requests)",
                   got, checks, throughput={
                       "unloaded_events_per_s": round(rate([p for p in phases if not p["loaded"]]), 1),
                       "loaded_events_per_s": round(rate([p for p in phases if p["loaded"]]), 1),
                       "ratio": round(ratio, 3), "pooled_ratio": round(pooled, 3),
                       "ingest_cpu_ms_per_event": {"unloaded": cpu(False), "loaded": cpu(True)}, "phases": phases},
                   requests={"total": clients.requests, "by_view": clients.statuses, "bad": clients.bad()},
                   cpus=pinned,
                   groups={"before": groups_before, "after": groups_after})


# -- kills -------------------------------------------------------------------------------------------------
def _progress_of(dep: _Deployment, role: str):
    """A role's own progress figure (read just before a kill, for the record), or None."""
    v = _view(dep.port(role), {"ingest": "/ingest/", "fm": "/fm/", "vm": "/vm/", "reach": "/reach"}[role], 2.0)
    if v is None:
        return None
    if role == "ingest":
        return sum(p.get("read", 0) + p.get("redelivered", 0) for k, p in v.items() if k.isdigit() and p)
    if role == "fm":
        return (v.get("counts") or {}).get("examples", 0)
    if role == "vm":
        return v.get("examples")
    return (v.get("stats") or {}).get("values")


def _kills(ctx: _Context) -> dict:
    cfg = ctx.cfg
    if ctx.clean is None:
        ctx.say("kills: first a run without kills to compare with")
        _clean_run(ctx, load=False)
    rng = random.Random(cfg.seed)
    span = max(20.0, ctx.evaluate_s)  # about the time the fm needs for the log
    n_chunks = 20
    n = len(ctx.records)
    cuts = [round(n * i / n_chunks) for i in range(n_chunks + 1)]
    actions = [(span * i / n_chunks, "send", i) for i in range(n_chunks)]
    roles: list = []
    while len(roles) < cfg.kills:  # shuffled rounds of the four roles: with kills >= 4, each is killed
        roles += rng.sample(ROLES, len(ROLES))
    # up to 1.5 spans: the fm and the vm are still busy after the last chunk (a third of the windows
    # close with the end of the log)
    actions += [(rng.uniform(0.1, 1.5) * span, "kill", role) for role in roles[:cfg.kills]]
    actions.sort(key=lambda a: (a[0], a[1] == "kill"))
    dep = _Deployment(ctx, "kills")
    done = []
    try:
        dep.start_broker()
        _start_roles(dep)
        ctx.say(f"kills: workers up; replaying over {span:.0f}s with {cfg.kills} kill -9s")
        t0 = time.monotonic()
        run_id = None
        for at, what, arg in actions:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            dep.check_alive()
            if what == "send":
                sent = dep.replay(ctx.records[cuts[arg]:cuts[arg + 1]], end_of_log=arg == n_chunks - 1)
                run_id = sent["run_id"]
                continue
            progress = _progress_of(dep, arg)
            dep.kill9(arg)
            dep.start(arg)
            done.append({"at_s": round(time.monotonic() - t0, 1), "role": arg, "progress": progress})
            ctx.say(f"kills: kill -9 {arg} at {done[-1]['at_s']}s (progress {progress}); restarted")
        got = _final(dep, run_id)
        ctx.say("kills: final numbers read")
    finally:
        dep.close()
    by_role = {r: sum(1 for k in done if k["role"] == r) for r in ROLES}
    return _result(ctx, f"{len(done)} kill -9s of seeded roles at seeded moments of a paced replay ({by_role}), "
                   "each followed by a restart on the same data directory", got,
                   {"every kill was followed by a restart": len(done) == cfg.kills}, clean=True,
                   kills=done, span_s=round(span, 1))


# -- broker_restart ----------------------------------------------------------------------------------------
def _broker_restart(ctx: _Context) -> dict:
    from loopline.stream.broker_watch import EXIT_BROKER_RESET
    dep = _Deployment(ctx, "broker_restart")
    try:
        dep.start_broker()
        _start_roles(dep)
        half = len(ctx.records) // 2
        dep.replay(ctx.records[:half], end_of_log=False)
        dep.wait(lambda: (_progress_of(dep, "ingest") or 0) >= half // 2, "ingest to be half-way through")
        port = dep.broker.port
        dep.expect_exit.update(dep.workers)
        dep.broker.proc.kill()  # kill -9: everything the broker held is gone
        dep.broker.proc.wait(10)
        t_kill = time.monotonic()
        dep.start_broker(port)  # same port, a new empty cluster with a new cluster id
        ctx.say("broker_restart: broker killed with kill -9 and restarted empty on the same port")
        exits = {}
        for name, w in dep.workers.items():
            try:
                rc = w.proc.wait(max(0.1, t_kill + ctx.cfg.wait - time.monotonic()))
            except subprocess.TimeoutExpired:
                rc = None
            exits[name] = {"code": rc, "after_s": round(time.monotonic() - t_kill, 1), "line": _last_line(w)}
        kept = {name: len(os.listdir(dep.specs[name][1])) > 1 for name in dep.workers}
        ctx.say(f"broker_restart: workers exited with {[e['code'] for e in exits.values()]}")
        # Before they noticed, the old workers' producers re-sent what was in flight into the new broker
        # (aiokafka reconnects to the same address and retries): counted here, then cleared, as an operator
        # must (a restart for the memory-only broker; on Kafka, delete and re-create Loopline's topics).
        stale = asyncio.run(_topic_ends(dep.broker.bootstrap))
        dep.broker.stop()
        dep.start_broker(port)
        ctx.say(f"broker_restart: {sum(stale.values())} messages the old workers re-sent into the new broker "
                "before they stopped; broker restarted empty again")
        for name in list(dep.workers):
            dep.set_extra(name, ("--on-broker-reset", "reset"))
            dep.start(name)
        dep.wait_ready(ROLES)
        sent = dep.replay(ctx.records)
        got = _final(dep, sent["run_id"])
        wiped = {name: "discarding this worker's state" in w.tail(20000) for name, w in dep.workers.items()}
        ctx.say("broker_restart: final numbers read")
    finally:
        dep.close()
    checks = {f"every worker exited {EXIT_BROKER_RESET} with the reset line":
              all(e["code"] == EXIT_BROKER_RESET and "broker reset detected" in e["line"] for e in exits.values()),
              "every worker kept its data directory (policy stop)": all(kept.values()),
              "every worker restarted with --on-broker-reset reset discarded its state": all(wiped.values())}
    return _result(ctx, "replayed half the log, killed the broker (kill -9) and restarted it empty on the same "
                   "port; under the default policy (stop) every worker stopped; the broker was cleared of what "
                   "their producers had re-sent into it, the workers restarted with --on-broker-reset reset and "
                   "the whole log replayed from its source", got, checks,
                   exits=exits, stale_messages=stale, policy="stop, then reset by the operator")


async def _topic_ends(bootstrap: str) -> dict:
    """Messages per topic a broker holds (the sum of its partitions' end offsets), non-empty topics only."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for topic in sorted(await consumer.topics()):
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            n = sum((await consumer.end_offsets(tps)).values()) if tps else 0
            if n:
                out[topic] = n
        return out
    finally:
        await consumer.stop()


# -- corrupt_snapshot --------------------------------------------------------------------------------------
def _snapshots(data_dir: str, series: str) -> list[str]:
    d = os.path.join(data_dir, series)
    try:
        return sorted(n for n in os.listdir(d) if n.startswith("snapshot-") and n.endswith(".pt"))
    except FileNotFoundError:
        return []


def _corrupt_snapshot(ctx: _Context) -> dict:
    dep = _Deployment(ctx, "corrupt_snapshot")
    series = {"fm": "fm-snapshots", "vm": "vm-snapshots"}
    try:
        dep.start_broker()
        _start_roles(dep)
        sent = dep.replay(ctx.records)
        dep.wait(lambda: all(len(_snapshots(dep.specs[r][1], s)) >= 2 for r, s in series.items()),
                 "two fm and two vm snapshots", every=0.05)
        for role in series:
            dep.kill9(role)
        damaged = {}
        for role, s in series.items():
            d = os.path.join(dep.specs[role][1], s)
            names = _snapshots(dep.specs[role][1], s)
            newest = os.path.join(d, names[-1])
            size = os.path.getsize(newest)
            with open(newest, "r+b") as f:
                f.truncate(size // 2)
            with open(os.path.join(d, ".snapshot-chaos.tmp"), "wb") as f:
                f.write(b"left by a killed save")
            damaged[role] = {"truncated": names[-1], "bytes": [size, size // 2], "previous": names[-2]}
        ctx.say(f"corrupt_snapshot: fm and vm killed; newest snapshots truncated "
                f"({', '.join(v['truncated'] for v in damaged.values())})")
        for role in series:
            dep.start(role)
        got = _final(dep, sent["run_id"])
        restored = {r: (_view(dep.port(r), f"/{r}/") or {}).get("restored") for r in series}
        tmp_left = {r: os.path.exists(os.path.join(dep.specs[r][1], s, ".snapshot-chaos.tmp"))
                    for r, s in series.items()}
        ctx.say(f"corrupt_snapshot: final numbers read; restored {restored}")
    finally:
        dep.close()
    checks = {f"{r} restarted from the previous snapshot": restored[r] == damaged[r]["previous"] for r in series}
    checks["stale temporaries removed"] = not any(tmp_left.values())
    return _result(ctx, "killed the fm and the vm once each had two snapshots, truncated the newest of each to "
                   "half and left a stale temporary beside it, restarted both", got, checks,
                   damaged=damaged, restored=restored)


# -- disk_full ---------------------------------------------------------------------------------------------
def _mount_tmpfs(path: str, mb: int) -> str | None:
    """Mount a tmpfs of ``mb`` MiB on ``path``; None when done, else why not."""
    os.makedirs(path, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", path], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def _fill(path: str) -> int:
    """Write a ballast file until the filesystem is full; returns its bytes."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12):
            buf = b"\0" * block
            while True:
                try:
                    n += f.write(buf)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return n


def _disk_full(ctx: _Context) -> dict:
    cfg = ctx.cfg
    dep = _Deployment(ctx, "disk_full")
    mount = str(dep.dir / "fm")  # the fm's data directory itself (its log, fm.log, stays outside)
    method, why = cfg.disk, None
    if method in ("auto", "tmpfs"):
        why = _mount_tmpfs(mount, cfg.tmpfs_mb)
        if why is None:
            method = "tmpfs"
        elif method == "tmpfs":
            raise ChaosFailure(f"disk_full: cannot mount a tmpfs ({why})")
        else:
            method = "simulated"
    flag = str(dep.dir / "disk-full.flag")
    ballast = os.path.join(mount, ".chaos-ballast")
    try:
        dep.start_broker()
        env = {ENV_DISK_FULL: flag} if method == "simulated" else {}
        dep.start("fm", env=env)
        for role in ("ingest", "vm", "reach"):
            dep.start(role)
        dep.wait_ready(ROLES)
        # the log goes in by eighths until the fm has a snapshot, and the rest only once the disk is full:
        # the fm must still have work (steps, snapshots) then; a fast fm fed the whole log at once finished
        # it before the ballast was written, and had nothing left to write
        fm = dep.workers["fm"]
        cuts = [len(ctx.records) * i // 8 for i in range(9)]
        for i in range(7):
            dep.replay(ctx.records[cuts[i]:cuts[i + 1]], end_of_log=False)
            try:
                view = dep.wait(lambda: (v := _view(dep.port("fm"), "/fm/") or {}).get("snapshot_at", 0) > 0 and v,
                                "the fm's first snapshot", timeout=10.0 if i < 6 else None, every=0.05)
                break
            except ChaosFailure:
                if i == 6:
                    raise
        rest = ctx.records[cuts[i + 1]:]
        dep.expect_exit.add("fm")
        if method == "tmpfs":
            filled = _fill(ballast)
        else:
            open(flag, "wb").close()
            filled = 0
        t_full = time.monotonic()
        ctx.say(f"disk_full: fm's disk full ({method}) at {view['counts'].get('examples')} examples")
        sent = dep.replay(rest)
        try:
            rc = fm.proc.wait(cfg.wait)
        except subprocess.TimeoutExpired:
            raise ChaosFailure(f"disk_full: the fm kept running {cfg.wait:.0f}s on a full disk") from None
        exit_s = time.monotonic() - t_full
        line = _last_line(fm)
        reasons = _reasons(fm)
        ctx.say(f"disk_full: fm exited {rc} after {exit_s:.1f}s: {line[:160]}")
        if method == "tmpfs":
            os.remove(ballast)
        else:
            os.remove(flag)
        dep.start("fm")
        got = _final(dep, sent["run_id"])
        ctx.say("disk_full: space back, fm restarted; final numbers read")
    finally:
        dep.close()
        if method == "tmpfs":
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
    checks = {"the fm exited non-zero": rc not in (None, 0),
              "with one line naming the full disk": len(reasons) == 1 and (
                  "No space left" in reasons[0] or "ENOSPC" in reasons[0] or "Errno 28" in reasons[0])}
    how = (f"a {cfg.tmpfs_mb} MiB tmpfs, filled with a ballast file" if method == "tmpfs"
           else f"simulated ENOSPC ({why or 'asked for'})")
    return _result(ctx, f"filled the fm's data directory ({how}) once it had a snapshot; freed the space and "
                   "restarted the fm", got, checks, method=method,
                   exit={"code": rc, "after_s": round(exit_s, 1), "line": line}, ballast_bytes=filled)


# -- standby ---------------------------------------------------------------------------------------------
def _standby(ctx: _Context) -> dict:
    dep = _Deployment(ctx, "standby")
    try:
        dep.start_broker()
        dep.start("fm")
        dep.wait(lambda: (_view(dep.port("fm"), "/fm/") or {}).get("role") == "active", "the first fm to be active")
        dep.start("fm-b", role="fm")
        dep.wait(lambda: (_view(dep.port("fm-b"), "/fm/") or {}).get("role") == "standby", "the second fm to stand by")
        for role in ("ingest", "vm", "reach"):
            dep.start(role)
        dep.wait_ready(("ingest", "vm", "reach", "fm", "fm-b"))
        sent = dep.replay(ctx.records)
        view = dep.wait(lambda: (v := _view(dep.port("fm"), "/fm/") or {}).get("snapshot_at", 0) > 0 and v,
                        "the active fm's first snapshot", every=0.05)
        standby = _view(dep.port("fm-b"), "/fm/") or {}
        dep.kill9("fm")
        t = time.monotonic()
        ctx.say(f"standby: active fm killed at {view['counts'].get('examples')} examples")

        def took_over():
            h = _view(dep.port("fm-b"), "/healthz", 2.0) or {}
            return ((h.get("roles") or {}).get("fm") or {}).get("batches", 0) >= 1
        dep.wait(took_over, "the standby to take over", every=0.05)
        takeover_s = time.monotonic() - t
        ctx.say(f"standby: took over after {takeover_s:.1f}s")
        got = _final(dep, sent["run_id"], fm="fm-b")
        role = (_view(dep.port("fm-b"), "/fm/") or {}).get("role")
    finally:
        dep.close()
    checks = {"the standby trained nothing while the active one lived": standby.get("role") == "standby"
              and not standby.get("counts"),
              "the standby became the active fm": role == "active"}
    return _result(ctx, "started two fm members, killed the active one (kill -9) once it had a snapshot",
                   got, checks, takeover_s=round(takeover_s, 2),
                   killed_at_examples=(view.get("counts") or {}).get("examples"))


_RUNNERS = {"view_load": lambda ctx: _clean_run(ctx, load=True), "kills": _kills, "broker_restart": _broker_restart,
            "corrupt_snapshot": _corrupt_snapshot, "disk_full": _disk_full, "standby": _standby}


def run_scenario(ctx: _Context, name: str) -> dict:
    """Run one scenario on a prepared context; a failure is a result with ``ok: false`` and the reason."""
    t = time.monotonic()
    ctx.say(f"{name}: start")
    try:
        out = _RUNNERS[name](ctx)
    except ChaosFailure as exc:
        out = {"ok": False, "error": str(exc)}
    out["seconds"] = round(time.monotonic() - t, 1)
    ctx.say(f"{name}: {'ok' if out['ok'] else 'FAILED'} in {out['seconds']:.0f}s")
    return out


def run_chaos(cfg: ChaosConfig, progress: bool = True) -> dict:
    """``loopline chaos``: prepare, run every selected scenario, and say where the logs are if one failed.
    A SIGTERM ends it like Ctrl-C: each scenario's ``finally`` stops the workers and the broker it
    started (they run in sessions of their own, so nothing else would)."""
    import signal

    def _interrupt(*_):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    ctx = prepare(cfg, progress)
    out = {"config": {**asdict(cfg), "scenarios": list(cfg.scenarios), "snapshot_every": ctx.snapshot_every},
           "log": ctx.generated, "expected": {"counts": ctx.expected["counts"], "reach": ctx.expected["reach"]},
           "scenarios": {}}
    for name in cfg.scenarios:
        out["scenarios"][name] = run_scenario(ctx, name)
    out["ok"] = all(s["ok"] for s in out["scenarios"].values())
    out["seconds"] = round(time.monotonic() - ctx.t0, 1)
    if out["ok"] and not cfg.keep and cfg.workdir is None:
        shutil.rmtree(ctx.work, ignore_errors=True)
    else:
        out["workdir"] = str(ctx.work)
    return out


FIGURES = {"view_load": ("throughput",), "kills": ("kills",), "broker_restart": ("exits",),
           "corrupt_snapshot": ("restored",), "disk_full": ("method", "exit"), "standby": ("takeover_s",)}


def format_chaos(out: dict) -> str:
    """The human summary: per scenario ``ok``/``FAILED``, what it did, what it compared, its figures.

    >>> print(format_chaos({"ok": True, "seconds": 1.0, "scenarios": {"standby": {"ok": True, "did": "killed",
    ...     "compared": {"evaluate": {"fm": "equal"}}, "checks": {"took over": True}, "takeover_s": 11.2,
    ...     "seconds": 1.0}}}))
    ok      standby (1s): killed
            compared: fm equal to evaluate
            checks: took over: yes
            takeover_s: 11.2
    all scenarios ok (1s)
    """
    lines = []
    for name, r in out["scenarios"].items():
        head = f"{'ok' if r['ok'] else 'FAILED':<8}{name} ({r.get('seconds', 0):.0f}s)"
        lines.append(f"{head}: {r.get('did', r.get('error'))}")
        for against, secs in r.get("compared", {}).items():
            same = [s for s, v in secs.items() if v == "equal"]
            differ = [f"{s} {json.dumps(v)}" for s, v in secs.items() if v != "equal"]
            what = against.replace("_", " ")
            lines.append(f"{'':8}compared: {', '.join(same) or 'nothing'} equal to {what}"
                         + (f"; DIFFERENT: {'; '.join(differ)}" if differ else ""))
        if r.get("checks"):
            lines.append(f"{'':8}checks: " + "; ".join(f"{c}: {'yes' if v else 'NO'}" for c, v in r["checks"].items()))
        for key in FIGURES.get(name, ()):
            if key in r:
                lines.append(f"{'':8}{key}: {json.dumps(r[key])}")
        if r.get("error"):
            lines.append(f"{'':8}error: {r['error']}")
    lines.append(f"{'all scenarios ok' if out['ok'] else 'SOME SCENARIOS FAILED'} ({out['seconds']:.0f}s)"
                 + (f"; logs in {out['workdir']}" if out.get("workdir") else ""))
    return "\n".join(lines)


# -- the chaos worker: ``loopline worker`` with the knobs above -------------------------------------------------
def _simulate_full_disk(flag: str) -> None:
    """While ``flag`` exists, snapshot writes and history-store appends fail as on a full disk."""
    from loopline.state import history, snapshots

    def full():
        if os.path.exists(flag):
            raise OSError(errno.ENOSPC, f"No space left on device (simulated by loopline chaos: {flag} exists)")

    write_atomic = snapshots.write_atomic

    def write(path, data):
        full()
        return write_atomic(path, data)
    snapshots.write_atomic = write
    for name in ("append_events", "append_embeddings"):
        orig = getattr(history.HistoryStore, name)

        def wrapped(self, rows, _orig=orig):
            full()
            return _orig(self, rows)
        setattr(history.HistoryStore, name, wrapped)


def _worker_main(argv: list[str]) -> int:
    every = os.environ.get(ENV_SNAPSHOT_EVERY)
    if every:
        from loopline.stream import fm, vm
        fm.SNAPSHOT_EVERY = vm.SNAPSHOT_EVERY = int(every)
    flag = os.environ.get(ENV_DISK_FULL)
    if flag:
        _simulate_full_disk(flag)
    from .cli import main
    return main(argv)


if __name__ == "__main__":
    sys.exit(_load_clients_main() if sys.argv[1:2] == ["load-clients"] else _worker_main(sys.argv[1:]))
