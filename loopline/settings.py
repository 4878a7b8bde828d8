"""Settings, each declared once: on its component's config dataclass, with its default, its one line of
help, its CLI flag and its environment variable.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class SamplerConfig:
    ...     budget_users: int = setting(20_000, "users the sample holds in all", env="REACH_BUDGET_USERS")
    ...     seed: int = 0  # a plain field: not a flag
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_config_args(p, SamplerConfig, prefix="reach-")
    >>> config_from_args(SamplerConfig, p.parse_args(["--reach-budget-users", "500"]), prefix="reach-")
    SamplerConfig(budget_users=500, seed=0)
    >>> [i.env for i in iter_settings(SamplerConfig)]
    ['LOOPLINE_REACH_BUDGET_USERS']

What a config declares:

- ``setting(default, help, ...)``: a dataclass field that is also a flag and an environment variable.
- ``argument(default, help, ...)``: a flag with no environment variable: one run's input or output (the
  file read or written, the query, the sources to choose between). An environment variable that quietly
  picked the input of every later run would surprise.
- ``same_as(Config, "name")``: the same setting in another config: it shares the declaration (default,
  help, flag, environment variable), so ``--partitions`` cannot drift apart between two commands.
- ``nested(Config, prefix="")``: a config inside a config; the flags of its settings get the prefix
  (``WorkerConfig.reach``: ``--reach-budget-users``).

Names. The flag is ``--`` + the nesting prefix + the setting's ``flag`` (default: the field's name with
dashes). The environment variable is ``LOOPLINE_`` + the setting's ``env`` (default: its flag, without any
nesting prefix), in upper case with underscores; so a setting has one variable wherever its flag appears.
A flag that means different settings in different commands (``--users`` of ``generate`` and of ``demo``)
gives each its own ``env`` (``GENERATE_USERS``, ``DEMO_USERS``); ``--help`` shows every flag's variable.

Values. The parser keeps the strings; :func:`config_from_args` converts them by the field's annotation
(``bool``, ``int``, ``float``, ``str``, ``tuple``: comma-separated) or the setting's ``parse``, so a value
that does not parse is one :class:`~loopline.errors.ConfigError` line naming the field, not argparse's
usage text. An environment variable (not empty) overrides the dataclass default; it is converted when the
flags are added, and one that does not parse is a ConfigError naming the variable. The config's own
``__post_init__`` then checks the values as it does for any caller. A flag given beats the variable.

Plain Python (no Faust, no torch): every layer may declare its settings here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Iterator, NamedTuple

from loopline.errors import ConfigError

__all__ = ["Setting", "SettingInfo", "setting", "argument", "same_as", "nested", "iter_settings", "add_config_args",
           "config_from_args", "env_name", "audit", "parse_broker_url"]

ENV_PREFIX = "LOOPLINE_"
_SETTING, _ORIGIN, _NESTED = "loopline.setting", "loopline.origin", "loopline.nested"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one config field appears on the command line (see the module docstring)."""

    help: str
    flag: str | None = None  # default: the field's name with dashes
    env: str | None = None  # default: the flag; "" for an argument (no environment variable)
    choices: tuple | None = None
    metavar: str | tuple | None = None
    parse: Callable[[str], Any] | None = None  # str -> value, instead of the annotation's type
    nargs: int | str | None = None
    positional: bool = False
    exclusive: str | None = None  # the name of a mutually exclusive group (within one command)
    required: bool = False  # a required flag, or (with ``exclusive``) a required choice in the group


def setting(default, help: str, *, flag: str | None = None, env: str | None = None, choices=None, metavar=None,
            parse: Callable | None = None, nargs=None):
    """A config field that is also a CLI flag and an environment variable."""
    s = Setting(help, flag, env, tuple(choices) if choices else None, metavar, parse, nargs)
    return dataclasses.field(default=default, metadata={_SETTING: s})


def argument(default, help: str, *, flag: str | None = None, choices=None, metavar=None, parse=None, nargs=None,
             positional: bool = False, exclusive: str | None = None, required: bool = False):
    """A config field that is a CLI flag (or positional) without an environment variable: an input or an
    output of one run."""
    s = Setting(help, flag, "", tuple(choices) if choices else None, metavar, parse, nargs, positional, exclusive,
                required)
    return dataclasses.field(default=default, metadata={_SETTING: s})


def same_as(config: type, name: str):
    """The field ``name`` of ``config`` again, in another config: one declaration, one default."""
    f = config.__dataclass_fields__[name]
    if _SETTING not in f.metadata:
        raise TypeError(f"{config.__name__}.{name} is not declared with setting() or argument()")
    return dataclasses.field(default=f.default, metadata={_SETTING: f.metadata[_SETTING],
                                                          _ORIGIN: f.metadata.get(_ORIGIN, (config, name))})


def nested(config: type, prefix: str = ""):
    """A config inside a config (default: ``config()``); its flags get ``prefix``."""
    return dataclasses.field(default_factory=config, metadata={_NESTED: (config, prefix)})


def env_name(s: Setting, name: str) -> str | None:
    """The environment variable of setting ``s`` declared as field ``name`` (None for an argument)."""
    if s.env == "":
        return None
    return ENV_PREFIX + (s.env or s.flag or name).upper().replace("-", "_")


class SettingInfo(NamedTuple):
    """One flag of a config, as :func:`iter_settings` finds it."""

    dest: str  # the namespace attribute: the field path, dotted for nested configs
    name: str  # the field's name
    flag: str  # ``--reach-budget-users``, or the positional's name
    env: str | None
    default: Any  # the dataclass default (before any environment variable)
    setting: Setting
    origin: tuple  # (config class, field name) where the setting is declared
    kind: type  # bool, int, float, str or tuple


def iter_settings(config: type, prefix: str = "", path: str = "") -> Iterator[SettingInfo]:
    """Every flag of ``config`` and of the configs nested in it, in field order."""
    for f in dataclasses.fields(config):
        if _NESTED in f.metadata:
            inner, inner_prefix = f.metadata[_NESTED]
            yield from iter_settings(inner, prefix + inner_prefix, f"{path}{f.name}.")
            continue
        s = f.metadata.get(_SETTING)
        if s is None:
            continue
        origin = f.metadata.get(_ORIGIN, (config, f.name))
        own = s.flag or origin[1].replace("_", "-")
        flag = (prefix + own).replace("_", "-") if s.positional else "--" + prefix + own
        yield SettingInfo(path + f.name, f.name, flag, env_name(s, origin[1].replace("_", "-")), f.default, s,
                          origin, _kind(f))


def _kind(f: dataclasses.Field) -> type:
    names = {t.strip() for t in str(getattr(f.type, "__name__", f.type)).split("|")} - {"None"}
    if len(names) == 1 and next(iter(names)) in _KINDS:
        return _KINDS[names.pop()]
    return type(f.default) if type(f.default) in _KINDS.values() else str


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_args(parser: argparse.ArgumentParser, config: type, prefix: str = "") -> None:
    """Add a flag for every setting and argument of ``config`` (nested configs included) to ``parser``.
    An environment variable that is set overrides the default; one that does not parse raises
    :class:`ConfigError` naming it."""
    groups: dict[str, Any] = {}  # mutually exclusive groups by name
    for info in iter_settings(config, prefix):
        s, default = info.setting, info.default
        from_env = bool(info.env and os.environ.get(info.env, "").strip())  # an empty variable is unset
        if from_env:
            default = _convert(info, os.environ[info.env], info.env, env=True)
        note = []
        if default is not None and info.kind is not bool and not s.required:
            note.append(f"default: {_show(default)}" + (f" from {info.env}" if from_env else ""))
        if info.env:
            note.append(f"env {info.env}")
        help_text = (s.help + (f" ({'; '.join(note)})" if note else "")).replace("%", "%%")
        kw: dict[str, Any] = {"help": help_text, "default": default,
                              "metavar": info.flag.lstrip("-").upper().replace("-", "_")}
        if s.choices:
            kw["metavar"] = "{" + ",".join(s.choices) + "}"
        if s.metavar:
            kw["metavar"] = s.metavar
        if info.kind is bool and not s.positional:
            kw["action"] = "store_false" if info.default else "store_true"
            kw.pop("metavar", None)
            if from_env:  # the variable says whether the flag counts as given
                kw["default"] = not default if info.default else default
        elif s.nargs is not None:
            kw["nargs"] = s.nargs
        target = parser
        if s.exclusive:
            if s.exclusive not in groups:
                groups[s.exclusive] = parser.add_mutually_exclusive_group(required=s.required)
            target = groups[s.exclusive]
        elif s.required and not s.positional:
            kw["required"] = True
        if s.positional:
            kw.setdefault("metavar", info.flag)
            if info.default is None and not s.required:
                kw["nargs"] = "?"
            action = target.add_argument(info.dest, **kw)
        else:
            action = target.add_argument(info.flag, dest=info.dest, **kw)
        action.loopline_setting = info  # for the audit in tests/test_settings.py


def config_from_args(config: type, namespace: argparse.Namespace, prefix: str = "", path: str = ""):
    """``config`` built from the values :func:`add_config_args` (same ``prefix``) stored in ``namespace``."""
    kw = {}
    for f in dataclasses.fields(config):
        if _NESTED in f.metadata:
            inner, inner_prefix = f.metadata[_NESTED]
            kw[f.name] = config_from_args(inner, namespace, prefix + inner_prefix, f"{path}{f.name}.")
    for info in iter_settings(config, prefix, path):
        if "." in info.dest[len(path):]:
            continue  # a nested config's: built above
        raw = getattr(namespace, info.dest, info.default)
        kw[info.name] = _convert(info, raw, info.name)
    return config(**kw)


def _convert(info: SettingInfo, raw, where: str, env: bool = False):
    """A flag's or a variable's text as the field's value; a ConfigError naming ``where`` if it does
    not parse. Values that are not text (defaults, store_true flags) are kept as they are."""
    if isinstance(raw, list):
        return tuple(_convert(info._replace(kind=str), r, where) if info.setting.parse is None
                     else _one(info, r, where) for r in raw)
    if not isinstance(raw, str):
        return raw
    if info.kind is bool:
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ConfigError(f"{where}: expected 1/true/yes/on or 0/false/no/off, got {raw!r}")
    return _one(info, raw, where)


def _one(info: SettingInfo, raw: str, where: str):
    s = info.setting
    if s.choices and raw not in s.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(s.choices)}, got {raw!r}")
    if s.parse is not None:
        try:
            return s.parse(raw)
        except ConfigError as exc:
            if where == info.name:
                raise
            raise ConfigError(f"{where}: {exc}") from None
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {_by(info, where)}cannot be {raw!r}") from None
    if info.kind is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if info.kind in (int, float):
        try:
            return info.kind(raw)
        except ValueError:
            what = "an integer" if info.kind is int else "a number"
            raise ConfigError(f"{where}: {_by(info, where)}expected {what}, got {raw!r}") from None
    return raw


def _by(info: SettingInfo, where: str) -> str:
    return f"{info.flag} " if where == info.name else ""  # a flag's error names the flag too


def audit(parser: argparse.ArgumentParser, own: tuple = ("help", "json")) -> list[str]:
    """What breaks "every setting declared once" in ``parser`` and its sub-commands (one line each):
    a flag that no config declares (other than ``own``: ``--help``, the CLI's ``--json``), a flag whose
    default is not its config field's, an environment variable that two declarations share (two settings
    under one name, or one setting declared twice). Run it with no ``LOOPLINE_`` variable set."""
    problems, declared = [], {}
    for name, p in _walk(parser):
        for action in _actions(p):
            info = getattr(action, "loopline_setting", None)
            if info is None:
                if action.dest not in own:
                    problems.append(f"{name} {'/'.join(action.option_strings) or action.dest}: not declared in a "
                                    "config")
                continue
            origin_cls, origin_name = info.origin
            field_default = origin_cls.__dataclass_fields__[origin_name].default
            if action.default != field_default or info.default != field_default:
                problems.append(f"{name} {info.flag}: default {action.default!r}, but "
                                f"{origin_cls.__name__}.{origin_name} = {field_default!r}")
            if info.env:
                declared.setdefault(info.env, {}).setdefault(info.origin, []).append(f"{name} {info.flag}")
    for env, origins in declared.items():
        if len(origins) > 1:
            where = "; ".join(f"{c.__name__}.{n} ({', '.join(u)})" for (c, n), u in origins.items())
            problems.append(f"{env}: declared {len(origins)} times: {where}")
    return problems


def _walk(parser: argparse.ArgumentParser, name: str = ""):
    """``(command name, parser)`` for ``parser`` and every sub-command's parser, depth first."""
    yield name or parser.prog, parser
    for action in _actions(parser, subparsers=True):
        for sub, p in action.choices.items():
            yield from _walk(p, f"{name} {sub}".strip())


def _actions(parser: argparse.ArgumentParser, subparsers: bool = False) -> list:
    """The parser's arguments (or, with ``subparsers``, its sub-command actions)."""
    # argparse has no public way to list a parser's arguments or sub-parsers; _actions and the
    # sub-parsers action's class have been stable since Python 2.7, and only audit() reads them
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction) == subparsers]


def parse_broker_url(url: str) -> str:
    """``kafka://host:port`` (or ``host:port``) -> ``host:port`` for aiokafka; a clear error otherwise.

    >>> parse_broker_url("kafka://127.0.0.1:9092")
    '127.0.0.1:9092'
    """
    rest = url[len("kafka://"):] if url.startswith("kafka://") else url
    if "://" in rest:
        raise ConfigError(f"broker: expected kafka://host:port, got {url!r}")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"broker: expected kafka://host:port, got {url!r}")
    return f"{host}:{port}"
