"""The monitor role on the real broker: a worker beside ingest+fm, scraped over HTTP like Prometheus would."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log
from loopline.ops.replay import replay
from loopline.stream.app import TOPICS

pytestmark = pytest.mark.integration


def _get(port: int, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def _exact(drift: dict) -> dict:
    """The drift report without the numeric features' PSI (approximate: KLL sketches)."""
    out = json.loads(json.dumps(drift))
    for w in out["windows"] + [out["latest"]]:
        for f in w["features"].values():
            if f["kind"] == "numeric":
                f.pop("psi")
    return out


def test_monitor_worker_serves_metrics_that_prometheus_can_parse(broker, start_worker, tmp_path):
    path = tmp_path / "events.jsonl"
    write_log(GenerateConfig(users=200, days=2.5, seed=4), str(path))
    records = read_log(str(path))
    fm = start_worker("w1")  # role all: ingest and the FM stage
    mon = start_worker("mon", ready=False, extra=("--role", "monitor"))
    asyncio.run(replay(broker.bootstrap, records, 4, progress=False))
    deadline = time.monotonic() + 240
    while not (fm.view("/fm/") or {}).get("finished"):
        assert time.monotonic() < deadline and fm.proc.poll() is None, fm.tail()
        time.sleep(0.5)
    counts = fm.view("/fm/")["counts"]
    want_rows = counts["examples"] if "model.scores" in TOPICS else 0  # the FM stage's rows
    vm_models = set()
    if fm.view("/vm/") is not None:  # role all trains the VMs too: their rows come for the same ids
        while (fm.view("/vm/") or {}).get("examples") != counts["augmented"]:
            assert time.monotonic() < deadline and fm.proc.poll() is None, fm.tail()
            time.sleep(0.5)
        want_rows += counts["augmented"]
        vm_models = set(fm.view("/vm/")["models"])
    while True:  # the monitor has read every augmented example (and score row)
        assert time.monotonic() < deadline and mon.proc.poll() is None, mon.tail()
        s = (mon.view("/drift") or {}).get("summary") or {}
        if s.get("examples") == counts["augmented"] and s.get("score_rows") == want_rows:
            break
        time.sleep(0.5)

    ctype, text = _get(mon.port, "/metrics")
    assert ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    seen = [x for x in fams["loopline_monitor_examples"].samples if x.name.endswith("_total")]
    assert seen[0].value == counts["augmented"]
    psi = {x.labels["feature"]: x.value for x in fams["loopline_feature_psi"].samples}
    assert {"campaign", "ad", "attrs.geo", "features.slot"} <= set(psi)
    assert all(v >= 0 for v in psi.values())
    if want_rows:
        models = {x.labels["model"] for x in fams["loopline_model_ne"].samples}
        assert {"fm", "lr"} | vm_models <= models
        auc = {x.labels["model"]: x.value for x in fams["loopline_model_auc"].samples}
        assert 0 < auc["fm"] <= 1

    # loopline drift reads the same worker
    r = subprocess.run([sys.executable, "-m", "loopline.ops.cli", "drift", "--worker", f"http://127.0.0.1:{mon.port}",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["summary"]["examples"] == counts["augmented"] and out["drift"]["windows"]
    assert mon.stop() == "stopped on SIGTERM"

    # a monitor started again (another machine: an empty data dir) reads the topics from the start
    # and shows the same windowed figures, whatever its consumer group had committed
    mon2 = start_worker("mon2", ready=False, extra=("--role", "monitor"))
    while (mon2.view("/drift") or {}).get("summary", {}).get("score_rows") != want_rows:
        assert time.monotonic() < deadline + 60 and mon2.proc.poll() is None, mon2.tail()
        time.sleep(0.5)
    again = mon2.view("/drift")
    assert _exact(again["drift"]) == _exact(out["drift"])
    for w1, w2 in zip(again["drift"]["windows"], out["drift"]["windows"]):
        # KLL sketches compact at random: within their error. Their rank error reaches PSI through the
        # log-ratio of near-empty bins, so a large PSI (soft_label's is 3-5: the FM's outputs come down
        # from 0.5 in the first window) differs by a few percent between two sketches of the same rows
        for name, f in w1["features"].items():
            assert f["psi"] == pytest.approx(w2["features"][name]["psi"], rel=0.1, abs=0.05), name
    # The restarted monitor reads every row at once; the live one closed a window once every stage it
    # had heard from was past it, so a stage that was not heard from yet (the VMs start later) counts
    # in the overall figures only there. What the live monitor does show matches exactly.
    assert len(again["health"]["windows"]) == len(out["health"]["windows"])
    for w_again, w_live in zip(again["health"]["windows"], out["health"]["windows"]):
        assert w_again["n"] == w_live["n"]
        for name, fig in w_live["models"].items():
            assert w_again["models"][name] == fig, (w_live["window"], name)
        for name, tr in w_live["transfer"].items():
            assert w_again["transfer"][name] == tr
