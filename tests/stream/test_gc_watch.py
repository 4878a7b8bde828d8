"""The garbage collector's passes timed, and start-up's objects frozen out of them (stream/gc_watch.py)."""

from __future__ import annotations

import gc

import pytest

from loopline.errors import ConfigError
from loopline.stream.app import WorkerConfig
from loopline.stream.gc_watch import GcWatch


def test_a_full_pass_is_counted_and_timed_and_frozen_objects_leave_it():
    w = GcWatch().start()
    keep = [{"i": [i]} for i in range(50_000)]  # start-up's objects, alive for good
    try:
        gc.collect()
        before = w.report()
        assert before["collections"][2] >= 1 and before["total_ms"][2] > 0
        frozen = w.freeze()
        assert frozen >= len(keep) and w.report()["frozen"] == frozen
        assert gc.get_freeze_count() == frozen
        garbage = [{"self": None} for _ in range(100)]
        for d in garbage:
            d["self"] = d  # a cycle made after the freeze is still collected
        del garbage, d
        assert gc.collect() >= 100
    finally:
        gc.unfreeze()
        w.stop()
    assert w._on_gc not in gc.callbacks


def test_gc_freeze_must_be_a_boolean():
    with pytest.raises(ConfigError, match="^gc_freeze:"):
        WorkerConfig(gc_freeze="yes")
