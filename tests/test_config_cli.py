"""The train/compare flags come from TrainConfig alone: help from each field's metadata, boolean
switches, and one-line errors for bad values."""

import argparse
import json
import re
from dataclasses import fields

import pytest

from htmuon.cli import main
from htmuon.train.cli import add_config_flags, config_overrides
from htmuon.train.config import TrainConfig, make_config


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


def test_help_lists_switches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--tensorboard, --no-tensorboard" in out and "--alpha, --no-alpha" in out
