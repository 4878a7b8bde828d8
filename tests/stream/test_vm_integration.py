"""The vm role on the real broker: the same VM metrics as ``loopline evaluate``, and ``POST /score/``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from loopline.model.verticals import VMStageConfig
from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay

pytestmark = pytest.mark.integration

VARIANTS = ("base", "loopfm+kd")


def post(port: int, obj) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/score/", data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_vm_worker_metrics_match_evaluate_and_score_serves_the_snapshot(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=300, days=3, seed=5), str(path))
    records = read_log(str(path))
    expected = evaluate_records(records, models=True, vm_cfg=VMStageConfig(variants=VARIANTS))
    w = start_worker(extra=("--variants", ",".join(VARIANTS), "--serve", "loopfm+kd"))
    asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    total = expected["examples"]["total"]
    deadline = time.monotonic() + 300
    while (w.view("/vm/") or {}).get("examples") != total or (w.view("/vm/") or {}).get("snapshot_at", -1) < 0 \
            or not w.view("/vm/")["serving"]["verticals"]:
        assert time.monotonic() < deadline and w.proc.poll() is None, w.tail()
        time.sleep(0.5)
    got = w.view("/vm/")
    assert got["models"] == {k: {m: v for m, v in r.items() if m != "tr"}
                             for k, r in expected["models"].items() if k.startswith("vm:")}

    vertical = got["serving"]["verticals"][0]
    # LoKA dispatch of the serving copy, measured here: this CPU has no FP8 hardware, so every layer
    # stays in high precision, and the decision table travels with the snapshot
    fp8 = got["serving"]["fp8"][vertical]
    assert fp8["layers"] > 0 and fp8["fp8"] == 0
    snap = sorted((tmp_path / "w1" / "vm-snapshots").glob("snapshot-*.pt"))[-1]
    r = subprocess.run([sys.executable, "-m", "loopline.ops.cli", "fp8", "report", "--snapshot", str(snap), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["table"]["layers"]) == fp8["layers"]
    cands = [{"ad": f"a{i}", "campaign": f"c{i % 7}"} for i in range(100)]
    status, body = post(w.port, {"user": "u1", "vertical": vertical, "candidates": cands, "attrs": {"age": "25-34"}})
    assert status == 200, body
    assert len(body["scores"]) == 100 and all(0 < s < 1 for s in body["scores"])
    assert len(set(body["scores"])) > 1  # candidates are told apart
    status, body = post(w.port, {"user": "u1", "vertical": "nope", "candidates": cands})
    assert status == 404 and body["error"].startswith("vertical:")
    status, body = post(w.port, {"user": "u1", "vertical": vertical, "candidates": cands * 11})
    assert status == 413 and "at most 1000" in body["error"]
    status, body = post(w.port, {"user": "u1", "vertical": vertical, "candidates": [{"ad": "a1"}]})
    assert status == 400 and body["error"].startswith("candidates[0].campaign")
    assert w.stop() == "stopped on SIGTERM"

    # a vm worker restarted on that data dir resumes from the newest snapshot (weights_only load) and
    # ends with the same numbers
    w = start_worker(ready=False, extra=("--role", "vm", "--variants", ",".join(VARIANTS), "--serve", "loopfm+kd"))
    deadline = time.monotonic() + 300
    while (view := w.view("/vm/") or {}).get("examples") != total:  # ready, and caught up past its snapshot
        assert time.monotonic() < deadline and w.proc.poll() is None, ({k: v for k, v in view.items() if k != "models"}, total, w.tail())
        time.sleep(0.5)
    again = w.view("/vm/")
    assert again["restored"] and again["models"] == got["models"]
    assert post(w.port, {"user": "u1", "vertical": vertical, "candidates": cands})[0] == 200
