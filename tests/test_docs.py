"""The repository's documents link only to files that exist (README, RESULTS, BENCHMARKS, CHANGELOG,
docs/, and the reports under results/, whose plots a reader opens from them)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        *(ROOT / name for name in ("README.md", "RESULTS.md", "BENCHMARKS.md", "CHANGELOG.md")),
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "results").rglob("*.md"),
    ]
)
# [text](target) and ![alt](target); a target ends at the first space (a title may follow) or ")"
LINK = re.compile(r"\]\(([^)\s]+)[^)]*\)")


def relative_targets(text: str) -> list[str]:
    """The link targets of a markdown text that name a file of the repository (no scheme, no bare
    anchor), without their #anchor."""
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_relative_targets_reads_links_and_images():
    text = 'see [a](docs/a.md#x), ![p](p.png), [web](https://x.org/y), [top](#anchor), [t](b.md "title")'
    assert relative_targets(text) == ["docs/a.md", "p.png", "b.md"]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc):
    missing = [t for t in relative_targets(doc.read_text(encoding="utf-8")) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"


def test_harness_config_table_lists_every_key():
    """docs/harness.md's "| group | keys |" table lists every TrainConfig key (it lacked wd_mode,
    warmup_fraction, tokens_per_param and final_eval_batches)."""
    from dataclasses import fields

    from htmuon.train.config import TrainConfig

    text = (ROOT / "docs" / "harness.md").read_text(encoding="utf-8")
    table = text.split("| group | keys |", 1)[1].split("\n\n", 1)[0]
    listed = set()
    for name in re.findall(r"`([a-z_0-9/]+)`", table):
        stem, _, tails = name.partition("1/")  # adamw_beta1/2
        listed |= {f"{stem}1", f"{stem}{tails}"} if tails else {name}
    missing = [f.name for f in fields(TrainConfig) if f.name not in listed]
    assert not missing, f"docs/harness.md's config-key table lacks {missing}"


def test_harness_quick_preset_row_gives_the_presets_lrs():
    """The `quick` row of docs/harness.md's preset table names each optimizer's lrs as the preset
    holds them (it said htmuon-interval's and htmuon-normuon's matrix lrs were carried "too", beside
    HTMuon's 0.04, where the preset carries Muon's 0.01)."""
    from htmuon.train.presets import RUN_PRESETS

    quick = RUN_PRESETS["quick"]
    text = (ROOT / "docs" / "harness.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `quick` |"))
    names = {"AdamW": "adamw", "Muon": "muon", "HTMuon": "htmuon", "NorMuon": "normuon"}
    found = dict(re.findall(r"\b(AdamW|Muon|HTMuon|NorMuon) \((?:lr )?([0-9.e-]+)", row))
    assert set(found) == set(names), row
    for title, lr in found.items():
        assert float(lr) == quick.lrs[names[title]], title
    for name in ("htmuon-interval", "htmuon-normuon"):
        assert quick.lrs[name] == quick.lrs["muon"] and quick.adamw_lrs[name] == quick.adamw_lrs["htmuon"]
    assert "htmuon-interval and htmuon-normuon carried, not tuned: Muon's matrix lr" in row
