"""The exception tree (``loopline/errors.py``): each class's HTTP status, the old import path, and a kernel's
bad-argument error going through the CLI's one-line handling."""

from __future__ import annotations

import pytest
import torch

import loopline.errors as errors
from loopline.errors import (BrokerError, Closed, ConfigError, DatasetError, InvalidEvent, InvalidMetricInput,
                             KernelError, LooplineError, NotFound, RanksError, TooLarge)
from loopline.kernels.dispatch import DispatchLinear
from loopline.kernels.epilogue import block_rms_norm
from loopline.kernels.fp8_gemm import fp8_linear
from loopline.kernels.probe import WelfordStats
from loopline.kernels.quant import quantize
from loopline.ops import cli

STATUS = [(LooplineError, 400), (ConfigError, 400), (NotFound, 404), (TooLarge, 413), (InvalidEvent, 400),
          (InvalidMetricInput, 400), (Closed, 503), (BrokerError, 503), (RanksError, 503), (DatasetError, 502),
          (KernelError, 500)]


@pytest.mark.parametrize("cls,status", STATUS, ids=[c.__name__ for c, _ in STATUS])
def test_each_class_maps_to_its_http_status(cls, status):
    exc = cls("reason", "detail") if cls is InvalidEvent else cls("field: message")
    assert exc.http_status == status
    assert isinstance(exc, LooplineError)


def test_every_class_of_the_tree_is_listed_and_has_a_status():
    assert {c.__name__ for c, _ in STATUS} == set(errors.__all__)


def test_not_found_and_too_large_are_config_errors_so_existing_handlers_still_catch_them():
    for cls in (NotFound, TooLarge):
        assert issubclass(cls, ConfigError) and issubclass(cls, ValueError)
    assert not issubclass(Closed, ConfigError) and issubclass(Closed, RuntimeError)


@pytest.mark.parametrize("call,field", [
    (lambda: quantize(torch.zeros(2, 2), "nope"), "recipe"),
    (lambda: quantize(torch.zeros(2), "row"), "x"),
    (lambda: block_rms_norm(torch.zeros(1, 2), 0), "block"),
    (lambda: fp8_linear(torch.zeros(2, 16), torch.zeros(4, 16), library="cutlass"), "library"),
    (lambda: DispatchLinear(torch.nn.Linear(4, 4), "nope"), "candidate"),
    (lambda: WelfordStats(3).merge(WelfordStats(4)), "dim"),
], ids=["quantize-recipe", "quantize-1d", "block_rms_norm-block", "fp8_linear-library", "DispatchLinear-candidate",
        "WelfordStats-merge-dim"])
def test_a_kernel_bad_argument_is_a_config_error_naming_the_argument(call, field):
    with pytest.raises(ConfigError, match=rf"^{field}:") as err:
        call()
    assert isinstance(err.value, LooplineError) and isinstance(err.value, ValueError)  # old catches still work


def test_the_cli_prints_a_kernel_error_in_one_line(monkeypatch, capsys):
    """A kernel's bad-argument error raised under a subcommand: exit 2 and ``Type: message``, no traceback."""
    def bad_report(*args, **kwargs):
        return quantize(torch.zeros(2, 2), "fp4")

    monkeypatch.setattr("loopline.ops.fp8.fp8_report", bad_report)
    assert cli.main(["fp8", "report"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("ConfigError: recipe: one of ('tensor', 'row', 'block'), got 'fp4'"), err


def test_the_cli_prints_a_kernel_config_error_in_one_line(capsys):
    """No patching: ``loopline fp8 report --threshold -1`` reaches ``kernels.dispatch.DispatchConfig``."""
    assert cli.main(["fp8", "report", "--threshold", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "ConfigError: threshold: must be > 0, got -1.0\n"
