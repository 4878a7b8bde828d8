"""The ``loopline`` command line: exit codes, one-line errors, JSON outputs, and the long-lived commands
stopping on signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from loopline.ops.broker import free_port
from loopline.ops.evaluate import evaluate_records
from loopline.ops.eventlog import read_log
from loopline.ops.generate import GenerateConfig, write_log

INGEST = ("--role", "ingest")  # these tests check the join; the models' roles would only add load


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "loopline.ops.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "events.jsonl"
    write_log(GenerateConfig(users=60, days=3, seed=5, malformed=0.02), str(path))
    return str(path)


def test_evaluate_json_has_the_design_contract_and_matches_the_api(small_log):
    r = run_cli("evaluate", "--events", small_log, "--json", "--no-models")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["events"]) >= {"read", "accepted", "deadletter", "by_reason"}
    assert set(out["examples"]) >= {"total", "positive"} and "models" in out
    assert out == evaluate_records(read_log(small_log))


@pytest.mark.parametrize("args,field", [
    (("evaluate", "--events", "/nonexistent/x.jsonl"), "events"),
    (("evaluate", "--events", "EVENTS", "--window", "-5", "--no-models"), "window_s"),
    (("evaluate", "--dataset", "criteo"), "dataset"),
    (("replay", "--events", "EVENTS", "--broker", "http://example:1"), "broker"),
    (("generate", "--users", "0", "--out", "/tmp/never-written.jsonl"), "users"),
    (("worker", "--role", "painter", "--broker", "kafka://127.0.0.1:1"), "role"),
], ids=["missing-file", "negative-window", "unknown-dataset", "bad-broker-url", "zero-users", "unknown-role"])
def test_bad_input_gives_a_one_line_error_naming_the_field(args, field, small_log):
    r = run_cli(*[small_log if a == "EVENTS" else a for a in args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].split(": ", 1)[1].startswith(field), lines[0]


def test_broker_command_listens_on_loopback_and_stops_on_sigint():
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "loopline.ops.cli", "broker", "--port", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and p.poll() is None, "broker did not come up"
                time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=15)
    finally:
        p.kill()
    assert p.returncode == 0
    assert "127.0.0.1" in out and "stopped" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


@pytest.mark.integration
def test_replay_wait_through_a_worker_prints_the_same_counts_as_evaluate(broker, start_worker, small_log):
    start_worker(extra=INGEST)
    r = run_cli("replay", "--events", small_log, "--broker", broker.url, "--wait", "--json", "--timeout", "120")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    expected = evaluate_records(read_log(small_log))
    assert out["events"] == expected["events"] and out["examples"] == expected["examples"]
    assert out["replay"]["sent"] == expected["events"]["read"]


@pytest.mark.integration
def test_replay_wait_through_a_role_all_worker_prints_the_models_of_evaluate(broker, start_worker, small_log):
    from loopline.model.verticals import VMStageConfig

    start_worker()  # role all: ingest, fm (announces itself on models.status), vm, reach
    r = run_cli("replay", "--events", small_log, "--broker", broker.url, "--wait", "--json", "--timeout", "300",
                timeout=360)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reported_by"] == ["fm", "vm"] and "missing" not in out
    expected = evaluate_records(read_log(small_log), models=True,
                                vm_cfg=VMStageConfig(variants=("base", "loopfm+kd")))["models"]
    assert set(out["models"]) == set(expected)  # fm, lr, das and both VM variants
    for name, m in expected.items():  # the workers run the same code: the same numbers
        assert {k: out["models"][name][k] for k in ("n", "auc", "ne", "logloss")} == \
            {k: m[k] for k in ("n", "auc", "ne", "logloss")}, name
    table = run_cli("replay", "--events", small_log, "--broker", broker.url, "--wait", "--timeout", "300",
                    timeout=360)  # a second run of the same log: the table, for people
    assert table.returncode == 0, table.stderr
    assert "vm:loopfm+kd" in table.stdout and "AUC" in table.stdout


@pytest.mark.integration
def test_worker_stops_within_its_grace_period_on_sigterm(start_worker):
    w = start_worker()
    t0 = time.monotonic()
    assert w.stop() == "stopped on SIGTERM"
    assert time.monotonic() - t0 < w.grace_s + 5
    assert w.proc.returncode is not None


def test_evaluate_reports_the_fm_beside_the_logistic_baseline(small_log):
    r = run_cli("evaluate", "--events", small_log, "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)["models"]
    assert {"fm", "lr", "das"} <= set(models)  # DAS scores from the second step on
    for name in ("fm", "lr"):
        assert set(models[name]) >= {"auc", "logloss", "ne", "calibration", "n"}
        assert models[name]["n"] == json.loads(r.stdout)["examples"]["total"]


@pytest.mark.parametrize("as_json", [False, True], ids=["text-summary", "json-summary"])
def test_generate_out_dash_writes_only_the_log_to_stdout_and_the_summary_to_stderr(as_json, capsysbinary):
    from loopline.ops.cli import main

    rc = main(["generate", "--users", "20", "--days", "0.5", "--out", "-"] + (["--json"] if as_json else []))
    out, err = capsysbinary.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert out.endswith(b"\n") and lines
    assert all(isinstance(json.loads(line), dict) for line in lines)  # a clean log: nothing else on stdout
    if as_json:
        summary = json.loads(err)
    else:
        assert err.startswith(b"loopline generate: wrote stdout\n"), err[:200]
        summary = {k: v for k, _, v in (ln.partition(": ") for ln in err.decode().splitlines()[1:])}
    assert int(summary["lines"]) == len(lines) and int(summary["bytes"]) == len(out)
    assert summary["path"] == "-"


def test_generate_into_a_pipe_the_reader_closes_stops_quietly():
    # `loopline generate --out - | head -1`: no traceback, the shell's SIGPIPE status
    p = subprocess.Popen([sys.executable, "-m", "loopline.ops.cli", "generate", "--users", "3000", "--days", "7",
                          "--out", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert json.loads(p.stdout.readline())["type"]
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and b"Traceback" not in err, err[-500:]
