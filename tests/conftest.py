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


# Property-based fuzzing (hypothesis): CI runs a bounded number of examples per property; `make fuzz`
# (HYPOTHESIS_PROFILE=fuzz) runs many more. Properties are marked `fuzz`.
try:
    import os as _os

    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=150, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fuzz", max_examples=5000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(_os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - scripts/setup.sh installs it
    pass


def wait_for(fn, timeout: float, what: str, every: float = 0.5, proc=None):
    """Poll ``fn()`` until it returns something other than None/False; fail naming ``what`` (and the
    worker's log tail when ``proc``, a :class:`WorkerProcess`, died or the time ran out)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got is not None and got is not False:
            return got
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"worker exited while waiting for {what}:\n{proc.tail()}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f":\n{proc.tail()}" if proc is not None else ""))
