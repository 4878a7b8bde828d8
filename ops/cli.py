"""The ``loopline`` command line. Every sub-command takes ``--json`` where it prints results.

Public surface: ``main``, ``build_parser``.

The sub-commands are the rows of ``ops/commands.py``; each one's flags come from its config dataclass
(``loopline/settings.py``: one declaration per setting, with its default, help and ``LOOPLINE_...``
environment variable). Only the command being run is imported and given its flags, so ``loopline drift``
never loads torch.

Errors: the CLI catches only :class:`~loopline.errors.LooplineError` (a bad flag or environment value
included), prints ``Type: message`` on one line and exits 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson

from loopline.errors import LooplineError
from loopline.settings import add_config_args, config_from_args

from .commands import COMMANDS, command

__all__ = ["main", "build_parser"]


def _emit(obj: dict, as_json: bool, title: str = "", file=None) -> None:
    """``obj`` as indented JSON or as an indented list, to ``file`` (default: stdout)."""
    file = file or sys.stdout
    if as_json:
        file.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if title:
        print(title, file=file)

    def walk(d, indent=0):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                print("  " * indent + f"{k}:", file=file)
                walk(v, indent + 1)
            else:
                print("  " * indent + f"{k}: {v}", file=file)
    walk(obj)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, just that command gets its flags (the others are
    listed by name), so only its modules are imported and only its environment variables are read."""
    ap = argparse.ArgumentParser(prog="loopline", description="Streaming online learning for ads.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help.replace("%", "%%"), description=c.help)
        if only is None or only == c.name:
            add_config_args(p, c.load("config"))
            if c.json:
                p.add_argument("--json", action="store_true", help="print JSON (machine-readable)")
    return ap


def _run(a: argparse.Namespace) -> int:
    c = command(a.cmd)
    cfg = config_from_args(c.load("config"), a)
    as_json = getattr(a, "json", False)
    out = c.load("run")(cfg, progress=not as_json)
    if isinstance(out, int):
        return out
    if isinstance(out, list):  # one answer per input line
        for o in out:
            sys.stdout.write(orjson.dumps(o).decode() + "\n")
        return 0
    file = sys.stderr if getattr(cfg, "out", None) == "-" else None  # stdout holds the product (generate)
    if as_json:
        _emit(out, True, file=file)
    else:
        shown = c.load("text")(out) if c.text else out
        for part in shown if isinstance(shown, tuple) else (shown,):
            if isinstance(part, dict):
                _emit(part, False, c.title.format(cfg=cfg), file=file)
            else:
                print(part, file=file)
    return 1 if c.fail_unless and not out[c.fail_unless] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((x for x in argv if not x.startswith("-")), None)  # the command: the first word
    try:
        return _run(build_parser(only=name).parse_args(argv))
    except LooplineError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loopline generate --out - | head`: the reader has what it wanted
        # stdout is gone; point it at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
