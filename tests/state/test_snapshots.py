"""Snapshot I/O: a damaged newest snapshot falls back to the previous good one (warning and counter),
writes are fsynced (file, then directory), stale temporaries go at open, at most ``keep`` remain, and a
load never unpickles anything but tensors and plain data."""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loopline.errors import ConfigError
from loopline.model.baseline import LogisticBaseline
from loopline.model.features import Featurizer
from loopline.model.trainer import OnlineTrainer, atomic_save, latest_snapshot
from loopline.state.snapshots import SnapshotDir, SnapshotError, read, read_latest, write_atomic


def obj(step: int, n: int = 4096) -> dict:
    """A snapshot-like object whose tensor data fills most of the file (a flipped byte in the middle lands
    in it) and tells which step it is."""
    return {"w": torch.arange(n, dtype=torch.float32) + step, "step": step, "meta": {"fed": {"t/0": step * 10}}}


def truncate(path: str, n: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(n)


def flip_bit(path: str, pos: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << bit)]))


def test_truncated_newest_falls_back_to_the_older_good_one_with_a_warning_and_a_counter(tmp_path, caplog):
    d = SnapshotDir(str(tmp_path), keep=2)
    old = d.save(obj(10), 10)
    new = d.save(obj(20), 20)
    truncate(new, os.path.getsize(new) // 2)  # a crash mid-write without the atomic rename, or a bad disk
    with caplog.at_level(logging.WARNING, logger="loopline.state.snapshots"):
        got, path = d.load_latest()
    assert path == old and got["step"] == 10 and torch.equal(got["w"], obj(10)["w"])
    assert d.counts["rejected"] == 1 and d.counts["fallbacks"] == 1
    assert any(os.path.basename(new) in r.getMessage() and "digest mismatch" in r.getMessage() for r in caplog.records)


def test_latest_snapshot_skips_a_truncated_newest_trainer_snapshot(tmp_path):
    """The finding, through the trainer's wrapper: it used to return the truncated newest file."""
    f = Featurizer()
    t = OnlineTrainer(LogisticBaseline())
    batch = f.batch([{"user": "u", "ad": "a", "campaign": "c", "vertical": "v", "ts": 1.0, "label": 1}], [[]])
    t.step(batch)
    p1 = t.save(str(tmp_path))
    t.step(batch)
    p2 = t.save(str(tmp_path))
    truncate(p2, 100)
    assert latest_snapshot(str(tmp_path)) == p1
    restored = OnlineTrainer(LogisticBaseline())
    restored.restore(p1)
    assert restored.version == 1
    with pytest.raises(SnapshotError, match="digest mismatch"):
        restored.restore(p2)


def test_a_bit_flipped_newest_falls_back_although_torch_would_load_it(tmp_path):
    d = SnapshotDir(str(tmp_path))
    old = d.save(obj(10), 10)
    new = d.save(obj(20), 20)
    flip_bit(new, os.path.getsize(new) // 2)
    silently_wrong = torch.load(new, weights_only=True)  # torch alone sees nothing wrong: a wrong weight
    assert not torch.equal(silently_wrong["w"], obj(20)["w"])
    got, path = d.load_latest()
    assert path == old and torch.equal(got["w"], obj(10)["w"]) and d.counts["fallbacks"] == 1


@pytest.mark.fuzz
@given(data=st.data())
def test_any_truncation_or_bit_flip_of_the_newest_falls_back(data):
    with tempfile.TemporaryDirectory() as tmp:
        d = SnapshotDir(tmp)
        old = d.save(obj(1, n=64), 1)
        new = d.save(obj(2, n=64), 2)
        size = os.path.getsize(new)
        if data.draw(st.booleans(), label="truncate"):
            truncate(new, data.draw(st.integers(0, size - 1), label="length"))
        else:
            flip_bit(new, data.draw(st.integers(0, size - 1), label="byte"), data.draw(st.integers(0, 7), label="bit"))
        got, path = d.load_latest()
        assert path == old and got["step"] == 1 and d.counts["rejected"] == 1


def test_no_good_snapshot_means_none_and_every_file_is_counted(tmp_path):
    assert read_latest(str(tmp_path / "missing")) is None
    d = SnapshotDir(str(tmp_path))
    assert d.load_latest() is None and d.counts["fallbacks"] == 0  # empty: nothing to fall back from
    for step in (1, 2):
        truncate(d.save(obj(step), step), 10)
    assert d.load_latest() is None
    assert d.counts["rejected"] == 2 and d.counts["fallbacks"] == 1


def test_a_save_after_a_fall_back_replaces_the_abandoned_newer_file(tmp_path):
    """The series continues from the older snapshot: the damaged newer file must not stay the newest."""
    d = SnapshotDir(str(tmp_path), keep=2)
    d.save(obj(10), 10)
    truncate(d.save(obj(30), 30), 50)
    assert d.load_latest()[0]["step"] == 10
    p = d.save(obj(20), 20)
    assert d.paths() == [d.paths()[0], p] and read(d.paths()[0])["step"] == 10
    assert d.load_latest()[1] == p and d.counts["rejected"] == 1  # no second rejection: the file is gone


def test_stale_temporaries_are_removed_at_open_and_nothing_else(tmp_path):
    for name in (".snapshot-abc123.tmp", ".snapshot-x.tmp"):  # a killed writer's leftovers
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".other.tmp").write_bytes(b"not ours")
    assert read_latest(str(tmp_path)) is None and (tmp_path / ".snapshot-x.tmp").exists()  # readers change nothing
    d = SnapshotDir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".other.tmp", "notes.txt"]
    assert d.counts["temporaries_removed"] == 2


def test_the_trainer_save_removes_a_killed_writers_temporary(tmp_path):
    (tmp_path / ".snapshot-x.tmp").write_bytes(b"partial")
    t = OnlineTrainer(LogisticBaseline())
    p = t.save(str(tmp_path))
    assert os.listdir(tmp_path) == [os.path.basename(p)]


def test_only_keep_snapshots_remain_and_the_rotation_is_counted(tmp_path):
    d = SnapshotDir(str(tmp_path), keep=3)
    paths = [d.save(obj(s, n=8), s) for s in range(0, 60, 10)]
    assert d.paths() == paths[-3:] and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths[-3:])
    assert d.counts["rotated"] == 3 and d.counts["saved"] == 6
    d.save(obj(50, n=8), 50)  # the same step again (a restart that resumed from an older one): replaced
    assert len(d.paths()) == 3 and sum(os.path.basename(p).startswith("snapshot-0000000050") for p in d.paths()) == 1


def test_legacy_snapshots_without_a_digest_load_and_rotate_out(tmp_path):
    torch.save(obj(10), tmp_path / "snapshot-0000000010.pt")  # written before this module
    d = SnapshotDir(str(tmp_path), keep=1)
    got, path = d.load_latest()
    assert got["step"] == 10 and path.endswith("snapshot-0000000010.pt")
    d.save(obj(20), 20)
    assert len(d.paths()) == 1 and read(d.paths()[0])["step"] == 20


def _record_fsyncs(monkeypatch):
    """Record ``("fsync", path)`` and ``("replace", src, dst)`` in call order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
@pytest.mark.parametrize("how", ["SnapshotDir.save", "atomic_save"])
def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, how):
    events = _record_fsyncs(monkeypatch)
    directory = os.path.realpath(tmp_path)
    if how == "atomic_save":
        path = atomic_save(obj(1), str(tmp_path / "stage.pt"))
    else:
        path = SnapshotDir(str(tmp_path)).save(obj(1), 1)
    (_, tmp, dst), = [e for e in events if e[0] == "replace"]
    assert dst == os.path.realpath(path)
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp, dst)) < events.index(("fsync", directory))
    assert torch.equal(torch.load(path, weights_only=True)["w"], obj(1)["w"])  # still a plain torch file


def test_a_failed_write_leaves_neither_a_temporary_nor_a_snapshot(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    d = SnapshotDir(str(tmp_path))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        d.save(obj(1), 1)
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        write_atomic(str(tmp_path / "x.bin"), b"abc")
    assert os.listdir(tmp_path) == []


ran: list = []


class Payload:
    """Unpickling this would run ``ran.append``: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return ran.append, ("executed",)


def test_loading_never_unpickles_arbitrary_objects(tmp_path, caplog):
    d = SnapshotDir(str(tmp_path))
    good = d.save(obj(1), 1)
    evil = d.save({"w": torch.zeros(2), "x": Payload()}, 2)  # its digest matches: only the content is wrong
    with caplog.at_level(logging.WARNING, logger="loopline.state.snapshots"):
        got, path = d.load_latest()
    assert path == good and got["step"] == 1 and ran == []
    assert any("weights_only" in r.getMessage() for r in caplog.records)
    with pytest.raises(SnapshotError, match="weights_only"):
        read(evil)
    assert ran == []


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="^keep"):
        SnapshotDir(str(tmp_path), keep=0)
    with pytest.raises(ConfigError, match="^step"):
        SnapshotDir(str(tmp_path)).save(obj(1), -1)
    with pytest.raises(ConfigError, match="^step"):
        SnapshotDir(str(tmp_path)).save(obj(1), np.int64(3).item() + 0.5)


def test_a_save_streams_the_snapshot_instead_of_holding_its_bytes(tmp_path):
    import hashlib
    import tracemalloc

    big = {"w": torch.ones(4_000_000)}  # 16 MB encoded
    tracemalloc.start()
    try:
        path = SnapshotDir(str(tmp_path)).save(big, 7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"the save held {peak / 2**20:.1f} MB of Python memory"
    with open(path, "rb") as f:  # the name's digest is the streamed bytes' hash
        assert os.path.basename(path) == f"snapshot-{7:010d}-{hashlib.sha256(f.read()).hexdigest()[:16]}.pt"
    assert torch.equal(read(path)["w"], big["w"])
