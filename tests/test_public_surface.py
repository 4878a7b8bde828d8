"""Every module states its public surface in ``__all__``, and every listed name exists."""

import importlib

import pytest

from .test_doctests import MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_an_existing_public_surface(name):
    mod = importlib.import_module(name)
    assert isinstance(getattr(mod, "__all__", None), list), f"{name} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ lists missing names {missing}"
