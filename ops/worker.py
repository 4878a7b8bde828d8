"""``loopline worker``: a long-lived Faust worker with a bounded shutdown.

Public surface: ``run_worker``, ``WorkerCommand`` and ``run_worker_command`` (``loopline worker``: the
worker's config, the join's flags and the grace period), ``WorkerProcess``, ``check_broker``.

On SIGTERM/SIGINT Faust commits and stops; a watchdog thread forces the exit after ``grace_s`` (an
agent stuck in a long step was seen to ignore SIGTERM for minutes) and says so on stderr. Only a stop
that reaches the end of shutdown marks the local tables as trusted (``stream/local_tables.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, replace

from loopline.settings import nested, setting
from loopline.stream.app import WorkerConfig, build_app
from loopline.stream.local_tables import mark_clean, open_tables

from .broker import create_topics
from .source import JoinConfig

__all__ = ["run_worker", "WorkerCommand", "run_worker_command", "WorkerProcess", "check_broker"]


@dataclass(frozen=True)
class WorkerCommand:
    """``loopline worker``: the worker's settings, its attribution join's, and how long it may take to stop."""

    worker: WorkerConfig = nested(WorkerConfig)
    join: JoinConfig = nested(JoinConfig)  # a worker reads no data set: the window defaults to a day
    grace_s: float = setting(20.0, "seconds to stop before the exit is forced", flag="grace")


def run_worker_command(cfg: WorkerCommand, progress: bool = False) -> int:
    """Run the worker until it is stopped (0; a failing agent or a broker reset exits on its own)."""
    run_worker(replace(cfg.worker, attribution=cfg.join.attribution()), grace_s=cfg.grace_s)
    return 0


def check_broker(cfg: WorkerConfig) -> None:
    """Before anything starts: is the broker the one this worker's state belongs to (its cluster id,
    recorded in the data dir)? On a reset, ``stop`` exits 75 with one line; ``reset`` empties the data
    dir and starts over here (``stream/broker_watch.py``)."""
    import asyncio

    from loopline.stream.broker_watch import BrokerWatch
    watch = BrokerWatch(cfg.broker, cfg.data_dir, cfg.on_broker_reset)
    async def once() -> dict:
        try:
            return await watch.identity()
        finally:
            await watch.close()
    identity = asyncio.run(once())
    recorded = watch.recorded()
    reason = BrokerWatch.compare(recorded, identity, {}, {})
    if reason is None:
        if recorded is None:
            watch.record(identity)
    elif cfg.on_broker_reset == "reset":
        print(f"loopline worker: broker reset detected: {reason}; discarding this worker's state "
              "(--on-broker-reset reset) and starting over", file=sys.stderr, flush=True)
        watch.wipe(identity)
    else:
        watch.act(reason)


def service_worker_class():
    """``faust.Worker`` without its terminal spinner (``ops/faust_floor.py`` runs one too). The spinner
    sets the root logger to DEBUG; aiokafka then builds a debug record for every message it sends (a
    tenth of the worker's time in the ingest benchmark) and the log fills with terminal escapes."""
    import faust

    class ServiceWorker(faust.Worker):
        def on_setup_root_logger(self, logger, level):  # noqa: ANN001 - mode's signature
            self.spinner = None
            super().on_setup_root_logger(logger, level)
    return ServiceWorker


def run_worker(cfg: WorkerConfig, grace_s: float = 20.0) -> None:
    check_broker(cfg)
    create_topics(cfg.broker, cfg.topic_partitions())
    app = build_app(cfg)
    tabledir = app.conf.tabledir
    if open_tables(tabledir) == "discarded":
        print(f"loopline worker: {tabledir} was not closed by a clean stop; its tables are restored from "
              "their changelogs", file=sys.stderr, flush=True)

    armed = []

    def arm_forced_exit(sig) -> None:  # noqa: ANN001
        if armed:
            return
        def force():
            print(f"loopline worker: not stopped {grace_s:.0f}s after {signal.Signals(sig).name}; "
                  "forcing exit", file=sys.stderr, flush=True)
            os._exit(3)
        t = threading.Timer(grace_s, force)
        t.daemon = True
        t.start()
        armed.append(t)

    class BoundedWorker(service_worker_class()):
        def _schedule_shutdown(self, sig):  # noqa: ANN001 - mode's signature
            arm_forced_exit(sig)
            super()._schedule_shutdown(sig)

        def install_signal_handlers(self) -> None:
            super().install_signal_handlers()
            # asyncio handles SIGTERM/SIGINT when its loop next runs: after a long synchronous stretch
            # (a training step under load) that can be seconds late. The Python-level handler runs in
            # the main thread between bytecodes, so the grace period starts when the signal comes;
            # asyncio's wake-up fd still delivers the signal to Faust's own handler.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: arm_forced_exit(signum))

        def stop_and_shutdown(self) -> None:
            super().stop_and_shutdown()
            mark_clean(tabledir)  # not reached when the exit is forced: the tables are then not trusted


    print(f"loopline worker: role={cfg.role} broker={cfg.broker} partitions={cfg.partitions} "
          f"data={cfg.data_dir} web=http://{cfg.web_host}:{cfg.web_port}", file=sys.stderr, flush=True)
    worker = BoundedWorker(app, loglevel=cfg.loglevel, quiet=True)
    profile_path = os.environ.get("LOOPLINE_PROFILE")  # set by `loopline bench ingest --profile`
    if not profile_path:
        worker.execute_from_commandline()
        return
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        worker.execute_from_commandline()
    finally:
        prof.disable()
        prof.dump_stats(profile_path)


class WorkerProcess:
    """A ``loopline worker`` in a child process (used by the demo, the benchmark and the tests).

    These are replay-driven evaluation runs, so ``evaluation`` (honour ``end_of_log``) defaults to on.

    >>> w = WorkerProcess("kafka://127.0.0.1:9092", "/tmp/w", web_port=6070)
    >>> w.args[3:5]
    ['worker', '--broker']
    """

    def __init__(self, broker_url: str, data_dir: str, partitions: int = 4, app_id: str = "loopline",
                 web_port: int | None = None, grace_s: float = 10.0, extra: tuple = (),
                 env: dict | None = None, evaluation: bool = True):
        from .broker import free_port
        self.port = web_port or free_port()
        self.grace_s = grace_s
        self.args = [sys.executable, "-m", "loopline.ops.cli", "worker", "--broker", broker_url,
                     "--partitions", str(partitions), "--data-dir", data_dir, "--web-port", str(self.port),
                     "--app-id", app_id, "--grace", str(grace_s),
                     *(["--evaluation"] if evaluation else []), *extra]
        self.log_path = data_dir.rstrip("/") + ".log"
        self.env = {**os.environ, **(env or {})}
        self.proc = None

    def start(self) -> "WorkerProcess":
        import subprocess
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=self.env)
        return self

    def view(self, path: str) -> dict | None:
        """A JSON view of the worker (``/ingest/``, ``/fm/``), or None while it is not serving."""
        import json
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def ingest_counts(self) -> dict | None:
        return self.view("/ingest/")

    def processed(self) -> int:
        c = self.ingest_counts() or {}
        return sum(v.get("read", 0) + v.get("redelivered", 0) for k, v in c.items() if k.isdigit())

    def wait_ready(self, timeout: float = 60.0) -> None:
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if self.ingest_counts() is not None:
                return
            time.sleep(0.3)
        raise RuntimeError(f"worker not serving after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> str:
        """SIGTERM, then SIGKILL after the grace period (plus a margin); says which it took."""
        import subprocess
        how = "already exited"
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.grace_s + 5)
                how = "stopped on SIGTERM"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                how = "did not stop on SIGTERM: killed"
        if getattr(self, "_log", None):
            self._log.close()
        return how
