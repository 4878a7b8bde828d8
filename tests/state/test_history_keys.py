"""History key packing is total (issue 12, defence in depth behind the event contract): any ``str`` user
and any read time pack, and users never share or interleave keys."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.state.history import EVENT, HistoryStore

ODD = ["u\x001", "u\x00", "\x00", "", "u\x01", "u\x01\x01", "u\x01\x02", "\ud800", "a\udfffb", "u" * 2000,
       "u" * 2000 + "x", "é" * 600, "u1", "u10", "u1\x00"]


@pytest.fixture
def store(tmp_path):
    with HistoryStore(str(tmp_path / "h")) as h:
        yield h


def test_a_nul_user_and_a_huge_read_time_no_longer_crash(store):
    """The finding: a NUL in an id, or a time of 9.2e12 or more, aborted the fm stage."""
    store.append_events([("u\x001", 5.0, "a", "c", "k")])
    assert store.last_events("u\x001", 6.0, 5) == [(5.0, "a", "c", "k")]
    assert store.last_events("u\x00", 6.0, 5) == []  # another user
    for t in (9.3e12, 10 ** 400, float("inf"), -(10 ** 400), -1.0):  # beyond max_age_s, or before: nothing
        assert store.last_events("u\x001", t, 5) == []
        assert store.last_embeddings("u\x001", t, 5)["ts"].tolist() == []


def test_odd_users_keep_their_own_histories(store):
    store.append_events([(u, float(i + 1), f"a{i}", "c", "k") for i, u in enumerate(ODD)])
    store.append_embeddings([(u, float(i + 1), 1, np.full(4, 0.5)) for i, u in enumerate(ODD)])
    for i, u in enumerate(ODD):
        assert store.last_events(u, 1e6, 50) == [(float(i + 1), f"a{i}", "c", "k")], repr(u[:10])
        assert store.last_embeddings(u, 1e6, 50)["ts"].tolist() == [float(i + 1)]
    prefixes = {k[:-12] for k, _ in store.raw_items(EVENT)}
    assert len(prefixes) == len(ODD) and all(b"\x00" not in p[1:-1] for p in prefixes)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One store for every example (opening RocksDB per example is slow): each example writes 1e7 s
    after the last, so earlier examples' entries are beyond max_age_s of its reads."""
    with HistoryStore(str(tmp_path_factory.mktemp("h"))) as h:
        yield h, itertools.count(1)


@pytest.mark.fuzz
@given(users=st.lists(st.text(max_size=12), min_size=1, max_size=6, unique=True))
def test_any_users_pack_apart(shared, users):
    h, examples = shared
    base = next(examples) * 1e7
    h.append_events([(u, base + i + 1, "a", "c", "k") for i, u in enumerate(users)])
    for i, u in enumerate(users):
        assert [e[0] for e in h.last_events(u, base + 100, 50)] == [base + i + 1]
