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
#: The modules whose docstrings hold examples that run, and how many (``# doctest: +SKIP`` ones, which
#: only illustrate, not counted; the other modules have none: a module that gains examples is found by
#: the first test below and belongs here).
DOCUMENTED = {
    "htmuon.diagnostics": 4,
    "htmuon.diagnostics.cli": 2,
    "htmuon.diagnostics.esd": 5,
    "htmuon.diagnostics.powerlaw": 4,
    "htmuon.diagnostics.tracker": 1,
    "htmuon.distributed": 3,
    "htmuon.functional": 5,
    "htmuon.optim": 9,
    "htmuon.routing": 5,
    "htmuon.spectral": 4,
    "htmuon.train.compare": 1,
    "htmuon.train.cosmos": 4,
}
#: Modules that need an optional package to import (module -> package); they hold no examples.
OPTIONAL = {"htmuon.integrations.torchtitan": "torchtitan"}


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [
        t for t in doctest.DocTestFinder().find(module, globs={"torch": torch, **vars(module)}) if t.examples
    ]


def test_the_docstring_examples_are_found():
    """A guard for the test below: every module's examples are found and run there, none lost, none
    left out (a finder that found nothing would pass it vacuously)."""
    found = {}
    for name in MODULES:
        if name in OPTIONAL and not importlib.util.find_spec(OPTIONAL[name]):
            continue
        count = sum(not e.options.get(doctest.SKIP) for t in _examples(name) for e in t.examples)
        if count:
            found[name] = count
    assert found == DOCUMENTED


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write a file (a CSV, a plot) write it here
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted == DOCUMENTED[name]
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
    )
