"""``loopline/settings.py`` on small configs of its own: flags, types, environment variables, nesting,
one-line errors, and an audit that finds a setting declared twice."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from loopline.errors import ConfigError
from loopline.settings import (add_config_args, argument, audit, config_from_args, iter_settings, nested, same_as,
                               setting)


@dataclass(frozen=True)
class Sampler:
    sample_users: int = setting(200, "users per partition", env="SAMPLER_USERS")
    epoch_s: float = setting(60.0, "epoch, seconds", flag="epoch")
    attrs: tuple = setting(("age", "geo"), "attributes, comma-separated")
    seed: int = 0  # not a flag


@dataclass(frozen=True)
class Job:
    partitions: int = setting(4, "partitions")
    wait: bool = setting(False, "wait for the end")
    end_of_log: bool = setting(True, "do not close the windows", flag="no-end-of-log")
    role: str = setting("all", "the role", choices=("all", "fm"))
    sampler: Sampler = nested(Sampler, prefix="reach-")
    events: str | None = argument(None, "an event log", metavar="FILE", exclusive="source", required=True)
    dataset: str | None = argument(None, "a data set", exclusive="source", required=True)
    pair: tuple | None = argument(None, "two numbers", nargs=2, parse=float)


@dataclass(frozen=True)
class Other:  # another command: shares Job's partitions, has a sampler without a prefix
    partitions: int = same_as(Job, "partitions")
    sampler: Sampler = nested(Sampler)


def parser_of(*configs) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="t")
    sub = ap.add_subparsers(dest="cmd")
    for i, c in enumerate(configs):
        add_config_args(sub.add_parser(f"c{i}"), c)
    return ap


def parse(config, argv):
    p = argparse.ArgumentParser()
    add_config_args(p, config)
    return config_from_args(config, p.parse_args(argv))


@pytest.fixture(autouse=True)
def no_loopline_env(monkeypatch):
    import os
    for k in [k for k in os.environ if k.startswith("LOOPLINE_")]:
        monkeypatch.delenv(k)


def test_flags_types_nesting_and_defaults():
    cfg = parse(Job, ["--events", "x.jsonl"])
    assert cfg == Job(events="x.jsonl")  # every default is the dataclass's
    cfg = parse(Job, ["--dataset", "d", "--partitions", "8", "--wait", "--no-end-of-log", "--role", "fm",
                      "--reach-sample-users", "7", "--reach-epoch", "2.5", "--reach-attrs", "a, b,", "--pair", "1", "2"])
    assert (cfg.partitions, cfg.wait, cfg.end_of_log, cfg.role) == (8, True, False, "fm")
    assert cfg.sampler == Sampler(sample_users=7, epoch_s=2.5, attrs=("a", "b"))
    assert cfg.pair == (1.0, 2.0)
    flags = {i.flag: i.env for i in iter_settings(Job)}
    assert flags["--reach-sample-users"] == "LOOPLINE_SAMPLER_USERS"  # the setting's variable, not the prefix's
    assert flags["--reach-epoch"] == "LOOPLINE_EPOCH" and flags["--no-end-of-log"] == "LOOPLINE_NO_END_OF_LOG"
    assert flags["--events"] is None  # an input: no variable
    assert {i.flag for i in iter_settings(Other)} == {"--partitions", "--sample-users", "--epoch", "--attrs"}


def test_an_environment_variable_overrides_the_default_and_a_flag_overrides_the_variable(monkeypatch):
    monkeypatch.setenv("LOOPLINE_SAMPLER_USERS", "31")
    monkeypatch.setenv("LOOPLINE_PARTITIONS", "2")
    monkeypatch.setenv("LOOPLINE_NO_END_OF_LOG", "yes")
    monkeypatch.setenv("LOOPLINE_WAIT", "0")
    cfg = parse(Job, ["--events", "x"])
    assert (cfg.sampler.sample_users, cfg.partitions, cfg.end_of_log, cfg.wait) == (31, 2, False, False)
    cfg = parse(Job, ["--events", "x", "--reach-sample-users", "5", "--partitions", "3"])
    assert (cfg.sampler.sample_users, cfg.partitions) == (5, 3)
    assert parse(Other, []).sampler.sample_users == 31  # one variable wherever the setting's flag appears


@pytest.mark.parametrize("var,value,message", [
    ("LOOPLINE_SAMPLER_USERS", "many", "LOOPLINE_SAMPLER_USERS: expected an integer, got 'many'"),
    ("LOOPLINE_EPOCH", "1d", "LOOPLINE_EPOCH: expected a number, got '1d'"),
    ("LOOPLINE_WAIT", "perhaps", "LOOPLINE_WAIT: expected 1/true/yes/on or 0/false/no/off, got 'perhaps'"),
    ("LOOPLINE_ROLE", "painter", "LOOPLINE_ROLE: must be one of all, fm, got 'painter'"),
], ids=["int", "float", "bool", "choice"])
def test_a_bad_environment_value_is_a_config_error_naming_the_variable(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        parse(Job, ["--events", "x"])
    assert str(err.value) == message


@pytest.mark.parametrize("argv,message", [
    (["--partitions", "four"], "partitions: --partitions expected an integer, got 'four'"),
    (["--reach-epoch", "x"], "epoch_s: --reach-epoch expected a number, got 'x'"),
    (["--role", "vm"], "role: must be one of all, fm, got 'vm'"),
    (["--pair", "1", "b"], "pair: --pair cannot be 'b'"),
], ids=["int", "nested-float", "choice", "parsed"])
def test_a_bad_flag_value_is_a_config_error_naming_the_field(argv, message):
    with pytest.raises(ConfigError) as err:
        parse(Job, ["--events", "x", *argv])
    assert str(err.value) == message


def test_help_shows_the_default_and_the_variable(monkeypatch):
    p = argparse.ArgumentParser()
    add_config_args(p, Job)
    text = " ".join(p.format_help().split())
    assert "partitions (default: 4; env LOOPLINE_PARTITIONS)" in text
    assert "attributes, comma-separated (default: age,geo; env LOOPLINE_ATTRS)" in text
    monkeypatch.setenv("LOOPLINE_PARTITIONS", "6")
    p = argparse.ArgumentParser()
    add_config_args(p, Job)
    assert "(default: 6 from LOOPLINE_PARTITIONS; env LOOPLINE_PARTITIONS)" in " ".join(p.format_help().split())


def test_the_audit_passes_one_declaration_shared_by_two_commands():
    assert audit(parser_of(Job, Other)) == []


def test_the_audit_finds_a_setting_declared_twice_with_two_defaults():
    @dataclass(frozen=True)
    class Again:  # the old habit: partitions declared again, with another default
        partitions: int = setting(8, "partitions")

    problems = audit(parser_of(Job, Again))
    assert len(problems) == 1 and problems[0].startswith("LOOPLINE_PARTITIONS: declared 2 times"), problems


def test_the_audit_finds_a_flag_no_config_declares_and_a_default_that_is_not_the_fields():
    ap = parser_of(Job, Other)
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["c0"].add_argument("--timeout", type=float, default=300.0)  # hand-written, as cli.py had them
    action = next(a for a in sub.choices["c1"]._actions if a.dest == "partitions")
    action.default = 2
    problems = audit(ap)
    assert any(p.startswith("c0 --timeout: not declared in a config") for p in problems), problems
    assert any(p.startswith("c1 --partitions: default 2, but Job.partitions = 4") for p in problems), problems
    assert len(problems) == 2, problems


def test_same_as_needs_a_declared_setting():
    with pytest.raises(TypeError, match="seed is not declared"):
        same_as(Sampler, "seed")
