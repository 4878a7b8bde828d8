"""The vm role's reading of the fm's control marks (``fmstep``, ``fmdone``): total on any header text; when an
idle stage saves a snapshot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.stream.vm import fm_mark


def test_the_fm_marks_are_read_and_everything_else_is_none():
    assert fm_mark("fmstep:3") == ("fmstep", 3, "")
    assert fm_mark("fmdone:-1:e1") == ("fmdone", -1, "e1")
    for bad in ("fmstep:", "fmstep:--1", "fmstep:1e3", "fmstep:\u0663", "watermark:0:1.0", ""):
        assert fm_mark(bad) is None, bad


@pytest.mark.fuzz
@given(st.text() | st.builds(lambda k, t: f"{k}:{t}", st.sampled_from(["fmstep", "fmdone"]), st.text()))
def test_property_any_header_text_gives_a_mark_or_none_never_an_exception(text):
    mark = fm_mark(text)
    assert mark is None or (mark[0] in ("fmstep", "fmdone") and isinstance(mark[1], int))


def test_an_idle_vm_saves_a_finished_run_at_once_and_live_traffic_at_most_once_a_minute():
    from loopline.stream.vm import IDLE_SNAPSHOT_EVERY_S, idle_snapshot_due

    assert not idle_snapshot_due(7, 7, None, 1e9)  # nothing trained since the snapshot
    assert idle_snapshot_due(7, 6, (7, "run"), 0.0)  # every step of the fm's finished run: at once
    assert not idle_snapshot_due(7, 6, (9, "run"), 0.0)  # that run's last steps still to come
    assert not idle_snapshot_due(7, 6, None, IDLE_SNAPSHOT_EVERY_S - 1)  # live: not after every step
    assert idle_snapshot_due(7, 6, None, IDLE_SNAPSHOT_EVERY_S)
