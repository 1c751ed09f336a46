"""The examples in the package's docstrings run as written and print what they show."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import htmuon

#: Not collected: the ``python -m htmuon`` entry point and the deprecated alias module (its import warns).
SKIP = {"htmuon.__main__", "htmuon.parallel"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(htmuon.__path__, "htmuon.") if m.name not in SKIP)
#: Modules that need an optional package (module -> package): their examples run where it is installed.
OPTIONAL = {"htmuon.integrations.torchtitan": "torchtitan"}


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [
        t for t in doctest.DocTestFinder().find(module, globs={"torch": torch, **vars(module)}) if t.examples
    ]


def test_the_docstring_examples_are_found():
    """A guard for the test below: a finder that found nothing would pass it vacuously."""
    have = [name for name in MODULES if name not in OPTIONAL or importlib.util.find_spec(OPTIONAL[name])]
    assert sum(len(t.examples) for name in have for t in _examples(name)) >= 40


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    if name in OPTIONAL:
        pytest.importorskip(OPTIONAL[name])
    monkeypatch.chdir(tmp_path)  # examples that write a file (a CSV, a plot) write it here
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
    )
