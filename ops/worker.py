"""``loopline worker``: a long-lived Faust worker with a bounded shutdown.

Public surface: ``run_worker``.

On SIGTERM/SIGINT Faust commits and stops; a watchdog thread forces the exit after ``grace_s`` (an
agent stuck in a long step was seen to ignore SIGTERM for minutes) and says so on stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from loopline.stream.app import WorkerConfig, build_app

from .broker import create_topics

__all__ = ["run_worker"]


def run_worker(cfg: WorkerConfig, grace_s: float = 20.0) -> None:
    import faust

    create_topics(cfg.broker, cfg.topic_partitions())
    app = build_app(cfg)

    class BoundedWorker(faust.Worker):
        def _schedule_shutdown(self, sig):  # noqa: ANN001 - mode's signature
            if not self._signal_stop_time:
                def force():
                    print(f"loopline worker: not stopped {grace_s:.0f}s after {signal.Signals(sig).name}; "
                          "forcing exit", file=sys.stderr, flush=True)
                    os._exit(3)
                t = threading.Timer(grace_s, force)
                t.daemon = True
                t.start()
            super()._schedule_shutdown(sig)

    print(f"loopline worker: role={cfg.role} broker={cfg.broker} partitions={cfg.partitions} "
          f"data={cfg.data_dir} web=http://{cfg.web_host}:{cfg.web_port}", file=sys.stderr, flush=True)
    BoundedWorker(app, loglevel=cfg.loglevel, quiet=True).execute_from_commandline()
