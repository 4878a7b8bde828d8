"""The column-wise featurizers build, bit for bit, the batches of the plain per-element loop they replaced
(kept here as the reference), whatever the ids, histories and cache state; the hash cache stays bounded."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.model.features import EVENT_TYPES, SPARSE_KEYS, FeatureConfig, Featurizer, gap_buckets, hash_id
from loopline.model.vm import VMConfig, VMFeaturizer

SMALL = FeatureConfig(table_sizes={"user": 50, "ad": 40, "campaign": 8, "vertical": 4, "attrs": 16, "feats": 16},
                      seq_len=4, hash_cache=30)


def reference_fm_batch(cfg: FeatureConfig, examples, histories):
    """The featurizer as it was: one hash and one tensor write per element."""
    s, L = cfg.table_sizes, cfg.seq_len
    ids = []
    for ex in examples:
        r = {k: [hash_id(k, ex[k], s[k])] for k in ("user", "ad", "campaign", "vertical")}
        r["attrs"] = [hash_id("attrs", f"{k}={v}", s["attrs"]) for k, v in sorted((ex.get("attrs") or {}).items())]
        r["feats"] = [hash_id("feats", f"{k}={v}", s["feats"]) for k, v in sorted((ex.get("features") or {}).items())]
        ids.append(r)
    sparse = {k: (torch.tensor([v for r in ids for v in r[k]], dtype=torch.int64),
                  torch.tensor([len(r[k]) for r in ids], dtype=torch.int64)) for k in SPARSE_KEYS}
    seq = {}
    for kind in EVENT_TYPES:
        ad, camp, gap = (torch.zeros(len(examples), L, dtype=torch.int64) for _ in range(3))
        mask = torch.zeros(len(examples), L, dtype=torch.bool)
        for i, (ex, hist) in enumerate(zip(examples, histories)):
            evs = [e for e in hist if e[3] == kind][-L:]
            off = L - len(evs)
            for j, (ts, a, c, _) in enumerate(evs):
                ad[i, off + j] = hash_id("ad", a, s["ad"])
                camp[i, off + j] = hash_id("campaign", c, s["campaign"])
                gap[i, off + j] = min(cfg.gap_buckets - 1, int(math.log2(1.0 + max(0.0, ex["ts"] - ts))))
                mask[i, off + j] = True
        seq[kind] = (ad, camp, gap, mask)
    return sparse, seq, torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float32)


def reference_vm_raw(cfg: VMConfig, raw):
    B, L, n = len(raw), cfg.seq_len, cfg.table_size
    ra, rc, rm = np.zeros((B, L), np.int64), np.zeros((B, L), np.int64), np.zeros((B, L), bool)
    for i, evs in enumerate(raw):
        evs = evs[-L:]
        for j, (_, a, c, kind) in enumerate(evs):
            ra[i, L - len(evs) + j] = hash_id("raw-ad", f"{kind}:{a}", n)
            rc[i, L - len(evs) + j] = hash_id("raw-campaign", f"{kind}:{c}", n)
            rm[i, L - len(evs) + j] = True
    return ra, rc, rm


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)


def assert_same_fm(got, examples, histories, cfg=SMALL):
    sparse, seq, labels = reference_fm_batch(cfg, examples, histories)
    for k in SPARSE_KEYS:
        assert_same(got.sparse[k][0], sparse[k][0])
        assert_same(got.sparse[k][1], sparse[k][1])
    for kind in EVENT_TYPES:
        for x, y in zip(got.seq[kind], seq[kind]):
            assert_same(x, y)
    assert_same(got.labels, labels)
    assert got.size == len(examples)


ids = st.sampled_from(["a1", "a2", "b", "", "é", "x=y", "1"]) | st.integers(0, 3) | st.booleans()
times = st.floats(0, 2e9, allow_nan=False) | st.sampled_from([1e9, 1e9 + 1, 1e9 + 2 ** -20])
event = st.tuples(times, st.sampled_from(["a1", "a2", "é", "q"]), st.sampled_from(["c1", "c2"]),
                  st.sampled_from(["impression", "click", "other"]))
example = st.fixed_dictionaries({
    "user": ids, "ad": ids, "campaign": ids, "vertical": ids, "ts": times, "label": st.integers(0, 1),
    "attrs": st.dictionaries(st.sampled_from(["age", "geo", "k"]), ids, max_size=3),
    "features": st.dictionaries(st.sampled_from(["slot", "hour"]), ids, max_size=2)})


@pytest.mark.fuzz
@given(st.lists(st.lists(st.tuples(example, st.lists(event, max_size=12)), max_size=6), min_size=1, max_size=4))
def test_fm_batches_are_bit_for_bit_those_of_the_per_element_loop(batches):
    from dataclasses import replace

    from loopline.model.features import raw_id
    f = Featurizer(SMALL)  # one featurizer over several batches: the cache's hits, misses and resets
    managed = Featurizer(replace(SMALL, managed=("user",)))  # and the raw ids of a managed user table
    for pairs in batches:
        exs, hists = [p[0] for p in pairs], [p[1] for p in pairs]
        assert_same_fm(f.batch(exs, hists), exs, hists)
        got = managed.batch(exs, hists)
        assert_same_fm(got, exs, hists)
        assert got.sparse["user_raw"][0].tolist() == [raw_id("user", e["user"]) for e in exs]
        assert got.sparse["user_raw"][1].tolist() == [1] * len(exs)


@pytest.mark.fuzz
@given(st.lists(st.floats(-1e10, 1e13, allow_nan=False) | st.sampled_from([0.0, 1.0, 2.0 ** 40 - 1.0]),
                max_size=50))
def test_gap_buckets_equal_int_log2(dts):
    want = [min(23, int(math.log2(1.0 + max(0.0, d)))) for d in dts]
    assert gap_buckets(np.array(dts, np.float64), 24).tolist() == want


def test_gap_buckets_at_the_edges_of_powers_of_two():
    # values just below a power of two, where a correctly rounded log2 rounds up to the power
    xs = [np.nextafter(2.0 ** k, 0.0) - 1.0 for k in range(1, 40)] + [2.0 ** k - 1.0 for k in range(40)]
    xs += [np.nextafter(2.0 ** k, 0.0) * (1 - 2.0 ** -50) - 1.0 for k in range(1, 40)]
    want = [min(63, int(math.log2(1.0 + max(0.0, d)))) for d in xs]
    assert gap_buckets(np.array(xs), 64).tolist() == want


def test_fm_batch_on_a_realistic_stream_and_an_empty_batch():
    rng = np.random.default_rng(0)
    exs = [{"user": f"u{rng.integers(30)}", "ad": f"a{rng.integers(9)}", "campaign": f"c{rng.integers(3)}",
            "vertical": "feed", "ts": 1e9 + float(i), "label": int(rng.integers(2)),
            "attrs": {"age": "25-34", "geo": f"g{rng.integers(4)}"}, "features": {"slot": "1"}} for i in range(200)]
    hists = [[(1e9 - float(rng.integers(0, 10 ** 6)), f"a{rng.integers(9)}", "c1",
               "click" if rng.random() < 0.2 else "impression") for _ in range(int(rng.integers(0, 30)))]
             for _ in exs]
    for h in hists:
        h.sort()
    f = Featurizer(SMALL)
    for _ in range(3):  # cold cache, then warm, then after resets
        assert_same_fm(f.batch(exs, hists), exs, hists)
    assert f.cache.resets > 0  # the bound (30 entries) bit, and the batches did not change
    assert_same_fm(f.batch([], []), [], [])


def test_hash_cache_is_bounded_and_counts_its_resets():
    f = Featurizer(FeatureConfig(hash_cache=10))
    exs = [{"user": f"u{i}", "ad": "a", "campaign": "c", "vertical": "v", "ts": 1.0, "label": 0} for i in range(50)]
    f.batch(exs, [[] for _ in exs])
    assert f.cache.resets == 1 and sum(map(len, f.cache.tables.values())) == 0
    f.batch(exs[:2], [[], []])
    assert 0 < sum(map(len, f.cache.tables.values())) <= 10


@pytest.mark.parametrize("value", [-1, 1.5, True, "10"])
def test_bad_hash_cache_names_the_field(value):
    with pytest.raises(ConfigError, match="^hash_cache:"):
        FeatureConfig(hash_cache=value)


@pytest.mark.fuzz
@given(st.lists(st.tuples(example, st.lists(event, max_size=25)), max_size=6))
def test_vm_batches_are_bit_for_bit_those_of_the_per_element_loop(pairs):
    cfg = VMConfig(table_size=64, seq_len=5, code_dim=3, history="attention", sequence="both")
    exs, raw = [dict(p[0], soft_label=0.5) for p in pairs], [p[1] for p in pairs]
    rng = np.random.default_rng(len(pairs))
    codes = [rng.normal(size=(int(rng.integers(0, 8)), 3)).astype(np.float32) for _ in pairs]
    f = VMFeaturizer(cfg)
    for _ in range(2):
        got = f.batch(exs, codes, raw)
        ra, rc, rm = reference_vm_raw(cfg, raw)
        assert np.array_equal(got.raw_ad.numpy(), ra) and np.array_equal(got.raw_campaign.numpy(), rc)
        assert np.array_equal(got.raw_mask.numpy(), rm)
        for fld in cfg.fields:
            rows = []
            for ex in exs:
                if fld in ("ad", "campaign"):
                    rows.append([hash_id(fld, ex[fld], cfg.table_size)])
                else:
                    src = ex.get("attrs" if fld == "attrs" else "features") or {}
                    rows.append([hash_id(fld, f"{k}={v}", cfg.table_size) for k, v in sorted(src.items())])
            assert got.ids[fld][0].tolist() == [v for r in rows for v in r]
            assert got.ids[fld][1].tolist() == (np.concatenate([[0], np.cumsum([len(r) for r in rows])[:-1]]).tolist()
                                               if exs else [])
        for i, c in enumerate(codes):
            c = c[-cfg.seq_len:]
            assert np.array_equal(got.codes[i, cfg.seq_len - len(c):].numpy(), c)
            assert got.code_mask[i].sum() == len(c)


@pytest.mark.fuzz
@given(example, st.lists(event, max_size=25), st.integers(1, 6), st.integers(0, 8))
def test_one_users_sequence_shared_by_every_candidate_gives_the_batch_of_its_copies(ex, evs, n, n_codes):
    """``POST /score/`` passes the same history object and the same attrs map for every candidate; the
    featurizer reads each once and repeats it, which must build the batch of per-candidate copies."""
    cfg = VMConfig(table_size=64, seq_len=5, code_dim=3, history="attention", sequence="both")
    code = np.random.default_rng(n_codes).normal(size=(n_codes, 3)).astype(np.float32)
    exs = [dict(ex, ad=f"{ex['ad']}{i}") for i in range(n)]
    shared = VMFeaturizer(cfg).batch(exs, [code] * n, [evs] * n)
    own = [dict(e, attrs=dict(e.get("attrs") or {}), features=dict(e.get("features") or {})) for e in exs]
    copies = VMFeaturizer(cfg).batch(own, [code.copy() for _ in range(n)], [list(evs) for _ in range(n)])
    for name in ("codes", "code_mask", "raw_ad", "raw_campaign", "raw_mask", "labels"):
        assert torch.equal(getattr(shared, name), getattr(copies, name)), name
    assert all(torch.equal(a, b) for k in cfg.fields for a, b in zip(shared.ids[k], copies.ids[k]))


def test_a_managed_key_also_comes_as_its_62_bit_raw_ids():
    from loopline.model.features import raw_id
    f = Featurizer(FeatureConfig(managed=("user",)))
    exs = [{"user": u, "ad": "a", "campaign": "c", "vertical": "v", "ts": 1.0, "label": 0} for u in ("u1", "u2", "u1")]
    values, lengths = f.batch(exs, [[], [], []]).sparse["user_raw"]
    assert values.tolist() == [raw_id("user", u) for u in ("u1", "u2", "u1")] and lengths.tolist() == [1, 1, 1]
    assert values[0] == values[2] != values[1] and int(values.max()) < 2 ** 62
    assert "user_raw" not in Featurizer().batch(exs, [[], [], []]).sparse  # only when asked for
    with pytest.raises(ConfigError, match="managed"):
        FeatureConfig(managed=("ad",))
