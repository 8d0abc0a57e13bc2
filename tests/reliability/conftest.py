"""Fixtures of the reliability tests: the tiny models and one finished, uninterrupted run, made once.

(``tests/reliability`` is a package so that this conftest is ``reliability.conftest``: the test modules of
``tests/`` import the top-level conftest by its plain name.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .reliability_helpers import finished_run, make_models


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """``teacher``, ``student`` (Hugging Face directories) and ``data`` (prepared)."""
    return make_models(tmp_path_factory.mktemp("reliability_models"))


@pytest.fixture(scope="session")
def reference(models, tmp_path_factory) -> Path:
    """The output folder of one uninterrupted run (read-only for tests: copy it to change it)."""
    return finished_run(models, tmp_path_factory.mktemp("reliability_reference") / "run")
