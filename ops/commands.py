"""The ``loopline`` sub-commands: one row each, naming the config its flags come from and the function
that runs it.

Public surface: ``Command``, ``COMMANDS``, ``command``.

A row names its config and functions as ``"module:attribute"`` strings, imported only when that command
runs (or its ``--help`` is asked for): ``loopline drift`` must not wait for torch, which ``fp8`` and the
models import. Contract of the named pieces:

* ``config``: a dataclass whose ``setting``/``argument`` fields (``loopline/settings.py``) are the
  command's flags;
* ``run(cfg, progress)``: does the work and returns its output, a dict (a list: printed as one JSON
  object per line, ``--json`` or not), or the exit code of a long-lived command that printed itself
  (``broker``, ``worker``). ``progress`` is False with ``--json``;
* ``text(out)``: the output for people, without ``--json``: a string to print, or a dict (or a tuple
  of dicts and strings) to print as an indented list under ``title``; without ``text``, the whole
  output is that list;
* ``title``: formatted with the config (``{cfg.worker}``);
* ``fail_unless``: a key of the output; the exit code is 1 when it is false (``chaos``'s ``ok``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from loopline.errors import ConfigError

__all__ = ["Command", "COMMANDS", "command"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str  # "module:Class" (modules relative to loopline.ops)
    run: str  # "module:function"
    title: str = ""
    text: str | None = None  # "module:function"
    fail_unless: str | None = None
    json: bool = True  # whether it takes --json

    def load(self, what: str) -> Any:
        """The config class, ``run`` or ``text`` of the row, imported now."""
        ref = getattr(self, what)
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(f"loopline.ops.{module}"), name)


COMMANDS = (
    Command("broker", "run the embedded Kafka-protocol broker (Tansu) on 127.0.0.1", "broker:BrokerConfig",
            "broker:run_broker", json=False),
    Command("worker", "a long-lived Faust worker", "worker:WorkerCommand", "worker:run_worker_command", json=False),
    Command("fm-rank", "one of the FM's ranks 1..N-1, joining rank 0 (a worker or evaluate with --fm-join)",
            "fm_rank:FmRankCommand", "fm_rank:run_fm_rank", json=False),
    Command("replay", "send an event log to the broker in event-time order", "replay:ReplayCommand",
            "replay:run_replay", "loopline replay", "replay:format_replay"),
    Command("evaluate", "replay in-process through the same code and print counts and metrics",
            "evaluate:EvaluateCommand", "evaluate:run_evaluate", "loopline evaluate", "evaluate:format_evaluate"),
    Command("generate", "write a synthetic event log", "generate:GenerateCommand", "generate:run_generate",
            "loopline generate: wrote {cfg.where}"),
    Command("demo", "the main job end to end on the embedded broker", "demo:DemoConfig", "demo:run_demo",
            "loopline demo", "demo:format_demo"),
    Command("quality", "score targeting data sources against aggregate truth reports", "quality:QualityCommand",
            "quality:run_quality", text="quality:format_quality"),
    Command("fp8", "LoKA FP8: probe and dispatch a model, print the per-layer decision table", "fp8:Fp8Command",
            "fp8:run_fp8_report", text="fp8:format_report"),
    Command("drift", "current drift and model-health figures of a monitor worker (--json: the whole /drift "
            "report)", "drift:DriftCommand", "drift:run_drift", "loopline drift ({cfg.worker})", "drift:drift_summary"),
    Command("report", "an HTML report with plots: drift, model health, alarms, transfer ratio",
            "report:ReportCommand", "report:run_report", "loopline report"),
    Command("reach", "audience reach of a targeting query, with 95% intervals", "reach:ReachCommand",
            "reach:run_reach", "loopline reach"),
    Command("chaos", "kill -9s, a broker restart, damaged snapshots, a full disk, view load and a standby fm on a "
            "role-split deployment: the final numbers must not change", "chaos:ChaosConfig", "chaos:run_chaos",
            text="chaos:format_chaos", fail_unless="ok"),
    Command("bench", "benchmarks, writing JSON", "benchmarks:BenchCommand", "benchmarks:run_bench",
            "loopline bench {cfg.what} (written to {cfg.path})"),
)


def command(name: str) -> Command:
    """The row of ``name``."""
    for c in COMMANDS:
        if c.name == name:
            return c
    raise ConfigError(f"command: unknown {name!r}")
