"""The train/compare flags come from TrainConfig alone: help from each field's metadata, boolean
switches, and one-line errors for bad values."""

import argparse
import json
import re
from dataclasses import fields

import pytest

from htmuon.cli import UserError, main
from htmuon.train.cli import add_config_flags, config_overrides
from htmuon.train.config import TrainConfig, from_dict, make_config, to_dict


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return make_config(None, None, config_overrides(parser.parse_args(argv)), strings=True)


def test_every_field_has_help_and_a_flag():
    parser = argparse.ArgumentParser(prog="train", formatter_class=argparse.RawTextHelpFormatter)
    add_config_flags(parser)
    text = re.sub(r"\s+", " ", parser.format_help())
    for f in fields(TrainConfig):
        help_text = f.metadata.get("help", "")
        assert help_text.strip(), f"TrainConfig.{f.name} has no help"
        assert f"--{f.name.replace('_', '-')}" in text
        assert f"{help_text} [default: {f.default}]" in text.replace("%%", "%")


def test_p_and_method_help_name_each_optimizers_default():
    """--method's help said "ns for muon, else auto" and --p's "0 for muon/normuon": normuon and adamuon
    run ns too, and adamuon has p = 0."""
    from htmuon.train.optimizers import HTMUON_NAMES, OPTIMIZERS

    helps = {f.name: f.metadata["help"] for f in fields(TrainConfig)}
    ns = re.search(r"ns for ([\w/-]+), else auto", helps["method"]).group(1).split("/")
    zero = re.search(r"\(0 for ([\w/-]+),", helps["p"]).group(1).split("/")
    assert sorted(ns) == sorted(n for n in HTMUON_NAMES if OPTIMIZERS[n]["method"] == "ns")
    assert sorted(zero) == sorted(n for n in HTMUON_NAMES if OPTIMIZERS[n]["p"] == 0)
    assert all(OPTIMIZERS[n]["p"] == 0.125 for n in HTMUON_NAMES if n.startswith("htmuon"))


def test_boolean_switches():
    assert TrainConfig().alpha is True and TrainConfig().tensorboard is False
    cfg = parse("--no-alpha", "--tensorboard")
    assert cfg.alpha is False and cfg.tensorboard is True
    cfg = parse("--steps", "70", "--lr", "none")
    assert cfg.steps == 70 and cfg.lr is None and cfg.alpha is True  # unset switches keep the default


def test_config_files_keep_booleans_and_flags_override_them(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"alpha": False, "tensorboard": True, "steps": 120}))
    cfg = make_config(None, str(file), {})
    assert (cfg.alpha, cfg.tensorboard, cfg.steps) == (False, True, 120)
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = make_config(None, str(file), config_overrides(parser.parse_args(["--alpha"])), strings=True)
    assert cfg.alpha is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "abc"], "config key 'steps' must be an integer, got 'abc'"),
        (["--lr", "inf"], "config key 'lr' must be a number or null, got 'inf'"),
        (["--routing", "llama"], "config key 'routing' must be one of ['standard', 'paper'], got 'llama'"),
        (["--steps"], "argument --steps: expected one argument (see htmuon train --help)"),
        (["--alpha", "maybe"], "unrecognized arguments: maybe (see htmuon train --help)"),
        (
            ["--alpha", "false"],
            "unrecognized arguments: false (a boolean key is a switch without a value: --KEY / --no-KEY)",
        ),
        (
            ["--stepz", "3"],
            "unrecognized arguments: --stepz 3 (did you mean --steps?) (see htmuon train --help)",
        ),
        (
            ["--no-steps"],
            "unrecognized arguments: --no-steps (did you mean --steps?) (see htmuon train --help)",
        ),
    ],
)
def test_bad_values_are_one_line_errors(argv, message, capsys):
    try:
        rc = main(["train", *argv])  # a UserError: returns 2
    except SystemExit as e:  # an argparse error: exits 2
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("htmuon train: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--seed", "1,1"], "unrecognized arguments: --seed 1,1 (did you mean --seeds?)"),
        (["--lr", "0.1"], "unrecognized arguments: --lr 0.1 (did you mean --lr-grid?)"),
        (
            ["--optimizer", "nosuch"],
            "unrecognized arguments: --optimizer nosuch (did you mean --optimizers?)",
        ),
        (["--resume"], "unrecognized arguments: --resume (compare resumes by itself: run the same command"),
    ],
)
def test_compare_refuses_the_grids_own_keys_not_their_longer_flags(argv, want, capsys):
    """compare's grid keys are refused (argparse's prefix matching took --seed for --seeds before)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--preset", "smoke", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("htmuon compare: error: ") and want in err and "\n" not in err


def test_an_unknown_key_names_the_closest_one():
    """A misspelt key (`htmuon:methd=svd`) had a hint only when it differed in dashes or underscores."""
    for key, close in (
        ("methd", "method"),
        ("warmup-step", "warmup_steps"),
        ("adamwlr", "adamw_lr"),
        ("lr_adamw", "adamw_lr"),  # the same words in another order
        ("data_dir", "data"),  # not out_dir, difflib's closest: a typo keeps the word's start
    ):
        with pytest.raises(UserError, match=rf"^unknown config key '{key}' \(did you mean '{close}'\?\)$"):
            make_config(None, None, {key: "1"}, strings=True)
    for key in ("q", "nesterov"):  # nothing close (nesterov: difflib says interval): no guess
        with pytest.raises(UserError, match=rf"^unknown config key '{key}'$"):
            make_config(None, None, {key: "1"}, strings=True)


def test_compare_lists_the_presets_as_train_does(capsys):
    """`htmuon compare --list-presets` was refused (an unrecognized argument); it lists what train's does."""
    from htmuon.train.presets import RUN_PRESETS

    assert main(["train", "--list-presets"]) == 0
    listing = capsys.readouterr().out
    assert main(["compare", "--list-presets"]) == 0
    assert capsys.readouterr().out == listing
    assert listing.startswith("run presets (--preset):") and "model presets (--model): " in listing
    assert all(f"  {name} " in listing for name in RUN_PRESETS)
    # every description starts in one column, also after the longest names (gpu-resnet50-cifar100 ran
    # into its text, one space after it, where the shorter names were padded to 12)
    rows = listing.split("model presets")[0].splitlines()[1:]
    starts = {len(row) - len(row.split(None, 1)[1]) for row in rows}
    assert len(rows) == len(RUN_PRESETS) and len(starts) == 1, rows


def test_help_lists_switches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--tensorboard, --no-tensorboard" in out and "--alpha, --no-alpha" in out


# ----------------------------------------------------------------------------- config files


def _train_error(argv, out_dir, capsys) -> str:
    """The one-line error of ``htmuon train ARGV`` (a UserError: exit status 2; were it accepted, the
    run would go to OUT_DIR)."""
    assert main(["train", *argv, "--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("htmuon train: error: ") and "\n" not in err
    return err


@pytest.mark.parametrize(
    ("name", "text", "keys"),
    [
        (
            "wrapped.json",
            json.dumps({"config": {"steps": 300}, "stpes": 1, "lr": -5, "optimizer": "nope"}),
            "top-level keys 'stpes', 'lr', 'optimizer' beside its 'config' object would be ignored",
        ),
        ("wrapped.toml", "seed = 3\n[config]\nsteps = 300\n", "top-level key 'seed' beside its 'config'"),
    ],
)
def test_keys_beside_a_config_wrapper_are_refused(tmp_path, name, text, keys):
    """{"config": {...}} (a run's config as a checkpoint holds it) is read from inside: a key beside it
    was dropped silently (the file above trained 300 steps of HTMuon, the typo and lr -5 ignored)."""
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(UserError) as info:
        make_config(None, str(file), {})
    err = str(info.value)
    assert err.startswith(f"config file '{file}': ") and keys in err and "\n" not in err
    # the wrapper alone is read
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps({"config": {"steps": 300, "alpha": False}}))
    cfg = make_config(None, str(alone), {})
    assert (cfg.steps, cfg.alpha) == (300, False)


def test_saved_run_configs_load_as_config_files(corpus_file, tmp_path):
    """What the harness writes still loads with --config: a run folder's config.json (flat), and the
    same config wrapped as a checkpoint holds it ({"config": ...} alone)."""
    pytest.importorskip("transformers")
    from helpers import TINY_RUN
    from htmuon.train.loop import train

    out = tmp_path / "run"
    train(TrainConfig(**{**TINY_RUN, "steps": 2, "data": str(corpus_file), "out_dir": str(out)}))
    saved = json.loads((out / "config.json").read_text())
    assert to_dict(make_config(None, str(out / "config.json"), {})) == saved
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"config": saved}))
    assert to_dict(make_config(None, str(wrapped), {})) == saved


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"steps": -1}, "config key 'steps' must be > 0, got -1 in {file}"),
        ({"lr": -5.0}, "config key 'lr' must be > 0, got -5.0 in {file}"),
        (
            {"routing": "llama"},
            "config key 'routing' must be one of ['standard', 'paper'], got 'llama' in {file}",
        ),
        ({"momentum": 1.0}, "config key 'momentum' must be in [0, 1), got 1.0 in {file}"),
        # every k-th chunk is held out (k >= 2): 0.7 held out 0.5
        ({"val_fraction": 0.7}, "config key 'val_fraction' must be in (0, 0.5], got 0.7 in {file}"),
        ({"steps": 5, "warmup_steps": 9}, "warmup_steps (9) in {file} must not exceed steps (5) in {file}"),
    ],
)
def test_range_errors_of_file_values_name_the_file(tmp_path, capsys, values, message):
    file = tmp_path / "run.json"
    file.write_text(json.dumps(values))
    assert message.format(file=file) in _train_error(["--config", str(file)], tmp_path / "run", capsys)
    # the same values read back from a run's files (resume) name where they were read
    with pytest.raises(UserError) as info:
        from_dict(values, where=" in checkpoint ckpt.pt")
    assert message.format(file="checkpoint ckpt.pt") in str(info.value)


def test_range_errors_of_flags_name_only_the_key(tmp_path, capsys):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"steps": 50, "lr": -5.0}))
    # a flag overriding a file value: its error is the flag's, not the file's
    err = _train_error(["--config", str(file), "--steps", "-2"], tmp_path / "run", capsys)
    assert err.endswith("config key 'steps' must be > 0, got -2") and str(file) not in err
    # a bad file value beside good flags: still the file's
    err = _train_error(["--config", str(file), "--steps", "40"], tmp_path / "run", capsys)
    assert err.endswith(f"config key 'lr' must be > 0, got -5.0 in {file}")
    # a bad file value that a flag overrides is no error
    assert make_config(None, str(file), {"lr": "0.01"}, strings=True).lr == 0.01


def test_a_blank_data_or_out_dir_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, capsys):
    """`--data "$CORPUS"` with the variable unset gave data '' (a flag's value is stripped, so "  " too),
    which is Path(""): the current folder, read as a data folder of every .txt under it; `--out-dir ''`
    wrote the run into the current folder. Each is a one-line error naming the key and the file now."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a corpus\n" * 2000)
    for argv, key in (
        (["--data", ""], "data"),
        (["--data", "   "], "data"),
        (["--out-dir", ""], "out_dir"),
    ):
        assert main(["train", "--model", "llama-micro", "--steps", "2", "--warmup-steps", "0", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"htmuon train: error: config key '{key}' must be a name or a path, not blank")
        assert "\n" not in err
    (tmp_path / "run.json").write_text(json.dumps({"out_dir": " "}))
    with pytest.raises(UserError, match=r"config key 'out_dir' .* got ' ' in .*run\.json$"):
        make_config(None, str(tmp_path / "run.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run.json"]  # nothing written


def test_a_config_file_with_a_key_twice_yaml_or_a_folder_is_a_one_line_error(tmp_path):
    """A JSON config giving a key twice ran with the last value, silently (TOML refuses it); a YAML file
    was "not valid JSON" with no word that YAML is not read; a folder was "not found"."""
    twice = tmp_path / "run.json"
    twice.write_text('{"steps": 10, "lr": 0.1, "steps": 20}')
    with pytest.raises(
        UserError, match=rf"^config file '{re.escape(str(twice))}' sets 'steps' twice \(10, then 20\)$"
    ):
        make_config(None, str(twice))
    twice.write_text('{"config": {"lr": 0.1, "lr": 0.2}}')  # inside a run's wrapper too
    with pytest.raises(UserError, match=r"sets 'lr' twice \(0\.1, then 0\.2\)$"):
        make_config(None, str(twice))
    yaml = tmp_path / "run.yaml"
    yaml.write_text("steps: 10\n")
    with pytest.raises(
        UserError, match=r"is not valid JSON: .*\(a config file is JSON or TOML, \.toml; YAML is not read\)$"
    ):
        make_config(None, str(yaml))
    with pytest.raises(
        UserError, match=rf"^config file '{re.escape(str(tmp_path))}' is a folder, not a file$"
    ):
        make_config(None, str(tmp_path))


def test_warmup_steps_and_fraction_given_together_are_refused_unless_they_agree(tmp_path, capsys):
    """``--warmup-steps 10 --warmup-fraction 0.2`` (or both in one config file) ran with the fraction's
    warmup, the step count dropped without a word. Both given in one place by the user are a one-line
    error naming both and where, unless they agree (a run's saved config.json holds both). A preset's
    or a default's value is not the user's, and a later source's warmup replaces an earlier one's."""
    err = _train_error(
        ["--steps", "100", "--warmup-steps", "10", "--warmup-fraction", "0.2"], tmp_path / "r", capsys
    )
    assert err == (
        "htmuon train: error: warmup_steps (10) and warmup_fraction (0.2) are both given on the command "
        "line: 0.2 x 100 steps is 20; give one of them (a fraction scales with the steps)"
    )
    file = tmp_path / "run.toml"
    file.write_text("warmup_steps = 10\nwarmup_fraction = 0.2\n")
    err = _train_error(["--config", str(file)], tmp_path / "r", capsys)
    assert err.endswith(
        f"warmup_steps (10) and warmup_fraction (0.2) are both given in {file}; give one of them (a fraction "
        "scales with the steps)"
    )
    assert not (tmp_path / "r").exists()
    # the preset's fraction (quick) or the default step count is not "given": either key is taken alone
    assert parse("--warmup-fraction", "0.2").warmup_fraction == 0.2
    cfg = make_config({"warmup_fraction": 0.1, "steps": 250}, None, {"warmup_steps": "7"}, strings=True)
    assert (cfg.warmup_steps, cfg.warmup_fraction) == (7, None)
    # across sources the later one's warmup wins, whichever key: a file's fraction, then a flag's steps
    file.write_text("steps = 100\nwarmup_fraction = 0.2\n")
    cfg = make_config(None, str(file), {"warmup_steps": "5"}, strings=True)
    assert (cfg.warmup_steps, cfg.warmup_fraction) == (5, None)
    file.write_text("steps = 100\nwarmup_steps = 5\n")
    assert make_config(None, str(file), {"warmup_fraction": "0.2"}, strings=True).warmup_fraction == 0.2
    # an explicit "none" fraction is no fraction
    assert parse("--warmup-steps", "5", "--warmup-fraction", "none").warmup_steps == 5
    # a run's saved config (both keys, the steps resolved from the fraction) is a config file as before
    from htmuon.train.loop import schedule_config

    saved = schedule_config(make_config({"warmup_fraction": 0.1}, None, {"steps": "250"}, strings=True))
    assert saved.warmup_steps == 25
    (tmp_path / "config.json").write_text(json.dumps(to_dict(saved)))
    again = make_config(None, str(tmp_path / "config.json"), {"steps": "500"}, strings=True)
    assert schedule_config(again).warmup_steps == 50  # the fraction, at the new steps


def test_compare_takes_a_spec_warmup_over_the_command_s_and_refuses_both_in_one_place(tmp_path, capsys):
    """compare merged its flags and a spec's options into one set of overrides: a spec's own warmup
    replaces the command's (either key), and both keys in one place are refused as in train."""
    from htmuon.train.compare import configure as compare_flags
    from htmuon.train.compare import plan_grid

    parser = argparse.ArgumentParser()
    compare_flags(parser)
    argv = ["--model", "llama-micro", "--steps", "20", "--out-dir", str(tmp_path / "g")]
    plan = plan_grid(
        parser.parse_args([*argv, "--warmup-steps", "3", "--optimizers", "muon,htmuon:warmup_fraction=0.5"])
    )
    cells = {c.spec: c.cfg for c in plan.select_cells()}
    assert (cells["muon"].warmup_steps, cells["muon"].warmup_fraction) == (3, None)
    assert (
        cells["htmuon:warmup_fraction=0.5"].warmup_steps,
        cells["htmuon:warmup_fraction=0.5"].warmup_fraction,
    ) == (10, 0.5)
    for extra in (["--warmup-steps", "3", "--warmup-fraction", "0.5", "--optimizers", "muon"],
                  ["--optimizers", "muon:warmup_steps=3,warmup_fraction=0.5"]):  # fmt: skip
        with pytest.raises(
            UserError, match=r"^warmup_steps \(3\) and warmup_fraction \(0\.5\) are both given on"
        ):
            plan_grid(parser.parse_args([*argv, *extra])).select_cells()
