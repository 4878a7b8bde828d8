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


AUGMENTED = {"id": "i1", "user": "u1", "ts": 1.0, "label_ts": 2.0, "fm_step": 0, "label": 1, "vertical": "feed",
             "soft_label": 0.3, "weight": 0.5}


def test_an_augmented_example_keeps_its_delay_weight_and_a_bad_weight_is_not_an_example():
    import orjson

    from loopline.stream.vm import _item
    assert _item("examples.augmented", orjson.dumps(AUGMENTED))["weight"] == 0.5
    assert _item("examples.augmented", orjson.dumps({k: v for k, v in AUGMENTED.items() if k != "weight"}))
    for bad in ("x", -1.0, True, None, 1e309):  # 1e309: orjson writes inf as null, so send it as text
        raw = orjson.dumps(dict(AUGMENTED, weight=bad)) if bad != 1e309 else \
            orjson.dumps(AUGMENTED).replace(b'"weight":0.5', b'"weight":1e309')
        assert _item("examples.augmented", raw) is None, bad


@pytest.mark.fuzz
@given(st.dictionaries(st.sampled_from(sorted(AUGMENTED)), st.none() | st.booleans() | st.integers() |
                       st.floats() | st.text(max_size=3), max_size=len(AUGMENTED)))
def test_property_any_augmented_value_is_an_example_with_a_usable_weight_or_none(changes):
    import orjson

    from loopline.stream.vm import _item
    try:
        raw = orjson.dumps(dict(AUGMENTED, **changes))
    except orjson.JSONEncodeError:
        return
    item = _item("examples.augmented", raw)
    assert item is None or (isinstance(item.get("weight", 1.0), (int, float)) and 0 <= item.get("weight", 1.0) < 1e308)
