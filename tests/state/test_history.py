"""The per-user history store: strictly-before-t reads, order, ties, user isolation, retention by length and
age, restart, idempotent replays and rebuild, quantization bounds, batching, errors."""

import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import Closed, ConfigError
from loopline.state.codes import qmax
from loopline.state.history import EMBEDDING, EVENT, HistoryConfig, HistoryStore

D = 8


def code(x, d=D):
    """A deterministic code whose first element tells rows apart (x in [-1, 1])."""
    z = np.linspace(-0.5, 0.5, d).astype(np.float32)
    z[0] = x
    return z


def emb_rows(user, times, version=1, ids=True):
    return [(user, float(t), version, code(((t * 7) % 100) / 100 - 0.5)) + ((f"{user}-{t}",) if ids else ())
            for t in times]


@pytest.fixture
def store(tmp_path):
    with HistoryStore(str(tmp_path / "h")) as h:
        yield h


def stored_ts(h, kind=EMBEDDING):
    return [int.from_bytes(k[-12:-4], "big") / 1e6 for k, _ in h.raw_items(kind)]


def ts_of(h, user, t, L=1000):
    return h.last_embeddings(user, t, L)["ts"].tolist()


# -- reads ---------------------------------------------------------------------------------------------
def test_an_entry_at_exactly_t_is_excluded(store):
    store.append_embeddings(emb_rows("u1", [10, 20, 30]))
    store.append_events([("u1", 10.0, "a1", "c1", "click"), ("u1", 20.0, "a2", "c1", "view")])
    assert ts_of(store, "u1", 20.0) == [10.0]
    assert ts_of(store, "u1", 20.000001) == [10.0, 20.0]
    assert ts_of(store, "u1", 10.0) == []
    assert [e[0] for e in store.last_events("u1", 20.0, 10)] == [10.0]
    assert store.last_events("u1", 10.0, 10) == []


def test_reads_are_oldest_first_whatever_the_append_order(store):
    store.append_embeddings(emb_rows("u1", [50, 10, 40]))
    store.append_embeddings(emb_rows("u1", [20, 30]))
    got = store.last_embeddings("u1", 100.0, 10)
    assert got["ts"].tolist() == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert got["ts"].dtype == np.float64 and got["codes"].dtype == np.float32
    assert got["codes"].shape == (5, D)
    # codes follow their entries
    firsts = [((t * 7) % 100) / 100 - 0.5 for t in (10, 20, 30, 40, 50)]
    assert np.allclose(got["codes"][:, 0], firsts, atol=1 / 254 + 1e-6)


def test_the_last_L_are_the_newest_L(store):
    store.append_embeddings(emb_rows("u1", range(1, 21)))
    assert ts_of(store, "u1", 15.0, L=3) == [12.0, 13.0, 14.0]
    assert ts_of(store, "u1", 100.0, L=0) == []
    assert len(ts_of(store, "u1", 100.0, L=500)) == 20


def test_an_unknown_user_or_an_empty_store_gives_empty_results(store):
    got = store.last_embeddings("nobody", 100.0, 5)
    assert got["codes"].shape == (0, 0) and got["ts"].shape == (0,) and got["versions"] == []
    assert store.last_events("nobody", 100.0, 5) == []


def test_versions_keep_their_type_and_can_be_selected(store):
    store.append_embeddings([("u1", 1.0, 3, code(0.1)), ("u1", 2.0, "fm-2024-06", code(0.2)),
                             ("u1", 3.0, 3, code(0.3)), ("u1", 4.0, "fm-2024-06", code(0.4))])
    got = store.last_embeddings("u1", 10.0, 10)
    assert got["versions"] == [3, "fm-2024-06", 3, "fm-2024-06"]
    only = store.last_embeddings("u1", 10.0, 1, fm_version=3)
    assert only["ts"].tolist() == [3.0] and only["versions"] == [3]
    only = store.last_embeddings("u1", 10.0, 10, fm_version="fm-2024-06")
    assert only["ts"].tolist() == [2.0, 4.0]


def test_one_version_per_code_reads_each_version_and_code_back(store):
    # live codes carry the FM step that made them, so a user's block mixes versions of one layout
    store.append_embeddings([("u1", float(t), 10 ** t, code(t / 10)) for t in range(1, 6)])
    store.append_embeddings([("u2", 1.0, "s-1", code(0.1)), ("u2", 2.0, "s-2", code(0.2)),
                             ("u3", 1.0, "", code(0.1)), ("u3", 2.0, "", code(0.2))])
    got = store.last_embeddings("u1", 10.0, 10)
    assert got["versions"] == [10, 100, 1000, 10_000, 100_000]
    assert np.allclose(got["codes"][:, 0], [t / 10 for t in range(1, 6)], atol=1 / 254 + 1e-6)
    assert store.last_embeddings("u2", 10.0, 10)["versions"] == ["s-1", "s-2"]
    assert store.last_embeddings("u3", 10.0, 10)["versions"] == ["", ""]


def test_codes_of_two_lengths_need_a_version(store):
    store.append_embeddings([("u1", 1.0, 1, code(0.1, d=8)), ("u1", 2.0, 2, code(0.2, d=4))])
    with pytest.raises(ConfigError, match=r"^fm_version:"):
        store.last_embeddings("u1", 10.0, 10)
    assert store.last_embeddings("u1", 10.0, 10, fm_version=2)["codes"].shape == (1, 4)
    assert store.last_embeddings("u1", 10.0, 10, fm_version=1)["codes"].shape == (1, 8)


def test_events_round_trip_with_unicode(store):
    store.append_events([("u1", 5.5, "ad-é", "camp-日本", "purchase"), ("u1", 6.0, "", "", "click")])
    assert store.last_events("u1", 7.0, 10) == [(5.5, "ad-é", "camp-日本", "purchase"), (6.0, "", "", "click")]


# -- ties and isolation --------------------------------------------------------------------------------
def test_ties_keep_insertion_order_within_and_across_calls(store):
    store.append_embeddings([("u1", 5.0, 1, code(0.1), "a"), ("u1", 5.0, 1, code(0.2), "b")])
    store.append_embeddings([("u1", 5.0, 1, code(0.3), "c")])
    store.append_events([("u1", 5.0, "a1", "c", "k"), ("u1", 5.0, "a2", "c", "k")])
    store.append_events([("u1", 5.0, "a3", "c", "k")])
    got = store.last_embeddings("u1", 6.0, 10)
    assert got["ts"].tolist() == [5.0, 5.0, 5.0]
    assert np.allclose(got["codes"][:, 0], [0.1, 0.2, 0.3], atol=0.5 / 127 + 1e-6)
    assert [e[1] for e in store.last_events("u1", 6.0, 10)] == ["a1", "a2", "a3"]
    # L cuts the tie group from the newest end
    assert np.allclose(store.last_embeddings("u1", 6.0, 2)["codes"][:, 0], [0.2, 0.3], atol=0.01)


def test_user_prefixes_never_mix(store):
    store.append_embeddings(emb_rows("u1", [1, 2, 3]) + emb_rows("u10", [1.5, 2.5, 100]) +
                            emb_rows("u", [0.5]) + emb_rows("u1\u00e9", [2.2]))
    store.append_events([("u10", 1.0, "x", "y", "z"), ("u1", 2.0, "a", "b", "c")])
    assert ts_of(store, "u1", 1000.0) == [1.0, 2.0, 3.0]
    assert ts_of(store, "u10", 1000.0) == [1.5, 2.5, 100.0]
    assert ts_of(store, "u", 1000.0) == [0.5]
    assert [e[1] for e in store.last_events("u1", 1000.0, 10)] == ["a"]
    assert [e[1] for e in store.last_events("u10", 1000.0, 10)] == ["x"]
    # embeddings and events are separate sequences
    assert store.stats(exact=True)["embeddings"] == 8 and store.stats(exact=True)["events"] == 2


def test_retention_of_one_user_leaves_a_prefix_neighbour_alone(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_len=2)) as h:
        h.append_embeddings(emb_rows("u10", [1, 2]))
        h.append_embeddings(emb_rows("u1", [3, 4, 5, 6]))
        assert ts_of(h, "u10", 100.0) == [1.0, 2.0]
        assert ts_of(h, "u1", 100.0) == [5.0, 6.0]


# -- retention -----------------------------------------------------------------------------------------
def test_length_retention_keeps_the_newest_max_len_per_user_and_kind(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_len=5, write_batch=3)) as h:
        got = h.append_embeddings(emb_rows("u1", range(1, 13)) + emb_rows("u2", [1, 2]))
        h.append_events([("u1", float(t), "a", "c", "k") for t in range(1, 9)])
        assert got["appended"] == 14 and got["trimmed"] == 7
        assert ts_of(h, "u1", 100.0) == [8.0, 9.0, 10.0, 11.0, 12.0]
        assert ts_of(h, "u2", 100.0) == [1.0, 2.0]
        assert [e[0] for e in h.last_events("u1", 100.0, 100)] == [4.0, 5.0, 6.0, 7.0, 8.0]
        st = h.stats(exact=True)
        assert st["embeddings"] == 7 and st["events"] == 5
        # a late row older than everything kept is written and trimmed at once
        h.append_embeddings(emb_rows("u1", [0.5]))
        assert ts_of(h, "u1", 100.0) == [8.0, 9.0, 10.0, 11.0, 12.0]


def test_age_retention_drops_entries_older_than_newest_minus_max_age(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_age_s=100.0)) as h:
        h.append_embeddings(emb_rows("u1", [0, 50, 120]))
        assert ts_of(h, "u1", 121.0) == [50.0, 120.0]  # 0 < 120 - 100: deleted
        got = h.append_embeddings(emb_rows("u1", [10, 150, 260]))
        assert got["dropped"] == 1  # 10 < 150 - 100 when it arrived
        assert ts_of(h, "u1", 1000.0) == [] and h.stats(exact=True)["embeddings"] == 1  # only 260 is left
        assert ts_of(h, "u1", 261.0) == [260.0]
        # an entry exactly max_age behind the newest is kept (160 arrives exactly 100 behind 260, then
        # is deleted when 360 arrives)
        h.append_embeddings(emb_rows("u1", [160, 360]))
        assert stored_ts(h) == [260.0, 360.0]
        # reads use their own window [t - max_age, t)
        assert ts_of(h, "u1", 360.0) == [260.0] and ts_of(h, "u1", 361.0) == [360.0]


def test_reads_apply_the_age_limit_to_users_nobody_touched(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_age_s=100.0)) as h:
        h.append_embeddings(emb_rows("u1", [0, 50, 90]))
        h.append_events([("u1", 50.0, "a", "c", "k")])
        assert ts_of(h, "u1", 140.0) == [50.0, 90.0]
        assert ts_of(h, "u1", 1000.0) == []
        assert h.last_events("u1", 1000.0, 5) == []
        assert h.stats(exact=True)["embeddings"] == 3  # still stored: nothing touched u1


# -- restart, idempotence, rebuild -------------------------------------------------------------------------
def test_data_and_retention_state_survive_a_restart(tmp_path):
    path = str(tmp_path / "h")
    cfg = HistoryConfig(max_len=3)
    with HistoryStore(path, cfg) as h:
        h.append_embeddings(emb_rows("u1", [1, 2, 3]))
        h.append_events([("u1", 1.0, "a", "c", "k")])
        before = h.last_embeddings("u1", 10.0, 10)
    with HistoryStore(path, cfg) as h:
        after = h.last_embeddings("u1", 10.0, 10)
        assert after["ts"].tolist() == before["ts"].tolist()
        assert np.array_equal(after["codes"], before["codes"]) and after["versions"] == before["versions"]
        assert h.last_events("u1", 10.0, 10) == [(1.0, "a", "c", "k")]
        # the count is reloaded from disk: two more appends trim two
        got = h.append_embeddings(emb_rows("u1", [4, 5]))
        assert got["trimmed"] == 2 and ts_of(h, "u1", 10.0) == [3.0, 4.0, 5.0]
        # a replay of an entry that is already there is recognized after the restart too
        assert h.append_embeddings(emb_rows("u1", [5]))["overwritten"] == 1


def test_replayed_rows_overwrite_rather_than_duplicate(store):
    rows = emb_rows("u1", [1, 2, 3]) + [("u1", 2.0, 1, code(0.7), "another")]  # two distinct rows at t=2
    store.append_embeddings(rows)
    again = store.append_embeddings(rows)
    assert again == {"appended": 0, "overwritten": 4, "dropped": 0, "trimmed": 0}
    assert ts_of(store, "u1", 10.0) == [1.0, 2.0, 2.0, 3.0]
    # without ids, the value itself is the identity
    ev = [("u2", 1.0, "a", "c", "k"), ("u2", 1.0, "b", "c", "k")]
    store.append_events(ev)
    assert store.append_events(ev)["overwritten"] == 2
    assert len(store.last_events("u2", 5.0, 10)) == 2
    # the same id with a new code replaces the stored code in place
    store.append_embeddings([("u1", 2.0, 1, code(0.9), "u1-2")])
    assert len(ts_of(store, "u1", 10.0)) == 4
    assert abs(store.last_embeddings("u1", 3.0, 2)["codes"][0, 0] - 0.9) < 0.01  # u1-2 kept its place


def test_rebuild_recreates_the_contents_and_is_idempotent(tmp_path):
    cfg = HistoryConfig(max_len=4, max_age_s=50.0, write_batch=5)
    rng = np.random.default_rng(3)
    emb, ev = [], []
    for i in range(300):  # roughly time-ordered with some disorder and ties, like a real topic
        u = f"u{rng.integers(0, 12)}"
        t = float(10 + i // 2 + rng.integers(-3, 2))
        emb.append((u, t, int(rng.integers(1, 3)), rng.uniform(-1, 1, D).astype(np.float32), f"e{i}"))
        ev.append((u, t, f"a{i % 7}", f"c{i % 3}", "click" if i % 4 else "view", f"i{i}"))
    with HistoryStore(str(tmp_path / "orig"), cfg) as orig:
        for s in range(0, 300, 37):  # several calls, as a worker appends
            orig.append_embeddings(emb[s:s + 37])
            orig.append_events(ev[s:s + 37])
        want = list(orig.raw_items())
    assert len(want) > 40
    with HistoryStore(str(tmp_path / "new"), cfg) as new:
        new.append_embeddings(emb[:50])  # stale contents from an earlier assignment
        new.rebuild(emb, ev)
        assert list(new.raw_items()) == want
        new.rebuild(emb + emb, ev + ev)  # a replay with at-least-once duplicates
        assert list(new.raw_items()) == want
        new.rebuild(emb, ev, clear=False)  # a second replay into the live store
        assert list(new.raw_items()) == want
        assert new.append_embeddings(emb[-10:])["appended"] == 0


def reference(rows, max_len, max_age_s):
    """The store's semantics, one row at a time, in plain Python: {user: sorted [(ts_us, seq, id)]}."""
    users: dict = {}
    max_age = round(max_age_s * 1e6)
    for user, ts, ident in rows:
        t = round(ts * 1e6)
        st = users.setdefault(user, {"newest": -1, "entries": []})
        e = st["entries"]
        if t > st["newest"]:
            e.append((t, 0, ident))
            st["newest"] = t
        elif t < st["newest"] - max_age:
            continue
        else:
            same = [x for x in e if x[0] == t]
            if any(x[2] == ident for x in same):
                continue  # an overwrite
            if len(e) >= max_len and t <= e[0][0]:
                continue  # not newer than the oldest entry of a full user
            e.append((t, max((x[1] for x in same), default=-1) + 1, ident))
            e.sort()
        while len(e) > max_len or e[0][0] < st["newest"] - max_age:
            e.pop(0)
    return {u: st["entries"] for u, st in users.items() if st["entries"]}


def stored(h):
    out: dict = {}
    for k, v in h.raw_items(EMBEDDING):
        user = k[1:-13].decode()
        out.setdefault(user, []).append((int.from_bytes(k[-12:-4], "big"), int.from_bytes(k[-4:], "big"),
                                         int.from_bytes(v[-4:], "little")))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contents_follow_the_reference_whatever_the_batching(tmp_path, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(400):
        ident = f"e{i}"
        if rows and rng.random() < 0.15:  # at-least-once: an earlier row again, later in the stream
            rows.append(rows[int(rng.integers(0, len(rows)))])
            continue
        rows.append((f"u{rng.integers(0, 6)}", float(20 + i // 3 + rng.integers(-8, 2)) / 2, ident))
    max_len, max_age = int(rng.integers(2, 7)), float(rng.integers(5, 40))
    want = {u: [(t, q, zlib.crc32(i.encode())) for t, q, i in e]
            for u, e in reference(rows, max_len, max_age).items()}
    for n, (batch, calls) in enumerate([(1, 1), (7, 3), (1024, 1), (3, 50)]):
        cfg = HistoryConfig(max_len=max_len, max_age_s=max_age, write_batch=batch, cache_users=3)
        with HistoryStore(str(tmp_path / f"h{n}"), cfg) as h:
            full = [(u, t, 1, code(0.1), i) for u, t, i in rows]
            step = -(-len(full) // calls)
            for s in range(0, len(full), step):
                h.append_embeddings(full[s:s + step])
            assert stored(h) == want, (batch, calls)


def test_rebuild_from_a_replay_equals_the_original_reads(tmp_path):
    rows = emb_rows("u1", [1, 2, 3]) + emb_rows("u2", [1, 5])
    with HistoryStore(str(tmp_path / "a")) as a, HistoryStore(str(tmp_path / "b")) as b:
        a.append_embeddings(rows)
        b.rebuild(rows)
        for u in ("u1", "u2"):
            ra, rb = a.last_embeddings(u, 10.0, 10), b.last_embeddings(u, 10.0, 10)
            assert np.array_equal(ra["codes"], rb["codes"]) and ra["ts"].tolist() == rb["ts"].tolist()


# -- quantization, batching ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_stored_codes_are_within_the_quantization_bound(tmp_path, bits):
    rng = np.random.default_rng(bits)
    z = np.tanh(rng.normal(size=(50, 33)) * 2).astype(np.float32)
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(bits=bits)) as h:
        h.append_embeddings([("u1", float(i), 1, z[i]) for i in range(50)])
        got = h.last_embeddings("u1", 100.0, 100)["codes"]
    assert got.shape == (50, 33)
    scale = np.abs(z).max(axis=1, keepdims=True) / qmax(bits)
    err = np.abs(got - z)
    assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-7)
    assert err.max() <= 1 / (2 * qmax(bits)) + 1e-6


def test_codes_written_under_another_bits_setting_still_read(tmp_path):
    path = str(tmp_path / "h")
    with HistoryStore(path, HistoryConfig(bits=8)) as h:
        h.append_embeddings([("u1", 1.0, 1, code(0.3))])
    with HistoryStore(path, HistoryConfig(bits=4)) as h:
        h.append_embeddings([("u1", 2.0, 1, code(0.3))])
        got = h.last_embeddings("u1", 3.0, 5)["codes"]
    assert np.abs(got[0] - code(0.3)).max() <= 0.5 / 127 + 1e-6
    assert np.abs(got[1] - code(0.3)).max() <= 0.5 / 7 + 1e-6


def test_many_users_in_one_call_across_write_batches(tmp_path):
    rng = np.random.default_rng(7)
    n_users, per = 300, 6
    rows, want = [], {}
    for i in range(n_users * per):
        u = f"user-{i % n_users}"
        rows.append((u, 1000.0 + i, 1, rng.uniform(-1, 1, D)))
        want.setdefault(u, []).append(1000.0 + i)
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(write_batch=64, cache_users=50)) as h:
        got = h.append_embeddings(iter(rows))  # any iterable, consumed once
        assert got["appended"] == n_users * per
        for u in ("user-0", "user-17", "user-299"):
            assert ts_of(h, u, 1e4) == want[u]
        st = h.stats(exact=True)
        assert st["embeddings"] == n_users * per and st["users"] == n_users
        assert st["cached_users"] <= 64 + 50  # bounded; misses reload from disk
        assert st["bytes_per_entry"] > 0 and st["entries_estimate"] > 0


def test_stats_estimate_without_a_scan_and_flush_and_compact_keep_the_data(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_len=50)) as h:
        h.append_embeddings(emb_rows("u1", range(100)))
        st = h.stats()
        assert "embeddings" not in st and st["entries_estimate"] > 0 and st["appended"] == 100
        assert st["trimmed"] == 50
        h.flush()
        h.compact()
        st = h.stats()
        assert st["sst_bytes"] > 0 and st["entries_estimate"] == 50  # the tombstones are gone
        assert 0 < st["bytes_per_entry_estimate"] < 1000
        assert ts_of(h, "u1", 1000.0) == [float(t) for t in range(50, 100)]


# -- errors --------------------------------------------------------------------------------------------
def test_user_ids_that_are_not_strings_are_rejected_naming_the_field(store):
    # (any str packs, NUL included: tests/state/test_history_keys.py)
    with pytest.raises(ConfigError, match=r"^user:"):
        store.append_embeddings([(7, 1.0, 1, code(0.1))])
    with pytest.raises(ConfigError, match=r"^user:"):
        store.append_events([(None, 1.0, "a", "c", "k")])
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        store.last_events(b"u1", 1.0, 5)


def test_a_bad_row_writes_nothing_of_its_batch(store):
    rows = emb_rows("u1", [1, 2]) + [("u2", 3.0, 1, np.array([0.1, np.nan] * 4))]
    with pytest.raises(ConfigError, match=r"^code:"):
        store.append_embeddings(rows)
    assert ts_of(store, "u1", 10.0) == []
    store.append_embeddings(emb_rows("u1", [1, 2]))
    assert ts_of(store, "u1", 10.0) == [1.0, 2.0]


@pytest.mark.parametrize("row,field", [
    (("u1", -1.0, 1, code(0.1)), "ts"),
    (("u1", float("nan"), 1, code(0.1)), "ts"),
    (("u1", "1.0", 1, code(0.1)), "ts"),
    (("u1", 1.0, 1.5, code(0.1)), "fm_version"),
    (("u1", 1.0, True, code(0.1)), "fm_version"),
    (("u1", 1.0, 1, np.zeros((2, 2))), "code"),
    (("u1", 1.0, 1, code(0.1), 1.5), "id"),
    (("u1", 1.0), "rows"),
])
def test_bad_embedding_rows_name_the_field(store, row, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        store.append_embeddings([row])


def test_bad_event_rows_and_reads_name_the_field(store):
    with pytest.raises(ConfigError, match=r"^campaign:"):
        store.append_events([("u1", 1.0, "a", None, "k")])
    with pytest.raises(ConfigError, match=r"^L:"):
        store.last_events("u1", 1.0, -1)
    with pytest.raises(ConfigError, match=r"^t:"):
        store.last_embeddings("u1", float("nan"), 5)


@pytest.mark.parametrize("kw,field", [({"max_len": 0}, "max_len"), ({"max_age_s": 0}, "max_age_s"),
                                      ({"bits": 2}, "bits"), ({"write_batch": 0}, "write_batch"),
                                      ({"wal": 1}, "wal"), ({"max_age_s": float("inf")}, "max_age_s")])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        HistoryConfig(**kw)


def test_a_closed_store_says_so(tmp_path):
    h = HistoryStore(str(tmp_path / "h"))
    h.close()
    h.close()  # idempotent
    with pytest.raises(Closed, match=r"^store:") as err:
        h.last_events("u1", 1.0, 1)
    assert err.value.http_status == 503


def test_key_layout_is_kind_user_nul_time_seq(store):
    store.append_embeddings([("u1", 1.5, 1, code(0.1))])
    store.append_events([("u1", 2.0, "a", "c", "k")])
    keys = [k for k, _ in store.raw_items()]
    assert keys == [EMBEDDING + b"u1\x00" + (1_500_000).to_bytes(8, "big") + bytes(4),
                    EVENT + b"u1\x00" + (2_000_000).to_bytes(8, "big") + bytes(4)]
    assert [k for k, _ in store.raw_items(EVENT)] == keys[1:]


def _batched_equals_one_by_one(h, users, times, L):
    want = [h.last_events(u, t, L) for u, t in zip(users, times)]
    assert h.last_events_many(users, times, L) == want
    return want


@pytest.mark.fuzz
@given(st.lists(st.tuples(st.sampled_from(["u1", "u2", "u10", "é"]), st.integers(0, 40),
                          st.sampled_from(["impression", "click"])), max_size=60),
       st.lists(st.tuples(st.sampled_from(["u1", "u2", "u10", "é", "nobody"]),
                          st.integers(-2, 45) | st.sampled_from([0.5, 10.000001, 1e300, float("inf")])),
                max_size=12),
       st.integers(0, 7), st.sampled_from([5.0, 12.0, 1000.0]))
def test_batched_event_reads_equal_reads_one_by_one(tmp_path_factory, rows, reads, L, max_age):
    """Same users at several times, ties, the age limit, t <= 0, huge t, unknown users, L = 0."""
    path = tmp_path_factory.mktemp("batched")
    with HistoryStore(str(path / "h"), HistoryConfig(max_age_s=max_age, max_len=30)) as h:
        h.append_events([(u, float(t), f"a{t % 3}", "c", kind, f"{u}-{i}") for i, (u, t, kind) in enumerate(rows)])
        _batched_equals_one_by_one(h, [u for u, _ in reads], [t for _, t in reads], L)


def test_batched_event_reads_on_a_long_history(tmp_path):
    with HistoryStore(str(tmp_path / "h"), HistoryConfig(max_len=1000)) as h:
        h.append_events([("u1", float(t), f"a{t}", "c", "click" if t % 4 == 0 else "impression") for t in range(500)])
        got = _batched_equals_one_by_one(h, ["u1", "u2", "u1", "u1"], [100.0, 50.0, 499.5, 10.0], 128)
    assert [len(g) for g in got] == [100, 0, 128, 10] and got[0][-1][0] == 99.0


def test_batched_event_reads_name_bad_arguments(store):
    with pytest.raises(ConfigError, match="^L:"):
        store.last_events_many(["u1"], [1.0], -1)
    with pytest.raises(ConfigError, match="^ts:"):
        store.last_events_many(["u1", "u2"], [1.0], 3)
    with pytest.raises(ConfigError, match="^user:"):
        store.last_events_many([7], [1.0], 3)
