"""Run every module's docstring examples, imported under the ``loopline`` package names."""

import doctest
import importlib
import pkgutil

import pytest

import loopline

MODULES = ["loopline.errors", "loopline.settings"] + sorted(
    m.name for sub in ("state", "model", "kernels", "stream", "ops")
    for m in pkgutil.walk_packages(importlib.import_module(f"loopline.{sub}").__path__, f"loopline.{sub}.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
