"""htmuon esd reads real checkpoints: files made by the real libraries give the in-memory alphas.

Hugging Face folders (safetensors single and sharded, pytorch_model.bin single and sharded),
torch.distributed.checkpoint folders, Lightning .ckpt, htmuon run folders, plain .pt state_dicts,
trusted full-model pickles; batch-by-batch reading; several targets in one call; one-line errors.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import dcp_save
from htmuon.cli import main
from htmuon.diagnostics import analyze, esd, open_checkpoint
from htmuon.diagnostics.cli import target_labels

safetensors = pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, sd, analyze(sd)


def assert_same(report, ref):
    """Same layers, shapes and alphas (safetensors lists layers in natural name order, not the model's)."""
    assert sorted(report.alphas) == sorted(ref.alphas)
    for name, a in ref.alphas.items():
        assert report.alphas[name] == pytest.approx(a, rel=1e-12, abs=0), name
    assert {r["name"]: r["shape"] for r in report.rows} == {r["name"]: r["shape"] for r in ref.rows}


def run_cli(argv, capsys):
    rc = main(["esd", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- formats


def test_hf_folder_safetensors_single_and_sharded(llama, tmp_path):
    model, _, ref = llama
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "single" / "model.safetensors").is_file()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    for folder in ("single", "sharded"):
        rep = analyze(tmp_path / folder)
        assert_same(rep, ref)
        assert rep.meta["source"].startswith("safetensors checkpoint")
    # the index file and one shard file can be given directly too
    assert_same(analyze(tmp_path / "sharded" / "model.safetensors.index.json"), ref)
    shard = sorted((tmp_path / "sharded").glob("model-0000*.safetensors"))[0]
    with open_checkpoint(shard) as ck:
        assert set(ck.entries) < set(ref.alphas) | {k for k in llama[1]}


def test_safetensors_dtypes_and_natural_layer_order(tmp_path):
    """A safetensors file's bf16 / fp16 / float32 weights keep their dtype in the metadata (it sets the
    degenerate-ESD tolerance: an orthogonal bf16 layer fails as in memory, not with a huge alpha), and
    layers come in natural name order ('layers.2' before 'layers.10', not string order)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {}
    for i, dtype in ((10, torch.bfloat16), (2, torch.float16), (1, torch.float32)):
        sd[f"layers.{i}.weight"] = torch.randn(48, 32).to(dtype)
    sd["layers.3.weight"] = nn.init.orthogonal_(torch.empty(64, 64)).to(torch.bfloat16)
    save_file(sd, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:
        assert {k: m.dtype for k, m in ckpt.entries.items()} == {k: v.dtype for k, v in sd.items()}
    rep = analyze(tmp_path / "m.safetensors")
    assert [r["name"] for r in rep.rows] == ["layers.1", "layers.2", "layers.3", "layers.10"]
    mem = analyze(sd)
    for r in rep.rows:
        assert r["status"] == next(m["status"] for m in mem.rows if m["name"] == r["name"]), r["name"]
    assert rep.rows[2]["status"].startswith("failed: degenerate ESD")
    assert rep.alphas == pytest.approx(mem.alphas, rel=1e-12, nan_ok=True)


def test_views_of_one_storage_are_distinct_layers_and_the_index_picks_the_shard(tmp_path):
    """Views at different offsets of one storage (q, k, v split from a fused matrix) are three layers,
    not one tied matrix, in memory and in a torch.save file; a sharded index's weight_map decides which
    shard a tensor is read from when a stale shard holds the same key too."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    fused = torch.randn(96, 32)
    sd = dict(zip(("q.weight", "k.weight", "v.weight"), fused.chunk(3)))
    want = {n[:-7]: analyze(w.clone()).rows[0]["alpha"] for n, w in sd.items()}
    torch.save(sd, tmp_path / "qkv.pt")
    for obj in (sd, tmp_path / "qkv.pt"):
        rep = analyze(obj)
        assert rep.alphas == pytest.approx(want, rel=1e-12) and "notes" not in rep.meta
    a, stale = torch.randn(40, 24), torch.randn(40, 24) ** 3
    save_file({"a.weight": a, "b.weight": torch.randn(40, 24)}, tmp_path / "s1.safetensors")
    save_file({"a.weight": stale, "c.weight": torch.randn(40, 24)}, tmp_path / "s2.safetensors")
    index = {
        "weight_map": {
            "a.weight": "s1.safetensors",
            "b.weight": "s1.safetensors",
            "c.weight": "s2.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    rep = analyze(tmp_path / "model.safetensors.index.json")
    assert rep.alphas["a"] == pytest.approx(analyze(a).rows[0]["alpha"], rel=1e-12)
    # a folder is found by its one index, whatever its name (diffusers: diffusion_pytorch_model...)
    (tmp_path / "model.safetensors.index.json").rename(tmp_path / "unet.safetensors.index.json")
    assert analyze(tmp_path).alphas == pytest.approx(rep.alphas, rel=1e-12)


def test_hf_folder_pytorch_model_bin_single_and_sharded(llama, tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    _, sd, ref = llama
    (tmp_path / "single").mkdir()
    torch.save(sd, tmp_path / "single" / "pytorch_model.bin")
    split = split_torch_state_dict_into_shards(
        sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="40KB"
    )
    assert split.is_sharded and len(split.filename_to_tensors) > 3
    folder = tmp_path / "sharded"
    folder.mkdir()
    for fname, keys in split.filename_to_tensors.items():
        torch.save({k: sd[k] for k in keys}, folder / fname)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for f in ("single", "sharded"):
        rep = analyze(tmp_path / f)
        assert_same(rep, ref)
        assert rep.meta["source"].startswith("torch checkpoint")


def test_dcp_folder(llama, tmp_path):

    model, sd, ref = llama
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": the single-process intent
        warnings.simplefilter("ignore", UserWarning)
        dcp_save({"model": model.state_dict(), "step": 7}, tmp_path / "dcp")
        dcp_save(model.state_dict(), tmp_path / "flat")  # top-level keys
    assert (tmp_path / "dcp" / ".metadata").is_file()
    rep = analyze(tmp_path / "dcp")
    assert_same(rep, ref)
    assert rep.meta["source"].startswith("dcp checkpoint")
    assert_same(analyze(tmp_path / "flat"), ref)


def test_dcp_metadata_is_not_unpickled_blindly(tmp_path):
    """A .metadata pickle that names anything but DCP's metadata classes is refused: its code never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(
        ValueError, match=r"\.metadata.*pathlib.Path.touch|\.metadata.*not a DCP metadata class"
    ):
        analyze(tmp_path / "dcp")
    assert not marker.exists()


@dataclass
class Hparams:  # a user's config object pickled in Lightning's hyper_parameters
    lr: float = 0.02
    name: str = "run"


def lightning_ckpt(sd, path, attr="model"):
    """A checkpoint in Lightning's format (the keys Trainer.save_checkpoint writes)."""
    torch.save(
        {
            "epoch": 1,
            "global_step": 10,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"{attr}.{k}": v for k, v in sd.items()},
            "loops": {"fit_loop": {"state_dict": {}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": {"cfg": Hparams(), "lr": 0.02},
        },
        path,
    )


def test_lightning_ckpt_dict_format(llama, tmp_path):
    _, sd, ref = llama
    lightning_ckpt(sd, tmp_path / "epoch=1-step=10.ckpt")
    rep = analyze(tmp_path / "epoch=1-step=10.ckpt")
    assert_same(rep, ref)  # the LightningModule's 'model.' prefix is removed: names match the HF ones
    notes = " ".join(rep.meta["notes"])
    assert "Hparams" in notes and "'model.'" in notes
    # a LightningModule whose attribute is the layer itself: 'layer.weight' keeps its prefix (never a
    # bare 'weight')
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    lightning_ckpt(lin.state_dict(), tmp_path / "one.ckpt", attr="layer")
    rep = analyze(tmp_path / "one.ckpt")
    assert rep.alphas == pytest.approx({"layer": analyze(lin.weight).rows[0]["alpha"]}, rel=1e-12)


def test_refused_globals_are_learnt_load_by_load_without_the_scan_and_the_allowlist_restored(
    llama, tmp_path, monkeypatch
):
    """torch 2.4 has no ``get_unsafe_globals_in_checkpoint`` / ``safe_globals``: the globals the
    weights-only unpickler refuses are learnt one load at a time, read as placeholders (nothing of
    them runs), and the process-wide allowlist is as it was afterwards (here: that path on this torch)."""
    _, sd, ref = llama
    lightning_ckpt(sd, tmp_path / "l.ckpt")
    monkeypatch.delattr(torch.serialization, "get_unsafe_globals_in_checkpoint", raising=False)
    before = set(torch.serialization.get_safe_globals())  # a set: torch 2.13 lists its own set's order
    rep = analyze(tmp_path / "l.ckpt")
    assert_same(rep, ref)
    assert "Hparams" in " ".join(rep.meta["notes"])
    assert set(torch.serialization.get_safe_globals()) == before
    marker = tmp_path / "ran"
    (tmp_path / "src.txt").write_text("x")
    torch.save({"model": sd, "payload": CopyFile(tmp_path / "src.txt", marker)}, tmp_path / "code.pt")
    rep = analyze(tmp_path / "code.pt")  # placeholders: the global is never called
    assert_same(rep, ref)
    assert not marker.exists() and "shutil.copyfile" in " ".join(rep.meta["notes"])
    assert set(torch.serialization.get_safe_globals()) == before


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
def test_lightning_trainer_checkpoint(tmp_path):
    try:
        import lightning as L
    except Exception as e:  # not installed, or broken by a mismatched torchvision
        pytest.skip(f"lightning unavailable: {type(e).__name__}: {str(e)[:80]}")

    class Module(L.LightningModule):
        def __init__(self, width: int = 32):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 16))

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 16)), batch_size=8)
    module = Module()
    trainer = L.Trainer(
        max_steps=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    rep = analyze(tmp_path / "last.ckpt")
    assert rep.alphas == pytest.approx(analyze(module.net.state_dict()).alphas, rel=1e-12)


def test_htmuon_run_folder_and_plain_state_dicts(llama, tmp_path):
    from htmuon.train import checkpoint

    _, sd, ref = llama
    run = tmp_path / "run-a"
    run.mkdir()
    checkpoint.save(
        run / checkpoint.CKPT_NAME, {"step": 3, "model": sd, "optimizer": {}, "rng": checkpoint.rng_state()}
    )
    assert_same(analyze(run), ref)
    assert_same(analyze(run / "ckpt.pt"), ref)
    # DDP / torch.compile wrappers' prefixes are removed when every key has them
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "wrapped.pt")
    assert_same(analyze(tmp_path / "wrapped.pt"), ref)
    # the legacy (non-zip) torch.save format is read too (without mmap)
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same(analyze(tmp_path / "legacy.pt"), ref)


def test_pytorch_tutorial_checkpoint_and_which_key_wins(tmp_path, capsys):
    """The PyTorch tutorial's checkpoint, {"epoch", "model_state_dict", "optimizer_state_dict", "loss"}
    (a tensor loss beside them), gives the model's alphas (it was refused: "nothing to analyze").
    'model', 'state_dict', 'model_state_dict' are tried in that order: the first holding weights is
    analysed, and the notes name any other that holds weights too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    opt = torch.optim.Adam(model.parameters())
    loss = model(torch.randn(8, 32)).pow(2).mean()
    loss.backward()
    opt.step()
    want = analyze(model).alphas
    state = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}
    torch.save({"epoch": 3, **state, "loss": loss.detach()}, tmp_path / "tutorial.pt")
    rep = analyze(tmp_path / "tutorial.pt")
    assert rep.alphas == pytest.approx(want, rel=1e-12) and "notes" not in rep.meta
    rc, out, _ = run_cli([tmp_path / "tutorial.pt"], capsys)
    assert rc == 0 and "| 0 | linear | 64x32 |" in out
    other = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16))
    torch.save({"model": model.state_dict(), "model_state_dict": other.state_dict()}, tmp_path / "both.pt")
    rep = analyze(tmp_path / "both.pt")
    assert rep.alphas == pytest.approx(want, rel=1e-12)
    assert rep.meta["notes"] == [
        "both.pt: weights under 'model' analysed; 'model_state_dict' also holds weights, not analysed"
    ]
    # 'model' before 'state_dict' whatever the file's key order
    torch.save({"state_dict": other.state_dict(), "model": model.state_dict()}, tmp_path / "sd.pt")
    rep = analyze(tmp_path / "sd.pt")
    assert rep.alphas == pytest.approx(want, rel=1e-12)
    assert rep.meta["notes"] == [
        "sd.pt: weights under 'model' analysed; 'state_dict' also holds weights, not analysed"
    ]
    torch.save({"model": "mlp-3", "model_state_dict": model.state_dict()}, tmp_path / "named.pt")
    rep = analyze(tmp_path / "named.pt")  # 'model' holds no weights here: not a candidate
    assert rep.alphas == pytest.approx(want, rel=1e-12) and "notes" not in rep.meta


class CopyFile:
    """Pickles as a call that writes a file: proof of whether unpickling ran code from the file."""

    def __init__(self, src, dst):
        self.args = (str(src), str(dst))

    def __reduce__(self):
        import shutil

        return (shutil.copyfile, self.args)


def test_code_in_a_checkpoint_never_runs_without_allow_pickle(llama, tmp_path):
    _, sd, ref = llama
    marker = tmp_path / "ran"
    (tmp_path / "src.txt").write_text("x")
    torch.save({"model": sd, "payload": CopyFile(tmp_path / "src.txt", marker)}, tmp_path / "ckpt.pt")
    rep = analyze(tmp_path / "ckpt.pt")  # the weights are read; the call became an inert placeholder
    assert_same(rep, ref)
    assert not marker.exists() and "shutil.copyfile" in " ".join(rep.meta["notes"])
    with open_checkpoint(tmp_path / "ckpt.pt", allow_pickle=True):  # the opt-in does run it
        pass
    assert marker.exists()


def test_full_model_pickle_needs_allow_pickle(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt.*Sequential.*execute code.*allow_pickle=True"):
        open_checkpoint(tmp_path / "model.pt")
    with open_checkpoint(tmp_path / "model.pt", allow_pickle=True) as ck:
        assert ck.format == "module"
        rep = analyze(ck)
    ref = analyze(model)
    assert rep.alphas == ref.alphas and rep.rows[0]["kind"] == "embedding"  # the module's kinds


def test_a_model_pickled_under_a_state_dict_key_needs_allow_pickle(tmp_path):
    """``torch.save({"model": model, "epoch": 3})`` (a common training-loop checkpoint): the error names
    the pickled object under 'model' and the way to load it, not 'no dict with one under model'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    torch.save({"model": model, "epoch": 3}, tmp_path / "run.pt")
    with pytest.raises(ValueError, match=r"run\.pt.*Sequential object under 'model'.*allow_pickle=True"):
        open_checkpoint(tmp_path / "run.pt")
    with open_checkpoint(tmp_path / "run.pt", allow_pickle=True) as ck:
        assert analyze(ck).alphas == analyze(model).alphas


# ----------------------------------------------------------------------------- bounded memory


def test_weights_are_read_batch_by_batch(llama, tmp_path, monkeypatch):
    """Each read asks for at most the batch budget (or one layer), never the whole checkpoint."""
    model, sd, ref = llama
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    budget = 64 * 128 + 1  # elements: one or two of the larger matrices per read
    monkeypatch.setattr(esd, "_STREAM_BATCH_ELEMS", budget)
    reads: list[list[str]] = []
    ck = open_checkpoint(tmp_path / "hf")
    real = ck._read

    def spy(names):
        reads.append(names)
        return real(names)

    ck._read = spy
    rep = analyze(ck)
    assert_same(rep, ref)
    sizes = [sum(sd[n].numel() for n in names) for names in reads]
    assert len(reads) >= 5 and all(s <= budget or len(n) == 1 for s, n in zip(sizes, reads)), sizes
    assert sum(len(n) for n in reads) == len(ref.rows)  # each analysed weight read once, nothing else


def test_layers_filter_reads_only_selected(llama, tmp_path):
    model, _, ref = llama
    model.save_pretrained(tmp_path / "hf")
    ck = open_checkpoint(tmp_path / "hf")
    read: list[str] = []
    real = ck._read
    ck._read = lambda names: (read.extend(names), real(names))[1]
    rep = analyze(ck, layers=r"layers\.1\.mlp")
    assert set(rep.alphas) == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert sorted(read) == sorted(f"{n}.weight" for n in rep.alphas)


# ----------------------------------------------------------------------------- CLI


def test_cli_several_targets_side_by_side(llama, tmp_path, capsys):
    from htmuon.train import checkpoint

    model, sd, ref = llama
    other = tiny_llama(seed=1)
    for name, m in (("run-a", model), ("run-b", other)):
        (tmp_path / name).mkdir()
        checkpoint.save(tmp_path / name / "ckpt.pt", {"step": 1, "model": m.state_dict()})
    other.save_pretrained(tmp_path / "hf-b", max_shard_size="40KB")
    args = [tmp_path / "run-a", tmp_path / "run-b" / "ckpt.pt", tmp_path / "hf-b"]
    rc, out, err = run_cli(
        [*args, "--plot", tmp_path / "out" / "cmp.png", "--csv", tmp_path / "out" / "all.csv"], capsys
    )
    assert rc == 0, err
    assert "| layer | run-a | run-b | hf-b |" in out
    ref_b = analyze(other.state_dict())
    row = next(ln for ln in out.splitlines() if ln.startswith("| model.layers.0.self_attn.q_proj |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    a_q, b_q = ref.alphas["model.layers.0.self_attn.q_proj"], ref_b.alphas["model.layers.0.self_attn.q_proj"]
    assert cells[1:] == [f"{a_q:.4g}", f"{b_q:.4g}", f"{b_q:.4g}"]
    assert "| **mean** |" in out
    with (tmp_path / "out" / "all.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["target"] for r in rows} == {"run-a", "run-b", "hf-b"} and len(rows) == 3 * len(ref.rows)
    q = [r for r in rows if r["name"] == "model.layers.0.self_attn.q_proj"]
    assert [(r["target"], r["shape"]) for r in q] == [(t, "64x64") for t in ("run-a", "run-b", "hf-b")]
    assert float(q[0]["alpha"]) == pytest.approx(a_q, rel=1e-12)  # full precision, not the table's 4 digits
    assert (tmp_path / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"


def test_target_labels(tmp_path):
    for d in ("x/run", "y/run", "z/run"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "ckpt.pt").write_bytes(b"")
    (tmp_path / "z/run/last.ckpt").write_bytes(b"")
    p = str(tmp_path)
    assert target_labels([f"{p}/x/run/ckpt.pt", f"{p}/y/run"]) == ["x/run", "y/run"]
    assert target_labels([f"{p}/x/run/ckpt.pt", f"{p}/z/run/"]) == ["x/run", "z/run"]
    assert target_labels([f"{p}/z/run/ckpt.pt", f"{p}/z/run/last.ckpt"]) == ["run/ckpt.pt", "run/last.ckpt"]
    assert target_labels([f"{p}/x/run", f"{p}/x/run"]) == [f"{p[1:]}/x/run#1", f"{p[1:]}/x/run#2"]
    assert target_labels(["torch.nn:Identity", f"{p}/x/run"]) == ["torch.nn:Identity", "run"]


def test_target_labels_of_compare_cells_name_the_optimizer(tmp_path):
    """Two compare cells were labelled `lr0.01-alr0.111/seed0` and `lr0.04-alr0.0333/seed0`: which one is
    Muon? A cell's label now starts at its optimizer's folder, whatever else tells them apart."""
    cells = (
        "muon/lr0.01-alr0.111/seed0",
        "htmuon__method=eigh/lr0.04-alr0.0333/seed0",
        "adamw/lr0.003/seed1",
    )
    for c in cells:
        (tmp_path / "grid" / c).mkdir(parents=True)
        (tmp_path / "grid" / c / "ckpt.pt").write_bytes(b"")
    p = str(tmp_path / "grid")
    assert target_labels([f"{p}/{c}" for c in cells]) == list(cells)
    assert target_labels([f"{p}/{c}/ckpt.pt" for c in cells]) == list(cells)
    assert target_labels([f"{p}/{cells[0]}"]) == [cells[0]]  # alone too: the label says what it is
    both = [f"{p}/{cells[0]}", f"{p}/{cells[0]}/ckpt.pt"]  # a folder and a file of it
    assert target_labels(both) == [cells[0], f"{cells[0]}/ckpt.pt"]
    # a cell's lr folder (without its seed) is named from its optimizer's folder too
    assert target_labels([f"{p}/muon/lr0.01-alr0.111"]) == ["muon/lr0.01-alr0.111"]
    (tmp_path / "runs" / "seed0").mkdir(parents=True)  # a folder named like a seed outside a compare grid
    assert target_labels([str(tmp_path / "runs" / "seed0")]) == ["runs/seed0"]


def test_cli_allow_pickle_and_labels(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    rc, out, err = run_cli([tmp_path / "model.pt"], capsys)
    assert rc == 2 and "--allow-pickle" in err and "model.pt" in err and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(
        [tmp_path / "model.pt", tmp_path / "sd.pt", "--allow-pickle", "--label", "full", "--label", "sd"],
        capsys,
    )
    assert rc == 0, err
    assert "| layer | full | sd |" in out
    rc, out, err = run_cli([tmp_path / "sd.pt", "--label", "a", "--label", "b"], capsys)
    assert rc == 2 and "--label given 2 times for 1 targets" in err


def corrupt_inputs(tmp_path: Path, llama) -> dict[str, Path]:
    model, sd, _ = llama
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    bad = {}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    bad["empty folder"] = tmp_path / "empty"
    bad["missing"] = tmp_path / "nope" / "ckpt.pt"
    st = tmp_path / "trunc.safetensors"
    model.save_pretrained(tmp_path / "one")
    data = (tmp_path / "one" / "model.safetensors").read_bytes()
    st.write_bytes(data[: len(data) // 2])
    bad["truncated safetensors"] = st
    pt = tmp_path / "trunc.pt"
    torch.save(sd, pt)
    pt.write_bytes(pt.read_bytes()[:2000])
    bad["truncated zip"] = pt
    (tmp_path / "junk.pt").write_bytes(
        os.urandom(64).replace(b"PK", b"xx").replace(b"\x80", b"\x00") + b"junk"
    )
    bad["junk bytes"] = tmp_path / "junk.pt"
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    shards[1].unlink()
    bad["index with a missing shard"] = tmp_path / "hf"

    for name in ("dcp-data", "dcp-meta"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp_save({"model": sd}, tmp_path / name)
    data = next((tmp_path / "dcp-data").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:1000])
    bad["truncated DCP data"] = tmp_path / "dcp-data"
    (tmp_path / "dcp-meta" / ".metadata").write_bytes(b"\x80\x04garbage")
    bad["corrupt DCP metadata"] = tmp_path / "dcp-meta"
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text("{not json")
    bad["corrupt index"] = tmp_path / "idx"
    return bad


def test_errors_are_one_line_naming_the_path(llama, tmp_path, capsys):
    bad = corrupt_inputs(tmp_path, llama)
    capsys.readouterr()  # save_pretrained's progress bars
    for what, path in bad.items():
        rc, out, err = run_cli([path], capsys)
        assert rc == 2, what
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("htmuon esd: error:"), (what, err)
        named = str(path) if what != "index with a missing shard" else "model-0000"
        assert named in lines[0], (what, lines[0])
        assert "Traceback" not in err


def test_unwritable_outputs_are_one_line_errors_before_the_analysis(tmp_path, capsys):
    torch.save(nn.Linear(32, 48).state_dict(), tmp_path / "w.pt")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for flag in ("--plot", "--csv"):
        for out_path, why in (
            (tmp_path / "afile" / "x.out", "is not a folder"),
            (tmp_path / "adir", "is a folder"),
        ):
            rc, out, err = run_cli([tmp_path / "w.pt", flag, out_path], capsys)
            assert rc == 2 and out == "", (flag, out_path)
            assert err.strip().count("\n") == 0 and flag in err and str(out_path) in err and why in err


def test_a_missing_optional_package_is_a_one_line_error_before_the_analysis(tmp_path, capsys, monkeypatch):
    """Without safetensors (``pip install htmuon`` alone) a safetensors target is a one-line error, not an
    ImportError traceback; without matplotlib, --plot is refused before the analysis, not after it."""
    import importlib.util
    import sys

    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(48, 32)}, tmp_path / "model.safetensors")
    torch.save(nn.Linear(32, 48).state_dict(), tmp_path / "w.pt")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    rc, out, err = run_cli([tmp_path / "model.safetensors"], capsys)
    assert rc == 2 and out == "" and err.strip().count("\n") == 0 and "pip install htmuon[checkpoints]" in err

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    monkeypatch.setattr(esd, "analyze", lambda *a, **k: pytest.fail("analysed before refusing --plot"))
    rc, out, err = run_cli([tmp_path / "w.pt", "--plot", tmp_path / "a.png"], capsys)
    assert rc == 2 and out == "" and "--plot needs matplotlib" in err and err.strip().count("\n") == 0


def test_write_failures_after_the_analysis_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Disk full / read-only while writing (after the up-front check passed): one line naming the path."""
    import errno

    from htmuon.diagnostics import plots
    from htmuon.diagnostics.esd import ESDReport

    torch.save(nn.Linear(32, 48).state_dict(), tmp_path / "w.pt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ESDReport, "to_csv", full)
    monkeypatch.setattr(plots, "_save", full)
    for flag in ("--csv", "--plot"):
        out_path = tmp_path / f"out{flag}.png"  # a suffix --plot writes (an unknown one is refused first)
        rc, out, err = run_cli([tmp_path / "w.pt", flag, out_path], capsys)
        assert rc == 2 and err.strip().count("\n") == 0, err
        assert f"cannot write {flag} '{out_path}': No space left on device" in err


def test_an_htmuon_training_checkpoint_is_verified_before_its_weights_are_analysed(tmp_path):
    """A run folder's ckpt.pt carries a SHA-256 trailer: a changed byte in a weight is refused, as
    resuming refuses it, not analysed into a wrong alpha (it was: the embedding's alpha 3.5 -> 1.0)."""
    from htmuon.train import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Linear(60, 50))
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run / checkpoint.CKPT_NAME, {"model": model.state_dict(), "step": 3})
    want = analyze(run).mean_alpha
    assert want == pytest.approx(analyze(model).mean_alpha)
    data = bytearray((run / checkpoint.CKPT_NAME).read_bytes())
    at = data.index(model[0].weight.detach().numpy().tobytes()[:64]) + 100  # inside the first weight
    data[at] ^= 0x40
    (run / checkpoint.CKPT_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is corrupt: its content does not match its SHA-256"):
        analyze(run)


def test_an_htmuon_checkpoint_with_a_damaged_or_cut_trailer_is_refused(tmp_path, capsys):
    """An htmuon checkpoint whose checksum trailer is damaged (one bit of its magic flipped) or cut
    (its last 40 bytes gone) is refused as resuming refuses it; it was read unverified, so a weight
    changed beside the flipped trailer gave a wrong alpha without a word. A whole archive without the
    trailer (saved again by torch.save, or the trailer cut off exactly) and a checkpoint from before
    checksums (v1) are read with a note; a plain .pt is untouched."""
    from htmuon.train import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Linear(60, 50))
    good = tmp_path / "good.pt"
    checkpoint.save(good, {"model": model.state_dict(), "step": 3})
    want = analyze(good).mean_alpha
    data = good.read_bytes()
    assert data[-checkpoint.TRAILER_LEN :].startswith(checkpoint.TRAILER_MAGIC)

    flipped = bytearray(data)
    flipped[-70] ^= 0x01  # one bit of the trailer's magic
    both = bytearray(flipped)
    at = both.index(model[1].weight.detach().numpy().tobytes()[:64])
    for i in range(at, at + 60 * 50 * 4, 4):  # and every weight of the second layer scaled by 2^+-1
        both[i + 3] ^= 0x01
    cases = {
        "flipped trailer": bytes(flipped),
        "last 40 bytes cut": data[:-40],
        "weights and trailer flipped": bytes(both),
    }
    assert torch.load(io.BytesIO(cases["weights and trailer flipped"]), weights_only=True)["step"] == 3
    damaged = "is damaged or truncated (no checksum trailer at its end)"
    for what, content in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.pt"
        path.write_bytes(content)
        at = re.escape(str(path))
        if what == "weights and trailer flipped":
            # the changed weights fail their record's CRC-32, checked before the trailer's absence is
            # (the archive's folder name inside the zip is torch's choice)
            why = rf"cannot read '{at}': it is corrupt: its record '[^']*/data/2' fails its CRC-32"
        else:
            why = rf"checkpoint '{at}' " + re.escape(damaged)
        with pytest.raises(ValueError, match=why):
            analyze(path)
        rc, out, err = run_cli([path], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "" and len(lines) == 1, (what, err)
        assert lines[0].startswith("htmuon esd: error:") and str(path) in lines[0], (what, err)
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(damaged)):  # as resume refuses it
            checkpoint.load(path)
    # a whole archive without the trailer (the checkpoint saved again by torch.save, its optimizer state
    # dropped; or the trailer cut off exactly) is read with a note; resuming refuses it
    for name, content in (("resaved.pt", None), ("trailer-cut-off.pt", data[: -checkpoint.TRAILER_LEN])):
        path = tmp_path / name
        if content is None:
            torch.save(
                {k: v for k, v in torch.load(good, weights_only=True).items() if k != "optimizer"}, path
            )
        else:
            path.write_bytes(content)
        rep = analyze(path)
        assert rep.mean_alpha == want
        assert any(
            f"{name}: an htmuon checkpoint without its checksum trailer" in n for n in rep.meta["notes"]
        )
        with pytest.raises(checkpoint.CheckpointError, match="lost its checksum trailer"):
            checkpoint.load(path)
    # a v1 checkpoint (before checksums: a bare torch.save archive) is read, and the report says unverified
    torch.save(
        {"format": checkpoint.FORMAT_UNCHECKED, "model": model.state_dict(), "step": 3}, tmp_path / "v1.pt"
    )
    rep = analyze(tmp_path / "v1.pt")
    assert rep.mean_alpha == want
    assert "v1.pt: no checksum (an older htmuon wrote it): read unverified" in rep.meta["notes"]
    # a plain torch.save file, with or without a "format" key of its own, is no htmuon checkpoint
    torch.save({"format": "mine", "model": model.state_dict()}, tmp_path / "plain.pt")
    rep = analyze(tmp_path / "plain.pt")
    assert rep.mean_alpha == want and not rep.meta.get("notes")


def test_a_checkpoint_replaced_while_open_is_refused_not_read(tmp_path):
    """The reader re-opens a torch.save file per batch of layers: a file written over it meanwhile (a
    training job saving its next checkpoint) is refused, not read unverified as the rest of the layers."""
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(40, 60).state_dict(), path)
    with open_checkpoint(path) as ckpt:
        other = tmp_path / "next.pt"
        torch.save(nn.Linear(40, 60).state_dict(), other)
        os.replace(other, path)
        with pytest.raises(ValueError, match=r"changed while being read"):
            analyze(ckpt)


# ----------------------------------------------------------------------------- inputs a user has


def test_lightning_checkpoint_of_a_compiled_or_wrapped_submodule(tmp_path):
    """A LightningModule holding ``self.model = torch.compile(net)`` saves keys ``model._orig_mod.*``:
    both prefixes are removed, so the layers are named as the module's (they kept ``_orig_mod.``)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32))
    ref = analyze(net)
    for inner in ("_orig_mod.", "module."):
        sd = {f"model.{inner}{k}": v for k, v in net.state_dict().items()}
        path = tmp_path / f"{inner.strip('.')}.ckpt"
        torch.save({"state_dict": sd, "pytorch-lightning_version": "2.6.6", "epoch": 0}, path)
        rep = analyze(path)
        assert rep.alphas == pytest.approx(ref.alphas, rel=1e-12), inner
        assert f"removed key prefix {inner!r}" in rep.meta["notes"]


def test_cut_archive_lfs_pointer_and_optimizer_only_files_say_what_they_are(tmp_path, capsys):
    """One line naming the file and what is wrong with it: a torch.save archive cut short (miniz said
    'OSError: [Errno 22] Invalid argument'), a Git LFS pointer where the weights should be (a model
    repository cloned without git lfs), a file holding an optimizer's state_dict or other keys only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 32))
    torch.save(model.state_dict(), tmp_path / "whole.pt")
    ref = analyze(model)
    data = (tmp_path / "whole.pt").read_bytes()
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(lfs)
    (tmp_path / "pytorch_model.bin").write_bytes(lfs)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 40)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.save({"optimizer": opt.state_dict(), "step": 1}, tmp_path / "opt-step.pt")
    cases = {
        "git-lfs-folder": (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", "Git LFS pointer"),
        "git-lfs-bin": (tmp_path / "pytorch_model.bin", None, "git lfs pull"),
        "optimizer": (tmp_path / "opt.pt", None, "an optimizer's state_dict: no model weights"),
        "other keys": (tmp_path / "opt-step.pt", None, "holds a dict with keys 'optimizer', 'step'"),
    }
    for cut in (2000, 5000, len(data) // 2, len(data) - 1):
        (tmp_path / f"cut{cut}.pt").write_bytes(data[:cut])
        cases[f"cut {cut}"] = (tmp_path / f"cut{cut}.pt", None, "the zip archive is cut short")
    for what, (target, named, why) in cases.items():
        with pytest.raises(ValueError, match=re.escape(why)):
            analyze(target)
        rc, out, err = run_cli([target], capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and out == "" and len(lines) == 1, (what, err)
        assert str(named or target) in lines[0] and why in lines[0], (what, lines[0])
    assert analyze(tmp_path / "whole.pt").alphas == pytest.approx(ref.alphas, rel=1e-12)  # the uncut one


def test_a_file_and_its_folder_get_distinct_labels(tmp_path):
    """`htmuon esd run/ckpt.prev.pt run` labelled both '<whole path>/run#1', '#2'; the file's name tells
    them apart."""
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    for f in ("ckpt.pt", "ckpt.prev.pt"):
        (run / f).write_bytes(b"")
    assert target_labels([f"{run}/ckpt.prev.pt", str(run)]) == ["run/ckpt.prev.pt", "run"]
    assert target_labels([str(run), f"{run}/ckpt.pt", f"{run}/ckpt.prev.pt"]) == [
        "run",
        "run/ckpt.pt",
        "run/ckpt.prev.pt",
    ]


def test_cli_missing_path_with_a_colon_is_named_as_missing(tmp_path, capsys):
    """`htmuon esd runs/exp:1` (a missing folder) said "cannot import module 'runs/exp'"."""
    rc, out, err = run_cli([tmp_path / "runs" / "exp:1"], capsys)
    assert rc == 2 and f"no such checkpoint file or folder: '{tmp_path}/runs/exp:1'" in err, err


def test_alpha_tracker_refuses_bad_options_when_made_not_at_its_first_analysis():
    """AlphaTracker(every=1000, method="bogus") (or a misspelt keyword, a bad regex) was accepted and
    failed at step 0 -- or at step 1000, hours into a run whose loop counts from 1."""
    from htmuon.diagnostics import AlphaTracker

    for kwargs, err, match in (
        ({"method": "bogus"}, ValueError, "Invalid method: 'bogus'"),
        ({"lyers": "x"}, TypeError, "unexpected keyword argument 'lyers'"),
        ({"layers": "("}, ValueError, "Invalid layers regex '\\('"),
        ({"dtype": torch.float16}, ValueError, "Invalid dtype"),
        ({"conv1d": "taps"}, ValueError, "Invalid conv1d: 'taps'"),
        ({"max_N": -1}, ValueError, "Invalid max_N: -1"),
        ({"callback": "wandb"}, TypeError, "callback must be callable"),
    ):
        with pytest.raises(err, match=match):
            AlphaTracker(every=1000, **kwargs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32))
    tracker = AlphaTracker(every=2, layers=r"^2$", method="svd", dtype=torch.float64)
    assert tracker(model, 1) is None
    rec = tracker(model, 2)
    assert list(rec["alphas"]) == ["2"]
    assert rec["alphas"]["2"] == pytest.approx(analyze(model, method="svd").alphas["2"], rel=1e-12)


def test_deepspeed_model_states_file(tmp_path):
    """DeepSpeed's ``global_stepN/mp_rank_00_model_states.pt`` keeps the weights under ``"module"``
    (beside ``buffer_names``, ``ds_config``, ...): it was refused as a dict without a state_dict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16)
    state = {
        "module": model.state_dict(),
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [{k: v.shape for k, v in model.named_parameters()}],
        "global_steps": 10,
        "ds_config": {"train_batch_size": 8},
        "ds_version": "0.16.0",
    }
    (tmp_path / "global_step10").mkdir()
    torch.save(state, tmp_path / "global_step10" / "mp_rank_00_model_states.pt")
    rep = analyze(tmp_path / "global_step10")
    assert rep.alphas == pytest.approx(analyze(model).alphas, rel=1e-12) and len(rep) == 2


def test_a_checkpoint_of_meta_tensors_is_a_one_line_error_naming_it(tmp_path, capsys):
    """A state_dict saved from a model built on the meta device (never loaded) ended in a traceback,
    "Tensor.item() cannot be called on meta tensors"; an error raised while reading a batch lost the
    opening quote of its path ("w.pt': ...")."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 32))
    path = tmp_path / "meta.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match="tensor '0.weight' is on the meta device and holds no values"):
        analyze(path)
    rc, out, err = run_cli([path], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"htmuon esd: error: '{path}': tensor '0.weight' is on the meta device"), err


def _pickle_span(path):
    """Where the bytes of a torch.save archive's data.pkl record lie in the file, and those bytes."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        pkl = z.read(info)
    head = Path(path).read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, pkl


def test_a_damaged_pickle_in_a_torch_archive_is_refused_as_corrupt_not_skipped(tmp_path, capsys):
    """One changed byte in a torch.save archive's pickle (the tensors' names, shapes, storages) was read
    as it came: a key '0.weight' changed to '0.weighs' silently dropped that layer from the report,
    and a damaged opcode was reported as code that would run, with advice to pass allow_pickle=True.
    The pickle record is checked against its CRC-32 (torch.load does not) when the file is opened."""
    torch.manual_seed(0)
    sd = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 16)).state_dict()
    torch.save(sd, tmp_path / "whole.pt")
    assert sorted(analyze(tmp_path / "whole.pt").alphas) == ["0", "1"]
    start, pkl = _pickle_span(tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    renamed = bytearray(data)
    at = start + pkl.index(b"0.weight")
    renamed[at : at + 8] = b"0.weighs"
    (tmp_path / "renamed.pt").write_bytes(renamed)
    opcode = bytearray(data)
    opcode[start + pkl.index(b"ctorch._utils")] = 0x09  # GLOBAL -> no opcode at all
    (tmp_path / "opcode.pt").write_bytes(opcode)
    for name in ("renamed.pt", "opcode.pt"):
        path = tmp_path / name
        with pytest.raises(ValueError, match=r"corrupt.*data\.pkl.*CRC-32") as e:
            analyze(path)
        assert str(path) in str(e.value) and "allow_pickle" not in str(e.value)
        rc, out, err = run_cli([path], capsys)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "CRC-32" in err


def _record_span(path, name):
    """Where the bytes of a torch.save archive's record ``name`` (its path's last part) lie."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.split("/")[-1] == name)
    head = Path(path).read_bytes()[info.header_offset : info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, info.file_size


def test_a_changed_byte_in_a_tensors_data_is_refused_as_corrupt(tmp_path, capsys):
    """Only the pickle record was checked against its CRC-32: one changed byte in a tensor's data
    (torch.load checks none) changed that layer's alpha without a word. Every record is checked now."""
    torch.manual_seed(0)
    sd = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 16)).state_dict()
    torch.save(sd, tmp_path / "whole.pt")
    data = bytearray((tmp_path / "whole.pt").read_bytes())
    # the archive names its storages 0, 1, ... in the order its pickle meets them: 0.weight's is "0"
    start, size = _record_span(tmp_path / "whole.pt", "0")
    assert size == sd["0.weight"].untyped_storage().nbytes()
    data[start + size // 2] ^= 0x40  # one bit of one float of 0.weight
    (tmp_path / "flipped.pt").write_bytes(data)
    flipped = torch.load(tmp_path / "flipped.pt")  # torch.load reads it: only 0.weight differs
    assert not torch.equal(flipped["0.weight"], sd["0.weight"])
    assert all(torch.equal(flipped[k], sd[k]) for k in sd if k != "0.weight")
    with pytest.raises(ValueError, match=r"corrupt.*data/0.*CRC-32") as e:
        analyze(tmp_path / "flipped.pt")
    assert str(tmp_path / "flipped.pt") in str(e.value)
    rc, out, err = run_cli([tmp_path / "flipped.pt"], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "CRC-32" in err


def test_an_archive_saved_without_crcs_is_read_and_the_notes_say_it_was_not_checked(tmp_path):
    """torch.serialization.set_crc32_options(False) stores CRC 0 for every record; such a file (which
    torch.load reads) was refused as corrupt by the pickle's CRC check. It is analysed, with a note."""
    torch.manual_seed(0)
    sd = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 16)).state_dict()
    torch.save(sd, tmp_path / "crc.pt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    with_crc = analyze(tmp_path / "crc.pt")
    without = analyze(tmp_path / "nocrc.pt")
    assert without.alphas == with_crc.alphas and "notes" not in with_crc.meta
    notes = " ".join(without.meta["notes"])
    assert "without a CRC-32" in notes and "set_crc32_options(False)" in notes


def test_a_truncated_dcp_metadata_file_is_called_corrupt_not_code(tmp_path):
    """A .metadata pickle cut short was refused with 'pickle data was truncated; if you trust the file,
    pass allow_pickle=True', as if it named foreign classes; it is corrupt, and plain pickle would not
    read it either."""
    torch.manual_seed(0)
    dcp_save({"model": nn.Linear(24, 32).state_dict(), "step": 1}, tmp_path / "dcp")
    meta = tmp_path / "dcp" / ".metadata"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"\.metadata.*corrupt or truncated") as e:
        analyze(tmp_path / "dcp")
    assert "allow_pickle" not in str(e.value)


def test_cli_empty_output_path_is_an_error_not_a_silent_no_op(tmp_path, capsys):
    """`htmuon esd ckpt.pt --csv "$OUT"` with OUT unset gave --csv '': the table was printed, no file
    written, exit 0. Now one line, exit 2, before the checkpoint is read."""
    torch.save(nn.Linear(30, 20).state_dict(), tmp_path / "w.pt")
    for flag in ("--csv", "--plot"):
        rc, out, err = run_cli([tmp_path / "w.pt", flag, ""], capsys)
        assert rc == 2 and err.strip() == f"htmuon esd: error: {flag} needs a file name, got ''", err
        assert out == ""
