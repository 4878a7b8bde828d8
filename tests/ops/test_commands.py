"""The sub-command registry (``ops/commands.py``) and ``loopline``'s flags: every CLI default declared
once, in a config; environment variables; the window that follows the data set; the ``run_*`` functions
taking configs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import orjson
import pytest

from loopline.errors import ConfigError
from loopline.ops.cli import build_parser, main
from loopline.ops.commands import COMMANDS
from loopline.settings import audit, config_from_args, iter_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_loopline_env(monkeypatch):
    for k in [k for k in os.environ if k.startswith("LOOPLINE_")]:
        monkeypatch.delenv(k)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    from loopline.ops.generate import GenerateConfig, write_log
    path = str(tmp_path_factory.mktemp("commands") / "log.jsonl")
    write_log(GenerateConfig(users=120, days=2, seed=4, malformed=0.02), path)
    return path


def parsed(*argv):
    """The config ``loopline ARGV`` would run with."""
    ns = build_parser(only=argv[0]).parse_args(list(argv))
    return config_from_args(next(c for c in COMMANDS if c.name == argv[0]).load("config"), ns)


def test_every_cli_default_is_declared_once_in_a_config():
    """The parser of every command, walked: each flag comes from a config field and has that field's
    default; each environment variable belongs to one declaration (so --partitions, --broker, the reach
    sampler's flags ... cannot be declared twice with two defaults again)."""
    parser = build_parser()
    assert audit(parser) == []
    seen = {}  # a shared setting really is shared: the same default in every command that has it
    for c in COMMANDS:
        for info in iter_settings(c.load("config")):
            if info.env:
                seen.setdefault(info.env, set()).add(repr(info.default))
    assert all(len(v) == 1 for v in seen.values()), {k: v for k, v in seen.items() if len(v) > 1}
    assert {"LOOPLINE_PARTITIONS", "LOOPLINE_BROKER", "LOOPLINE_REACH_BUDGET_USERS"} <= set(seen)


def test_no_setting_takes_a_variable_the_code_reads_for_something_else():
    env = {info.env for c in COMMANDS for info in iter_settings(c.load("config")) if info.env}
    used = set()
    for folder in ("loopline", "ops", "state", "model", "kernels", "stream"):
        for path in (ROOT / folder).glob("*.py"):
            if path.name == "settings.py":  # the machinery's own docstring names a setting's variable
                continue
            used |= set(re.findall(r"[\"'](LOOPLINE_[A-Z0-9_]+)[\"']", path.read_text()))
    assert "LOOPLINE_PROFILE" in used  # the scan finds them (ops/bench.py hands the worker its profile path)
    assert not env & used, env & used


def test_every_row_names_existing_functions():
    for c in COMMANDS:
        for what in ("config", "run") + (("text",) if c.text else ()):
            assert callable(c.load(what)), (c.name, what)


def test_shared_settings_have_one_default_across_commands():
    replay = parsed("replay", "--events", "x")
    worker = parsed("worker").worker
    reach = parsed("reach", "q", "--events", "x")
    assert replay.broker == worker.broker == "127.0.0.1:9092"  # the CLI said kafka://..., WorkerConfig host:port
    assert replay.partitions == worker.partitions == reach.partitions == parsed("evaluate", "--events", "x").partitions
    assert reach.sampler == worker.reach  # --budget-users ... and --reach-budget-users ...
    assert worker.data_dir == ".loopline-data"  # WorkerConfig's (the CLI had .loopline-data/worker)


def test_a_variable_sets_the_setting_in_every_command_and_a_flag_beats_it(monkeypatch):
    monkeypatch.setenv("LOOPLINE_REACH_BUDGET_USERS", "123")
    monkeypatch.setenv("LOOPLINE_BROKER", "kafka://10.0.0.5:9093")
    assert parsed("worker").worker.reach.budget_users == 123
    assert parsed("reach", "q", "--events", "x").sampler.budget_users == 123
    assert parsed("reach", "q", "--events", "x", "--budget-users", "9").sampler.budget_users == 9
    assert parsed("worker").worker.broker == parsed("replay", "--events", "x").broker == "10.0.0.5:9093"


@pytest.mark.parametrize("var,value", [("LOOPLINE_REACH_BUDGET_USERS", "lots"), ("LOOPLINE_BROKER", "http://x:1"),
                                       ("LOOPLINE_NO_MODELS", "maybe")], ids=["int", "broker", "bool"])
def test_a_bad_variable_is_one_line_naming_it(monkeypatch, capsys, log, var, value):
    monkeypatch.setenv(var, value)
    cmd = {"LOOPLINE_REACH_BUDGET_USERS": ["reach", "*", "--events", log],
           "LOOPLINE_BROKER": ["replay", "--events", log],
           "LOOPLINE_NO_MODELS": ["evaluate", "--events", log]}[var]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ConfigError: {var}: "), err
    monkeypatch.delenv(var)
    assert main(["drift", "--worker", "ftp://x"]) == 2  # another command does not read it
    assert capsys.readouterr().err.startswith("ConfigError: worker:")


def test_a_bad_flag_value_is_one_line_naming_the_field(capsys):
    assert main(["generate", "--users", "many", "--out", "/tmp/never-written.jsonl"]) == 2
    assert capsys.readouterr().err == "ConfigError: users: --users expected an integer, got 'many'\n"
    assert main(["worker", "--loglevel", "loud"]) == 2
    assert capsys.readouterr().err.startswith("ConfigError: loglevel: must be one of crit, error, warn")


def test_the_window_follows_the_data_set_unless_given():
    ev = parsed("evaluate", "--dataset", "movielens-100k")
    a = ev.join.attribution(ev.source.dataset)
    assert (a.window_s, a.bucket_s, a.dedup_horizon_s) == (60.0, 60.0, 86400.0)
    ev = parsed("evaluate", "--dataset", "movielens-100k", "--window", "86400")  # given: kept, even = the default
    assert ev.join.attribution(ev.source.dataset).window_s == 86400.0
    a = parsed("worker", "--window", "172800", "--lateness", "5").join.attribution()
    assert (a.window_s, a.bucket_s, a.dedup_horizon_s, a.lateness_s) == (172800.0, 600.0, 172800.0, 5.0)
    a = parsed("report", "--events", "x", "--out", "d").join.attribution(None)
    assert (a.window_s, a.bucket_s) == (86400.0, 600.0)


def test_run_functions_take_configs(log, tmp_path):
    from loopline.ops.evaluate import EvaluateCommand, run_evaluate
    from loopline.ops.fp8 import Fp8Command, run_fp8_report
    from loopline.ops.generate import GenerateCommand, GenerateConfig, run_generate
    from loopline.ops.quality import QualityCommand, run_quality
    from loopline.ops.reach import ReachCommand, run_reach
    from loopline.ops.source import SourceConfig
    from loopline.state.reach import ReachConfig

    one = run_reach(ReachCommand(query="gender = F", events=log, sampler=ReachConfig(budget_users=120)),
                    progress=False)
    assert one["users_ci"][0] <= one["users"] <= one["users_ci"][1] and one["sample"]["sampled_users"] > 0
    queries = tmp_path / "q.txt"
    queries.write_text("gender = F\n*\n")
    many = run_reach(ReachCommand(queries=str(queries), events=log), progress=False)
    assert [m["query"] for m in many] == ["gender = F", "*"]

    q = run_quality(QualityCommand(events=log, methods=("ls",)), progress=False)
    assert q["events"]["read"] > 0 and "sources" in q["report"]

    ev = run_evaluate(EvaluateCommand(source=SourceConfig(events=log), models=False), progress=False)
    assert ev["events"]["read"] == q["events"]["read"] and ev["examples"]["total"] > 0

    summary = run_generate(GenerateCommand(log=GenerateConfig(users=5, days=0.5), quality=True,
                                           out=str(tmp_path / "g.jsonl")))
    assert summary["path"].endswith("g.jsonl") and summary["users"] == 5
    assert {s["source"] for s in summary["quality"]["sources"]} == {"s_good", "s_poor", "s_adversarial"}

    with pytest.raises(ConfigError, match="^snapshot: cannot read"):
        run_fp8_report(Fp8Command(snapshot=str(tmp_path / "missing.pt")), progress=False)
    with pytest.raises(ConfigError, match="^query: give a query"):
        ReachCommand(events=log)


def test_reach_queries_print_one_object_per_line_through_the_registry(log, tmp_path, capsys):
    queries = tmp_path / "q.txt"
    queries.write_text("gender = F\nage in (\n")
    assert main(["reach", "--events", log, "--queries", str(queries)]) == 0
    lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["query"] for x in lines] == ["gender = F", "age in ("] and "error" in lines[1]
