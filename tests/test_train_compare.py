"""htmuon compare: the grid, the table (mean ± std over seeds, best lr), the plots."""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from helpers import TINY_RUN, flags, load_script  # noqa: E402
from htmuon.cli import main as cli_main  # noqa: E402
from htmuon.train.compare import aggregate, markdown_table, mean_std, parse_spec  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


# the tiny run, 4 steps, every flag the grid may take (alpha stays on: the alpha tests need it)
_GRID = ("model", "vocab_size", "seq_len", "batch_size", "eval_batches", "threads", "progress")
TINY = flags({**{k: TINY_RUN[k] for k in _GRID}, "steps": 4, "warmup_steps": 1, "eval_every": 2})


def test_compare_writes_table_and_plots_and_reuses_runs(corpus_file, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [
        "compare",
        "--optimizers",
        "muon,htmuon:method=eigh",
        "--seeds",
        "0,1",
        "--lr-grid",
        "muon=0.01,0.02",
    ]
    argv += ["--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    header = "| optimizer | backend | lr (tried) | AdamW-part lr (tried) | decay/step (matrix; AdamW part) "
    header += "| seeds |"
    assert header in md
    main_table = md.split("Paired differences")[0]
    rows = [ln for ln in main_table.splitlines() if ln.startswith("| muon |") or ln.startswith("| htmuon:")]
    assert len(rows) == 2 and all(" ± " in r for r in rows)
    # the backend that ran, "auto" resolved on this hardware (tests pin HTMUON_CPU_BF16=0: fp32 NS)
    assert rows[0].startswith("| muon | ns (NS5 polar), fp32 |") and rows[1].startswith(
        "| htmuon:method=eigh | eigh |"
    )
    # the lrs tried are listed, the untuned ones said so; muon's best is at an edge of {0.01, 0.02}
    assert "(0.01/0.02) **EDGE" in rows[0] and "0.001 (0.001) (fixed)" in rows[0]
    assert "| htmuon:method=eigh | s0: " in md and "selection and report share seeds 0,1" in md
    assert "htmuon:method=eigh: lr 0.03 is the optimizer's default, never tuned" in md
    tried = md.split("All cells tried")[1]
    assert tried.count("**") == 4  # two best cells in bold
    assert (out / "val_curves.png").read_bytes()[:8] == PNG
    res = json.loads((out / "results.json").read_text())
    assert (out / "lr_grid.png").read_bytes()[:8] == PNG
    assert len(res["runs"]) == 6 and {r["spec"] for r in res["runs"]} == {"muon", "htmuon:method=eigh"}
    # each row's numbers are its own best cell's runs: mean ± sample std over the seeds
    for spec, row in zip(("muon", "htmuon:method=eigh"), rows):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        best = res["best"][spec]
        runs = [r for r in res["runs"] if r["spec"] == spec and r["lr"] == best["lr"]]
        assert len(runs) == 2
        for col, key, digits in ((6, "final_val_loss", 4), (7, "final_val_ppl", 2), (10, "mean_alpha", 3)):
            vals = [r[key] for r in runs]
            # to the printed digits (a value on a rounding tie may print either way: no exact bits)
            shown = [float(x) for x in cells[col].split(" ± ")]
            expected = (statistics.mean(vals), statistics.stdev(vals))
            assert all(abs(a - e) <= 0.5 * 10**-digits + 1e-9 for a, e in zip(shown, expected)), (cells, col)
    best_muon = res["best"]["muon"]
    losses = {
        lr: [r["final_val_loss"] for r in res["runs"] if r["spec"] == "muon" and r["lr"] == lr]
        for lr in (0.01, 0.02)
    }
    assert best_muon["lr"] == min(losses, key=lambda lr: sum(losses[lr]))
    cfg = json.loads((out / "htmuon__method=eigh" / "lr0.03-alr0.001" / "seed1" / "config.json").read_text())
    assert (cfg["method"], cfg["seed"], cfg["p"]) == ("eigh", 1, 0.125)
    # a second call reuses the finished runs (their files are untouched) and rewrites the report
    ckpt = out / "muon" / "lr0.01-alr0.001" / "seed0" / "ckpt.pt"
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert ckpt.stat().st_mtime_ns == before
    assert "| muon |" in capsys.readouterr().out


def _muon_two_seeds(corpus_file, out, *extra: str) -> list[str]:
    """``htmuon compare`` of Muon on seeds 0 and 1, tiny runs of the corpus, into ``out``."""
    return ["compare", "--optimizers", "muon", "--seeds", "0,1", "--data", str(corpus_file)] + [
        "--out-dir",
        str(out),
        *TINY,
        *extra,
    ]


def test_compare_stopped_by_sigterm_keeps_the_cell_and_goes_on_when_run_again(
    corpus_file, tmp_path, monkeypatch, capsys
):
    import signal

    from htmuon.train import loop

    out = tmp_path / "grid"
    argv = _muon_two_seeds(corpus_file, out, "--ckpt-every", "0")
    real = loop.lr_factor

    def schedule(step, *a):  # SIGTERM while the first cell's step 3 runs
        if step == 3 and not (out / "muon" / "lr0.02-alr0.001" / "seed0" / "ckpt.pt").exists():
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_factor", schedule)
    assert cli_main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    cell = out / "muon" / "lr0.02-alr0.001" / "seed0"
    assert err == (
        "htmuon compare: stopped by SIGTERM: the cell muon lr=0.02 seed=0 stopped after step 3 "
        f"(checkpoint in {cell}); run the same command again to go on"
    )
    assert not (cell / "cell.lock").exists() and not (cell / "summary.json").exists()
    assert not (out / "muon" / "lr0.02-alr0.001" / "seed1").exists()  # the next cell was not started
    assert not (out / "results.md").exists()
    monkeypatch.undo()
    assert cli_main(argv) == 0  # the same command: resumes the cell from step 3, runs the rest
    assert json.loads((cell / "run.json").read_text())["resumed_from_steps"] == [3]
    assert json.loads((out / "results.json").read_text())["best"]["muon"]["n"] == 2


def test_compare_signalled_in_a_cells_last_step_stops_once(corpus_file, tmp_path, monkeypatch, capsys):
    """The cell finishes (a signal in the last step is too late to stop it) and compare stops before the
    next cell; run again, compare reuses that cell and goes on: the signal is not kept with it."""
    import signal

    from htmuon.train import loop

    out = tmp_path / "grid"
    argv = _muon_two_seeds(corpus_file, out)
    real = loop.lr_factor
    sent = []

    def schedule(step, *a):  # SIGTERM in the first cell's last step (4)
        if step == 4 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_factor", schedule)
    assert cli_main(argv) == 128 + signal.SIGTERM
    assert "the cell muon lr=0.02 seed=0 finished its run" in capsys.readouterr().err
    cell = out / "muon" / "lr0.02-alr0.001" / "seed0"
    assert json.loads((cell / "summary.json").read_text())["finished"]
    assert not (out / "muon" / "lr0.02-alr0.001" / "seed1").exists()
    assert cli_main(argv) == 0  # (the patch is still there: it sends nothing more)
    assert json.loads((out / "results.json").read_text())["best"]["muon"]["n"] == 2


def test_compare_image_task_reports_accuracy(tmp_path):
    out = tmp_path / "img"
    argv = ["compare", "--optimizers", "adamw,htmuon", "--model", "resnet-micro", "--steps", "3"]
    argv += ["--warmup-steps", "1", "--batch-size", "16", "--eval-every", "3", "--eval-batches", "2"]
    argv += ["--threads", "1", "--progress", "none", "--no-alpha", "--out-dir", str(out)]
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    assert "val acc (%)" in md and "| htmuon |" in md
    assert (out / "val_curves.png").read_bytes()[:8] == PNG
    # the accuracy column is a percentage: 100 x each optimizer's final validation accuracy (one seed)
    res = json.loads((out / "results.json").read_text())
    lines = md.splitlines()
    header = next(ln for ln in lines if ln.startswith("| optimizer |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("val acc (%)")
    for spec in ("adamw", "htmuon"):
        row = next(ln for ln in lines if ln.startswith(f"| {spec} |"))
        (run,) = [r for r in res["runs"] if r["spec"] == spec]
        assert 0.0 <= run["final_val_acc"] <= 1.0
        assert [c.strip() for c in row.strip("|").split("|")][col] == f"{100 * run['final_val_acc']:.2f}"


def test_aggregate_mean_std_and_best_lr():
    runs = [
        {"spec": "a", "lr": 0.1, "seed": s, "final_val_loss": v, "final_val_acc": None, "ms_per_step": 2.0,
         "run_dir": "x"}
        for s, v in ((0, 3.0), (1, 3.2))
    ] + [
        {"spec": "a", "lr": 0.2, "seed": 0, "final_val_loss": math.inf, "final_val_acc": None,
         "ms_per_step": 2.0, "run_dir": "y", "diverged": True}
    ]  # fmt: skip
    agg = aggregate(runs)
    best = agg["best"]["a"]
    assert best["lr"] == 0.1 and best["val_loss"][0] == pytest.approx(3.1)
    assert best["val_loss"][1] == pytest.approx(math.sqrt(0.02))
    assert best["val_ppl"][0] == pytest.approx((math.exp(3.0) + math.exp(3.2)) / 2)
    table = markdown_table(agg)
    assert "3.1000 ± 0.1414" in table and "diverged" in table and "**EDGE (low)**" in table
    assert mean_std([1.0]) == (1.0, None)


def test_bad_grid_input(capsys, tmp_path):
    for argv, msg in (
        (["--optimizers", "muon,lamb"], "unknown optimizer 'lamb'"),
        (["--optimizers", "muon", "--seeds", "0,x"], "--seeds must be a comma-separated list"),
        (["--optimizers", "htmuon:p"], "expected key=value"),
        (["--optimizers", "htmuon:q=1"], "unknown config key 'q'"),
        (["--optimizers", "htmuon:methd=svd"], "spec 'htmuon:methd=svd' (did you mean 'method'?)"),
        (["--optimizers", "htmuon:p=abc"], "config key 'p' must be a number or null, got 'abc'"),
        (["--optimizers", "muon", "--lr-grid", "muon=-1"], "learning rates must be > 0"),
        ([], "give --preset"),
        (["--optimizers", "adamw", "--adamw-lr-grid", "adamw=0.01"], "adamw has no AdamW part"),
        (["--optimizers", "muon", "--lr-grid", "htmuon=0.01"], "lr grid for 'htmuon', which is not among"),
        (["--optimizers", "muon", "--seeds", "0,1", "--tune-seeds", "1,2"], "overlap"),
        (["--preset", "smoke", "--optimizers", ""], "--optimizers is empty"),
        (["--preset", "smoke", "--seeds", " "], "--seeds is empty"),
        # checked before any cell trains (they were found when their cell started, after the others)
        (["--optimizers", "muon,htmuon:method=nope", *TINY], "optimizer 'htmuon': Invalid method: 'nope'"),
        (["--optimizers", "muon", *TINY, "--data", str(tmp_path / "none.txt")], "none.txt' not found"),
    ):
        assert cli_main(["compare", "--out-dir", str(tmp_path / "g"), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "g").exists()
    assert parse_spec("htmuon:method=ns,p=0.25") == ("htmuon", {"method": "ns", "p": "0.25"})


def test_compare_refuses_a_blank_out_dir(tmp_path, monkeypatch, capsys):
    """`--out-dir "$DIR"` with the variable unset gave '', which fell back to runs/compare-NAME without a
    word (``htmuon train`` refuses a blank out_dir): a one-line error now, with --status and --models too."""
    monkeypatch.chdir(tmp_path)
    assert TINY[:2] == ["--model", "llama-micro"]
    for extra in (TINY[:2], [*TINY[:2], "--status"], ["--models", "llama-micro"]):
        for blank in ("", "  "):
            assert cli_main(["compare", "--optimizers", "muon", *TINY[2:], "--out-dir", blank, *extra]) == 2
            err = capsys.readouterr().err.strip()
            assert err == (
                "htmuon compare: error: --out-dir must be a folder, not blank (a blank path is the current "
                f"folder; leave it out for runs/compare-custom), got {blank!r}"
            )
    assert list(tmp_path.iterdir()) == []  # no runs/compare-custom


def test_compare_uses_diagnostics_for_alpha_when_present(corpus_file, tmp_path, monkeypatch):
    """The table's mean alpha and alpha.png come from htmuon.diagnostics (stand-ins for its analyze and
    plot_layer_alpha here, whose alpha depends on the trained weights), each row from its own run."""
    import htmuon.diagnostics
    import htmuon.diagnostics.plots

    class Report:
        def __init__(self, model):
            self.mean_alpha = 2.0 + float(sum(p.detach().double().sum() for p in model.parameters())) % 1

    def plot_layer_alpha(reports, path):
        assert set(reports) == {"muon", "htmuon"} and all(isinstance(r, Report) for r in reports.values())
        Path(path).write_bytes(PNG + b"stand-in")

    monkeypatch.setattr(htmuon.diagnostics, "analyze", lambda model, fit="ks": Report(model))
    monkeypatch.setattr(htmuon.diagnostics.plots, "plot_layer_alpha", plot_layer_alpha)
    out = tmp_path / "alpha"
    argv = [
        "compare",
        "--optimizers",
        "muon,htmuon",
        "--data",
        str(corpus_file),
        "--out-dir",
        str(out),
        *TINY,
    ]
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    assert "![alpha.png](alpha.png)" in md and (out / "alpha.png").read_bytes()[:8] == PNG
    runs = {r["spec"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert all(2.0 <= r["mean_alpha"] < 3.0 for r in runs.values())
    assert runs["muon"]["mean_alpha"] != runs["htmuon"]["mean_alpha"]  # each row's own run, below
    for spec in ("muon", "htmuon"):
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {spec} |"))
        assert row.rstrip(" |").split("|")[-1].strip() == f"{runs[spec]['mean_alpha']:.3f}"


def test_alpha_reports_leave_out_an_optimizer_whose_best_cell_diverged_on_every_seed(tmp_path, monkeypatch):
    """A grid whose every lr diverged before its first checkpoint has no final model: the report
    (alpha.png) leaves that optimizer out instead of failing on its missing checkpoint (it failed the
    whole report, every time compare was run again); another seed of a cell that did not diverge is
    used where the first diverged."""
    from htmuon.train import compare

    loaded = []
    monkeypatch.setattr(compare, "_final_model", lambda run_dir: loaded.append(run_dir.name) or run_dir.name)
    monkeypatch.setattr("htmuon.diagnostics.analyze", lambda model, fit="ks": f"report of {model}")
    runs = [
        {"spec": "muon", "lr": 1e6, "adamw_lr": 0.1, "seed": 0, "final_val_loss": math.inf},
        {"spec": "muon", "lr": 1e6, "adamw_lr": 0.1, "seed": 1, "final_val_loss": math.inf},
        {"spec": "adamw", "lr": 1e-3, "adamw_lr": None, "seed": 0, "final_val_loss": math.inf},
        {"spec": "adamw", "lr": 1e-3, "adamw_lr": None, "seed": 1, "final_val_loss": 5.0},
    ]
    for r in runs:
        r.update(run_dir=str(tmp_path / f"{r['spec']}-seed{r['seed']}"), ms_per_step=None)
    assert compare.alpha_reports(aggregate(runs)) == {"adamw": "report of adamw-seed1"}
    assert loaded == ["adamw-seed1"]
    assert compare.alpha_reports(aggregate(runs[:2])) is None


def test_rerunning_a_finished_compare_needs_no_data(corpus_file, tmp_path):
    """The checks before training cover only cells left to train: a finished grid's tables are rebuilt
    with its corpus gone (the data check refused it; the alpha plot, which rebuilds the final model,
    still needs the data: --no-plots)."""
    data = tmp_path / "corpus.txt"
    data.write_bytes(corpus_file.read_bytes())
    argv = ["compare", "--optimizers", "muon", "--data", str(data), "--out-dir", str(tmp_path / "g"), *TINY]
    argv.append("--no-plots")
    assert cli_main(argv) == 0
    data.unlink()
    (tmp_path / "g" / "results.md").unlink()
    assert cli_main(argv) == 0 and (tmp_path / "g" / "results.md").is_file()


def test_alpha_every_records_alpha_during_training_and_plots_it(corpus_file, tmp_path):
    """--alpha-every N: "alpha" records every N steps (the real diagnostics), the last one equal to the
    summary's end-of-run alpha, and a curve plot over training in the report."""
    out = tmp_path / "alpha-every"
    argv = ["compare", "--optimizers", "muon,htmuon:method=eigh", "--alpha-every", "2"]
    argv += ["--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main(argv) == 0
    for spec in ("muon", "htmuon__method=eigh"):
        run = next((out / spec).glob("lr*/seed0"))
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        alpha = [r for r in recs if r["kind"] == "alpha"]
        assert [r["step"] for r in alpha] == [2, 4]
        assert all(math.isfinite(r["mean_alpha"]) and r["mean_alpha"] > 1 for r in alpha)
        summary = json.loads((run / "summary.json").read_text())
        assert alpha[-1]["mean_alpha"] == pytest.approx(summary["mean_alpha"], rel=1e-12)
        assert "mean_alpha" in (run / "metrics.csv").read_text().splitlines()[0]
    md = (out / "results.md").read_text()
    assert "![alpha_curves.png](alpha_curves.png)" in md
    assert (out / "alpha_curves.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "bf16, optimizer, method, expected",
    [
        ("0", "htmuon", "auto", "eigh"),  # an AVX2-only CPU
        ("1", "htmuon", "auto", "fast, bf16"),  # an AMX / AVX-512-BF16 CPU
        ("1", "muon", "ns", "ns (NS5 polar), bf16"),
        ("0", "htmuon", "svd", "svd"),
        ("0", "adamw", None, None),
    ],
)
def test_backend_label_names_what_auto_resolves_to(bf16, optimizer, method, expected, monkeypatch):
    from htmuon.train.config import TrainConfig
    from htmuon.train.optimizers import backend_label, resolve

    monkeypatch.setenv("HTMUON_CPU_BF16", bf16)
    cfg = resolve(TrainConfig(optimizer=optimizer, method=method))
    assert backend_label(cfg, "cpu") == expected


def _alpha_column(md: str, spec: str) -> str:
    row = next(ln for ln in md.splitlines() if ln.startswith(f"| {spec} |"))
    return row.rstrip(" |").split("|")[-1].strip()


def test_report_is_written_when_a_finished_cells_checkpoints_were_deleted(corpus_file, tmp_path, capsys):
    """Deleting a finished cell's checkpoints is supported (docs/harness.md): compare reuses its summary,
    and its report (alpha.png rebuilds each optimizer's final model) failed with "no checkpoint at
    .../ckpt.pt" (rc 2, results.md not rewritten). The report is written: the table's mean alpha is the
    summary's (else the alpha logged at the last step), alpha.png leaves the cell out, and a note names
    it; a cell whose run recorded no mean alpha at all is named too."""
    out = tmp_path / "g"
    argv = ["compare", "--optimizers", "adamw,muon", "--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main(argv) == 0
    muon = next((out / "muon").glob("lr*/seed0"))
    cell = str(muon.relative_to(out))
    summary = json.loads((muon / "summary.json").read_text())
    assert summary["mean_alpha"] > 1
    for ckpt in muon.glob("ckpt*.pt"):
        ckpt.unlink()
    (out / "results.md").unlink()
    (out / "alpha.png").unlink()
    capsys.readouterr()

    assert cli_main(argv) == 0, capsys.readouterr().err
    md = (out / "results.md").read_text()
    left_out = (
        f"alpha.png leaves out the cell(s) {cell}: finished, but their checkpoints were deleted, so their "
        "final weights are gone"
    )
    assert left_out in md and left_out in capsys.readouterr().out
    assert (out / "alpha.png").read_bytes()[:8] == PNG and "![alpha.png](alpha.png)" in md  # adamw's
    assert _alpha_column(md, "muon") == f"{summary['mean_alpha']:.3f}"
    assert "mean alpha not known" not in md

    # a run from before summaries recorded the mean alpha: the alpha logged at its last step is used
    del summary["mean_alpha"]
    (muon / "summary.json").write_text(json.dumps(summary))
    with (muon / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": summary["steps_done"], "kind": "alpha", "mean_alpha": 2.3456}) + "\n")
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    assert _alpha_column(md, "muon") == "2.346" and "mean alpha not known" not in md and left_out in md
    # ... and where it logged none either, the table has no value and the report says why
    lines = (muon / "metrics.jsonl").read_text().splitlines()
    (muon / "metrics.jsonl").write_text("\n".join(ln for ln in lines if '"alpha"' not in ln) + "\n")
    assert cli_main(argv) == 0
    md = (out / "results.md").read_text()
    assert _alpha_column(md, "muon") == "-"
    assert f"mean alpha not known for the cell(s) {cell}: their summaries record none" in md


def test_status_says_a_cell_of_another_config_is_refused_as_the_run_refuses_it(corpus_file, tmp_path, capsys):
    """A cell's folder name leaves out --steps: the same command with another --steps finds the runs of
    the first. --status called them "done, step 4/6" and "every cell is finished", and the command then
    stopped on the first with "written by another config"; it now says the run would refuse them."""
    out = tmp_path / "g"
    argv = ["compare", "--optimizers", "adamw", "--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main([*argv, "--no-plots"]) == 0
    cell = str(next((out / "adamw").glob("lr*/seed0")).relative_to(out))
    capsys.readouterr()
    assert cli_main([*argv, "--steps", "4", "--status"]) == 0  # the same config: done
    assert f"{cell}  done, step 4/4" in capsys.readouterr().out
    assert cli_main([*argv, "--steps", "6", "--status"]) == 0
    text = capsys.readouterr().out
    assert "1 cell(s) so far (1 refused)" in text
    assert f"{cell}  refused: its folder holds a run of another config (steps=4 vs 6)" in text
    assert f"the command would stop with an error at {cell}" in text
    assert "done" not in text and "every cell is finished" not in text
    assert cli_main([*argv, "--steps", "6", "--no-plots"]) == 2  # what the run does with it
    assert "its folder holds a run of another config (steps=4 vs 6)" in capsys.readouterr().err
    # said before anything else is checked: with the data moved away since, the error is still this
    # (the refused cell once counted as a cell to train, so the data check came first and said
    # "data source not found")
    moved = corpus_file.rename(corpus_file.with_name("moved.txt"))
    try:
        assert cli_main([*argv, "--steps", "6", "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert f"cell '{out / cell}': its folder holds a run of another config (steps=4 vs 6)" in err
        assert "not found" not in err
    finally:
        moved.rename(corpus_file)


def test_status_checks_a_cells_checkpoint_as_the_run_does(corpus_file, tmp_path, capsys):
    """A cell with a checkpoint and a finished summary but no config.json was "done" for --status (only
    config.json was compared), while the run loads the checkpoint and checks its config: under another
    --steps the command stopped on it. --status now reads the checkpoint where the run would decide by
    it: no config.json, or no ckpt.pt (the run resumes from ckpt.prev.pt, so the cell is not done)."""
    out = tmp_path / "g"
    argv = ["compare", "--optimizers", "adamw", "--data", str(corpus_file), "--out-dir", str(out), *TINY]
    argv += ["--ckpt-every", "3"]  # ckpt.prev.pt at step 3
    assert cli_main([*argv, "--no-plots"]) == 0
    run = next((out / "adamw").glob("lr*/seed0"))
    cell = str(run.relative_to(out))
    (run / "config.json").unlink()
    capsys.readouterr()
    assert cli_main([*argv, "--status"]) == 0  # the same config: its checkpoint agrees
    assert f"{cell}  done, step 4/4" in capsys.readouterr().out
    assert cli_main([*argv, "--steps", "6", "--status"]) == 0
    text = capsys.readouterr().out
    why = f"checkpoint '{run / 'ckpt.pt'}' was written by another config (steps=4 vs 6)"
    assert "1 cell(s) so far (1 refused)" in text and f"{cell}  refused: {why}" in text
    assert "done" not in text
    assert cli_main([*argv, "--steps", "6", "--no-plots"]) == 2  # what the run does with it
    assert why in capsys.readouterr().err
    # a config.json of another config beside a checkpoint of this one: the run goes on by the checkpoint
    from htmuon.train import checkpoint

    saved = checkpoint.load(run / "ckpt.pt")["config"]
    (run / "config.json").write_text(json.dumps({**saved, "steps": 6}))
    assert cli_main([*argv, "--status"]) == 0
    assert f"{cell}  done, step 4/4" in capsys.readouterr().out
    # ckpt.pt gone: the run resumes from ckpt.prev.pt (step 3) and trains step 4 again: not done
    (run / "config.json").write_text(json.dumps(saved))
    (run / "ckpt.pt").unlink()
    assert cli_main([*argv, "--status"]) == 0
    text = capsys.readouterr().out
    assert f"{cell}  stopped, step 4/4" in text and "done" not in text
    assert cli_main([*argv, "--no-plots"]) == 0  # the run: resumed at step 3, not reused
    assert "reused" not in capsys.readouterr().err and (run / "ckpt.pt").is_file()


def test_compare_run_again_says_its_finished_cells_are_reused(corpus_file, tmp_path, capsys):
    """A second call over finished cells printed the same "[1/1] adamw lr=... -> DIR" line as the first
    and trained nothing, without saying so; the line now says the cell is reused."""
    out = tmp_path / "g"
    argv = ["compare", "--optimizers", "adamw", "--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main([*argv, "--no-plots"]) == 0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[1/1]")]
    assert "reused" not in line
    assert cli_main([*argv, "--no-plots"]) == 0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[1/1]")]
    assert line.startswith("[1/1] adamw lr=") and line.endswith(" (finished earlier: reused)")


def test_a_refused_cell_says_what_to_do(corpus_file, tmp_path, capsys):
    """A cell whose folder holds a run of another config stopped the command with "...; nothing changed"
    and no way on; it names one now, as --status does: another --out-dir. Also where run_cells meets it
    (an edge extension's or a report's cell, not checked before the data is looked for)."""
    import argparse

    from htmuon.cli import UserError
    from htmuon.train import compare

    out = tmp_path / "g"
    argv = ["compare", "--optimizers", "adamw", "--data", str(corpus_file), "--out-dir", str(out), *TINY]
    assert cli_main([*argv, "--no-plots"]) == 0
    capsys.readouterr()
    assert cli_main([*argv, "--steps", "6", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "another config (steps=4 vs 6); nothing changed; pick another --out-dir, or run the command" in err
    parser = argparse.ArgumentParser()
    compare.configure(parser)
    plan = compare.plan_grid(parser.parse_args([*argv[1:], "--steps", "6"]))
    with pytest.raises(UserError, match=r"\(steps=4 vs 6\); nothing changed; pick another --out-dir"):
        compare.run_cells(plan.select_cells(), plan.preset, quiet=True)


def test_compare_config_file_setting_a_cells_own_key_is_refused(tmp_path, capsys):
    """A config file's ``lr`` went to every optimizer (AdamW, Muon and HTMuon all at 0.04) while the
    report's notes named each optimizer's default lr as the one that ran; its ``optimizer``, ``seed``
    and ``out_dir`` were ignored. Compare sets these per cell: a one-line error naming the file."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "llama-micro"\noptimizer = "htmuon"\nlr = 0.04\nseed = 7\n')
    argv = ["compare", "--config", str(cfg), "--optimizers", "adamw,muon", "--out-dir", str(tmp_path / "g")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"config file '{cfg}' sets 'optimizer', 'lr', 'seed', which compare sets per cell" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g").exists()
    cfg.write_text('model = "llama-micro"\nsteps = 5\nwarmup_steps = 1\n')  # keys for every cell: taken
    assert cli_main([*argv, "--status"]) == 0


def test_kept_cells_are_copied_without_checkpoints_and_reused_where_restored(corpus_file, tmp_path, capsys):
    """scripts/keep_cells.py (RESULTS.md's llama-small study keeps its finished cells in the repository,
    since a run folder is lost with its machine): a finished cell's record is copied without its
    checkpoints and locks, an unfinished one is not; copied back into a new run folder, compare reuses
    the cell (no training: no checkpoint appears, its summary is the same bytes) and trains the rest;
    a destination that holds another run is left as it is and named."""
    keep = load_script("keep_cells")
    out, kept, fresh = tmp_path / "g", tmp_path / "kept", tmp_path / "fresh"
    assert cli_main(_muon_two_seeds(corpus_file, out)) == 0
    seed0, seed1 = sorted(p.parent.relative_to(out) for p in out.rglob("summary.json"))
    assert list((out / seed0).glob("ckpt*.pt"))
    (out / seed1 / "summary.json").unlink()  # as a run still going when its machine is lost
    capsys.readouterr()

    assert keep.main([str(out), str(kept)]) == 0
    printed = capsys.readouterr().out
    names = sorted(p.name for p in (kept / seed0).iterdir())
    assert names == ["config.json", "metrics.csv", "metrics.jsonl", "run.json", "summary.json"], names
    assert not (kept / seed1).exists() and f"not finished: {seed1} (step 4)" in printed
    assert keep.main([str(out), str(kept)]) == 0  # again: nothing new
    assert "0 cell(s) copied, 1 already at" in capsys.readouterr().out
    assert keep.main([str(out), str(tmp_path / "dry"), "--dry-run"]) == 0  # lists, copies nothing
    assert f"would copy: {seed0} (5 files" in capsys.readouterr().out and not (tmp_path / "dry").exists()

    assert keep.main([str(kept), str(fresh)]) == 0  # a new machine's run folder
    capsys.readouterr()
    assert cli_main(_muon_two_seeds(corpus_file, fresh)) == 0
    assert "reusing its summary, not training it again" in capsys.readouterr().err
    assert not list((fresh / seed0).glob("ckpt*.pt")) and list((fresh / seed1).glob("ckpt*.pt"))
    assert (fresh / seed0 / "summary.json").read_bytes() == (out / seed0 / "summary.json").read_bytes()
    runs = json.loads((fresh / "results.json").read_text())["runs"]
    original = json.loads((out / seed0 / "summary.json").read_text())["final_val_loss"]
    assert [r["final_val_loss"] for r in runs if r["seed"] == 0] == [original]

    # a destination cell holding a run (checkpoints) or another summary is not overwritten
    summary = kept / seed0 / "summary.json"
    summary.write_text(summary.read_text().replace('"finished": true', '"finished": true, "x": 1'))
    before = (fresh / seed0 / "summary.json").read_bytes()
    assert keep.main([str(kept), str(fresh)]) == 1
    assert f"refused: {seed0}: its summary.json differs" in capsys.readouterr().err
    assert (fresh / seed0 / "summary.json").read_bytes() == before
    assert not (fresh / seed0 / "cell.lock").exists()  # taken while checking, released
    assert keep.main([str(fresh), str(out)]) == 1  # seed1 is finished in fresh; out's holds checkpoints
    printed = capsys.readouterr()
    assert f"refused: {seed1}: it holds ckpt.pt" in printed.err
    assert not (out / seed1 / "summary.json").exists()
    assert "1 already at" in printed.out  # seed0: the same finished run, its checkpoints beside it

    # one damaged cell is named and the others go on; a damaged config is not copied (it could not be
    # reused without the checkpoint); folders that hold one another are refused
    (fresh / seed0 / "summary.json").write_text("{not json")
    (fresh / seed1 / "config.json").write_text("{bad")
    other = tmp_path / "other"
    assert keep.main([str(fresh), str(other)]) == 1
    err = capsys.readouterr().err
    assert f"refused: {seed0}: run summary" in err and "is not valid JSON" in err
    assert f"refused: {seed1}: " in err and not (other / seed1).exists() and not (other / seed0).exists()
    with pytest.raises(SystemExit):
        keep.main([str(out), str(out / "kept")])
    assert "must not be one folder or hold one another" in capsys.readouterr().err
    # a destination cell whose compare runs it now is refused, in a dry run too
    (fresh / seed0 / "summary.json").write_bytes((out / seed0 / "summary.json").read_bytes())
    live = tmp_path / "live"
    (live / seed0).mkdir(parents=True)
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (live / seed0 / "cell.lock").write_text(f"{runner.pid} {socket.gethostname()}\n")
        for extra in ([], ["--dry-run"]):
            assert keep.main([str(fresh), str(live), *extra]) == 1
            assert f"refused: {seed0}: a process holds its cell.lock" in capsys.readouterr().err
    finally:
        runner.kill()
        runner.wait()


def test_a_damaged_config_of_a_finished_cell_is_a_one_line_error_not_a_traceback(
    corpus_file, tmp_path, capsys
):
    """A finished cell is reused from its checkpoint, which holds its config, so a damaged config.json
    beside it was read only by the report: a JSONDecodeError traceback. Now one line names the file."""
    out = tmp_path / "g"
    argv = _muon_two_seeds(corpus_file, out)
    assert cli_main(argv) == 0
    config = sorted(out.rglob("config.json"))[0]  # seed 0: the cell whose config the report reads
    config.write_text(config.read_text()[:20])
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"run config '{config}' is not valid JSON" in err and "Traceback" not in err
