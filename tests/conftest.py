"""Shared fixtures: a real embedded broker (Tansu) per test, and real worker processes."""

from __future__ import annotations

import pytest

from loopline.ops.broker import EmbeddedBroker, create_topics
from loopline.ops.worker import WorkerProcess
from loopline.stream.app import TOPICS


@pytest.fixture
def broker(tmp_path):
    """A fresh, memory-only Tansu broker on a free loopback port; stopped by pid afterwards."""
    b = EmbeddedBroker(log_path=str(tmp_path / "tansu.log")).start()
    yield b
    b.stop()


@pytest.fixture
def start_worker(broker, tmp_path):
    """Factory: start a worker against the test's broker; every worker is stopped at the end."""
    started: list[WorkerProcess] = []

    def _start(name: str = "w1", partitions: int = 4, ready: bool = True, **kw) -> WorkerProcess:
        create_topics(broker.bootstrap, {t: partitions for t in TOPICS})
        w = WorkerProcess(broker.url, str(tmp_path / name), partitions, **kw).start()
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield _start
    for w in started:
        w.stop()
