"""``loopline chaos``: each scenario, short, through the command's own functions (real broker, real
workers, real RocksDB); the full run is ``loopline chaos --events 20000 --kills 10`` (docs/reliability.md).

One small log and one ``evaluate`` of it are shared by the module; each scenario starts its own broker
and deployment. The ``kills`` scenario compares with the ``view_load`` run when it ran first (file order),
and makes a run without kills of its own otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loopline.ops.chaos import SCENARIOS, ChaosConfig, format_chaos, prepare, run_scenario
from loopline.errors import ConfigError

EVENTS = 900


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    # min_ratio 0: a test asserts no speed (the brief); the throughput ratio is a figure of the command's
    # full run (docs/reliability.md), and here only errors, rebalances and the final numbers count
    # (a short throughput log too: the command's 80,000 lines are for that figure)
    cfg = ChaosConfig(events=EVENTS, kills=4, seed=3, min_ratio=0.0, throughput_events=4000, wait_s=240)
    return prepare(cfg, progress=False, workdir=str(tmp_path_factory.mktemp("chaos")))


def assert_ok(name: str, r: dict) -> None:
    assert r["ok"], format_chaos({"ok": False, "seconds": r.get("seconds", 0), "scenarios": {name: r}})
    assert set(r["compared"]["evaluate"]) == {"counts", "fm", "vm", "reach"}


@pytest.mark.integration
def test_views_under_load_answer_without_errors_or_rebalances_and_change_no_number(ctx):
    r = run_scenario(ctx, "view_load")
    assert_ok("view_load", r)
    assert r["requests"]["total"] > 0
    assert all(set(codes) == {"200"} for codes in r["requests"]["by_view"].values()), r["requests"]
    # where the loaded time goes: every process's cores per chunk; ingest and the broker on a core of
    # their own where the machine has two
    assert all({"ingest", "reach", "broker", "clients"} <= set(p["cores_used"]) for p in r["throughput"]["phases"])
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        assert r["cpus"]["ingest+broker"] and r["cpus"]["others"]
        assert not set(r["cpus"]["ingest+broker"]) & set(r["cpus"]["others"])


@pytest.mark.integration
def test_kills_of_every_role_end_with_the_numbers_of_evaluate_and_of_a_clean_run(ctx):
    r = run_scenario(ctx, "kills")
    assert_ok("kills", r)
    assert sorted(k["role"] for k in r["kills"]) == ["fm", "ingest", "reach", "vm"]
    assert set(r["compared"]["clean_run"].values()) == {"equal"}


@pytest.mark.integration
def test_a_broker_restart_stops_every_worker_loudly_and_a_reset_recovers(ctx):
    r = run_scenario(ctx, "broker_restart")
    assert_ok("broker_restart", r)
    assert {e["code"] for e in r["exits"].values()} == {75}
    assert all("broker reset detected" in e["line"] for e in r["exits"].values())


@pytest.mark.integration
def test_truncated_snapshots_fall_back_to_the_previous_ones(ctx):
    r = run_scenario(ctx, "corrupt_snapshot")
    assert_ok("corrupt_snapshot", r)
    for role in ("fm", "vm"):
        assert r["restored"][role] == r["damaged"][role]["previous"] != r["damaged"][role]["truncated"]


@pytest.mark.integration
def test_a_full_disk_stops_the_fm_with_one_line_and_a_restart_ends_with_the_same_numbers(ctx):
    r = run_scenario(ctx, "disk_full")
    assert_ok("disk_full", r)
    assert r["exit"]["code"] not in (None, 0)


@pytest.mark.integration
def test_the_standby_fm_takes_over_with_the_same_numbers(ctx):
    r = run_scenario(ctx, "standby")
    assert_ok("standby", r)
    assert 0 < r["takeover_s"] < 120


def test_a_bad_setting_names_its_field():
    with pytest.raises(ConfigError, match="^kills:"):
        ChaosConfig(kills=-1)
    with pytest.raises(ConfigError, match="^reach_budget_users:"):  # the reach sample's total budget
        ChaosConfig(reach_budget_users=0)
    with pytest.raises(ConfigError, match="^scenarios: unknown 'nope'"):
        ChaosConfig(scenarios=("kills", "nope"))
    assert ChaosConfig(scenarios=tuple(reversed(SCENARIOS))).scenarios == SCENARIOS  # always in one order
    r = subprocess.run([sys.executable, "-m", "loopline.ops.cli", "chaos", "--scenarios", "kills,nope"],
                       capture_output=True, text=True, timeout=60, env={**os.environ})
    assert r.returncode == 2 and r.stderr.strip().startswith("ConfigError: scenarios: unknown 'nope'")
