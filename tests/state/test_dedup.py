"""The bounded memory of recent ids behind exactly-once effects (state/dedup.py)."""

from __future__ import annotations

import pytest

from loopline.errors import ConfigError
from loopline.state.dedup import DedupConfig, RecentIds


def test_a_repeat_within_the_horizon_is_dropped_and_counted():
    seen = RecentIds(DedupConfig(horizon_s=100))
    assert seen.first("i1", 10.0) and seen.first("i2", 20.0)
    assert not seen.first("i1", 10.0)
    assert seen.counts()["repeats"] == 1


def test_ids_older_than_the_horizon_are_forgotten():
    seen = RecentIds(DedupConfig(horizon_s=100))
    for i in range(1000):
        seen.first(f"i{i}", float(i))
    assert len(seen) <= 102  # only ids within 100 s of the newest time stay
    assert seen.counts()["evicted_early"] == 0


def test_the_cap_bounds_memory_and_says_when_it_bites():
    seen = RecentIds(DedupConfig(horizon_s=1e9, max_ids=50))
    for i in range(500):
        seen.first(f"i{i}", 0.0)
    assert len(seen) == 50
    assert seen.counts()["evicted_early"] == 450


def test_state_round_trip_keeps_the_ids():
    seen = RecentIds()
    for i in range(100):
        seen.first(f"i{i}", float(i))
    again = RecentIds()
    again.load_state_dict(seen.state_dict())
    assert not again.first("i42", 42.0) and again.first("new", 100.0)
    assert again.counts()["ids"] == 101


def test_ids_of_any_string_are_accepted():
    seen = RecentIds()
    assert seen.first("\ud800\x00", 0.0) and not seen.first("\ud800\x00", 0.0)


@pytest.mark.parametrize("kw, field", [({"horizon_s": -1}, "horizon_s"), ({"max_ids": 0}, "max_ids")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        DedupConfig(**kw)
