"""The fair-comparison protocol of ``htmuon compare`` and the loop (issue 14): edge flags, grid
extension, selection seeds, cell locks, warmup fraction, token budget, whole-split evaluation,
weight decay independent of the lr."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from helpers import TINY_RUN, flags, flock_held_elsewhere, load_script  # noqa: E402
from htmuon.cli import UserError  # noqa: E402
from htmuon.train import checkpoint, locks  # noqa: E402
from htmuon.train import compare as cmp  # noqa: E402
from htmuon.train.config import TrainConfig, make_config, to_dict  # noqa: E402
from htmuon.train.loop import budget_steps, evaluate, independent_weight_decay, resolve_config, train  # noqa: E402

# ----------------------------------------------------------------------------- edge flags


def _row(spec, lr, alr, loss):
    return {"spec": spec, "lr": lr, "adamw_lr": alr, "val_loss": (loss, None)}


def test_edge_flags_along_the_best_line():
    rows = [_row("m", lr, alr, 5.0) for lr in (0.01, 0.02, 0.04) for alr in (1e-3, 3e-3, 1e-2)]
    best = next(r for r in rows if (r["lr"], r["adamw_lr"]) == (0.02, 1e-2))  # interior lr, top AdamW lr
    assert cmp.edge_flags(rows, best) == {"lr": None, "adamw_lr": "high"}
    low = _row("m", 0.01, 1e-3, 0.0)
    assert cmp.edge_flags(rows, low) == {"lr": "low", "adamw_lr": "low"}
    single = [_row("a", 0.003, None, 4.0)]
    assert cmp.edge_flags(single, single[0]) == {"lr": "fixed"}  # one value: untuned, not an edge
    assert cmp._next_value([0.01, 0.02, 0.04], high=True) == 0.08
    assert cmp._next_value([1e-3, 3e-3], high=False) == pytest.approx(3.33e-4)


def test_edge_flags_read_only_the_line_through_the_best_cell():
    """A grid that is not a full product (an extension ran along one line only): the flag looks at the
    cells with the other lr held at the best's, not at every lr tried."""
    rows = [_row("m", lr, 1e-3, 5.0) for lr in (0.01, 0.02, 0.04)]
    rows += [_row("m", lr, 3e-3, 5.0) for lr in (0.01, 0.02)]
    best = next(r for r in rows if (r["lr"], r["adamw_lr"]) == (0.02, 3e-3))
    assert cmp.edge_flags(rows, best) == {"lr": "high", "adamw_lr": "high"}


def _summary(spec, lr, seed, loss, acc=None, alr=None):
    return {
        "spec": spec, "lr": lr, "adamw_lr": alr, "seed": seed, "final_val_loss": loss,
        "final_val_acc": acc, "ms_per_step": 1.0, "mean_alpha": None, "run_dir": f"{spec}/{lr}/{seed}",
    }  # fmt: skip


@pytest.mark.parametrize("order", [1, -1])
def test_best_cell_is_never_a_non_finite_loss(order):
    rows = [_summary("m", 0.1, 0, 3.0), _summary("m", 0.2, 0, math.nan), _summary("m", 0.4, 0, math.inf)]
    assert cmp.aggregate(rows[::order])["best"]["m"]["lr"] == 0.1


@pytest.mark.parametrize("order", [1, -1])
def test_equal_losses_select_the_smaller_lrs_whatever_the_order(order):
    """Ties go to the smaller matrix lr, then the smaller AdamW-part lr (before: the cell read first)."""
    rows = [_summary("m", 0.04, 0, 3.0), _summary("m", 0.02, 0, 3.0), _summary("m", 0.08, 0, 3.5)]
    assert cmp.aggregate(rows[::order])["best"]["m"]["lr"] == 0.02
    rows = [_summary("m", 0.02, 0, 3.0, alr=0.1), _summary("m", 0.02, 0, 3.0, alr=0.03)]
    assert cmp.aggregate(rows[::order])["best"]["m"]["adamw_lr"] == 0.03
    rows = [_summary("m", 0.02, 0, 1.0, acc=0.7), _summary("m", 0.01, 0, 1.2, acc=0.7)]
    assert cmp.aggregate(rows[::order])["best"]["m"]["lr"] == 0.01


def test_image_task_selects_the_highest_accuracy():
    rows = [_summary("m", 0.1, 0, 1.0, acc=0.5), _summary("m", 0.2, 0, 1.2, acc=0.7)]
    agg = cmp.aggregate(rows)
    assert agg["task"] == "image" and agg["best"]["m"]["lr"] == 0.2


def test_paired_differences_leave_a_diverged_seed_out_of_the_mean():
    rows = [_summary("muon", 0.01, 0, 3.0), _summary("muon", 0.01, 1, 3.1)]
    rows += [_summary("htmuon", 0.04, 0, 2.9), _summary("htmuon", 0.04, 1, math.inf)]
    diffs = cmp.paired_differences(cmp.aggregate(rows), "muon")["htmuon"]
    assert diffs["mean_std"][0] == pytest.approx(-0.1) and diffs["mean_std"][1] is None
    assert diffs["per_seed"][1] == math.inf
    assert diffs["ci95"] is None and (diffs["worse"], diffs["n"]) == (0, 1)  # one finite seed: no interval


def test_paired_differences_give_the_t_interval_of_the_mean_and_the_seeds_behind():
    """Four seeds, HTMuon behind on three: the 95% interval is Student's t with 3 degrees of freedom
    (t_0.975 = 3.1824, not the normal 1.96), and it holds 0 here; for accuracy, lower is worse."""
    gaps = [0.01, 0.03, -0.01, 0.05]
    rows = [_summary("muon", 0.01, s, 3.0 + s) for s in range(4)]
    rows += [_summary("htmuon", 0.04, s, 3.0 + s + g) for s, g in enumerate(gaps)]
    d = cmp.paired_differences(cmp.aggregate(rows), "muon")["htmuon"]
    m, sd = d["mean_std"]
    half = 3.182446305284263 * sd / 2.0
    assert d["ci95"] == pytest.approx((m - half, m + half)) and d["ci95"][0] < 0 < d["ci95"][1]
    assert (d["worse"], d["n"]) == (3, 4)
    tight = [_summary("muon", 0.01, s, 3.0) for s in range(3)]
    tight += [_summary("htmuon", 0.04, s, 3.0 + g) for s, g in enumerate([0.02, 0.021, 0.019])]
    assert cmp.paired_differences(cmp.aggregate(tight), "muon")["htmuon"]["ci95"][0] > 0  # excludes 0
    acc = [_summary("m", 0.1, s, 1.0, acc=0.9) for s in range(3)]
    acc += [_summary("h", 0.1, s, 1.0, acc=a) for s, a in enumerate([0.8, 0.95, 0.85])]
    d = cmp.paired_differences(cmp.aggregate(acc), "m")["h"]
    assert (d["worse"], d["n"]) == (2, 3)


# ----------------------------------------------------------------------------- the plan (a stand-in train)


def _args(**kw):
    base = dict(
        preset=None, config=None, optimizers="muon,htmuon", seeds="0,1", tune_seeds=None, lr_grid=None,
        adamw_lr_grid=None, extend_edges=0, compare_out=None, no_plots=True, alpha="false",
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def _fake_train(calls, optimum=0.05, aopt=3e-3):
    """A stand-in for loop.train: a bowl in log lr (minimum at ``optimum``, ``aopt``) plus a seed term."""

    def fake(cfg, resume=False, preset_lrs=None):
        cfg = resolve_config(cfg, preset_lrs)
        calls.append((cfg.optimizer, cfg.lr, cfg.adamw_lr, cfg.seed, cfg.out_dir))
        (Path(cfg.out_dir) / "config.json").write_text(json.dumps(to_dict(cfg)))
        loss = 4.0 + math.log(cfg.lr / optimum) ** 2 + 0.5 * math.log(cfg.adamw_lr / aopt) ** 2
        loss += 0.01 * cfg.seed + (0.1 if cfg.optimizer == "htmuon" else 0.0)
        return {
            "run_dir": cfg.out_dir, "optimizer": cfg.optimizer, "lr": cfg.lr, "seed": cfg.seed,
            "final_val_loss": loss, "final_val_acc": None, "ms_per_step": 1.0, "finished": True,
            "diverged": False, "mean_alpha": None, "elapsed_s": 1.0, "wall_s": 1.0,
        }  # fmt: skip

    return fake


def test_cells_run_seed_by_seed_so_a_partial_grid_is_paired(tmp_path, monkeypatch):
    """Selection and report cells go seed by seed across the optimizers: a study cut short (a
    llama-small cell takes hours) has whole seeds of every optimizer, not all seeds of the first."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    args = _args(
        optimizers="muon,htmuon", seeds="0,1", tune_seeds="10,11", lr_grid=["muon=0.01", "htmuon=0.02"],
        adamw_lr_grid=["muon=3e-3", "htmuon=3e-3"], compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    cmp.run_plan(cmp.plan_grid(args), quiet=True)
    order = [(seed, opt) for opt, _, _, seed, _ in calls]
    assert order == [(s, o) for s in (10, 11, 0, 1) for o in ("muon", "htmuon")]


def test_extend_edges_at_both_lrs_runs_the_corner(tmp_path, monkeypatch):
    """Both lrs at their high edge in the same round: the new matrix lr and the new AdamW-part lr are
    also tried together (before, each new value was paired only with the other lr's old values, so
    the corner was missing and the best stayed flagged at the edge)."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls, optimum=0.05, aopt=1e-2))
    args = _args(
        optimizers="muon", seeds="0", lr_grid=["muon=0.005,0.01"], adamw_lr_grid=["muon=1e-3,3e-3"],
        compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    res = cmp.run_plan(cmp.plan_grid(args), extend_edges=1, quiet=True)
    pairs = {(c[1], c[2]) for c in calls}
    assert pairs == {(lr, alr) for lr in (0.005, 0.01, 0.02) for alr in (1e-3, 3e-3, 9e-3)}
    assert len(calls) == 9  # the 4 first cells, then the 5 that complete the 3 x 3 product
    best = cmp.aggregate(res["select"])["best"]["muon"]
    assert (best["lr"], best["adamw_lr"]) == (0.02, 9e-3)


def test_extend_edges_follows_the_optimum_and_is_bounded(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    args = _args(
        optimizers="muon", seeds="0", lr_grid=["muon=0.005,0.01"], adamw_lr_grid=["muon=1e-3,3e-3,1e-2"],
        compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    plan = cmp.plan_grid(args)
    res = cmp.run_plan(plan, extend_edges=2, quiet=True)
    lrs = sorted({c[1] for c in calls})
    # 0.01 is the high edge -> 0.02, then 0.04; a third round would reach 0.08 but only 2 are allowed
    assert lrs == [0.005, 0.01, 0.02, 0.04] and res["extension_rounds"] == 2
    assert len(calls) == 4 * 3  # each new lr with every AdamW-part lr: the grid stays a full product
    best = cmp.aggregate(res["select"])["best"]["muon"]
    assert (best["lr"], best["adamw_lr"]) == (0.04, 3e-3)
    assert cmp.edge_flags(cmp.aggregate(res["select"])["rows"], best) == {"lr": "high", "adamw_lr": None}
    # no extension: the best stays at the edge and the table says so
    calls.clear()
    res0 = cmp.run_plan(cmp.plan_grid(args), extend_edges=0, quiet=True)
    table = cmp.markdown_table(cmp.aggregate(res0["report"]))
    assert "0.01 (0.005/0.01) **EDGE (high)**" in table
    assert "0.003 (0.001/0.003/0.01) |" in table


def test_tune_seeds_select_then_report_on_other_seeds_paired(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    args = _args(
        seeds="0,1,2", tune_seeds="7", lr_grid=["muon=0.02,0.05,0.1", "htmuon=0.02,0.05,0.1"],
        compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    plan = cmp.plan_grid(args)
    assert "selected on seeds 7" in plan.notes[0]
    res = cmp.run_plan(plan, quiet=True)
    assert {c[3] for c in calls if c[1] != 0.05} == {7}  # the grid ran on the tune seed only
    assert sorted((c[0], c[3]) for c in calls if c[3] != 7) == [
        (o, s) for o in ("htmuon", "muon") for s in (0, 1, 2)
    ]
    assert all(c[1] == 0.05 for c in calls if c[3] != 7)  # the reported seeds ran the best lr only
    agg = cmp.aggregate(res["report"])
    diffs = cmp.paired_differences(agg, "muon")["htmuon"]
    assert diffs["per_seed"] == pytest.approx({0: 0.1, 1: 0.1, 2: 0.1})
    assert diffs["mean_std"][0] == pytest.approx(0.1) and diffs["mean_std"][1] == pytest.approx(
        0.0, abs=1e-12
    )
    out = cmp.write_report(res, plan.out, "t", "htmuon compare ...", 1.0, plots=False, notes=plan.notes)
    md = (plan.out / "results.md").read_text()
    assert (
        "| htmuon | s0: +0.1000, s1: +0.1000, s2: +0.1000 | +0.1000 ± 0.0000 | [+0.1000, +0.1000] "
        "| 3 of 3 seeds |" in md
    )
    assert "selection seeds 7" in md and "0,1,2" in out["table"]


def test_one_lr_baselines_have_no_adamw_part_in_the_plan(tmp_path):
    """soap, cadamw and galore train every parameter at one lr: no AdamW-part lr in their cell, folder or
    notes (a fixed --adamw-lr would be reported as applied when it is not), and gridding it is refused."""
    from htmuon.cli import UserError

    plan = cmp.plan_grid(
        _args(optimizers="muon,soap,cadamw,galore,mars,cosmos", seeds="0", compare_out=str(tmp_path / "g"))
    )
    for spec in ("soap", "cadamw", "galore"):
        cell = plan.cell(spec, None, None, 0, "select")
        assert cell.adamw_lr is None and "alr" not in cell.cfg.out_dir
        assert not any(n.startswith(f"{spec}: AdamW-part lr") for n in plan.notes)
    for spec in ("muon", "mars", "cosmos"):  # these have one: it stays in the cell and the notes
        assert plan.cell(spec, None, None, 0, "select").adamw_lr is not None
        assert any(n.startswith(f"{spec}: AdamW-part lr") for n in plan.notes)
    with pytest.raises(UserError, match="galore has no AdamW part"):
        cmp.plan_grid(_args(optimizers="galore", adamw_lr_grid=["galore=0.01"]))


def test_lr_grid_per_spec_with_overrides(tmp_path):
    """A spec with its own overrides ('htmuon:p=0.25') takes its own grid; others fall back to the name's."""
    plan = cmp.plan_grid(
        _args(
            optimizers="muon,htmuon:p=0.25,htmuon", seeds="0", compare_out=str(tmp_path / "g"),
            lr_grid=["htmuon=0.02,0.04", "htmuon:p=0.25=0.08,0.16"],
            adamw_lr_grid=["htmuon:p=0.25=0.01,0.03"],
        )
    )  # fmt: skip
    assert plan.lrs == {"muon": [None], "htmuon:p=0.25": [0.08, 0.16], "htmuon": [0.02, 0.04]}
    assert plan.adamw_lrs["htmuon:p=0.25"] == [0.01, 0.03] and plan.adamw_lrs["htmuon"] == [None]
    assert cmp.parse_lr_grid(["muon=0.01,0.02"]) == {"muon": [0.01, 0.02]}


def test_a_presets_grid_for_an_optimizer_not_run_is_ignored(tmp_path):
    """The size-scan preset grids muon and htmuon; running only HTMuon specs from it is allowed (the
    preset's muon grid is not an error), while a grid the command line names for an absent optimizer is."""
    from htmuon.cli import UserError

    spec = "htmuon:method=fast,p=0.0625"
    plan = cmp.plan_grid(
        _args(preset="size-scan", optimizers=spec, seeds="0", compare_out=str(tmp_path / "g"),
              lr_grid=[f"{spec}=0.005,0.01"])
    )  # fmt: skip
    assert plan.specs == [spec] and plan.lrs[spec] == [0.005, 0.01]
    with pytest.raises(UserError, match="lr grid for 'muon', which is not among"):
        cmp.plan_grid(_args(preset="size-scan", optimizers=spec, seeds="0", lr_grid=["muon=0.01"]))


def _best(spec, p, loss):
    return {"spec": spec, "p": p, "val_loss": (loss, 0.01)}


def test_p_grid_plots_muon_and_htmuon_only(tmp_path, monkeypatch):
    """Fig. 8 is U s^p V^T over p: the plug-ins (their own p) and the other baselines are not points."""
    plotted = []
    monkeypatch.setattr(cmp, "_save", lambda fig, path: plotted.append(fig))
    specs = {
        "muon": 0.0, "htmuon:p=0.0625": 0.0625, "htmuon": 0.125, "normuon": 0.0,
        "htmuon-normuon": 0.125, "htmuon-adamuon": 0.25, "mars": None,
    }  # fmt: skip
    agg = {"task": "lm", "best": {s: _best(s, p, 4.0) for s, p in specs.items()}}
    assert cmp.plot_p_grid(agg, tmp_path / "p.png")
    labels = [t.get_text() for t in plotted[0].axes[0].get_legend().get_texts()]
    assert labels == ["muon (p=0)", "htmuon:p=0.0625 (p=0.0625)", "htmuon (p=0.125)"]
    plugins = {s: _best(s, p, 4.0) for s, p in specs.items() if s in ("muon", "normuon", "htmuon-normuon")}
    assert not cmp.plot_p_grid({"task": "lm", "best": plugins}, tmp_path / "q.png")  # one p of muon/htmuon


def test_compare_plots_write_losses_out_on_the_y_axis_without_an_offset(tmp_path, monkeypatch):
    """p_grid.png of losses 4.2731-4.2737 had ticks 0.0001 ... 0.0006 and "+4.273" at the top of the axis
    (matplotlib's offset notation); every plot of compare writes the values themselves now."""
    import io

    plotted = []
    monkeypatch.setattr(cmp, "_save", lambda fig, path: plotted.append(fig))
    specs = {"muon": (0.0, 4.2737), "htmuon:p=0.0625": (0.0625, 4.2731), "htmuon": (0.125, 4.2734)}
    best = {s: _best(s, p, loss) for s, (p, loss) in specs.items()}
    assert cmp.plot_p_grid({"task": "lm", "best": best}, tmp_path / "p.png")
    rows = [_row("muon", lr, None, loss) for lr, loss in ((0.01, 4.2731), (0.02, 4.2736))]
    best = {"muon": rows[0]}
    assert cmp.plot_lr_grid({"task": "lm", "rows": rows, "best": best}, tmp_path / "lr.png")
    for fig in plotted:
        for ax in fig.axes:
            assert ax.yaxis.get_major_formatter().get_useOffset() is False
        fig.savefig(io.BytesIO(), format="png")  # drawn: the ticks and the offset text are set
        ax = fig.axes[0]
        assert ax.yaxis.get_offset_text().get_text() == ""
        assert any(t.get_text().startswith("4.27") for t in ax.get_yticklabels())


def _curve_run(folder: Path, val: dict[int, float], steps: int = 8, eval_batches: int = 10) -> str:
    """A run folder with the records plot_curves reads: a train loss per step and ``val`` (the one at
    ``steps`` the evaluation at the end, on the whole split)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"steps": steps, "eval_batches": eval_batches, "final_eval_batches": 0})
    )
    recs = [{"step": s, "kind": "train", "loss": 8.0 - 0.5 * s} for s in range(1, steps + 1)]
    recs += [{"step": s, "kind": "val", "loss": v} for s, v in val.items()]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(folder)


def test_val_curves_draw_the_whole_split_end_point_apart_and_say_the_axis_is_zoomed(tmp_path, monkeypatch):
    """The validation points during training are windows of eval_batches batches, the last one the whole
    held-out split: it was joined to the windows' line, so every curve seemed to turn at its end. It is
    its own marker now, named in the legend; and the zoomed y-axis (AdamW's early curve off the chart)
    says so."""
    plotted = []
    monkeypatch.setattr(cmp, "_save", lambda fig, path: plotted.append(fig))
    best = {}
    for spec, start, end in (("adamw", 9.0, 4.6), ("muon", 5.0, 4.3)):
        runs = [
            _curve_run(tmp_path / spec / f"seed{seed}", {2: start, 4: 4.5, 6: 4.4 - 0.01 * seed, 8: end})
            for seed in (0, 1)
        ]
        best[spec] = {"spec": spec, "lr": 0.01, "adamw_lr": None, "n": 2, "run_dirs": runs}
    cmp.plot_curves({"task": "lm", "best": best}, tmp_path / "val_curves.png")
    ax = plotted[0].axes[1]
    joined = [ln for ln in ax.get_lines() if ln.get_linestyle() != "None"]
    assert [list(ln.get_xdata()) for ln in joined] == [[2, 4, 6], [2, 4, 6]]  # the windows only
    ends = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in ends] == [([8], [4.6]), ([8], [4.3])]
    assert [e.get_color() for e in ends] == [ln.get_color() for ln in joined]  # each its curve's colour
    # each later optimizer's marker smaller, on top: two ends 0.0006 apart (the main job's) both show
    sizes = [e.get_markersize() for e in ends]
    assert sizes[0] > sizes[1] and ends[0].get_zorder() < ends[1].get_zorder()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "during training: windows of 10 batches" in labels
    assert "at the end: the whole held-out split" in labels
    assert "zoomed" in ax.get_ylabel() and ax.get_ylim()[1] < 9.0  # AdamW's first point is off the chart
    # windows of 0 batches read the whole split too (the image presets): one line to the end, as before
    plotted.clear()
    folder = _curve_run(tmp_path / "whole" / "seed0", {2: 5.0, 4: 4.5, 8: 4.4}, eval_batches=0)
    best = {"muon": {"spec": "muon", "lr": 0.01, "adamw_lr": None, "n": 1, "run_dirs": [folder]}}
    cmp.plot_curves({"task": "lm", "best": best}, tmp_path / "whole.png")
    ax = plotted[0].axes[1]
    assert [list(ln.get_xdata()) for ln in ax.get_lines()] == [[2, 4, 8]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["muon (lr 0.01)"]


def test_val_curves_keep_the_end_point_on_the_line_when_not_every_seed_has_one(tmp_path, monkeypatch):
    """A seed whose config.json is gone (deleted with the checkpoints of a finished run; damaged) gives no
    end marker for its optimizer: the other seeds' final evaluations were taken off the line and drawn
    nowhere, so the optimizer's validation curve lost its last point. They stay on the line, as before
    the marker, and the legend does not name an end marker that is not drawn."""
    plotted = []
    monkeypatch.setattr(cmp, "_save", lambda fig, path: plotted.append(fig))
    runs = [_curve_run(tmp_path / "muon" / f"seed{s}", {2: 5.0, 4: 4.5, 8: 4.3 + 0.01 * s}) for s in (0, 1)]
    (Path(runs[1]) / "config.json").unlink()
    best = {"muon": {"spec": "muon", "lr": 0.01, "adamw_lr": None, "n": 2, "run_dirs": runs}}
    cmp.plot_curves({"task": "lm", "best": best}, tmp_path / "val_curves.png")
    ax = plotted[0].axes[1]
    assert [list(ln.get_xdata()) for ln in ax.get_lines()] == [[2, 4, 8]]  # the end on the line, no star
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["muon (lr 0.01)"]


def test_preset_lr_reused_at_another_horizon_is_flagged():
    plan = cmp.plan_grid(_args(preset="quick", optimizers="muon,htmuon", seeds="0", steps="1000"))
    text = "\n".join(plan.notes)
    assert "muon: lr 0.01 is the preset's, tuned at model='llama-tiny', steps=250" in text
    assert "WARNING: reused under steps=1000 (tuned at 250)" in text
    assert "htmuon: AdamW-part lr 0.0333 is the preset's, tuned at model='llama-tiny', steps=250" in text
    assert "re-tune with --adamw-lr-grid" in text
    same = cmp.plan_grid(_args(preset="quick", optimizers="muon", seeds="0"))
    assert not any("WARNING" in n for n in same.notes)
    where = "tuned at model='llama-tiny', steps=250, routing='standard'; not tuned here."
    assert f"muon: AdamW-part lr 0.111 is the preset's, {where}" in same.notes
    # the preset's lrs were tuned with each other: another AdamW-part lr is warned about on the matrix lr
    other = cmp.plan_grid(_args(preset="quick", optimizers="muon", seeds="0", adamw_lr="0.01"))
    text = "\n".join(other.notes)
    assert "muon: lr 0.01 is the preset's" in text and "reused under adamw_lr=0.01 (tuned at 0.111)" in text
    assert "muon: AdamW-part lr 0.01 fixed, not tuned" in text
    bare = cmp.plan_grid(_args(optimizers="muon", seeds="0"))  # no preset: the default, said so
    assert "muon: AdamW-part lr 0.001 (the default) fixed, not tuned" in "\n".join(bare.notes)


def test_preset_lr_notes_name_carried_values_other_models_spec_options_and_grids():
    notes = lambda **kw: "\n".join(cmp.plan_grid(_args(seeds="0", **kw)).notes)  # noqa: E731
    # values carried from another optimizer are not called tuned
    text = notes(preset="quick", optimizers="htmuon-normuon,normuon")
    carried = "carried from another optimizer's value tuned at model='llama-tiny'"
    assert f"htmuon-normuon: lr 0.01 is the preset's, {carried}" in text
    assert f"htmuon-normuon: AdamW-part lr 0.0333 is the preset's, {carried}" in text
    assert f"normuon: AdamW-part lr 0.0333 is the preset's, {carried}" in text
    assert "normuon: lr 0.01 is the preset's, tuned at" in text  # its matrix lr was tuned
    # the quick lrs reused on another model (smoke: llama-micro, 20 steps; gpt2-cpu: gpt2-tiny)
    assert "muon: lr 0.01 is the preset's, tuned at model='llama-tiny'" in (t := notes(preset="smoke"))
    assert "WARNING: reused under model='llama-micro' (tuned at 'llama-tiny'), steps=20" in t
    assert "reused under model='gpt2-tiny' (tuned at 'llama-tiny')" in notes(
        preset="gpt2-cpu", optimizers="muon"
    )
    # a spec that changes the update itself reuses the lr of the optimizer's own setting: warned
    text = notes(preset="quick", optimizers="htmuon:p=0.5")
    assert "htmuon:p=0.5: lr 0.04 is the preset's" in text and "reused under p=0.5 set in the spec" in text
    assert "WARNING" not in notes(preset="quick", optimizers="htmuon:method=svd")  # another backend: no
    # with the AdamW-part lr on a grid, the matrix lr's note does not depend on the grid's order
    for grid in (["muon=0.0333,0.111"], ["muon=0.111,0.37"]):
        assert "WARNING" not in notes(preset="quick", optimizers="muon", adamw_lr_grid=grid)
    # AdamW has no AdamW part: its lr's note does not name one (--adamw-lr is Muon's; for AdamW alone it
    # is refused: test_a_config_flag_that_no_cell_uses_is_refused)
    text = notes(preset="gpu-60m", optimizers="adamw,muon", adamw_lr="0.01")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("adamw:")]
    assert line.startswith(
        "adamw: lr 0.001 is the preset's, tuned at model='llama-60m', steps=10000, routing='paper';"
    )
    assert "WARNING" not in line


# ----------------------------------------------------------------------------- cell locks


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_cell_lock_exclusive_released_and_stale_taken_over(tmp_path):
    lock = tmp_path / "cell.lock"
    assert locks.acquire_lock(lock)
    assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
    assert locks.describe_owner(lock) == f"'{lock}' (process {os.getpid()} on {socket.gethostname()})"
    assert not locks.acquire_lock(lock)  # held by a live process (this one)
    locks.release_lock(lock)
    assert not lock.exists()
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # left by a killed compare
    assert locks.lock_is_stale(lock) and locks.acquire_lock(lock)
    assert lock.read_text().split()[0] == str(os.getpid())
    locks.release_lock(lock)
    lock.write_text(f"{_dead_pid()} another-host\n")  # a pid on another host cannot be checked: held
    assert not locks.acquire_lock(lock)
    # (so the message says how to free it: a container restarted under a new host name waited forever)
    assert locks.describe_owner(lock).endswith(
        "another host: it cannot be checked from here; delete the lock if that process is gone)"
    )
    lock.write_text("")  # being written by its owner: held
    assert not locks.acquire_lock(lock)
    old = time.time() - 2 * locks.UNPARSABLE_STALE_S  # left empty by a kill between create and write
    os.utime(lock, (old, old))
    assert locks.lock_is_stale(lock) and locks.acquire_lock(lock)
    locks.release_lock(lock)


def test_a_lock_whose_pid_is_not_alive_here_but_whose_flock_is_held_is_not_taken_over(tmp_path):
    """A process in another PID namespace under this host name (containers on the host's network)
    holds its lock's flock, but its PID is not alive here: its lock was taken over as a dead process's,
    so two processes ran the same cell. Held while the flock is; taken over once its holder is gone."""
    lock = tmp_path / "cell.lock"
    with flock_held_elsewhere(lock, f"{_dead_pid()} {socket.gethostname()}"):
        assert not locks.lock_is_stale(lock) and not locks.acquire_lock(lock)
    assert locks.lock_is_stale(lock) and locks.acquire_lock(lock)
    locks.release_lock(lock)
    assert not lock.exists()


def test_a_lock_naming_this_process_that_it_did_not_take_is_stale(tmp_path, monkeypatch):
    """A run killed while it was PID 1 of a container (its entrypoint) leaves "1 HOST"; the restarted
    container's process is PID 1 again on the same host name and finds its own PID in the lock. It did
    not take that lock: it is a leftover and is taken over (it used to count as held by a live
    process, so `train --resume` was refused and `compare` waited for its own cell forever). A lock
    this process did take stays held, also against itself."""
    lock = tmp_path / "cell.lock"
    mine = f"{os.getpid()} {socket.gethostname()}\n"
    lock.write_text(mine)  # left by the process that had this PID before
    assert locks.lock_holder(lock) == f"process {os.getpid()} on {socket.gethostname()}"
    locks.release_lock(lock)  # not taken by this process: not removed by it either
    assert lock.exists()
    assert locks.lock_is_stale(lock) and locks.acquire_lock(lock)
    assert not locks.lock_is_stale(lock) and not locks.acquire_lock(lock)  # now held, by this process
    assert locks.holds_lock(lock)
    locks.release_lock(lock)
    assert not lock.exists() and not locks.holds_lock(lock)
    lock.write_text(mine)  # a taken lock, released, then the same text again: a leftover again
    assert locks.lock_is_stale(lock)
    lock.unlink()

    # compare finds its own PID in a cell's lock: it runs the cell instead of waiting for itself
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))

    def wait(_s):
        raise AssertionError("compare waits for a cell whose lock names its own process")

    monkeypatch.setattr(cmp.time, "sleep", wait)
    cells = cmp.plan_grid(_args(optimizers="muon", seeds="0", compare_out=str(tmp_path / "g"))).select_cells()
    held = Path(cells[0].cfg.out_dir) / cmp.LOCK_NAME
    held.parent.mkdir(parents=True)
    held.write_text(mine)
    assert [r["seed"] for r in cmp.run_cells(cells, None, quiet=True)] == [0] and len(calls) == 1
    assert not held.exists()


@pytest.mark.skipif(locks.fcntl is None, reason="needs flock (POSIX)")
def test_a_lock_naming_this_pid_held_by_a_live_process_of_another_namespace_is_held(tmp_path):
    """Two containers on the host's network (one host name) whose entrypoints are both PID 1: the
    other's live lock names this process's PID and host. Its taker holds the lock file's flock, so it
    is held (taking it over ran two processes in one folder); once that process is gone, a leftover."""
    lock = tmp_path / "cell.lock"
    # the other container's PID 1 took the lock (its text names that PID: ours) and holds its flock
    holder = subprocess.Popen(
        [sys.executable, "-c", _FLOCK_HOLDER, str(lock), f"{os.getpid()} {socket.gethostname()}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert not locks.lock_is_stale(lock) and not locks.acquire_lock(lock)
        assert lock.read_text().split()[0] == str(os.getpid()) and not locks.holds_lock(lock)
    finally:
        holder.communicate("")  # it ends: the kernel drops its flock
    assert locks.lock_is_stale(lock) and locks.acquire_lock(lock) and locks.holds_lock(lock)
    locks.release_lock(lock)
    assert not lock.exists()


#: Creates the lock file argv[1] holding the text argv[2], flocks it, says "holding", waits for stdin.
_FLOCK_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
os.write(fd, (sys.argv[2] + "\n").encode())
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("holding", flush=True)
sys.stdin.read()
"""


#: A process that takes a lock (argv[1]) with locks.acquire_lock, stopping after each staleness check
#: until a line on stdin says to go on; it prints each check and, at the end, whether it won.
_STEPPED_TAKER = r"""
import sys
from pathlib import Path
from htmuon.train import locks
real = locks.lock_is_stale
def stepped(path):
    stale = real(path)
    print(f"checked {Path(path).name} {stale}", flush=True)
    sys.stdin.readline()
    return stale
locks.lock_is_stale = stepped
print(f"won {locks.acquire_lock(Path(sys.argv[1]))}", flush=True)
sys.stdin.readline()  # keeps what it won until the test is done
"""


class _SteppedTaker:
    def __init__(self, lock: Path, log: Path):
        src = Path(__file__).resolve().parents[1] / "src"
        self.err = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _STEPPED_TAKER, str(lock)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
            env={**os.environ, "PYTHONPATH": str(src)},
        )  # fmt: skip
        self.lines = [self.proc.stdout.readline().strip()]  # stopped at its first check (or done)

    @property
    def stopped(self) -> bool:
        return self.lines[-1].startswith("checked ")

    def step(self) -> None:
        """Let it go on to its next check or its end."""
        if self.stopped:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            self.lines.append(self.proc.stdout.readline().strip())

    def finish(self) -> None:
        while self.stopped:
            self.step()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.err):
            f.close()


def test_two_takers_of_a_stale_lock_and_a_stale_takeover_guard_cannot_both_win(tmp_path):
    """A lock left by a killed process, and beside it the takeover guard of a taker killed during its
    takeover. Two processes take the lock over at once, in the order that used to let both win: each
    found the guard stale; the first removed it and made its own, the second then removed the first
    one's fresh guard (its check and its removal were two steps) and made its own; both removed the
    lock and each created one, the second one's removed by the first. Exactly one may win, and the
    lock must name it."""
    lock = tmp_path / "cell.lock"
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    guard = tmp_path / "cell.lock.takeover"
    guard.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    a = b = None
    try:
        a = _SteppedTaker(lock, tmp_path / "a.err")
        a.step()  # the lock is stale; then (the guard checked, or taken) a stops
        b = _SteppedTaker(lock, tmp_path / "b.err")
        b.step()  # b finds the lock stale too, and goes on until its next check or its end
        a.step()  # a goes on: its takeover, up to its next check or its end
        b.finish()
        a.finish()
        won = [t for t in (a, b) if t.lines[-1] == "won True"]
        log = f"a: {a.lines}, b: {b.lines}"
        assert all(t.lines[-1] in ("won True", "won False") for t in (a, b)), log
        assert len(won) == 1, log
        assert lock.read_text().split() == [str(won[0].proc.pid), socket.gethostname()], log
        assert not guard.exists(), log
    finally:
        for t in (a, b):
            if t is not None:
                t.close()


def test_repeated_seeds_are_refused():
    for kw in (dict(seeds="0,1,0"), dict(seeds="0", tune_seeds="10,10")):
        with pytest.raises(UserError, match="lists a seed twice"):
            cmp.plan_grid(_args(**kw))


def test_run_cells_waits_for_a_cell_another_process_runs(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    plan = cmp.plan_grid(_args(optimizers="muon", seeds="0,1", compare_out=str(tmp_path / "g")))
    cells = plan.select_cells()
    held = os.path.join(cells[0].cfg.out_dir, cmp.LOCK_NAME)
    os.makedirs(cells[0].cfg.out_dir)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(held, "w") as f:
            f.write(f"{other.pid} {socket.gethostname()}\n")
        order = []

        def finish_other():
            time.sleep(0.5)
            order.append("other done")
            os.remove(held)  # the other process finishes its cell and releases the lock

        t = threading.Thread(target=finish_other)
        t.start()
        res = cmp.run_cells(cells, None, quiet=False, poll_s=0.05)
        t.join()
    finally:
        other.kill()
        other.wait()
    # the wait names the lock and its owner
    assert (
        f"waiting for 1 cell(s) another process runs: '{held}' (process {other.pid} on"
        in capsys.readouterr().err
    )
    # seed 1 ran at once; seed 0 only after the other process released it, and exactly once
    assert [c[3] for c in calls] == [1, 0] and order == ["other done"]
    assert [r["seed"] for r in res] == [0, 1]
    assert not any(p.name == cmp.LOCK_NAME for p in (tmp_path / "g").rglob("*"))


# ----------------------------------------------------------------------------- --status


def _recording_train(calls, optimum=0.05, model_params=None):
    """:func:`_fake_train` that also leaves a finished run's summary.json, as loop.train does, and
    records the model and its parameter count (``model_params``); ``optimum`` may be per model (read
    at each call, so a test can change it between commands)."""

    def train(cfg, resume=False, preset_lrs=None):
        opt = optimum[cfg.model] if isinstance(optimum, dict) else optimum
        s = _fake_train(calls, optimum=opt)(cfg, resume, preset_lrs)
        s.update(model=cfg.model, steps=cfg.steps, steps_done=cfg.steps)
        s["info"] = {"parameters": (model_params or {}).get(cfg.model, 1)}
        (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(s))
        return s

    return train


def _log_steps(run_dir: Path, steps, step_ms: float, val_loss: float) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"step": s, "kind": "train", "loss": 6.0, "step_ms": step_ms} for s in steps]
    recs.append({"step": steps[-1], "kind": "val", "loss": val_loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 9')


def test_status_gives_each_cells_state_and_time_left_and_trains_nothing(tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("--status must not train")

    monkeypatch.setattr("htmuon.train.loop.train", no_training)
    args = _args(
        seeds="0,1,2", lr_grid=["muon=0.01", "htmuon=0.02"], adamw_lr_grid=["muon=3e-3", "htmuon=3e-3"],
        compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    plan = cmp.plan_grid(args)
    cells = plan.select_cells()
    done, running, stopped, by_train, diverged, pruned = (Path(c.cfg.out_dir) for c in cells)
    config = {Path(c.cfg.out_dir): json.dumps(to_dict(c.cfg)) for c in cells}  # as loop.train writes it
    steps = plan.select_cells()[0].cfg.steps
    finished = dict(finished=True, diverged=False, steps_done=steps, final_val_loss=3.5, ms_per_step=500.0)
    for folder, summary in (
        (done, {**finished, "elapsed_s": 100.0, "wall_s": 150.0}),  # evaluations: 1.5x the step time
        (
            diverged,
            {**finished, "finished": False, "diverged": True, "steps_done": 40, "final_val_loss": math.inf},
        ),
        (pruned, finished),  # summary.json alone: not a run that loop.train reuses
    ):
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        if folder is not pruned:
            (folder / "config.json").write_text(config[folder])
    # the process that runs two of the cells (a lock naming this process, which did not take it, is
    # a leftover of a PID reused: see test_a_lock_naming_this_process_that_it_did_not_take_is_stale)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    _log_steps(running, [10, 20], 2000.0, 6.1)
    (running / cmp.LOCK_NAME).write_text(f"{live.pid} {socket.gethostname()}\n")  # a live process
    _log_steps(stopped, [50, 100], 1000.0, 5.2)  # a torn last line (a kill) is skipped
    (stopped / cmp.LOCK_NAME).write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # left by a kill
    _log_steps(by_train, [10], 1000.0, 6.5)
    (by_train / "run.lock").write_text(f"{live.pid} {socket.gethostname()}\n")  # htmuon train runs it
    try:
        result, text = cmp.plan_status(plan)
    finally:
        live.kill()
        live.wait()
    assert result is None  # not every cell is finished
    lines = text.splitlines()
    assert (
        lines[0] == f"{plan.out}: 6 cell(s) so far (1 done, 2 running, 1 stopped, 1 diverged, 1 not started)"
    )
    me = f"process {live.pid} on {socket.gethostname()}"

    def mins(seconds):
        return f"~{seconds / 60:.0f} min left"

    expected = [
        f"muon/lr0.01-alr0.003/seed0 done, step {steps}/{steps}, final val loss 3.5000, 0.50 s/step",
        f"htmuon/lr0.02-alr0.003/seed0 running ({me}), step 20/{steps}, last val loss 6.1000, 2.00 s/step, "
        + mins((steps - 20) * 2.0 * 1.5),
        f"muon/lr0.01-alr0.003/seed1 stopped, step 100/{steps}, last val loss 5.2000, 1.00 s/step, "
        + mins((steps - 100) * 1.0 * 1.5),
        f"htmuon/lr0.02-alr0.003/seed1 running (htmuon train, {me}), step 10/{steps}, last val loss 6.5000, "
        f"1.00 s/step, " + mins((steps - 10) * 1.0 * 1.5),
        "muon/lr0.01-alr0.003/seed2 diverged, step 40/" + f"{steps}, final val loss inf, 0.50 s/step",
        # the median speed of the cells listed (0.5, 2, 1, 1, 0.5 s/step)
        "htmuon/lr0.02-alr0.003/seed2 not started, " + mins(steps * 1.0 * 1.5),
    ]
    assert [" ".join(line.split()) for line in lines[1:7]] == expected
    left = ((steps - 20) * 2 + (steps - 100) + (steps - 10) + steps) * 1.5
    assert lines[7] == (
        f"~{left / 60:.0f} min of one process left for the cells listed "
        "(evaluations included at 1.50x the step time, as in the finished cells)"
    )
    assert len(lines) == 8  # no tune seeds, no extension: these are all the cells

    # nothing to read: every cell "not started", and the folder is not created
    empty = cmp.plan_grid(_args(compare_out=str(tmp_path / "none")))
    result, text = cmp.plan_status(empty)
    assert result is None and "(4 not started)" in text and "time left unknown" in text
    assert not (tmp_path / "none").exists()


def test_status_on_the_command_line_trains_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from htmuon.cli import main as cli_main

    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _recording_train(calls))
    argv = ["compare", "--optimizers", "muon", "--seeds", "0", "--lr-grid", "muon=0.02,0.05"]
    argv += ["--out-dir", str(tmp_path / "g"), "--no-plots", "--no-alpha", "--extend-edges", "1"]
    assert cli_main([*argv, "--status"]) == 0
    out = capsys.readouterr().out
    assert calls == [] and not (tmp_path / "g").exists()
    assert "2 cell(s) so far (2 not started)" in out
    assert "cells after these (edge extensions) are listed once these finish" in out
    assert cli_main(argv[:-2]) == 0 and len(calls) == 2  # the grid, no extension: 0.05 is at its edge
    capsys.readouterr()
    assert cli_main([*argv, "--status"]) == 0  # with --extend-edges 1: the extension round, listed
    out = capsys.readouterr().out
    assert "3 cell(s) so far (2 done, 1 not started)" in out and "muon/lr0.125-alr" in out
    assert "edge extensions" not in out  # its one round is listed: nothing more comes after it
    assert len(calls) == 2


def test_status_follows_the_plan_from_selection_to_the_report_cells(tmp_path, monkeypatch):
    """The cells --status lists are the ones the command would run: after a finished selection, the
    best cell on the reported seeds; once those are finished, the plan's result."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _recording_train(calls))
    args = _args(
        optimizers="muon", seeds="0,1", tune_seeds="7", lr_grid=["muon=0.02,0.05,0.1"],
        adamw_lr_grid=["muon=3e-3"], compare_out=str(tmp_path / "g"),
    )  # fmt: skip
    plan = cmp.plan_grid(args)
    result, text = cmp.plan_status(plan)
    assert result is None and text.count("[select]") == 3 and "[report]" not in text
    assert "cells after these (the best cells on the reported seeds) are listed once these finish" in text
    cmp.run_cells(plan.select_cells(), None, quiet=True)
    result, text = cmp.plan_status(plan)
    assert result is None and "5 cell(s) so far (3 done, 2 not started)" in text
    assert "listed once these finish" not in text  # the report is the last phase
    report = [line.split()[1] for line in text.splitlines() if "[report]" in line]
    assert report == ["muon/lr0.05-alr0.003/seed0", "muon/lr0.05-alr0.003/seed1"]  # the best lr, 0.05
    ran = cmp.run_plan(plan, quiet=True)
    calls.clear()
    result, text = cmp.plan_status(plan)
    assert calls == [] and text.endswith(
        "every cell is finished: the command writes (or has written) the report"
    )
    assert [(r["lr"], r["seed"]) for r in result["report"]] == [(r["lr"], r["seed"]) for r in ran["report"]]


def _scan_argv() -> list[str]:
    """``compare``: Muon, seed 0, llama-micro then llama-tiny, lrs carried (grids and folder to add)."""
    return [
        "compare",
        "--optimizers",
        "muon",
        "--models",
        "llama-micro,llama-tiny",
        "--carry-lrs",
        "--seeds",
        "0",
    ]


def test_status_of_a_size_scan_stops_where_the_next_models_lrs_are_not_known(tmp_path, monkeypatch, capsys):
    from htmuon.cli import main as cli_main

    calls = []
    params = {"llama-micro": 1, "llama-tiny": 8}
    monkeypatch.setattr("htmuon.train.loop.train", _recording_train(calls, optimum=0.01, model_params=params))
    out = tmp_path / "scan"
    argv = _scan_argv() + [
        "--lr-grid",
        "muon=0.005,0.01,0.02",
        "--adamw-lr-grid",
        "muon=3e-3",
        "--out-dir",
        str(out),
    ]
    argv += ["--no-plots", "--no-alpha"]
    assert cli_main([*argv, "--status"]) == 0
    text = capsys.readouterr().out
    assert f"llama-micro: {out / 'llama-micro'}: 3 cell(s) so far (3 not started)" in text
    assert (
        "llama-tiny: their lrs are carried from llama-micro's best cells; listed once it is finished" in text
    )
    assert calls == [] and not out.exists()
    subargs = [a if a != "llama-micro,llama-tiny" else "llama-micro" for a in argv]
    subargs.remove("--carry-lrs")
    assert cli_main(subargs) == 0  # the first model alone: its best matrix lr is 0.01
    capsys.readouterr()
    assert cli_main([*argv, "--status"]) == 0
    text = capsys.readouterr().out
    assert "llama-micro: " in text and "(3 done)" in text
    tiny = [line.split()[0] for line in text.splitlines() if "not started" in line and "seed0" in line]
    assert tiny == [f"muon/lr{lr}-alr0.003/seed0" for lr in ("0.005", "0.01", "0.02")]  # 1/2, 1, 2 x 0.01


# ----------------------------------------------------------------------------- schedule and budget


def test_warmup_fraction_scales_with_steps_and_step_count_stays_possible():
    for steps, want in ((250, 25), (1000, 100), (7, 1)):
        cfg = resolve_config(make_config(overrides=dict(steps=steps, warmup_fraction=0.1)))
        assert cfg.warmup_steps == want
    cfg = resolve_config(make_config(overrides=dict(steps=1000, warmup_steps=40)))
    assert cfg.warmup_steps == 40 and cfg.warmup_fraction is None
    # a step count given after a preset's fraction wins (defaults < preset < file < flags)
    cfg = make_config({"warmup_fraction": 0.1, "steps": 250}, None, {"warmup_steps": "7"}, strings=True)
    assert resolve_config(cfg).warmup_steps == 7
    # a fraction does not trip the step-count check of the (unused) default warmup_steps
    assert resolve_config(make_config(overrides=dict(steps=20, warmup_fraction=0.5))).warmup_steps == 10
    from htmuon.cli import UserError

    with pytest.raises(UserError, match="warmup_fraction"):
        make_config(overrides=dict(warmup_fraction=1.5))


def test_warmup_fraction_rounds_a_half_up_on_the_fraction_as_written():
    """``round(warmup_fraction * steps)`` rounded a half to even: 10% of 25 steps warmed up for 2, of 45
    for 4, 50% of 1 step for 0. A half rounds up now, on the decimal as written (the float 0.1 x 30 is
    3.0000000000000004: still 3, as a ceiling of the float would not give). The presets' warmups at
    their standard steps are unchanged (their runs resume and their stored configs still match)."""
    from htmuon.train.config import warmup_for
    from htmuon.train.presets import RUN_PRESETS

    cases = [(25, 0.1, 3), (45, 0.1, 5), (35, 0.1, 4), (1, 0.5, 1), (30, 0.1, 3), (24, 0.1, 2)]
    cases += [(4, 0.1, 0), (5, 0.1, 1), (10, 0.15, 2), (7, 0.1, 1)]
    for steps, fraction, want in cases:
        cfg = resolve_config(make_config(overrides=dict(steps=steps, warmup_fraction=fraction)))
        assert cfg.warmup_steps == warmup_for(fraction, steps) == want, (steps, fraction)
    # quick (250), the GPU LLaMA presets (10k / 20k / 60k), and the size scan's budgets (258 / 1132 / 4457,
    # the steps of its stored runs in results/)
    for name, steps, want in (("quick", 250, 25), ("gpt2-cpu", 250, 25), ("gpu-60m", 10_000, 1000),
                              ("gpu-135m", 20_000, 2000), ("gpu-350m", 60_000, 6000)):  # fmt: skip
        assert RUN_PRESETS[name].config["steps"] == steps
        assert warmup_for(RUN_PRESETS[name].config["warmup_fraction"], steps) == want
    for steps, want in ((258, 26), (1132, 113), (4457, 446)):
        assert warmup_for(RUN_PRESETS["size-scan"].config["warmup_fraction"], steps) == want


def test_tokens_per_param_budget_sets_steps():
    from htmuon.train.models import build_llama, count_parameters

    cfg = make_config(overrides=dict(model="llama-micro", vocab_size=320, seq_len=16, batch_size=2))
    n = count_parameters(build_llama("llama-micro", 320, 16))
    cfg = resolve_config(
        make_config(overrides={**vars(cfg), "tokens_per_param": 0.5, "warmup_fraction": 0.1})
    )
    assert cfg.steps == math.ceil(0.5 * n / 32) == budget_steps(cfg)
    assert (cfg.steps, cfg.warmup_steps) == (715, 72)  # 71.5: a half rounds up
    # a GPT-2 model counts its own parameters (it raised KeyError from the LLaMA builder before)
    from htmuon.train.models import build_gpt2

    gpt = make_config(overrides=dict(model="gpt2-micro", vocab_size=320, seq_len=16, batch_size=2))
    n_gpt = count_parameters(build_gpt2("gpt2-micro", 320, 16))
    gpt = resolve_config(make_config(overrides={**vars(gpt), "tokens_per_param": 0.5}))
    assert gpt.steps == math.ceil(0.5 * n_gpt / 32) and n_gpt != n


# ----------------------------------------------------------------------------- evaluation


def test_periodic_evaluations_rotate_over_the_split_and_the_final_one_reads_it_all(corpus_file, tmp_path):
    from htmuon.train.loop import build_data_and_model

    cfg = TrainConfig(
        **{**TINY_RUN, "data": str(corpus_file), "eval_batches": 1, "out_dir": str(tmp_path / "r")}
    )
    cfg = resolve_config(cfg)
    data, _, _ = build_data_and_model(cfg)
    n = (len(data.val_tokens) - 1) // cfg.seq_len
    assert n > 2 * cfg.batch_size  # several windows
    firsts = [next(data.val_batches(1, w))[0][0] for w in range(n)]
    # window w starts at sequence (w * batch) mod n: consecutive evaluations read other sequences
    assert not torch.equal(firsts[0], firsts[1])
    seen = {tuple(x.tolist()) for w in range(n) for xb, _ in data.val_batches(1, w) for x in xb}
    assert len(seen) == len({tuple(x.tolist()) for xb, _ in data.val_batches(0) for x in xb})
    assert sum(len(xb) for xb, _ in data.val_batches(0)) == n

    s = train(cfg)
    ck = checkpoint.load(tmp_path / "r" / "ckpt.pt")
    _, model, _ = build_data_and_model(cfg)
    model.load_state_dict(ck["model"])
    whole = evaluate(model, data, "lm", torch.device("cpu"), None, 0)["loss"]
    first = evaluate(model, data, "lm", torch.device("cpu"), None, 1)["loss"]
    assert s["final_val_loss"] == pytest.approx(whole, rel=1e-5)
    assert abs(whole - first) > 1e-4  # (so the check above tells the two apart)
    assert s["final_eval_s"] is not None and s["final_eval_s"] >= 0


# ----------------------------------------------------------------------------- weight decay


def test_independent_weight_decay_does_not_scale_with_lr():
    for lr in (0.01, 0.1):
        w = torch.nn.Parameter(torch.ones(4, 4))
        opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.05}], lr=lr)
        independent_weight_decay(opt)
        w.grad = torch.zeros_like(w)  # Adam's step is 0: only the decay moves the weights
        opt.step()
        assert torch.allclose(w.detach(), torch.full((4, 4), 0.95))  # 1 - wd, whatever the lr


def test_wd_mode_independent_in_a_run_saves_scaled_groups(corpus_file, tmp_path):
    cfg = TrainConfig(
        **{
            **TINY_RUN,
            "steps": 2,
            "data": str(corpus_file),
            "optimizer": "muon",
            "lr": 0.02,
            "adamw_lr": 0.004,
        },
        wd_mode="independent",
        weight_decay=0.1,
        out_dir=str(tmp_path / "r"),
    )
    train(cfg)
    groups = checkpoint.load(tmp_path / "r" / "ckpt.pt")["optimizer"]["param_groups"]
    wds = sorted({round(g["weight_decay"], 9) for g in groups})
    assert wds == [0.0, round(0.1 / 0.02, 9), round(0.1 / 0.004, 9)]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["wd_mode"] == "independent"


# ----------------------------------------------------------------------------- size scan


def test_models_runs_the_protocol_per_model_and_plots_the_gap(corpus_file, tmp_path):
    from htmuon.cli import main as cli_main

    out = tmp_path / "scan"
    keys = ("vocab_size", "seq_len", "batch_size", "eval_batches", "threads", "progress")
    argv = ["compare", "--optimizers", "muon,htmuon:method=eigh", "--models", "llama-micro,llama-tiny"]
    argv += ["--seeds", "0,1", "--data", str(corpus_file), "--out-dir", str(out), "--no-alpha"]
    argv += flags({**{k: TINY_RUN[k] for k in keys}, "steps": 3, "warmup_fraction": 0.34, "eval_every": 3})
    assert cli_main(argv) == 0
    gaps = {}
    for model in ("llama-micro", "llama-tiny"):
        res = json.loads((out / model / "results.json").read_text())
        assert {r["model"] for r in res["runs"]} == {model} and len(res["runs"]) == 4
        loss = {(r["spec"], r["seed"]): r["final_val_loss"] for r in res["runs"]}
        gaps[model] = [loss["htmuon:method=eigh", s] - loss["muon", s] for s in (0, 1)]  # paired by seed
    md = (out / "size_scan.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| llama-")]
    assert [r.split("|")[1].strip() for r in rows] == ["llama-micro", "llama-tiny"]  # by size
    n_micro, n_tiny = (float(r.split("|")[2].split()[0]) for r in rows)
    assert n_tiny > 4 * n_micro
    for row, model in zip(rows, ("llama-micro", "llama-tiny")):  # htmuon - muon, paired over 2 seeds
        d = gaps[model]
        cell = row.split("|")[5].strip()
        assert " (2 seeds; 95%: " in cell, cell
        shown = [float(x) for x in cell.split(" (")[0].split(" ± ")]  # to the printed digits
        assert all(
            abs(a - e) <= 0.5e-4 + 1e-9 for a, e in zip(shown, (statistics.mean(d), statistics.stdev(d)))
        )
    assert (out / "gap_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_size_scan_marks_a_size_of_one_seed(tmp_path):
    """A size with one seed so far has no spread: the table says "(1 seed)" and the plot draws it hollow
    and labelled, so it is not read as a mean."""
    rows = [
        {
            "model": "llama-mini",
            "parameters": 5.8e6,
            "steps": 10,
            "ref": "muon",
            "ref_loss": (3.5, 0.01),
            "diffs": {"htmuon": (0.05, 0.01)},
            "per_seed": {"htmuon": {0: 0.04, 1: 0.05, 2: 0.06}},
        },
        {
            "model": "llama-small",
            "parameters": 2.3e7,
            "steps": 20,
            "ref": "muon",
            "ref_loss": (3.17, None),
            "diffs": {"htmuon": (0.0476, None)},
            "per_seed": {"htmuon": {0: 0.0476}},
        },
    ]
    lines = [ln for ln in cmp.size_scan_table(rows).splitlines() if ln.startswith("| llama-")]
    assert lines[0].endswith("| +0.0500 ± 0.0100 (3 seeds; 95%: +0.0252 to +0.0748) |")  # t_0.975,2 = 4.30
    assert lines[1].endswith("| +0.0476 (1 seed) |")
    rows[1]["per_seed"]["htmuon"][1] = float("nan")  # a diverged seed does not count as a seed
    lines = [ln for ln in cmp.size_scan_table(rows).splitlines() if ln.startswith("| llama-")]
    assert lines[1].endswith("| +0.0476 (1 seed) |")
    cmp.plot_gap_vs_params(rows, tmp_path / "gap.png")
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_plot_draws_each_size_with_its_95_percent_interval(tmp_path, monkeypatch):
    """The error bars are the t interval of each mean (3 seeds: 4.30 s / sqrt(3), not the std), and a
    size of one seed has none."""
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.errorbar

    def record(ax, x, y, **kw):
        drawn.append(kw["yerr"])
        return real(ax, x, y, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", record)
    rows = [
        {"model": "a", "parameters": 1e6, "steps": 1, "ref": "muon", "ref_loss": (3.5, 0.01),
         "diffs": {"h": (0.05, 0.01)}, "per_seed": {"h": {0: 0.04, 1: 0.05, 2: 0.06}}},
        {"model": "b", "parameters": 2e7, "steps": 2, "ref": "muon", "ref_loss": (3.1, None),
         "diffs": {"h": (0.02, None)}, "per_seed": {"h": {0: 0.02, 1: math.nan}}},
    ]  # fmt: skip
    cmp.plot_gap_vs_params(rows, tmp_path / "gap.png")
    assert drawn[0] == pytest.approx((4.302652729911275 * 0.01 / math.sqrt(3), 0.0))


def test_size_scan_table_is_written_after_each_model(tmp_path, monkeypatch):
    """A scan cut short (here the third model's training fails) still has the table of the models done,
    saying which are left; the completed scan's table has no such line."""
    from htmuon.cli import main as cli_main

    calls = []
    sizes = {"llama-micro": 1, "llama-tiny": 8, "llama-mini": 40}

    def fake(cfg, resume=False, preset_lrs=None):
        if cfg.model == "llama-mini" and fail[0]:
            raise RuntimeError("the machine went away")
        s = _fake_train(calls)(cfg, resume, preset_lrs)
        return {**s, "model": cfg.model, "steps": cfg.steps, "info": {"parameters": sizes[cfg.model]}}

    fail = [True]
    monkeypatch.setattr("htmuon.train.loop.train", fake)
    out = tmp_path / "scan"
    argv = ["compare", "--optimizers", "muon,htmuon", "--models", "llama-micro,llama-tiny,llama-mini"]
    argv += ["--seeds", "0,1", "--out-dir", str(out), "--no-plots", "--no-alpha"]
    with pytest.raises(RuntimeError, match="the machine went away"):
        cli_main(argv)
    md = (out / "size_scan.md").read_text()
    rows = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| llama-")]
    assert rows == ["llama-micro", "llama-tiny"]
    assert "Done so far: llama-micro, llama-tiny; still to run: llama-mini." in md
    fail[0] = False
    assert cli_main(argv) == 0  # run again: now the third model trains too
    md = (out / "size_scan.md").read_text()
    rows = [ln.split("|")[1].strip() for ln in md.splitlines() if ln.startswith("| llama-")]
    assert rows == ["llama-micro", "llama-tiny", "llama-mini"] and "still to run" not in md


def test_carried_grids_center_each_specs_matrix_lr_and_keep_its_adamw_lr():
    best = {
        "muon": {"lr": 0.01, "adamw_lr": 0.111},
        "htmuon:method=fast,p=0.03125": {"lr": 0.04, "adamw_lr": 0.0333},
        "adamw": {"lr": 0.003, "adamw_lr": None},
    }
    g = cmp.carried_grids(best)
    assert g["lr_grid"] == [
        "muon=0.005,0.01,0.02",
        "htmuon:method=fast,p=0.03125=0.02,0.04,0.08",
        "adamw=0.0015,0.003,0.006",
    ]
    # every optimizer with an AdamW part on every AdamW-part lr chosen there (adamw has none)
    assert g["adamw_lr_grid"] == ["muon=0.0333,0.111", "htmuon:method=fast,p=0.03125=0.0333,0.111"]
    assert cmp.carried_grids(best, 1)["lr_grid"][0] == "muon=0.01"
    assert cmp.carried_grids(best, 1)["adamw_lr_grid"][0] == "muon=0.111"  # no selection: its own
    assert cmp.carried_grids(best, 5)["lr_grid"][0] == "muon=0.0025,0.005,0.01,0.02,0.04"
    # the items parse back to the same grids, full spec as the key
    assert cmp.parse_lr_grid(g["lr_grid"])["htmuon:method=fast,p=0.03125"] == [0.02, 0.04, 0.08]


def test_carry_lrs_tunes_the_next_model_around_the_last_ones_best(tmp_path, monkeypatch, capsys):
    """``--models A,B --carry-lrs``: B's cells are 1/2, 1, 2 x A's best matrix lr (extended past an edge)
    at A's best AdamW-part lr alone, and B's report says the lrs were carried."""
    from htmuon.cli import main as cli_main

    calls = []
    optima = {"llama-micro": 0.01, "llama-tiny": 0.04}  # the bigger model wants a larger lr here
    params = {"llama-micro": 1, "llama-tiny": 8, "llama-mini": 40}
    monkeypatch.setattr("htmuon.train.loop.train", _recording_train(calls, optima, model_params=params))
    out = tmp_path / "scan"
    argv = _scan_argv()
    argv += [
        "--lr-grid",
        "muon=0.005,0.01,0.02",
        "--adamw-lr-grid",
        "muon=1e-3,3e-3,1e-2",
        "--extend-edges",
        "1",
    ]
    argv += ["--out-dir", str(out), "--no-plots", "--no-alpha"]
    assert cli_main(argv) == 0
    tiny = [(lr, alr) for _, lr, alr, _, d in calls if "llama-tiny" in d]
    micro = [(lr, alr) for _, lr, alr, _, d in calls if "llama-micro" in d]
    assert len(micro) == 9 and {a for _, a in micro} == {1e-3, 3e-3, 1e-2}  # the full grid first
    # micro's best is (0.01, 3e-3): tiny tries 0.005, 0.01, 0.02 at 3e-3 only, then 0.04 past the high edge
    assert tiny == [(0.005, 3e-3), (0.01, 3e-3), (0.02, 3e-3), (0.04, 3e-3)]
    assert "lrs carried from llama-micro" in (out / "llama-tiny" / "results.md").read_text()
    assert "carried" not in (out / "llama-micro" / "results.md").read_text()

    # --carry-lrs 1: the carried cell alone, run on the reported seeds (no selection on --tune-seeds)
    calls.clear()
    argv2 = [a for a in argv if a != "--carry-lrs"] + [
        "--carry-lrs",
        "1",
        "--tune-seeds",
        "10",
        "--seeds",
        "0,1",
    ]
    argv2[argv2.index("--out-dir") + 1] = str(tmp_path / "scan1")
    assert cli_main(argv2) == 0
    tiny = sorted((lr, alr, seed) for _, lr, alr, seed, d in calls if "llama-tiny" in d)
    micro_best = json.loads((tmp_path / "scan1" / "llama-micro" / "results.json").read_text())["best"]["muon"]
    assert tiny == [(micro_best["lr"], micro_best["adamw_lr"], s) for s in (0, 1)]
    assert "--carry-lrs 1" in (tmp_path / "scan1" / "llama-tiny" / "results.md").read_text()
    assert cli_main(argv2[:-6] + ["--carry-lrs", "2"]) != 0
    assert "--carry-lrs must be an odd number of lrs (1, 3, 5, ...), got 2" in capsys.readouterr().err
    single = argv2[:-6] + ["--model", "llama-tiny", "--carry-lrs"]
    del single[single.index("--models") : single.index("--models") + 2]
    assert cli_main(single) != 0
    assert "--carry-lrs carries lrs from one model to the next: it needs --models" in capsys.readouterr().err

    # --carry-lrs 3,1: selection around micro's best on tiny, then tiny's best alone on mini (seeds 0, 1)
    calls.clear()
    optima["llama-mini"] = 0.04
    argv3 = [a if a != "llama-micro,llama-tiny" else "llama-micro,llama-tiny,llama-mini" for a in argv2]
    argv3[argv3.index("--carry-lrs") + 1] = "3,1"
    argv3[argv3.index("--out-dir") + 1] = str(tmp_path / "scan31")
    assert cli_main(argv3) == 0
    tiny_best = json.loads((tmp_path / "scan31" / "llama-tiny" / "results.json").read_text())["best"]["muon"]
    tiny = {lr for _, lr, _, _, d in calls if d.endswith("seed10") and "llama-tiny" in d}
    assert tiny == {0.005, 0.01, 0.02, 0.04}  # 1/2, 1, 2 x micro's best, extended past the edge
    mini = sorted((lr, alr, seed) for _, lr, alr, seed, d in calls if "llama-mini" in d)
    assert mini == [(tiny_best["lr"], tiny_best["adamw_lr"], s) for s in (0, 1)]
    capsys.readouterr()
    for bad, message in (
        ("3,1,1", "--carry-lrs 3,1,1 gives 3 widths, but 3 models have 2 step(s)"),
        ("3,x", "--carry-lrs takes odd numbers of lrs such as 3 or 3,1, got '3,x'"),
    ):
        argv3[argv3.index("--carry-lrs") + 1] = bad
        assert cli_main(argv3) != 0
        assert message in capsys.readouterr().err


def test_carry_widths_one_per_step_between_models():
    assert cmp.carry_widths("3", 3) == [3, 3]
    assert cmp.carry_widths("3,1", 3) == [3, 1]
    assert cmp.carry_widths("0", 4) == [0, 0, 0]
    assert cmp.carry_widths(None, 2) == [0]
    assert cmp.carry_widths("5", 1) == []
    from htmuon.cli import UserError

    for bad, value in (("2", "2"), ("3,-1", "-1"), ("3,0", "0")):
        with pytest.raises(UserError, match=f"odd number of lrs .*got {value}$"):
            cmp.carry_widths(bad, 3)
    with pytest.raises(UserError, match="odd numbers of lrs such as 3 or 3,1, got 'x'"):
        cmp.carry_widths("x", 3)


def test_report_machine_line_gives_the_runs_thread_count():
    """The report's machine line names the runs' torch threads (their config), not the reporting
    process's own count (issue 13's study found the report saying 2 for 1-thread runs)."""
    from htmuon.train.compare import machine

    assert "torch threads per run 1;" in machine(1)
    assert "torch threads per run torch's default" in machine(0)


def test_run_cells_reports_the_cells_folder_not_the_one_a_moved_summary_recorded(tmp_path, monkeypatch):
    """A finished run whose folder was moved keeps its old ``run_dir`` in summary.json; the report must
    read the cell's actual folder (issue 13's study had to patch a moved run by hand)."""
    calls = []
    fake = _fake_train(calls)

    def stale(cfg, resume=False, preset_lrs=None):
        s = fake(cfg, resume, preset_lrs)
        return {**s, "run_dir": "/nonexistent/old/place"}

    monkeypatch.setattr("htmuon.train.loop.train", stale)
    plan = cmp.plan_grid(_args(optimizers="muon", seeds="0", compare_out=str(tmp_path / "g")))
    cells = plan.select_cells()
    res = cmp.run_cells(cells, None, quiet=True)
    assert [r["run_dir"] for r in res] == [c.cfg.out_dir for c in cells]
    assert (Path(res[0]["run_dir"]) / "config.json").is_file()


def _merge_script():
    return load_script("merge_size_scan")


def test_merge_size_scan_pairs_each_model_with_its_one_reference(tmp_path):
    """scripts/merge_size_scan.py: one model's optimizers from two results.json (a SPEC filter picks
    one optimizer of the second); paired to the single Muon; a spec found in two files is refused."""

    def results(path, runs):
        for r in runs:
            r.update(phase="report", steps=100, info={"parameters": 1000})
        best = {r["spec"]: r for r in runs}
        path.write_text(json.dumps({"runs": runs, "best": best}))
        return str(path)

    a = results(tmp_path / "a.json", [_summary("muon", 0.01, s, 3.0 + s) for s in (0, 1)])
    b_rows = [_summary("muon", 0.01, s, 9.0) for s in (0, 1)] + [
        _summary("ht", 0.02, s, 3.1 + s) for s in (0, 1)
    ]
    b = results(tmp_path / "b.json", b_rows)
    merge = _merge_script()
    assert merge.main(["--out", str(tmp_path / "out"), "--add", "m", a, "--add", "m", f"{b}:ht"]) == 0
    md = (tmp_path / "out" / "size_scan.md").read_text()
    # b's Muon (9.0) was left out
    assert "| 3.5000 ± 0.7071 | +0.1000 ± 0.0000 (2 seeds; 95%: +0.1000 to +0.1000) |" in md, md
    assert f"- m: ht from `{b}`" in md and (tmp_path / "out" / "gap_vs_params.png").is_file()
    with pytest.raises(SystemExit, match="seed 0 of 'muon' comes from both"):
        merge.main(["--out", str(tmp_path / "o2"), "--add", "m", a, "--add", "m", b])
    # later seeds of the same cells, from another session's file: one row over all the seeds
    c = results(tmp_path / "c.json", [_summary("muon", 0.01, 2, 5.0), _summary("ht", 0.02, 2, 5.4)])
    args = ["--out", str(tmp_path / "o3"), "--add", "m", a, "--add", "m", f"{b}:ht", "--add", "m", c]
    assert merge.main(args) == 0
    md = (tmp_path / "o3" / "size_scan.md").read_text()
    assert "(3 seeds; 95%:" in md and f"- m: ht from `{b}` and `{c}`" in md, md
    other = results(tmp_path / "d.json", [_summary("ht", 0.04, 3, 5.0)])
    with pytest.raises(SystemExit, match="'ht' has the cell lr 0.04"):
        merge.main(["--out", str(tmp_path / "o4"), "--add", "m", f"{b}:ht", "--add", "m", other])


@pytest.mark.parametrize(
    "preset, model, steps, lrs",
    [
        ("gpu-60m", "llama-60m", 10_000, {"adamw": 1e-3, "muon": 0.01, "htmuon": 0.03}),
        ("gpu-135m", "llama-135m", 20_000, {"adamw": 1e-3, "muon": 0.01, "htmuon": 0.03}),
        ("gpu-350m", "llama-350m", 60_000, {"adamw": 1e-3, "muon": 5e-3, "htmuon": 5e-3}),
    ],
)
def test_gpu_llama_presets_are_the_papers_setup(preset, model, steps, lrs):
    """PAPER.md's LLaMA/C4 setup: vocabulary 32000, sequence 256, 512 sequences per step, warmup 10%,
    weight decay 0.1, embeddings and head in the spectral group, the paper's lrs; no gradient clipping
    (the paper's script leaves its max norm at 0); 350M: 60k steps, lr 5e-3 from its run scripts."""
    from htmuon.train.optimizers import resolve as resolve_optimizer
    from htmuon.train.presets import RUN_PRESETS

    p = RUN_PRESETS[preset]
    c = p.config
    assert (c["model"], c["steps"], c["vocab_size"], c["seq_len"]) == (model, steps, 32000, 256)
    assert c["batch_size"] * c["grad_accum"] == 512
    assert (c["warmup_fraction"], c["weight_decay"], c["routing"], c["grad_clip"]) == (0.1, 0.1, "paper", 0.0)
    assert {k: p.lrs[k] for k in lrs} == lrs
    cfg = resolve_optimizer(make_config(c, overrides={"optimizer": "htmuon"}), p.lrs)
    assert cfg.grad_clip == 0.0 and cfg.lr == lrs["htmuon"] and cfg.adamw_lr == 1e-3


def test_val_windows_pairs_runs_by_step_and_keeps_a_resumed_runs_last_value(tmp_path, capsys):
    """scripts/val_windows.py (the val_windows.csv of RESULTS.md's llama-small seeds): the steps both
    runs evaluated at, the last value of a step a resumed run logged twice, train rows ignored; a run
    without validation rows is named in the error."""
    vw = load_script("val_windows")

    def run(name, rows):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    ref = run("muon=lr", [{"step": s, "kind": "val", "loss": 5.0 - s / 100} for s in (50, 100, 150)])
    other = run(
        "ht",
        [
            {"step": 50, "kind": "val", "loss": 4.6},
            {"step": 60, "kind": "train", "loss": 9.0},
            {"step": 100, "kind": "val", "loss": 9.9},  # logged before the resume ...
            {"step": 100, "kind": "val", "loss": 4.1},  # ... and after it: this one counts
            {"step": 125, "kind": "val", "loss": 4.0},  # the reference has no such step
            {"step": 150, "kind": "val", "loss": 3.45},
        ],
    )
    out = tmp_path / "w.csv"
    assert vw.main(["--out", str(out), "--every", "100", "--run", "muon", ref, "--run", "p=1/32", other]) == 0
    assert out.read_text() == "step,muon,p=1/32\n50,4.5000,4.6000\n100,4.0000,4.1000\n150,3.5000,3.4500\n"
    printed = capsys.readouterr().out
    assert "step 100: p=1/32 +0.100" in printed and "step 150: p=1/32 -0.050" in printed
    assert "step 50:" not in printed  # only every 100th step and the last

    empty = run("empty", [{"step": 1, "kind": "train", "loss": 7.0}])
    assert vw.main(["--out", str(tmp_path / "x.csv"), "--run", "muon", ref, "--run", "e", empty]) == 1
    assert "empty/metrics.jsonl: no validation rows" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- input that would be ignored


def test_grid_input_that_no_cell_would_use_is_refused(tmp_path):
    """A grid given twice for one name (the first list was dropped), a grid that no spec takes (every
    spec of that name sets the lr itself, or has its own grid), a spec that sets a key twice, and a
    spec option the optimizer ignores all ran without them, silently; each is a one-line error now."""
    out = str(tmp_path / "g")
    for kw, msg in (
        (dict(optimizers="muon", lr_grid=["muon=0.01", "muon=0.02"]), "--lr-grid gives 'muon' twice"),
        (dict(optimizers="muon", adamw_lr_grid=["muon=0.01", "muon=0.1"]),
         "--adamw-lr-grid gives 'muon' twice"),
        (dict(optimizers="muon:lr=0.1", lr_grid=["muon=0.01,0.02"]),
         "--lr-grid muon=...: no optimizer runs it ('muon:lr=0.1' sets lr in the spec)"),
        (dict(optimizers="muon:adamw_lr=0.1", adamw_lr_grid=["muon=0.01,0.02"]),
         "--adamw-lr-grid muon=...: no optimizer runs it ('muon:adamw_lr=0.1' sets adamw_lr in the spec)"),
        (dict(optimizers="muon,htmuon:p=0.25", lr_grid=["htmuon=0.08", "htmuon:p=0.25=0.1"]),
         "--lr-grid htmuon=...: no optimizer runs it ('htmuon:p=0.25' has its own grid)"),
        (dict(optimizers="htmuon:p=0.25,p=0.5"), "optimizer spec 'htmuon:p=0.25,p=0.5' sets 'p' twice"),
        (dict(optimizers="muon,adamw:p=0.5"),
         "optimizer spec 'adamw:p=0.5' sets p: optimizer 'adamw' does not use it"),
        (dict(optimizers="muon,galore:adamw_lr=0.1"), "sets adamw_lr: optimizer 'galore' does not use it"),
        (dict(optimizers="muon", seeds="0,1.5"), "--seeds must be a comma-separated list of integers"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=re_escape(msg)):
            cmp.plan_grid(_args(compare_out=out, **kw))
    # a name's grid still reaches the specs that take it, beside one with its own lr
    plan = cmp.plan_grid(_args(optimizers="muon:lr=0.1,muon", lr_grid=["muon=0.01,0.02"], compare_out=out))
    assert plan.lrs == {"muon:lr=0.1": [None], "muon": [0.01, 0.02]}


def test_a_config_flag_that_no_cell_uses_is_refused(tmp_path):
    """`compare --optimizers adamw --p 0.5` trained AdamW without a word (htmuon train refuses --p for
    adamw), as did --adamw-lr beside an --adamw-lr-grid of the only spec that takes it (the grid's values
    won) and an option every spec sets itself. A flag that some cell uses is still taken."""
    out = str(tmp_path / "g")
    for kw, msg in (
        (dict(optimizers="adamw", p="0.5"),
         "--p: no optimizer of this grid uses it ('adamw' does not use it (not of the HTMuon family))"),
        (dict(optimizers="adamw,soap", adamw_lr="0.002"), "--adamw-lr: no optimizer of this grid uses it"),
        (dict(optimizers="muon", adamw_lr="0.002", adamw_lr_grid=["muon=0.001,0.003"]),
         "('muon' has an --adamw-lr-grid)"),
        (dict(optimizers="htmuon:p=0.25,adamw", p="0.5"), "('htmuon:p=0.25' sets p in the spec; 'adamw'"),
        (dict(optimizers="soap", adamw_beta1="0.8"), "--adamw-beta1: no optimizer of this grid uses it"),
    ):  # fmt: skip
        with pytest.raises(UserError, match=re_escape(msg)):
            cmp.plan_grid(_args(compare_out=out, **kw))
    plan = cmp.plan_grid(_args(optimizers="adamw,muon", p="0.5", adamw_lr="0.002", compare_out=out))
    cells = {c.spec: c.cfg for c in plan.select_cells()}
    assert cells["muon"].p == 0.5 and cells["muon"].adamw_lr == 0.002


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_models_are_all_checked_before_the_first_one_trains(tmp_path, monkeypatch, capsys):
    """A misspelt model in --models was found after the models before it had trained (hours, at
    llama-small); a model listed twice, and --model beside --models (which it silently lost to), were
    taken. Each is a one-line error before any training."""
    from htmuon.cli import main as cli_main

    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    base = ["compare", "--optimizers", "muon,htmuon", "--seeds", "0", "--out-dir", str(tmp_path / "s")]
    base += ["--no-plots", "--no-alpha"]
    for extra, msg in (
        (["--models", "llama-micro,llama-nope"], "unknown model preset 'llama-nope'"),
        (["--models", "llama-micro,llama-micro"], "--models lists a model twice: llama-micro,llama-micro"),
        (["--models", "llama-micro", "--model", "llama-tiny"], "--model llama-tiny and --models llama-micro"),
    ):
        assert cli_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert calls == [] and not (tmp_path / "s").exists()


def test_image_report_lists_every_cell_with_the_accuracy_it_was_selected_on():
    """Image cells are selected on accuracy; "All cells tried" showed only the loss, with the bold on a
    cell whose loss was not the lowest."""

    def row(lr, loss, acc):
        return {"spec": "muon", "lr": lr, "adamw_lr": 1e-3, "seeds": [0], "n": 1, "val_loss": (loss, None),
                "val_acc": (acc, None), "accs": {0: acc}, "losses": {0: loss}, "ms_per_step": (None, None),
                "mean_alpha": (None, None)}  # fmt: skip

    rows = [row(0.01, 0.30, 0.90), row(0.02, 0.35, 0.93)]  # the best accuracy has the higher loss
    agg = {"task": "image", "rows": rows, "best": {"muon": rows[1]}}
    table = cmp.markdown_table(agg)
    tried = table.split("All cells tried")[1]
    assert "| optimizer | lr | AdamW-part lr | seeds | val loss | val acc (%) |" in tried
    assert "| muon | 0.01 | 0.001 | 1 | 0.3000 | 90.00 |" in tried
    assert "| muon | 0.02 | 0.001 | 1 | 0.3500 | **93.00** |" in tried


def test_report_removes_an_earlier_reports_plots_and_skips_alpha_without_alpha(tmp_path, monkeypatch):
    """A report's folder kept the plots of an earlier report that this one does not draw (p_grid.png of a
    run with Muon, beside the results.md of one without), and --no-alpha still loaded every best
    cell's final model for alpha.png."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    plan = cmp.plan_grid(_args(optimizers="htmuon", seeds="0", compare_out=str(tmp_path / "g")))
    res = cmp.run_plan(plan, quiet=True)
    for name in ("p_grid.png", "lr_grid.png", "alpha.png", "notes.txt"):
        (plan.out / name).write_bytes(b"old")
    monkeypatch.setattr(cmp, "plot_curves", lambda agg, path: path.write_bytes(b"new"))
    monkeypatch.setattr(cmp, "plot_alpha_curves", lambda agg, path: False)  # (reads metrics.jsonl)

    def no_alpha(*a, **k):
        raise AssertionError("alpha.png analysed the final models of runs with alpha off")

    monkeypatch.setattr(cmp, "alpha_reports", no_alpha)
    out = cmp.write_report(res, plan.out, "t", "htmuon compare ...", 1.0, plots=True)
    assert out["files"] == ["val_curves.png"]
    assert sorted(p.name for p in plan.out.iterdir() if p.is_file()) == [
        "notes.txt", "results.json", "results.md", "val_curves.png"
    ]  # fmt: skip


def test_size_scan_of_the_reference_alone_has_a_whole_table_and_no_empty_plot(tmp_path, monkeypatch):
    rows = [{"model": "llama-micro", "parameters": 6e4, "steps": 3, "ref": "muon", "ref_loss": (5.9, None),
             "diffs": {}, "per_seed": {}}]  # fmt: skip
    lines = cmp.size_scan_table(rows).splitlines()
    assert lines[0] == "| model | parameters | steps | muon val loss |"
    assert [ln.count("|") for ln in lines] == [5, 5, 5]
    plotted = []
    monkeypatch.setattr(cmp, "plot_gap_vs_params", lambda rows, path: plotted.append(path))
    monkeypatch.setattr(cmp, "size_scan_rows", lambda per_model: rows)
    cmp.write_size_scan(tmp_path, "t", ["llama-micro"], {"llama-micro": {}}, no_plots=False)
    assert plotted == [] and "only muon was run" in (tmp_path / "size_scan.md").read_text()


def test_progress_lines_name_the_batch_they_count(tmp_path, monkeypatch, capsys):
    """The grid, each round of edge extensions and the report cells are counted from 1 each: the lines
    name which batch they count ("[1/2]" came three times in one command)."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    args = _args(optimizers="muon", seeds="0", tune_seeds="7", lr_grid=["muon=0.005,0.01"],
                 compare_out=str(tmp_path / "g"))  # fmt: skip
    cmp.run_plan(cmp.plan_grid(args), extend_edges=1, quiet=False)
    err = capsys.readouterr().err
    heads = [ln.split("]")[0] + "]" for ln in err.splitlines() if ln.startswith("[")]
    assert heads == ["[selection 1/2]", "[selection 2/2]", "[edge extension 1: 1/1]", "[report 1/1]"]


# ----------------------------------------------------------------------------- gaps found by mutation


def test_paired_differences_are_to_muon_wherever_it_is_listed():
    """The reference is Muon, not the first optimizer (the quick presets list adamw first)."""
    rows = [_summary("adamw", 1e-3, s, 3.5 + 0.01 * s) for s in range(2)]
    rows += [_summary("muon", 0.02, s, 3.0 + 0.01 * s) for s in range(2)]
    rows += [_summary("htmuon", 0.04, s, 2.9 + 0.01 * s) for s in range(2)]
    agg = cmp.aggregate(rows)
    assert cmp.reference_spec(agg) == "muon"
    diffs = cmp.paired_differences(agg, cmp.reference_spec(agg))
    assert set(diffs) == {"adamw", "htmuon"}
    assert diffs["adamw"]["mean_std"][0] == pytest.approx(0.5)
    table = cmp.markdown_table(agg)
    assert "Paired differences to muon" in table and "| time vs muon |" in table


def test_paired_differences_pair_only_the_seeds_both_ran():
    """A seed the reference did not run has no pair: it is left out, not a KeyError or a false pair."""
    rows = [_summary("muon", 0.02, s, 3.0) for s in (0, 1)]
    rows += [_summary("htmuon", 0.04, s, 3.1) for s in (0, 1, 2)]
    d = cmp.paired_differences(cmp.aggregate(rows), "muon")["htmuon"]
    assert set(d["per_seed"]) == {0, 1} and d["n"] == 2
    assert d["mean_std"][0] == pytest.approx(0.1)


def test_tune_seeds_report_flags_an_edge_of_the_selection_grid(tmp_path, monkeypatch):
    """Under --tune-seeds the reported seeds ran the best cell alone: its edge flag and the lrs tried
    come from the selection grid, not from that single cell ("fixed")."""
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train([]))
    args = _args(optimizers="muon", seeds="0", tune_seeds="7", lr_grid=["muon=0.005,0.01"],
                 compare_out=str(tmp_path / "g"))  # fmt: skip
    res = cmp.run_plan(cmp.plan_grid(args), quiet=True)
    table = cmp.markdown_table(cmp.aggregate(res["report"]), cmp.aggregate(res["select"]))
    assert "| 0.01 (0.005/0.01) **EDGE (high)** |" in table


def test_tune_seeds_report_the_best_cell_after_the_edge_extensions(tmp_path, monkeypatch):
    """The reported seeds run the best cell of the extended grid, not of the first one."""
    calls = []
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train(calls))
    args = _args(optimizers="muon", seeds="0", tune_seeds="7", lr_grid=["muon=0.005,0.01"],
                 compare_out=str(tmp_path / "g"))  # fmt: skip
    res = cmp.run_plan(cmp.plan_grid(args), extend_edges=2, quiet=True)
    assert res["extension_rounds"] == 2
    assert {(c[1], c[3]) for c in calls if c[3] == 0} == {(0.04, 0)}  # 0.005, 0.01 -> 0.02 -> 0.04
    assert [r["lr"] for r in res["report"]] == [0.04]


def test_independent_weight_decay_is_reported_as_wd_per_step_whatever_the_lr(tmp_path, monkeypatch):
    """wd_mode "independent" decays wd per step at peak lr (not lr x wd): the table's decay column and
    the report's text say so."""
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train([]))
    for mode, want in (("independent", "| 0.1; 0.1 |"), ("lr", "| 0.001; 0.0003 |")):
        args = _args(optimizers="muon", seeds="0", lr_grid=["muon=0.01"], adamw_lr_grid=["muon=3e-3"],
                     compare_out=str(tmp_path / mode), wd_mode=mode, weight_decay="0.1")  # fmt: skip
        plan = cmp.plan_grid(args)
        res = cmp.run_plan(plan, quiet=True)
        out = cmp.write_report(res, plan.out, "t", "htmuon compare ...", 1.0, plots=False)
        assert want in out["table"]
        md = (plan.out / "results.md").read_text()
        assert ("independent of lr" in md) == (mode == "independent")


def test_negative_extend_edges_is_refused():
    with pytest.raises(UserError, match="--extend-edges must be >= 0, got -1"):
        cmp.plan_grid(_args(extend_edges=-1))


def test_a_grid_of_finished_or_diverged_cells_has_nothing_left_to_train(tmp_path, monkeypatch):
    """A diverged cell is an outcome (its summary is reused), not a cell to train: re-running the
    command builds no optimizer and needs no data for it; a cell without its summary is still to train."""
    monkeypatch.setattr("htmuon.train.loop.train", _fake_train([]))
    plan = cmp.plan_grid(_args(optimizers="muon,htmuon", seeds="0", compare_out=str(tmp_path / "g")))
    res = cmp.run_plan(plan, quiet=True)
    for r in res["report"]:
        diverged = r["optimizer"] == "htmuon"
        summary = {**r, "finished": not diverged, "diverged": diverged}
        (Path(r["run_dir"]) / "summary.json").write_text(json.dumps(summary))
    assert cmp._specs_to_train(plan) == []
    (Path(res["report"][1]["run_dir"]) / "summary.json").unlink()
    assert cmp._specs_to_train(plan) == ["htmuon"]


def test_periodic_evaluations_of_a_run_read_window_k_at_the_kth(corpus_file, tmp_path, monkeypatch):
    """The loop passes evaluation k its window k (not window 0 every time), and the final evaluation
    the whole split."""
    from htmuon.train import loop

    seen, real = [], loop.evaluate

    def spy(model, data, task, device, amp, max_batches, window=0):
        seen.append((max_batches, window))
        return real(model, data, task, device, amp, max_batches, window)

    monkeypatch.setattr(loop, "evaluate", spy)
    cfg = {**TINY_RUN, "data": str(corpus_file), "steps": 7, "eval_every": 2, "eval_batches": 1}
    train(TrainConfig(**cfg, out_dir=str(tmp_path / "r")))
    assert seen == [(1, 1), (1, 2), (1, 3), (0, 0)]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_independent_weight_decay_resumes_as_the_run_went_on(corpus_file, tmp_path):
    """wd_mode "independent" divides each group's decay by its peak lr once: a resumed run keeps the
    saved groups' decay (dividing it again, by the scheduled lr of the checkpoint, decayed far more)."""
    kw = {**TINY_RUN, "data": str(corpus_file), "optimizer": "muon", "steps": 6, "ckpt_every": 2}
    kw.update(wd_mode="independent", weight_decay=0.1)
    train(TrainConfig(**kw, out_dir=str(tmp_path / "full")))
    train(TrainConfig(**kw, out_dir=str(tmp_path / "cut")), stop_after=3)
    assert train(TrainConfig(**kw, out_dir=str(tmp_path / "cut")), resume=True)["finished"]
    full, cut = (checkpoint.load(tmp_path / d / "ckpt.pt") for d in ("full", "cut"))
    wds = [[g["weight_decay"] for g in c["optimizer"]["param_groups"]] for c in (full, cut)]
    assert wds[1] == pytest.approx(wds[0]) and sorted(wds[0]) == pytest.approx([0.0, 0.1 / 0.02, 0.1 / 1e-3])
    assert _max_diff(full["model"], cut["model"]) < 1e-6


def test_image_task_never_selects_or_pairs_a_diverged_seeds_accuracy():
    """A diverged image run has no accuracy: it counted as 0, so an lr that diverged on one seed of
    three (0.95, 0.95, 0) beat a stable one (0.6) and became the best cell (the loss task never picks
    a non-finite cell), and a diverged seed entered the paired differences."""
    rows = [_summary("m", 0.1, s, 1.0, acc=0.6) for s in range(3)]
    rows += [_summary("m", 0.4, s, 0.5, acc=0.95) for s in range(2)] + [_summary("m", 0.4, 2, math.inf)]
    rows += [_summary("h", 0.1, s, 1.0, acc=0.9) for s in range(2)] + [_summary("h", 0.1, 2, math.inf)]
    agg = cmp.aggregate(rows)
    assert agg["task"] == "image" and agg["best"]["m"]["lr"] == 0.1
    assert not math.isfinite(next(r for r in agg["rows"] if r["lr"] == 0.4)["val_acc"][0])
    d = cmp.paired_differences(agg, "m")["h"]
    assert d["n"] == 2 and d["mean_std"][0] == pytest.approx(0.3) and d["worse"] == 0
    assert "| m | 0.4 | - | 3 | diverged | diverged |" in cmp.markdown_table(agg)


def test_an_image_grid_whose_every_run_diverged_is_reported_as_an_image_task():
    """The task was read from the accuracies alone: with every image run diverged (none has one), the
    report called the grid a language model's, with a "val ppl" column. The runs' model says it."""
    rows = [{**_summary(spec, 0.1, 0, math.inf), "model": "resnet-micro"} for spec in ("m", "h")]
    agg = cmp.aggregate(rows)
    assert agg["task"] == "image"
    table = cmp.markdown_table(agg)
    assert "val acc (%)" in table and "val ppl" not in table and "| m | - | 0.1 (0.1) (fixed) |" in table
    assert cmp.aggregate([{**r, "model": "llama-micro"} for r in rows])["task"] == "lm"


def test_a_lock_of_a_live_process_this_user_may_not_signal_is_held(tmp_path, monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: that process is alive,
    and its lock is not taken over (nor is the file touched)."""
    import errno

    lock = tmp_path / "cell.lock"
    text = f"{os.getpid() + 1} {socket.gethostname()}\n"
    lock.write_text(text)

    def kill(pid, sig):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(locks.os, "kill", kill)
    assert not locks.lock_is_stale(lock) and not locks.acquire_lock(lock)
    assert lock.read_text() == text


def test_a_takeover_checks_the_lock_again_under_its_guard(tmp_path, monkeypatch):
    """Between a taker's finding the lock stale and its taking the guard, another taker may have
    replaced it with its own live lock: under the guard the lock is checked again, not removed."""
    import contextlib

    lock = tmp_path / "cell.lock"
    lock.write_text(f"{_dead_pid()} {socket.gethostname()}\n")
    live = f"{os.getppid()} {socket.gethostname()}\n"  # a live process on this host, not this one
    real = locks._takeover_guard

    @contextlib.contextmanager
    def late_guard(path):
        with real(path) as alone:
            lock.unlink()
            lock.write_text(live)  # the other taker won while this one waited for the guard
            yield alone

    monkeypatch.setattr(locks, "_takeover_guard", late_guard)
    assert not locks.acquire_lock(lock)
    assert lock.read_text() == live


def test_a_spec_and_the_configs_optimizer_keys_reach_the_optimizer(tmp_path):
    """What a spec or flag sets is what trains: p, momentum, scale, the AdamW betas (HTMuon family),
    the AdamW betas of adamw, and no weight decay on adamw's vectors."""
    from torch import nn

    from htmuon.train.optimizers import build_optimizer

    model = nn.ModuleDict({"embed": nn.Embedding(8, 4), "mlp": nn.Linear(4, 4), "lm_head": nn.Linear(4, 8)})
    args = _args(optimizers="htmuon:p=0.25,momentum=0.8,scale=muon_rms", seeds="0", adamw_beta1="0.85",
                 adamw_beta2="0.97", compare_out=str(tmp_path / "g"))  # fmt: skip
    plan = cmp.plan_grid(args)
    cfg = plan.cell(plan.specs[0], None, None, 0, "select").cfg
    assert (cfg.p, cfg.momentum, cfg.scale) == (0.25, 0.8, "muon_rms")
    groups = build_optimizer(model, cfg).param_groups
    spectral = [g for g in groups if g["algorithm"] == "htmuon"]
    assert spectral and all((g["p"], g["momentum"], g["scale"]) == (0.25, 0.8, "muon_rms") for g in spectral)
    assert all(tuple(g["adamw_betas"]) == (0.85, 0.97) for g in groups)
    cfg = resolve_config(make_config(overrides=dict(optimizer="adamw", adamw_beta1=0.85, adamw_beta2=0.97)))
    groups = build_optimizer(model, cfg).param_groups
    assert all(tuple(g["betas"]) == (0.85, 0.97) for g in groups)
    assert {(p.ndim, g["weight_decay"]) for g in groups for p in g["params"]} == {(2, 0.1), (1, 0.0)}


def test_a_negative_weight_decay_is_refused_naming_the_key():
    with pytest.raises(UserError, match="config key 'weight_decay' must be >= 0, got -0.1"):
        make_config(overrides=dict(weight_decay=-0.1))


def test_evaluation_is_the_mean_over_examples_when_the_last_batch_is_smaller():
    """The split rarely divides into whole batches: the loss and accuracy are over every example
    (token), not the mean of the batches' means, which gives the short last batch a larger weight."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])

    class Split:
        def val_batches(self, max_batches, window=0):
            yield x[:4], y[:4]
            yield x[4:6], y[4:6]
            yield x[6:], y[6:]

    got = evaluate(model, Split(), "image", torch.device("cpu"), None, 0)
    with torch.no_grad():
        logits = model(x)
    want = torch.nn.functional.cross_entropy(logits, y).item()
    assert got["loss"] == pytest.approx(want, rel=1e-6)
    assert got["acc"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())


def test_a_size_scan_carrying_lrs_takes_adamw_lr_for_its_first_model_only(tmp_path, monkeypatch):
    """--adamw-lr with --models --carry-lrs sets the first model's AdamW-part lr; the later models carry
    theirs from the model before (an --adamw-lr-grid), so the flag is dropped there rather than refused as
    unused after the first model trained (nor silently lost to the grid)."""
    from htmuon.cli import main as cli_main

    calls = []
    monkeypatch.setattr(
        "htmuon.train.loop.train", _recording_train(calls, {"llama-micro": 0.01, "llama-tiny": 0.01})
    )
    argv = _scan_argv() + ["--lr-grid", "muon=0.005,0.01,0.02", "--adamw-lr", "0.002"]
    assert cli_main([*argv, "--out-dir", str(tmp_path / "scan"), "--no-plots", "--no-alpha"]) == 0
    assert {alr for *_, alr, _, d in calls if "llama-micro" in d} == {0.002}
    assert {alr for *_, alr, _, d in calls if "llama-tiny" in d} == {0.002}  # carried: micro's best
    assert len([d for *_, d in calls if "llama-tiny" in d]) == 3


def test_a_size_scan_carrying_lrs_keeps_the_lr_a_spec_sets_itself(tmp_path, monkeypatch):
    """--models A,B --carry-lrs with a spec that sets its own lr (muon:lr=0.01) carried a grid for it
    into B, which plan_grid refuses ("no optimizer runs it ... sets lr in the spec"): the scan stopped
    with that error after A had trained (hours at scale). The spec keeps its lr at every size; the
    others are carried as before."""
    from htmuon.cli import main as cli_main

    calls = []
    monkeypatch.setattr(
        "htmuon.train.loop.train", _recording_train(calls, {"llama-micro": 0.01, "llama-tiny": 0.01})
    )
    argv = [
        "compare",
        "--optimizers",
        "muon:lr=0.01,htmuon:adamw_lr=0.002",
        "--models",
        "llama-micro,llama-tiny",
    ]
    argv += ["--carry-lrs", "--seeds", "0", "--lr-grid", "htmuon=0.01,0.02", "--out-dir", str(tmp_path / "s")]
    assert cli_main([*argv, "--no-plots", "--no-alpha"]) == 0
    tiny = sorted((opt, lr, alr) for opt, lr, alr, _, d in calls if "llama-tiny" in d)
    # muon: its own lr, on the AdamW-part lrs chosen on micro (its 1e-3 and htmuon's 0.002)
    assert [c for c in tiny if c[0] == "muon"] == [("muon", 0.01, 1e-3), ("muon", 0.01, 0.002)]
    htmuon = [c for c in tiny if c[0] == "htmuon"]
    assert {c[2] for c in htmuon} == {0.002} and len(htmuon) == 3  # its own AdamW-part lr, 3 carried lrs
