"""Run every module's docstring examples, imported under the ``loopline`` package names."""

import doctest
import importlib
import pkgutil

import pytest

import loopline

MODULES = ["loopline.errors"] + sorted(
    m.name for sub in ("state", "model", "kernels", "stream", "ops")
    for m in pkgutil.walk_packages(importlib.import_module(f"loopline.{sub}").__path__, f"loopline.{sub}.")
)


class _Checker(doctest.OutputChecker):
    """``loopline.state.errors`` re-exports ``loopline.errors``: an example's traceback may name a class
    by either path (both name the same class), so the old one is read as the new one."""

    def check_output(self, want, got, optionflags):
        return super().check_output(want.replace("loopline.state.errors.", "loopline.errors."), got, optionflags)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    mod = importlib.import_module(name)
    runner = doctest.DocTestRunner(checker=_Checker(), optionflags=doctest.ELLIPSIS, verbose=False)
    for test in doctest.DocTestFinder().find(mod, name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
