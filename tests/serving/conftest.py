"""Serving-test plumbing: coroutine tests run on a fresh event loop (no pytest-asyncio needed), and a
repository of only the small foreign ONNX classifier."""

from __future__ import annotations

import asyncio
import inspect
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def plain_repo(model_repo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`plain/1/model.onnx` alone (input "input" 3x16x16, 5 classes): servers start in well under a second."""
    root = tmp_path_factory.mktemp("plain_repo")
    (root / "plain" / "1").mkdir(parents=True)
    shutil.copy(model_repo.plain, root / "plain" / "1" / "model.onnx")
    return root


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), timeout=60))
    return True
