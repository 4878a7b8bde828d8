"""Snapshot I/O, written once for every role: atomic and durable writes, verified loads with fall-back to
the previous good snapshot, stale temporaries removed, and a bounded number kept.

Public surface: ``SnapshotDir``, ``SnapshotError``, ``encoder``, ``read``, ``read_latest``,
``write_atomic``, ``DEFAULT_KEEP``.

**Layout.** One directory per snapshot series (``fm-snapshots``, ``vm-snapshots``), one file per
snapshot::

    snapshot-<step, 10 digits>-<digest, 16 hex>.pt

``step`` orders the series (the caller's training step; zero-padded, so names sort as steps do);
``digest`` is the first 64 bits of the SHA-256 of the file's bytes. The file itself is a plain
``torch.save`` file, so tools read it as before (``torch.load(path, weights_only=True)``, ``loopline fp8
report --snapshot FILE``). The digest lives in the name rather than in a sidecar so that a snapshot is
committed by one rename: there is never a file without its checksum, or a checksum without its file.

**Writes** (:func:`write_atomic`): the bytes go to ``.snapshot-<random>.tmp`` in the same directory, are
``fsync``-ed, renamed over the final name (atomic on POSIX), and then the directory is ``fsync``-ed so
the rename itself survives a power loss. A kill leaves at most one temporary, never a partial snapshot.
A snapshot is streamed: ``torch.save`` writes into the temporary through the hash that names it, so a
save never holds the encoded snapshot in memory (tens of MB at a time, several times a minute in a
busy worker: large transient blocks that the allocator keeps and fragments).

**Loads** (:func:`read`, :func:`read_latest`): a snapshot is good when its bytes hash to the digest in
its name *and* ``torch.load(weights_only=True)`` accepts them, so a truncated or bit-flipped file is
rejected and nothing but tensors and plain containers is ever unpickled. :func:`read_latest` tries the
newest first and falls back to the next older one, logging a warning for each file it rejects. Files
named without a digest (``snapshot-<step>.pt``, written before this module) are accepted when they load,
so an upgraded worker keeps its state; they rotate out with the next saves.

**The writer** (:class:`SnapshotDir`): a directory has one writer, the worker that owns the data dir.
Opening it removes the temporaries a killed writer left behind; each ``save`` then keeps the ``keep``
newest snapshots, and removes any file with a step above the one just saved (a series that continued
from an older snapshot, after a fall-back, must never restart from the abandoned newer file). Readers
that are not the writer (benchmarks, tools) use :func:`read_latest`, which changes nothing on disk.
``counts`` says when a bound or a fall-back bit: ``rotated`` (old snapshots removed),
``temporaries_removed``, ``rejected`` (files that failed verification) and ``fallbacks`` (loads that
rejected at least one file).

**Why torch here.** ``state/`` otherwise imports only numpy, rocksdict and orjson. The snapshot format is
``torch.save``/``torch.load(weights_only=True)``: it is what makes a load safe, so it belongs with the
verification. torch is imported when a snapshot is encoded or decoded, never at import time.

>>> import os, tempfile, torch
>>> d = SnapshotDir(tempfile.mkdtemp(), keep=2)
>>> for step in (10, 20, 30):
...     _ = d.save({"w": torch.full((2,), float(step))}, step)
>>> [os.path.basename(p)[:19] for p in d.paths()]  # the two newest remain
['snapshot-0000000020', 'snapshot-0000000030']
>>> with open(d.paths()[-1], "r+b") as f:  # a crash truncates the newest
...     _ = f.truncate(40)
>>> obj, path = d.load_latest()  # rejected with a warning; the older one loads
>>> obj["w"].tolist(), os.path.basename(path)[:19], d.counts["fallbacks"]
([20.0, 20.0], 'snapshot-0000000020', 1)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile

from loopline.errors import ConfigError, LooplineError

__all__ = ["SnapshotDir", "SnapshotError", "encoder", "read", "read_latest", "write_atomic", "DEFAULT_KEEP"]

DEFAULT_KEEP = 2  # snapshots kept per series: the newest and one to fall back to (each can be tens of MB)

log = logging.getLogger(__name__)

_NAME = re.compile(r"snapshot-(\d{10})(?:-([0-9a-f]{16}))?\.pt")
_TMP_PREFIX, _TMP_SUFFIX = ".snapshot-", ".tmp"


class SnapshotError(LooplineError, ValueError):
    """A snapshot file that must not be loaded: truncated, corrupted, or holding more than plain data."""


def _short(sha) -> str:
    return sha.hexdigest()[:16]


def _digest(data: bytes) -> str:
    return _short(hashlib.sha256(data))


class _Hashing:
    """A binary file that hashes what is written through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def encoder(obj):
    """A writer for :func:`write_atomic`: ``torch.save`` of ``obj`` straight into the file."""
    import torch  # the snapshot format; imported on use (see "Why torch here")
    return lambda f: torch.save(obj, f)


def _decode(data: bytes):
    import torch
    return torch.load(io.BytesIO(data), weights_only=True)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data) -> str:
    """Write ``data`` to ``path`` so that a crash at any moment leaves the old file or the whole new one:
    a temporary beside it, ``fsync``, rename, ``fsync`` of the directory. Returns the path written.

    ``data``: bytes, or a function that writes them into a binary file (streamed, never held whole).
    ``path``: a path, or a function of the written bytes' digest (:func:`_digest`) returning one, for
    names that carry their checksum."""
    directory = os.path.dirname(path if isinstance(path, str) else path("")) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            out = _Hashing(f)
            if callable(data):
                data(out)
            else:
                out.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not isinstance(path, str):
            path = path(_short(out.sha))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # a failed write (ENOSPC, ...) leaves nothing behind
    _fsync_dir(directory)
    return path


def read(path: str):
    """The object in one snapshot file, verified: its digest (when its name has one) and a
    ``weights_only`` load. Raises :class:`SnapshotError` naming the file and the reason."""
    name = os.path.basename(path)
    m = _NAME.fullmatch(name)
    with open(path, "rb") as f:
        data = f.read()
    if m and m.group(2) and _digest(data) != m.group(2):
        raise SnapshotError(f"{name}: digest mismatch ({len(data)} bytes): truncated or corrupted")
    try:
        return _decode(data)
    except Exception as exc:  # torch raises several types for a damaged or non-plain file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SnapshotError(f"{name}: does not load with weights_only ({type(exc).__name__}: {first})") from None


def _series(directory: str) -> list[tuple[int, str]]:
    """``(step, name)`` of every snapshot in ``directory``, oldest first (temporaries never match)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), n) for n in names if (m := _NAME.fullmatch(n)))


def read_latest(directory: str):
    """``(obj, path)`` of the newest good snapshot in ``directory``, or None when there is none. A file
    that fails verification is skipped with a logged warning and the next older one is tried. Read-only:
    safe on a directory a running worker writes to."""
    return _read_latest(directory)[0]


def _read_latest(directory: str) -> tuple:
    """``(found, rejected paths)``: :func:`read_latest`'s answer and the files it rejected on the way."""
    rejected = []
    for _, name in reversed(_series(directory)):
        path = os.path.join(directory, name)
        try:
            obj = read(path)
        except FileNotFoundError:
            continue  # rotated away by the writer since the listing
        except (OSError, SnapshotError) as exc:
            rejected.append(path)
            log.warning("snapshot rejected, trying the previous one: %s", exc if isinstance(exc, SnapshotError)
                        else f"{name}: {exc}")
            continue
        if rejected:
            log.warning("snapshot fall-back: loaded %s after rejecting %d newer file(s)", name, len(rejected))
        return (obj, path), rejected
    if rejected:
        log.warning("no good snapshot in %s (%d rejected): starting without one", directory, len(rejected))
    return None, rejected


class SnapshotDir:
    """The writer of one snapshot series: ``save(obj, step)``, ``load_latest()``, at most ``keep`` files.

    Opening removes the temporaries (``.snapshot-*.tmp``) a killed writer left; a directory must have one
    writer at a time (the worker that owns the data dir), or it could remove another's write in flight.
    """

    def __init__(self, path: str, keep: int = DEFAULT_KEEP):
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep: must be an int >= 1, got {keep!r}")
        self.path, self.keep = path, keep
        self.counts = {"saved": 0, "rotated": 0, "temporaries_removed": 0, "rejected": 0, "fallbacks": 0}
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                os.remove(os.path.join(path, name))
                self.counts["temporaries_removed"] += 1
        if self.counts["temporaries_removed"]:
            log.warning("removed %d stale snapshot temporaries in %s", self.counts["temporaries_removed"], path)

    def paths(self) -> list[str]:
        """The snapshot files, oldest first."""
        return [os.path.join(self.path, n) for _, n in _series(self.path)]

    def save(self, obj, step: int) -> str:
        """Write ``obj`` (tensors and plain containers) as the snapshot of ``step``; returns its path.
        Then rotate: the ``keep`` newest remain, and none newer than ``step`` (see the module doc)."""
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10 ** 10:
            raise ConfigError(f"step: must be an int in [0, 1e10), got {step!r}")
        path = write_atomic(lambda digest: os.path.join(self.path, f"snapshot-{step:010d}-{digest}.pt"),
                            encoder(obj))
        name = os.path.basename(path)
        self.counts["saved"] += 1
        series = _series(self.path)
        stale = [n for s, n in series if s > step or (s == step and n != name)]
        older = [n for s, n in series if s < step]
        stale += older[:max(0, len(older) - (self.keep - 1))]
        for n in stale:
            try:
                os.remove(os.path.join(self.path, n))
            except FileNotFoundError:
                pass
        if stale:
            _fsync_dir(self.path)  # a power loss must not bring an abandoned newer file back as the newest
        self.counts["rotated"] += len(stale)
        return path

    def load_latest(self):
        """``(obj, path)`` of the newest good snapshot, falling back to older ones (a warning each, and
        ``counts``), or None when there is none."""
        found, rejected = _read_latest(self.path)
        self.counts["rejected"] += len(rejected)
        self.counts["fallbacks"] += bool(rejected)
        return found
