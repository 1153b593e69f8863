"""Every exception class defined in pipelines/data is a user-facing error: it inherits pipelines.errors.UserError,
so the CLI prints it as one line (exit 2) instead of a traceback.

    .venv/bin/python -m pytest tests/pipelines/data/test_errors.py -q
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from pipelines.errors import USER_ERRORS, UserError

DATA = Path(__file__).resolve().parents[3] / "pipelines" / "data"
MODULES = sorted(f"pipelines.data.{p.stem}" for p in DATA.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_error_classes_inherit_user_error(name):
    mod = importlib.import_module(name)
    for _, cls in inspect.getmembers(mod, inspect.isclass):
        if cls.__module__ == name and issubclass(cls, BaseException):
            assert issubclass(cls, UserError), f"{name}.{cls.__name__} must inherit pipelines.errors.UserError"
            assert issubclass(cls, USER_ERRORS)


def test_the_known_ones():
    from pipelines.data.config import PrepError
    from pipelines.data.manifest import DatasetNotReadyError

    assert issubclass(PrepError, UserError) and issubclass(DatasetNotReadyError, UserError)
