"""Shared fixtures: a real embedded broker (Tansu) per test, and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from loopline.ops.broker import EmbeddedBroker, create_topics, free_port
from loopline.stream.app import TOPICS


@pytest.fixture
def broker(tmp_path):
    """A fresh, memory-only Tansu broker on a free loopback port; stopped by pid afterwards."""
    b = EmbeddedBroker(log_path=str(tmp_path / "tansu.log")).start()
    yield b
    b.stop()


class WorkerProc:
    """A ``loopline worker`` subprocess with its own data dir and web port."""

    def __init__(self, broker: EmbeddedBroker, data_dir: str, partitions: int = 4, app_id: str = "loopline",
                 extra: tuple = ()):
        self.port = free_port()
        self.args = [sys.executable, "-m", "loopline.ops.cli", "worker", "--broker", broker.url,
                     "--partitions", str(partitions), "--data-dir", data_dir, "--web-port", str(self.port),
                     "--app-id", app_id, "--grace", "10", *extra]
        self.log_path = os.path.join(data_dir + ".log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProc":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ingest_counts(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ingest/", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def processed(self) -> int:
        c = self.ingest_counts() or {}
        return sum(p.get("read", 0) for p in c.values())

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"worker exited early:\n{self.tail()}"
            if self.ingest_counts() is not None:
                return
            time.sleep(0.3)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_worker(broker, tmp_path):
    """Factory: start a worker against the test's broker; every worker is stopped at the end."""
    started: list[WorkerProc] = []

    def _start(name: str = "w1", partitions: int = 4, ready: bool = True, **kw) -> WorkerProc:
        create_topics(broker.bootstrap, {t: partitions for t in TOPICS})
        w = WorkerProc(broker, str(tmp_path / name), partitions, **kw).start()
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield _start
    for w in started:
        w.stop()
